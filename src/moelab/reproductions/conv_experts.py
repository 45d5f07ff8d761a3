"""E seed-1 CNN experts computed together: ``ConvExperts(E)(x) -> (E, N, num_classes)`` logits (the CIFAR
seed's ten class-pair experts; a :class:`moelab.MoE` takes it as ``experts=``, it has ``num_experts``).

Storage is the same for every implementation: each tensor of :class:`~moelab.models.cifar_cnn.Seed1CNN`
is stacked along a new leading expert dimension under the same name (``trunk.conv1_1.weight`` is
``(E, 32, 3, 3, 3)``, ``trunk.bn1_1.running_mean`` is ``(E, 32)``, ``head.weight`` is ``(E, 10, 2048)``,
``trunk.bn1_1.num_batches_tracked`` is ``(E,)``). So ``state_dict()[k][i]`` is expert i's ``k``, the
checkpoint does not depend on ``impl``, and ``impl`` may be changed at any time.

Implementations (``impl``):

* ``"separate"``: the reference. A loop running the :class:`Seed1CNN` module code once per expert on
  views of the stacked tensors (``torch.func.functional_call``); exactly what an ``nn.ModuleList`` of
  E CNNs computes (:meth:`ConvExperts.to_modules` gives that ModuleList).
* ``"grouped"``: one network of E*C channels. The first conv shares its input, so it is one ordinary
  conv with E*32 output channels (the E first kernels stacked); later convs use ``groups=E``;
  BatchNorm over E*C channels equals E per-expert BNs (BN is per channel); ELU, max-pool and dropout
  act per element/channel; the heads are one batched matmul (baddbmm) over ``(E, num_classes, 2048)``.
* ``"vmap"``: ``torch.func.vmap`` of ``functional_call`` over the stacked tensors (functorch turns a
  conv with batched weights into a grouped conv). Works in training mode too: the BN running stats are
  vmapped along with the parameters, so their in-place update lands in each expert's slice. Dropout
  draws independent masks per expert (``randomness="different"``). The slowest here (2-4x slower than
  separate on CPU); kept as an alternative formulation and cross-check.
* ``"auto"``: per call, a fixed choice (not timed at run time, so runs stay reproducible) by device,
  compute dtype (the autocast dtype if autocast is on) and train/eval mode, from benchmarks: see
  :data:`AUTO_TABLE`. On CPU that is ``"separate"`` throughout.

All three compute the same function (tests check outputs, gradients and BN running stats in float64);
dropout masks differ between implementations (same distribution). Inputs may be channels_last and run
under ``torch.autocast``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from moelab.errors import MoelabError
from moelab.models.cifar_cnn import IMAGE_SIZE, L2_COEF, Seed1CNN, check_positive_int, conv_l2_penalty

IMPLS = ("auto", "grouped", "separate", "vmap")

# "auto" choice per (device type, compute dtype, training). Measured with `moelab bench conv` (batch 256,
# 10 experts, channels_last, torch 2.13) on a 2-core AVX-512-bf16 CPU shared with other jobs, so compared
# on process CPU time at 1 thread (cpu ms/batch, grouped vs separate): fp32 infer 4311 vs 3679, fp32 train
# 11363 vs 8675, bf16 infer 2612 vs 1682, bf16 train 6311 vs 5040; vmap 2-4x slower than separate. The
# loop of small convs wins: the grouped path's E-times-wider activations (170-340 MB per layer at batch
# 256) miss the caches, and glibc maps every block over 32 MB afresh, paying page faults on each layer
# (`tune_glibc_malloc` in moelab.bench.conv narrows but does not close the gap). torch.compile speeds both
# up ~1.3-1.5x and keeps the order (bf16 infer CPU s: separate 2.0 -> 1.5, grouped 2.5 -> 1.75; compiling
# the 10-expert loop takes minutes). At 2 threads with OMP_WAIT_POLICY=PASSIVE (no spin-waiting on
# descheduled neighbours) grouped/separate speed was 0.61x (bf16 infer) and 0.89x (bf16 train), matching
# an earlier quieter check (284 vs 518 images/s bf16 infer); only a 2-thread run with spinning OpenMP
# under heavy load favoured grouped (~1.3x: fewer barriers). So: separate everywhere on CPU.
AUTO_TABLE: dict[tuple[str, torch.dtype, bool], str] = {
    ("cpu", dtype, training): "separate"
    for dtype in (torch.float32, torch.bfloat16)
    for training in (False, True)
}
AUTO_DEFAULT = "separate"  # unmeasured devices/dtypes (e.g. CUDA: run `moelab bench conv --device cuda`)


class _Stack(nn.Module):
    """Holds one layer's stacked tensors; the repr shows their shapes."""

    def extra_repr(self) -> str:
        items = list(self._parameters.items()) + list(self._buffers.items())
        return ", ".join(f"{k}={tuple(v.shape)}" for k, v in items if v is not None)


