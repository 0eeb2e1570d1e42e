"""DeepSeek base models (tiny presets or a local directory), LoRA attachment and adapter state."""

from fedsecure.model.adapter import (
    adapter_delta,
    adapter_state,
    apply_delta,
    load_adapter_file,
    save_adapter_file,
    set_adapter_state,
)
from fedsecure.model.lora import attach_lora, lora_module_names
from fedsecure.model.presets import build_base_model, export_preset, initial_adapter, load_model_and_tokenizer

__all__ = [
    "adapter_delta", "adapter_state", "apply_delta", "attach_lora", "build_base_model", "export_preset",
    "initial_adapter",
    "load_adapter_file", "load_model_and_tokenizer", "lora_module_names", "save_adapter_file",
    "set_adapter_state",
]
