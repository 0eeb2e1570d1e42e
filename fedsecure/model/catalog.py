"""The public DeepSeek checkpoints users bring, by name: their ``config.json`` and a weightless model of each.

The configs are the public Hugging Face ``config.json`` files of the checkpoints, shipped in
``fedsecure/assets/configs`` (where each was copied from, and which were reconstructed field by field:
``PROVENANCE.md`` beside them). Nothing is downloaded: :func:`meta_model` builds the architecture on PyTorch's
``meta`` device (shapes, no storage, under a second even for the 671 B-parameter V3), so the CLI can say where
LoRA attaches and how many values travel per round before anyone fetches a weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from fedsecure.config import LoraSettings
from fedsecure.errors import ModelError

#: short name -> the Hugging Face repository whose config.json is shipped
CHECKPOINTS: dict[str, str] = {
    "r1-distill-qwen-1.5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "r1-distill-qwen-7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "r1-distill-qwen-14b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "r1-distill-qwen-32b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    "r1-distill-llama-8b": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "r1-distill-llama-70b": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3 (DeepSeek-R1 has the same architecture)",
}
#: config.json keys that describe the file or remote code, not the architecture
_NOT_ARCHITECTURE = ("architectures", "auto_map", "transformers_version", "torch_dtype", "quantization_config")


def raw_config(name: str) -> dict[str, Any]:
    """The shipped ``config.json`` of checkpoint ``name``."""
    if name not in CHECKPOINTS:
        raise ModelError(f"no shipped config named {name!r}. Fix: one of {', '.join(CHECKPOINTS)}, or point "
                         "model.path at a local model directory")
    text = (resources.files("fedsecure") / "assets" / "configs" / f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def named_config(name: str) -> Any:
    """The transformers config of checkpoint ``name`` (transformers' own DeepSeek/Qwen2/Llama classes: the
    checkpoint's ``auto_map`` remote code is never used; its fp8 ``quantization_config`` is left out, since a
    site loads the weights in ``model.dtype``).
    """
    from transformers import AutoConfig

    doc = raw_config(name)
    model_type = doc.pop("model_type")
    for key in _NOT_ARCHITECTURE:
        doc.pop(key, None)
    return AutoConfig.for_model(model_type, **doc)


def meta_model(config: Any) -> torch.nn.Module:
    """The architecture of ``config`` on the meta device: every parameter's shape, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class LoraSite:
    """One Linear module that carries LoRA: its name, shape, and the LoRA values it adds at rank ``r``."""

    name: str
    in_features: int
    out_features: int
    values: int


def lora_sites(model: torch.nn.Module, lora: LoraSettings) -> list[LoraSite]:
    """Where :func:`fedsecure.model.lora.attach_lora` puts LoRA on ``model``, and what each adds (A: r x in,
    B: out x r), without attaching it (works on the meta device).
    """
    from fedsecure.model.lora import target_module_names

    modules = dict(model.named_modules())
    out = []
    for name in target_module_names(model, lora.targets):
        m = modules[name]
        assert isinstance(m, torch.nn.Linear)
        out.append(LoraSite(name, m.in_features, m.out_features, lora.r * (m.in_features + m.out_features)))
    return out


def parameter_count(model: torch.nn.Module) -> int:
    """All parameters of ``model`` (meta or not)."""
    return sum(p.numel() for p in model.parameters())
