"""The MLP mixture of seed experiment 2 (Jacobs et al. 1991 style), faithful and modern.

Faithful (:class:`SeedMixture`, :class:`SeedMLP`)
--------------------------------------------------
The seed's NumPy network, with the seed's *literal parameter layout*, so a parameter of this module is
the seed's array of the same shape and meaning:

* inputs carry a leading bias column of ones: ``x`` is ``(N, 1 + 196)``;
* ``expert_hidden`` ``(E, 197, 25)`` (the seed's ``expert_l2_weights``; row 0 is the bias),
  ``expert_output`` ``(E, 26, 10)`` (``expert_l3_weights``; row 0 is the bias), sigmoid hidden and output;
* ``gate_hidden`` ``(197, 25)`` (``gating_l2_weights``), sigmoid, ``gate_softmax`` ``(26, 10)``
  (``gating_softmax_weights``), softmax over the E experts;
* weights uniform in [-0.5, 0.5) (``np.random.random(shape) - 0.5``);
* output ``sum_i g_i o_i``; loss (Jacobs' competitive loss, the seed's ``mean_squared_error_ME``)
  ``0.5 * sum_i g_i ||y - o_i||^2`` averaged over examples.

The layout is kept (rather than ``nn.Linear`` + separate bias) because it makes the faithfulness test a
line-by-line comparison with the seed's arrays.

The seed's hand-written gradient (``gradient_ME``) is *not* the gradient of its loss for the gate: it
forms the softmax delta as ``g * (e - sum_j g_j e_j)`` with ``e = ||y - o||^2``, without the loss's
factor 0.5, so every gate update is twice the gradient. (Its expert gradients are exact.) The seed's
training is therefore plain gradient descent with learning rate ``lr`` on the experts and ``2 * lr`` on
the gate. :func:`seed_mixture_gradients` reproduces that with ``gate_grad_scale=2.0`` (the default) and
gives the true gradient with ``gate_grad_scale=1.0``; autograd on :meth:`SeedMixture.loss` gives the true
gradient. The single network (:class:`SeedMLP`, the seed's benchmark NN) uses the seed's
``0.5 * sum (o - y)^2 / N`` and its gradient is exact.

:func:`seed_mixture_gradients` / :func:`seed_mlp_gradients` compute the full-batch loss and gradient by
hand, in blocks of examples with preallocated buffers (no autograd graph over 60000 x 275 activations):
the seed's 3000 full-batch epochs take minutes instead of an hour.

Modern (:func:`mlp_mixture`, :func:`mlp`)
-----------------------------------------
The same parameter budget (E experts ``in-hidden-classes`` and an ``in-hidden-E`` gate, biases as usual)
built from :class:`moelab.moe.MLPExperts`, producing logits for cross-entropy-type losses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe import MLPExperts, MoE

SEED_HIDDEN = 25
SEED_CLASSES = 10


def _uniform_seed_init(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """``np.random.random(shape) - 0.5``: uniform in [-0.5, 0.5)."""
    return torch.rand(shape, generator=generator, dtype=dtype) - 0.5


def add_bias_column(x: Tensor) -> Tensor:
    """``np.c_[np.ones((N, 1)), x]``."""
    return torch.cat([torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device), x], dim=1)


def _check_dims(**dims: int) -> None:
    for name, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MoelabError(f"{name} must be an integer >= 1, got {v!r}")


class SeedMLP(nn.Module):
    """The seed's benchmark network: ``(N, 1 + in_dim)`` biased input -> sigmoid hidden -> sigmoid outputs."""

    def __init__(self, in_dim: int = 196, hidden_dim: int = SEED_HIDDEN, out_dim: int = SEED_CLASSES,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_dims(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
        self.hidden = nn.Parameter(_uniform_seed_init((in_dim + 1, hidden_dim), generator, dtype))
        self.output = nn.Parameter(_uniform_seed_init((hidden_dim + 1, out_dim), generator, dtype))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, 1 + in_dim) with the bias column -> (N, out_dim) sigmoid outputs (``feed_forward``)."""
        h = torch.sigmoid(x @ self.hidden)
        return torch.sigmoid(torch.addmm(self.output[0], h, self.output[1:]))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The seed's ``mean_squared_error``: ``0.5 * sum (o - y)^2 / N`` (``y`` one-hot)."""
        return 0.5 * ((self(x) - y) ** 2).sum() / x.shape[0]


class SeedMixture(nn.Module):
    """The seed's mixture of E sigmoid MLP experts with a sigmoid-hidden softmax gate (seed layout)."""

    def __init__(self, num_experts: int = 10, in_dim: int = 196, hidden_dim: int = SEED_HIDDEN,
                 out_dim: int = SEED_CLASSES, gate_hidden_dim: int = SEED_HIDDEN,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_dims(num_experts=num_experts, in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim,
                    gate_hidden_dim=gate_hidden_dim)
        self.num_experts, self.in_dim, self.hidden_dim, self.out_dim = num_experts, in_dim, hidden_dim, out_dim
        # Same order as the seed's draws: gate hidden, gate softmax, expert hidden, expert output.
        self.gate_hidden = nn.Parameter(_uniform_seed_init((in_dim + 1, gate_hidden_dim), generator, dtype))
        self.gate_softmax = nn.Parameter(_uniform_seed_init((gate_hidden_dim + 1, num_experts), generator, dtype))
        self.expert_hidden = nn.Parameter(
            _uniform_seed_init((num_experts, in_dim + 1, hidden_dim), generator, dtype))
        self.expert_output = nn.Parameter(
            _uniform_seed_init((num_experts, hidden_dim + 1, out_dim), generator, dtype))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, "
                f"out_dim={self.out_dim}")

    def gates(self, x: Tensor) -> Tensor:
        """(N, 1 + in_dim) -> (N, E) softmax gate (``feed_forward_gating_NN``)."""
        h = torch.sigmoid(x @ self.gate_hidden)
        return torch.softmax(torch.addmm(self.gate_softmax[0], h, self.gate_softmax[1:]), dim=1)

    def experts(self, x: Tensor) -> Tensor:
        """(N, 1 + in_dim) -> (E, N, out_dim) sigmoid expert outputs."""
        e, d1, k = self.expert_hidden.shape
        h = torch.sigmoid(x @ self.expert_hidden.permute(1, 0, 2).reshape(d1, e * k))  # (N, E*k), one GEMM
        h = h.view(x.shape[0], e, k).transpose(0, 1)  # (E, N, k)
        return torch.sigmoid(torch.baddbmm(self.expert_output[:, :1], h, self.expert_output[:, 1:]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> (gates (N, E), expert outputs (E, N, out_dim))."""
        return self.gates(x), self.experts(x)

    @staticmethod
    def combine(gates: Tensor, outputs: Tensor) -> Tensor:
        """``hypothesis_ME``: ``sum_i g_i o_i`` -> (N, out_dim)."""
        return torch.einsum("ne,enc->nc", gates, outputs)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The seed's ``mean_squared_error_ME`` (Jacobs' competitive loss), ``y`` one-hot."""
        return jacobs_competitive_loss_seed(*self(x), y)


def jacobs_competitive_loss_seed(gates: Tensor, outputs: Tensor, y: Tensor) -> Tensor:
    """``0.5 * sum_n sum_i g_ni ||y_n - o_ni||^2 / N`` with gates (N, E), outputs (E, N, C), y (N, C)."""
    err = ((outputs - y) ** 2).sum(-1)  # (E, N)
    return 0.5 * (gates.T * err).sum() / y.shape[0]


# ------------------------------------------------------------------ fast full-batch gradients (by hand)
_BUFFERS: dict = {}  # work arrays, allocated once per (name, worker, shape, dtype)
_POOL: list = []  # a lazily created thread pool for ``workers > 1``


def _buffer(name: str, worker: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    key = (name, worker, shape, dtype)
    if key not in _BUFFERS:
        _BUFFERS[key] = torch.empty(shape, dtype=dtype)
    return _BUFFERS[key]


def _map_workers(fn, n: int, chunk: int, workers: int) -> list:
    """Run ``fn(starts, worker)`` on ``workers`` contiguous groups of the chunk starts; list of results.

    With ``workers > 1`` the groups run in Python threads (torch releases the GIL in every op), each op
    single-threaded (set ``torch.set_num_threads(1)``): the threads only meet once per call, so a core
    taken away by another process slows the epoch down but never stalls every op at a barrier, as
    intra-op threads do.
    """
    starts = list(range(0, n, chunk))
    workers = max(1, min(workers, len(starts)))
    groups = [starts[w * len(starts) // workers:(w + 1) * len(starts) // workers] for w in range(workers)]
    if workers == 1:
        return [fn(groups[0], 0)]
    from concurrent.futures import ThreadPoolExecutor

    if not _POOL or _POOL[0]._max_workers < workers:
        _POOL[:] = [ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moelab-seed-grad")]
    return list(_POOL[0].map(fn, groups, range(workers)))


def _argmax0(t: Tensor) -> Tensor:
    """``t.argmax(0)`` for a (rows, N) tensor, ten times faster on CPU through a contiguous transpose."""
    return t.T.contiguous().argmax(1)


@torch.no_grad()
def seed_mixture_gradients(model: SeedMixture, xt: Tensor, yt: Tensor, *, gate_grad_scale: float = 2.0,
                           chunk: int = 4096, lead_counts: bool = False, rows: Tensor | None = None,
                           workers: int = 1) -> dict:
    """Full-batch loss and the seed's gradient (``gradient_ME``), written into each parameter's ``.grad``.

    Inputs are *transposed* (examples along columns, so every per-expert block below is contiguous):
    ``xt`` (1 + in_dim, N) with the bias row of ones, ``yt`` (C, N) one-hot. The examples are processed
    in chunks of ``chunk`` columns with preallocated buffers; per chunk one GEMM computes all E expert
    hidden layers and the gate hidden layer together, a batched GEMM the E output layers, and the
    transposed GEMMs the gradients. ``gate_grad_scale=2.0`` reproduces the seed (see the module
    docstring), ``1.0`` gives the true gradient of :meth:`SeedMixture.loss`.

    ``rows`` (optional): the input rows ``xt`` holds, as indices into the 1 + in_dim rows of the hidden weights.
    Inputs that are 0 in every example (39 of MNIST 14x14's 196 pixels) can be left out: they add exactly 0
    to every hidden unit and their weights' gradient is exactly 0, so the result is the same, 20% cheaper.
    ``workers``: split the chunks over this many threads (see :func:`_map_workers`).

    Returns ``{"loss": float, "correct": int (mixture argmax == label), "lead_counts": (E,) tensor}``
    (lead counts only when ``lead_counts``).
    """
    E, k, C = model.num_experts, model.hidden_dim, model.out_dim
    kg = model.gate_hidden.shape[1]
    d1, n = xt.shape
    dt = xt.dtype
    w_e, w_g = model.expert_hidden, model.gate_hidden
    if rows is not None:
        w_e, w_g = w_e[:, rows], w_g[rows]
    # (E*k + kg, d1): rows e*k..e*k+k-1 are expert e's hidden units, the last kg rows the gate's.
    w_all_t = torch.cat([w_e.permute(0, 2, 1).reshape(E * k, d1), w_g.T], dim=0)
    width = E * k + kg
    v_e_t = model.expert_output.transpose(1, 2)  # (E, C, 1 + k)
    v_e_b, v_e_w = v_e_t[:, :, :1].contiguous(), v_e_t[:, :, 1:].contiguous()  # (E, C, 1), (E, C, k)
    v_g_b, v_g_w = model.gate_softmax[0].unsqueeze(1).contiguous(), model.gate_softmax[1:].T.contiguous()

    @torch.no_grad()  # grad mode is per thread
    def partial(starts: list[int], worker: int) -> dict:
        g_w_all_t = torch.zeros(width, d1, dtype=dt)
        g_ve_b, g_ve_w = torch.zeros(E, C, 1, dtype=dt), torch.zeros(E, C, k, dtype=dt)
        g_vg_b, g_vg_w = torch.zeros(E, 1, dtype=dt), torch.zeros(E, kg, dtype=dt)
        loss = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.long)
        leads = torch.zeros(E, dtype=torch.long)
        for i in starts:
            xc, yc = xt[:, i:i + chunk], yt[:, i:i + chunk]  # (d1, c), (C, c)
            c = xc.shape[1]
            a = _buffer("a", worker, (width, c), dt)
            torch.mm(w_all_t, xc, out=a)
            a.sigmoid_()  # hidden activations: E experts then the gate, (width, c)
            h_e = a[:E * k].view(E, k, c)
            h_g = a[E * k:]  # (kg, c)
            g = torch.addmm(v_g_b, v_g_w, h_g).softmax(dim=0)  # (E, c)
            o = torch.baddbmm(v_e_b, v_e_w, h_e).sigmoid_()  # (E, C, c)
            diff = o - yc  # (E, C, c)
            err = (diff * diff).sum(1)  # (E, c): ||y - o_i||^2
            collective = (g * err).sum(0)  # (c,): sum_i g_i e_i
            loss += 0.5 * collective.sum(dtype=torch.float64)
            if lead_counts:
                leads += torch.bincount(_argmax0(g), minlength=E)
            correct += (_argmax0((g.unsqueeze(1) * o).sum(0)) == _argmax0(yc)).sum()
            # output deltas g_i (o_i - y) o_i (1 - o_i); o is clobbered
            delta = diff.mul_(o).mul_(o.neg_().add_(1)).mul_(g.unsqueeze(1))  # (E, C, c)
            g_ve_w.baddbmm_(delta, h_e.transpose(1, 2))
            g_ve_b += delta.sum(2, keepdim=True)
            # gate softmax delta; the seed omits the loss's 0.5 (gate_grad_scale = 2)
            dsoft = g.mul_(err.sub_(collective)).mul_(0.5 * gate_grad_scale)  # (E, c)
            g_vg_w.addmm_(dsoft, h_g.T)
            g_vg_b += dsoft.sum(1, keepdim=True)
            # back to the hidden pre-activations: da = (W^T delta) * h * (1 - h)
            da = _buffer("da", worker, (width, c), dt)
            torch.bmm(v_e_w.transpose(1, 2), delta, out=da[:E * k].view(E, k, c))
            torch.mm(v_g_w.T, dsoft, out=da[E * k:])
            da.mul_(a)
            da.mul_(a.neg_().add_(1))
            g_w_all_t.addmm_(da, xc.T)
        return {"w": g_w_all_t, "ve_b": g_ve_b, "ve_w": g_ve_w, "vg_b": g_vg_b, "vg_w": g_vg_w, "loss": loss,
                "correct": correct, "leads": leads}

    parts = _map_workers(partial, n, chunk, workers)
    tot = {key: sum(p[key] for p in parts[1:]) + parts[0][key] for key in parts[0]}
    g_w_all_t = tot["w"] / n
    g_e, g_g = g_w_all_t[:E * k].view(E, k, d1).transpose(1, 2), g_w_all_t[E * k:].T
    if rows is not None:
        g_e = torch.zeros_like(model.expert_hidden).index_copy_(1, rows, g_e)
        g_g = torch.zeros_like(model.gate_hidden).index_copy_(0, rows, g_g)
    model.expert_hidden.grad = g_e.contiguous()
    model.gate_hidden.grad = g_g.contiguous()
    model.expert_output.grad = torch.cat([tot["ve_b"], tot["ve_w"]], dim=2).transpose(1, 2).contiguous() / n
    model.gate_softmax.grad = torch.cat([tot["vg_b"], tot["vg_w"]], dim=1).T.contiguous() / n
    return {"loss": float(tot["loss"]) / n, "correct": int(tot["correct"]), "lead_counts": tot["leads"]}


@torch.no_grad()
def seed_mlp_gradients(model: SeedMLP, xt: Tensor, yt: Tensor, *, chunk: int = 4096,
                       rows: Tensor | None = None, workers: int = 1) -> dict:
    """Full-batch loss and gradient of the seed's benchmark NN (``gradient_expert_NN``) into ``.grad``.

    Transposed inputs, ``rows`` and ``workers`` as in :func:`seed_mixture_gradients`: ``xt`` (1 + in_dim, N),
    ``yt`` (C, N).
    """
    d1, n = xt.shape
    dt = xt.dtype
    w_t = (model.hidden if rows is None else model.hidden[rows]).T.contiguous()  # (k, d1)
    v_b, v_w = model.output[0].unsqueeze(1).contiguous(), model.output[1:].T.contiguous()  # (C,1), (C,k)

    @torch.no_grad()  # grad mode is per thread
    def partial(starts: list[int], worker: int) -> dict:
        g_w_t = torch.zeros_like(w_t)
        g_v_b, g_v_w = torch.zeros_like(v_b), torch.zeros_like(v_w)
        loss = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.long)
        for i in starts:
            xc, yc = xt[:, i:i + chunk], yt[:, i:i + chunk]
            c = xc.shape[1]
            h = _buffer("mlp_h", worker, (w_t.shape[0], c), dt)
            torch.mm(w_t, xc, out=h).sigmoid_()
            o = torch.addmm(v_b, v_w, h).sigmoid_()  # (C, c)
            correct += (_argmax0(o) == _argmax0(yc)).sum()
            diff = o - yc
            loss += 0.5 * (diff * diff).sum(dtype=torch.float64)
            delta = diff.mul_(o).mul_(o.neg_().add_(1))
            g_v_w.addmm_(delta, h.T)
            g_v_b += delta.sum(1, keepdim=True)
            dh = v_w.T @ delta
            dh.mul_(h)
            dh.mul_(h.neg_().add_(1))
            g_w_t.addmm_(dh, xc.T)
        return {"w": g_w_t, "v_b": g_v_b, "v_w": g_v_w, "loss": loss, "correct": correct}

    parts = _map_workers(partial, n, chunk, workers)
    tot = {key: sum(p[key] for p in parts[1:]) + parts[0][key] for key in parts[0]}
    g_w = tot["w"].T / n
    if rows is not None:
        g_w = torch.zeros_like(model.hidden).index_copy_(0, rows, g_w)
    model.hidden.grad = g_w.contiguous()
    model.output.grad = torch.cat([tot["v_b"], tot["v_w"]], dim=1).T.contiguous() / n
    return {"loss": float(tot["loss"]) / n, "correct": int(tot["correct"])}


# ------------------------------------------------------------------ modern
def mlp(in_dim: int, hidden_dim: int, out_dim: int, activation: str = "gelu") -> nn.Sequential:
    """``Linear(in, hidden) - activation - Linear(hidden, out)``: one expert-shaped network (logits out)."""
    _check_dims(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
    acts = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if activation not in acts:
        raise MoelabError(f"activation must be one of {', '.join(acts)}; got {activation!r}")
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), acts[activation](), nn.Linear(hidden_dim, out_dim))


def mlp_mixture(num_experts: int = 10, in_dim: int = 196, hidden_dim: int = SEED_HIDDEN,
                num_classes: int = SEED_CLASSES, gate_hidden_dim: int = SEED_HIDDEN, activation: str = "gelu",
                gate_temperature: float = 1.0) -> MoE:
    """The modern seed-2 mixture as a :class:`moelab.MoE`: E MLP experts ``in-hidden-classes``
    (:class:`moelab.moe.MLPExperts`) and an MLP gate ``in-gate_hidden-E`` with a dense softmax
    (router ``dense``, ``temperature``).

    ``y, aux = moe(x)``: ``aux.expert_outputs`` (E, N, classes) are the experts' logits, ``aux.logits``
    (N, E) the gate's, ``aux.gates`` softmax(gate logits / temperature), and ``y`` the logit mixture
    ``sum_i g_i z_i``. The class probabilities of the mixture, ``sum_i g_i softmax(z_i)``:
    :func:`mixture_predict`."""
    _check_dims(num_experts=num_experts, in_dim=in_dim, hidden_dim=hidden_dim, num_classes=num_classes,
                gate_hidden_dim=gate_hidden_dim)
    return MoE(in_dim, num_experts, router="dense",
               experts=MLPExperts(num_experts, in_dim, hidden_dim, num_classes, activation=activation),
               gate=mlp(in_dim, gate_hidden_dim, num_experts, activation),
               router_options={"temperature": gate_temperature})


def mixture_log_gates(moe: MoE, gate_logits: Tensor) -> Tensor:
    """(N, E) gate logits -> log softmax(logits / temperature), in float32 at least."""
    if gate_logits.dtype in (torch.bfloat16, torch.float16):
        gate_logits = gate_logits.float()
    return torch.log_softmax(gate_logits / moe.router.temperature, dim=-1)


@torch.no_grad()
def mixture_predict(moe: MoE, x: Tensor) -> tuple[Tensor, Tensor]:
    """-> (class probabilities sum_i g_i softmax(z_i) (N, classes), gates (N, E))."""
    _, aux = moe(x)
    gates = mixture_log_gates(moe, aux.logits).exp()
    probs = torch.softmax(aux.expert_outputs.to(gates.dtype), dim=-1)
    return torch.einsum("ne,enc->nc", gates, probs), gates


# ------------------------------------------------------------------ sparse (mnist-sparse)
class SparseMoEMLP(nn.Module):
    """A residual MLP classifier whose feed-forward blocks are sparse :class:`moelab.MoE` layers (the
    Switch / V-MoE recipe on flat images):

        x (N, in) -> Linear(in, dim) -> [z + FFN(LayerNorm(z))] x depth -> LayerNorm -> Linear(dim, classes)

    ``FFN`` is ``MoE(dim, num_experts, hidden_dim, router, k, ...)`` (each example runs k of E
    ``dim-hidden-dim`` GELU experts) when ``num_experts`` > 0, else a dense ``dim-hidden-dim`` MLP: the
    same network with ``num_experts = 0`` is the dense baseline, and its ``hidden_dim`` is what the
    equal-FLOPs / equal-parameters baselines tune. ``forward`` returns ``(logits, aux_loss)``.
    ``moe_layers``: which blocks are MoE ("all", or "last": only the last block, the others dense).

    ``arch = "experts"``: no trunk; the MoE's experts are whole ``in-hidden-classes`` classifiers routed by a
    linear gate on the input (a Jacobs-style mixture of MLP experts with a sparse gate); dense: one
    ``in-hidden-classes`` MLP (``dim`` and ``depth`` unused).
    """

    def __init__(self, in_dim: int = 196, dim: int = 64, hidden_dim: int = 128, num_classes: int = 10,
                 depth: int = 1, num_experts: int = 0, router: str = "topk", k: int | None = None,
                 capacity_factor: float | None = None, aux_loss_weights: dict | None = None,
                 moe_layers: str = "all", activation: str = "gelu", arch: str = "residual",
                 router_options: dict | None = None):
        super().__init__()
        _check_dims(in_dim=in_dim, dim=dim, hidden_dim=hidden_dim, num_classes=num_classes, depth=depth)
        if moe_layers not in ("all", "last"):
            raise MoelabError(f"moe_layers must be 'all' or 'last', got {moe_layers!r}")
        if arch not in ("residual", "experts"):
            raise MoelabError(f"arch must be 'residual' or 'experts', got {arch!r}")
        self.num_experts, self.arch = num_experts, arch
        options = dict(router_options or {})
        if capacity_factor is not None and router != "soft":
            options["capacity_factor"] = capacity_factor

        def moe(d_in: int, d_out: int) -> MoE:  # E GELU (or ``activation``) MLPs d_in -> hidden_dim -> d_out
            return MoE(d_in, num_experts, router=router, k=k if router in ("topk", "noisy_topk") else None,
                       router_options=options or None, aux_loss_weights=aux_loss_weights,
                       experts=MLPExperts(num_experts, d_in, hidden_dim, d_out, activation=activation))

        if arch == "experts":
            self.embed, self.norms, self.head = nn.Identity(), nn.ModuleList([nn.Identity()]), nn.Identity()
            self.blocks = nn.ModuleList([moe(in_dim, num_classes) if num_experts > 0
                                         else mlp(in_dim, hidden_dim, num_classes, activation)])
            return
        self.embed = nn.Linear(in_dim, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        blocks = []
        for i in range(depth):
            if num_experts > 0 and (moe_layers == "all" or i == depth - 1):
                blocks.append(moe(dim, dim))
            else:
                blocks.append(mlp(dim, hidden_dim, dim, activation))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, aux, _ = self.forward_with_aux(x)
        return logits, aux

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, Tensor, list]:
        """-> (logits, summed auxiliary loss, the MoEAux of each MoE block)."""
        z = self.embed(x)
        aux, auxes = None, []
        for norm, block in zip(self.norms, self.blocks):
            out = block(norm(z))
            if isinstance(out, tuple):  # MoE: (y, MoEAux)
                out, a = out
                aux = a.loss if aux is None else aux + a.loss
                auxes.append(a)
            z = z + out if self.arch == "residual" else out
        return self.head(z), z.new_zeros((), dtype=torch.float32) if aux is None else aux, auxes

    def moe_aux(self, x: Tensor) -> list:
        """The MoEAux of each MoE block on ``x`` (for routing statistics)."""
        return self.forward_with_aux(x)[2]
