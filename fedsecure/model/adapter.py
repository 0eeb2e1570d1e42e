"""Adapter state: only LoRA tensors ever travel or get saved (safetensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedsecure.errors import AdapterError

ADAPTER_FORMAT = "fedsecure-lora-adapter"
ADAPTER_FORMAT_VERSION = "1"


def adapter_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The LoRA weights of a PEFT model as float32 numpy arrays, in a stable key order."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(_unwrap(model))
    return {k: sd[k].detach().cpu().float().numpy().copy() for k in sorted(sd)}


def set_adapter_state(model: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    """Copy ``state`` into the model's LoRA weights in place; names and shapes must match exactly."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    inner = _unwrap(model)
    current = get_peft_model_state_dict(inner)
    check_compatible(state, {k: tuple(v.shape) for k, v in current.items()})
    tensors = {k: torch.from_numpy(np.ascontiguousarray(state[k], dtype=np.float32)) for k in current}
    result = set_peft_model_state_dict(inner, tensors)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:  # pragma: no cover - guarded by check_compatible
        raise AdapterError(f"adapter keys not used by the model: {unexpected[:3]}")


def check_compatible(state: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise AdapterError when ``state`` does not have exactly the tensors and shapes of ``expected``."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise AdapterError(f"adapter does not match the model: {len(missing)} missing keys {missing[:2]}, "
                           f"{len(extra)} unexpected keys {extra[:2]}. Fix: use an adapter made for the same "
                           "base model and LoRA settings.")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise AdapterError(f"adapter tensor {k} has shape {tuple(state[k].shape)}, the model expects "
                               f"{tuple(shape)}. Fix: match model.lora.r and the base model.")
        if not np.all(np.isfinite(state[k])):
            raise AdapterError(f"adapter tensor {k} holds NaN or infinite values; refusing to load it.")


def adapter_delta(new: dict[str, np.ndarray], old: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``new - old`` (float32), after checking both hold the same tensors."""
    check_compatible(new, {k: v.shape for k, v in old.items()})
    return {k: (new[k] - old[k]).astype(np.float32) for k in old}


def apply_delta(base: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base + delta`` (float32), after checking both hold the same tensors."""
    check_compatible(delta, {k: v.shape for k, v in base.items()})
    return {k: (base[k] + delta[k]).astype(np.float32) for k in base}


def save_adapter_file(path: str | Path, state: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` as plain safetensors, atomically (used only when sealing is off)."""
    from safetensors.numpy import save

    from fedsecure._durable import atomic_write

    meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION, **(metadata or {})}
    blob = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, metadata=meta)
    return atomic_write(path, blob)


def load_adapter_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read an adapter written by :func:`save_adapter_file`; returns (state, metadata)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"adapter file {p} does not exist.")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in sorted(f.keys())}
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
        raise AdapterError(f"adapter file {p} is corrupt or not safetensors ({e}).") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{p} is not a fedsecure adapter (format {meta.get('format')!r}).")
    return state, meta


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Opacus' GradSampleModule keeps the PEFT model in `_module`.
    return getattr(model, "_module", model)
