"""LoRA with PEFT on the attention projections and the dense / shared-expert MLPs.

The router, the routed experts, norms and embeddings stay frozen: Opacus cannot compute exact
per-sample gradients for the fused 3D expert weights or the router (which has buffers), and
routed experts see token-flattened inputs, which would silently make the privacy unit a token.

PEFT >= 0.18 on transformers 5 rewrites ``gate_proj/up_proj/down_proj`` targets of DeepSeek
models onto the routed experts' fused parameters and drops the dense and shared-expert MLPs
(huggingface/peft#3711). We switch that conversion off while attaching, then *verify* the result:
if a PEFT upgrade ever puts LoRA anywhere else, attaching fails instead of training silently.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from fedsecure.config import LoraSettings
from fedsecure.errors import ModelError

#: Default LoRA targets per architecture (leaf names of ``nn.Linear`` modules).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "deepseek_v3": ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj"),
    "deepseek_v2": ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

#: Path components that must never carry LoRA (router, routed experts, norms, embeddings, head).
FROZEN_PARTS = ("experts", "gate", "norm", "embed_tokens", "lm_head", "rotary_emb")


@contextlib.contextmanager
def _no_v5_moe_conversion() -> Iterator[None]:
    import peft.tuners.tuners_utils as tu

    saved = tu.is_transformers_ge_v5
    tu.is_transformers_ge_v5 = False
    try:
        yield
    finally:
        tu.is_transformers_ge_v5 = saved


def _is_frozen_path(name: str) -> bool:
    parts = name.split(".")
    # "shared_experts" is allowed; the routed "experts" container and the router "gate" are not.
    return any(p in FROZEN_PARTS for p in parts[:-1]) or parts[-1] in ("gate", "lm_head", "embed_tokens")


def target_module_names(model: torch.nn.Module, targets: tuple[str, ...] = ()) -> list[str]:
    """Fully-qualified names of the ``nn.Linear`` modules that get LoRA."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    wanted = targets or DEFAULT_TARGETS.get(str(model_type), ())
    if not wanted:
        raise ModelError(f"no default LoRA targets for model_type {model_type!r}; set model.lora.targets.")
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in wanted and not _is_frozen_path(n)]
    if not names:
        raise ModelError(f"model.lora.targets {list(wanted)} matched no Linear module of this "
                         f"{model_type} model. Fix: use leaf names such as q_proj or o_proj.")
    return names


def attach_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Freeze ``model`` and wrap it with PEFT LoRA on the allowed Linear modules."""
    from peft import LoraConfig, get_peft_model

    names = target_module_names(model, settings.targets)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=names, bias="none")
    with _no_v5_moe_conversion(), warnings.catch_warnings():
        # peft 0.21 calls transformers' deprecated is_gradient_checkpointing; only that warning is muted
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        peft_model = get_peft_model(model, config)
    got = lora_module_names(peft_model)
    expected = {f"base_model.model.{n}" for n in names}
    if set(got) != expected or getattr(peft_model.peft_config["default"], "target_parameters", None):
        raise ModelError("PEFT attached LoRA to other modules than requested (installed peft changed its "
                         f"target rewriting): missing {sorted(expected - set(got))[:3]}, "
                         f"extra {sorted(set(got) - expected)[:3]}. Pin peft==0.21.2.")
    for name, p in peft_model.named_parameters():
        if p.requires_grad and "lora_" not in name:
            raise ModelError(f"parameter {name} is trainable but is not a LoRA weight")
        if p.requires_grad and p.dtype != torch.float32:  # PEFT upcasts bf16/fp16 adapters (autocast_adapter_dtype)
            raise ModelError(f"LoRA weight {name} is {p.dtype}, not float32: per-sample gradients, clipping and noise "
                             "must be float32. Pin peft==0.21.2.")
    return peft_model


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of modules that carry a LoRA adapter (PEFT ``LoraLayer``s)."""
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