class ConvExperts(nn.Module):
    """E seed-1 CNN experts: ``forward(x: (N, in_channels, 32, 32)) -> (E, N, num_classes)`` logits."""

    def __init__(
        self,
        num_experts: int,
        num_classes: int = 10,
        width: int = 32,
        in_channels: int = 3,
        dropout: Sequence[float] = (0.2, 0.3, 0.4),
        impl: str = "auto",
    ):
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.impl = impl
        # One expert's definition, holding no data (meta device), kept out of the module tree: the
        # separate/vmap paths run its code on the stacked tensors, the grouped path reads its layers.
        template = Seed1CNN(num_classes, width, in_channels, dropout).to("meta")
        object.__setattr__(self, "_template", template)
        self.num_classes, self.width, self.in_channels = num_classes, width, in_channels
        self.dropout = template.dropout
        # Independent Keras-style initialisation per expert, stacked.
        experts = [Seed1CNN(num_classes, width, in_channels, dropout) for _ in range(num_experts)]
        for name, _ in template.named_parameters():
            self._put(name, nn.Parameter(torch.stack([m.get_parameter(name).detach() for m in experts])))
        for name, _ in template.named_buffers():
            self._put(name, torch.stack([m.get_buffer(name) for m in experts]))

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        *path, leaf = name.split(".")
        m: nn.Module = self
        for p in path:
            if p not in m._modules:
                m.add_module(p, _Stack())
            m = m._modules[p]
        if isinstance(tensor, nn.Parameter):
            m.register_parameter(leaf, tensor)
        else:
            m.register_buffer(leaf, tensor)

    # --- configuration ------------------------------------------------------------------------

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise MoelabError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {value!r}")
        self._impl = value

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_classes={self.num_classes}, width={self.width}, impl={self.impl!r}"

    def to(self, *args, **kwargs) -> ConvExperts:
        """As ``nn.Module.to``, but ``memory_format`` is accepted and ignored: the stacked conv kernels are
        5-D (no channels_last form) and the input's format is what selects the channels_last kernels."""
        kwargs.pop("memory_format", None)
        return super().to(*args, **kwargs)

    def train(self, mode: bool = True) -> ConvExperts:
        super().train(mode)
        self._template.train(mode)
        return self

    def resolve_impl(self, x: torch.Tensor) -> str:
        """The implementation a forward on ``x`` uses now (resolves ``"auto"``)."""
        if self.impl != "auto":
            return self.impl
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.head.weight.dtype
        return AUTO_TABLE.get((dev, dtype, self.training), AUTO_DEFAULT)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise MoelabError(
                f"ConvExperts expects images of shape (N, {self.in_channels}, {IMAGE_SIZE}, {IMAGE_SIZE}); "
                f"got {tuple(x.shape)}"
            )
        impl = self.resolve_impl(x)
        if impl == "grouped":
            return self._forward_grouped(x)
        if impl == "vmap":
            return self._forward_vmap(x)
        return self._forward_separate(x)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    def _forward_separate(self, x: torch.Tensor) -> torch.Tensor:
        t = self._tensors()
        outs = [
            functional_call(self._template, {k: v[e] for k, v in t.items()}, (x,))
            for e in range(self.num_experts)
        ]
        return torch.stack(outs)  # (E, N, K)

    def _forward_vmap(self, x: torch.Tensor) -> torch.Tensor:
        params, buffers = dict(self.named_parameters()), dict(self.named_buffers())

        def one(p, b):
            return functional_call(self._template, (p, b), (x,))

        out = vmap(one, randomness="different")(params, buffers)  # (E, N, K)
        dev = x.device.type  # vmap splits the batched linear into matmul + add, so autocast leaves fp32
        return out.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else out

    def _forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        E, t, h = self.num_experts, self._tensors(), x  # h: (N, in_channels, H, W), shared by all experts
        first = True
        for name, layer in self._template.trunk.named_children():
            key = f"trunk.{name}."
            if isinstance(layer, nn.Conv2d):
                w, b = t[key + "weight"], t[key + "bias"]  # (E, C_out, C_in, 3, 3), (E, C_out)
                # first conv: plain conv, E*C_out outputs from the shared input; then one group per expert
                h = F.conv2d(
                    h, w.flatten(0, 1), b.flatten(), layer.stride, layer.padding, groups=1 if first else E
                )
                first = False  # h: (N, E*C_out, H, W), expert-major channels
            elif isinstance(layer, nn.BatchNorm2d):
                if self.training:
                    t[key + "num_batches_tracked"].add_(1)
                # view(-1) (not flatten/reshape) so the in-place running-stat update reaches the buffers
                h = F.batch_norm(
                    h,
                    t[key + "running_mean"].view(-1),
                    t[key + "running_var"].view(-1),
                    t[key + "weight"].view(-1),
                    t[key + "bias"].view(-1),
                    self.training,
                    layer.momentum,
                    layer.eps,
                )
            else:  # ELU, max-pool, dropout: elementwise or per channel, so the same for E*C channels
                h = layer(h)
        h = h.reshape(h.shape[0], E, -1)  # (N, E*C, 4, 4) -> (N, E, F), each expert flattened (C, 4, 4)
        w, b = t["head.weight"], t["head.bias"]  # (E, K, F), (E, K)
        # batched dense: b + (E, N, F) @ (E, F, K); one op, so autocast gives bf16 logits like nn.Linear
        return torch.baddbmm(b[:, None], h.transpose(0, 1), w.transpose(1, 2))  # (E, N, K)

    # --- regularisation -----------------------------------------------------------------------

    def conv_kernels(self) -> Iterator[torch.Tensor]:
        """The stacked conv kernels (E, C_out, C_in, 3, 3), one per conv layer."""
        for name, layer in self._template.trunk.named_children():
            if isinstance(layer, nn.Conv2d):
                yield self.get_parameter(f"trunk.{name}.weight")

    def l2_penalty(self, coef: float = L2_COEF) -> torch.Tensor:
        """Sum over experts of each expert's Keras L2 penalty ``coef * sum(w**2)`` on conv kernels."""
        return conv_l2_penalty(self, coef)

    # --- conversion to/from per-expert modules ------------------------------------------------

    def _check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not -self.num_experts <= i < self.num_experts:
            raise MoelabError(f"expert index must be an integer in [0, {self.num_experts}); got {i!r}")
        return i % self.num_experts

    def expert_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Expert i's tensors as a :class:`Seed1CNN` state dict (copies, detached)."""
        i = self._check_index(i)
        return {k: v[i].detach().clone() for k, v in self.state_dict().items()}

    def load_expert_state_dict(self, i: int, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy a :class:`Seed1CNN` state dict into expert i (strict: same keys and shapes)."""
        i = self._check_index(i)
        t = self._tensors()
        missing, unexpected = sorted(set(t) - set(state_dict)), sorted(set(state_dict) - set(t))
        if missing or unexpected:
            raise MoelabError(
                f"expert state dict does not fit: missing keys {missing}, unexpected keys {unexpected}"
            )
        for k, v in state_dict.items():
            if tuple(v.shape) != tuple(t[k].shape[1:]):
                raise MoelabError(
                    f"expert state dict key {k!r} has shape {tuple(v.shape)}, expected {tuple(t[k].shape[1:])}"
                )
        with torch.no_grad():
            for k, v in state_dict.items():
                t[k][i].copy_(v)

    @classmethod
    def from_modules(cls, modules: Sequence[Seed1CNN], impl: str = "auto") -> ConvExperts:
        """Stack E same-shaped :class:`Seed1CNN` (e.g. pretrained experts) into one ConvExperts, on the
        first module's device and dtype and in its train/eval mode."""
        modules = list(modules)
        if not modules or not all(isinstance(m, Seed1CNN) for m in modules):
            raise MoelabError(f"from_modules needs a non-empty sequence of Seed1CNN; got {modules!r}")
        cfgs = {(m.num_classes, m.width, m.in_channels, m.dropout) for m in modules}
        if len(cfgs) > 1:
            raise MoelabError(
                f"from_modules needs identically configured experts; got configurations {sorted(cfgs)}"
            )
        if any(m.head_activation is not None for m in modules):
            raise MoelabError("from_modules: ConvExperts has no head activation; got Seed1CNN with one")
        num_classes, width, in_channels, dropout = cfgs.pop()
        ref = modules[0].head.weight
        experts = cls(len(modules), num_classes, width, in_channels, dropout, impl).to(ref.device, ref.dtype)
        for i, m in enumerate(modules):
            experts.load_expert_state_dict(i, m.state_dict())
        return experts.train(modules[0].training)

    def to_modules(self) -> nn.ModuleList:
        """The experts as an ``nn.ModuleList`` of independent :class:`Seed1CNN` (copies), same device,
        dtype and train/eval mode."""
        ref = self.head.weight
        mods = nn.ModuleList()
        for i in range(self.num_experts):
            m = Seed1CNN(self.num_classes, self.width, self.in_channels, self.dropout).to(
                ref.device, ref.dtype
            )
            m.load_state_dict(self.expert_state_dict(i))
            mods.append(m.train(self.training))
        return mods
