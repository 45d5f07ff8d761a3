"""Checkpoints as safetensors (no pickle), written atomically.

Tensors go in the safetensors payload; everything else (epoch, scheduler state,
optimizer hyper-parameters, metrics line count) goes as JSON in its metadata.
Optimizer states are flattened: ``optim.state.<param_idx>.<name>`` tensors plus
the param groups as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moelab.errors import MoelabError
from moelab.io import atomic_path
from moelab.train.callbacks import fire


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    """Write ``tensors`` (+ JSON ``meta``) to ``path`` atomically (the ``checkpoint_write`` callback point,
    :mod:`moelab.train.callbacks`, sits between the temp file's write and its rename)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"moelab": json.dumps(meta or {})})
        fire("checkpoint_write", tmp=tmp, meta=meta or {})


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` -> (tensors, meta)."""
    path = Path(path)
    if not path.is_file():
        raise MoelabError(f"checkpoint '{path}' does not exist.")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("moelab", "{}")
        return tensors, json.loads(raw)
    except (SafetensorError, OSError, ValueError) as e:
        raise MoelabError(f"checkpoint '{path}' is not a readable safetensors file: {e}.") from None


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state dict into tensors + a JSON-able dict."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}state.{pid}.{name}"] = v
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optim."
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "state."):
            pid, name = key[len(prefix) + 6 :].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its tensors ({} if unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("moelab", "{}"))
    except (SafetensorError, OSError, ValueError):
        return {}
