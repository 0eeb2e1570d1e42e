"""How much memory one DP-SGD step of a site needs: weights, LoRA and its optimizer, per-sample gradients, and the
activations autograd keeps, estimated before any weight is loaded.

The activations are not guessed from a formula: :func:`activation_bytes` runs the model's real forward pass and
the per-sequence loss on PyTorch's ``meta`` device (shapes only, no memory, no arithmetic) under
``torch.autograd.graph.saved_tensors_hooks`` and adds up every tensor autograd saves for the backward pass,
leaving out the frozen weights it saves by reference. So the count follows the installed transformers'
attention and MoE code and PEFT's casts (a half-precision base makes a float32 copy of each LoRA input) exactly.
One exception: on the meta device transformers' grouped expert matmul accepts only bfloat16, so a float32 MoE
model is traced in bfloat16 with its half-precision tensors counted at 4 bytes a value (an upper bound: the
float32 copies PEFT makes of a half-precision LoRA input are counted although a float32 model has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import torch

from fedsecure.config import LoraSettings
from fedsecure.training.local import activation_checkpointing

GIB = float(1 << 30)
#: Share of a GPU's memory a plan may fill: the caching allocator's fragmentation takes the rest.
USABLE = 0.90
#: What the runtime itself allocates on first use, beyond the model: on the CPU (oneDNN and OpenMP buffers,
#: autograd's and Opacus' first step) measured by bench/bench_memory_plan.py on a model of a few thousand
#: parameters; on a GPU the CUDA context and cuBLAS workspaces (typically 0.5-1 GiB; not measured here, no GPU).
RUNTIME = {"cpu": 70 << 20, "cuda": 1 << 30}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each part of one DP-SGD step (``total``: their sum)."""

    weights: int  # the frozen base in its dtype
    lora: int  # LoRA weights, their gradients and AdamW's two moments (float32)
    per_sample: int  # Opacus' per-sample gradients (batch x LoRA values) and their clipped sum (float32)
    activations: int  # what autograd keeps for the backward pass (traced)
    backward: int  # the backward pass' largest transient: the gradient of the largest saved tensor
    runtime: int = 0  # the runtime's own first-use allocations (:data:`RUNTIME`)

    @property
    def total(self) -> int:
        """All parts together."""
        return self.weights + self.lora + self.per_sample + self.activations + self.backward + self.runtime

    def fits(self, device_bytes: float) -> bool:
        """Whether the step fits a device with ``device_bytes`` of memory (:data:`USABLE` of it)."""
        return self.total <= USABLE * device_bytes

    def rows(self) -> list[tuple[str, int]]:
        """(part, bytes) in the order a reader wants them."""
        return [("frozen base weights", self.weights), ("LoRA weights, gradients, AdamW moments", self.lora),
                ("per-sample gradients (DP)", self.per_sample), ("activations kept for backward", self.activations),
                ("backward transient", self.backward), ("runtime (first use)", self.runtime), ("total", self.total)]


def lora_values(model: torch.nn.Module) -> int:
    """Trainable (LoRA) values of a PEFT model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def activation_bytes(model: torch.nn.Module, batch: int, seq: int, half_as: int = 2) -> tuple[int, int]:
    """(bytes autograd saves over one forward + loss of ``batch`` x ``seq`` tokens, the largest saved tensor's
    bytes) for a PEFT model on the meta device; frozen weights saved by reference are not counted. Half-precision
    tensors count ``half_as`` bytes a value (4: what they would be in a float32 model traced in bfloat16).
    """
    from fedsecure.training.local import per_sequence_loss

    params = {id(p) for p in model.parameters()}
    total, largest = [0], [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            size = t.numel() * (half_as if t.element_size() == 2 else t.element_size())
            total[0] += size
            largest[0] = max(largest[0], size)
        return t

    import transformers.masking_utils as masking

    ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    # in training mode transformers looks for packed sequences in the position ids, a data-dependent check the
    # meta device cannot answer (Tensor.item()); these ids are one unpacked sequence a row
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            mock.patch.object(masking, "find_packed_sequence_indices", lambda position_ids: None):
        out = model(input_ids=ids)  # a padding mask would need .item() on meta tensors as well
        per_sequence_loss(out.logits, ids).mean()
    return total[0], largest[0]


def weight_bytes(model: torch.nn.Module, quantization: str = "none", quantize_attention: bool = False) -> int:
    """Bytes of the frozen base's weights; with ``quantization`` (``model.quantization``), the Linear modules
    bitsandbytes converts (:func:`fedsecure.model.presets.quantization_config`'s policy) at its storage: int8 one
    byte a weight and a float32 scale a row, nf4 half a byte and a float32 absmax a block of 64.
    """
    from fedsecure.model.presets import ATTENTION_PROJECTIONS

    keep = {"lm_head", *([] if quantize_attention else ATTENTION_PROJECTIONS),
            *(["kv_b_proj"] if quantization == "int8" else [])}
    total = 0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            n = p.numel()
            leaf = name.split(".")[-1]
            if quantization != "none" and isinstance(module, torch.nn.Linear) and pname == "weight" \
                    and leaf not in keep:
                total += n + 4 * module.out_features if quantization == "int8" else n // 2 + 4 * -(-n // 64)
            else:
                total += n * p.element_size()
    return total


def plan_memory(config: object, lora: LoraSettings, dtype: torch.dtype, batch: int, seq: int,
                private: bool = True, device: str = "cpu", checkpointing: bool = False, quantization: str = "none",
                quantize_attention: bool = False) -> MemoryPlan:
    """The memory of one training step of ``config`` with LoRA ``lora``, the base in ``dtype``, on ``device``
    (``cpu`` or ``cuda``); with ``checkpointing`` (``train.gradient_checkpointing``) the activations are what the
    checkpointed forward keeps plus one layer's, live while it is recomputed; with ``quantization`` the weights
    are counted at bitsandbytes' storage (:func:`weight_bytes`; the activations are those of the compute dtype).
    """
    from fedsecure.model.catalog import meta_model
    from fedsecure.model.lora import attach_lora

    base = meta_model(config).to(dtype)
    weights = weight_bytes(base, quantization, quantize_attention)
    model = attach_lora(base, lora)
    values = lora_values(model)
    half_as = 2
    try:
        activation_bytes(model, 1, 2)
    except RuntimeError:  # float32 MoE: the meta grouped matmul wants bfloat16 (module docstring)
        model, half_as = attach_lora(meta_model(config).to(torch.bfloat16), lora), 4
    model.train()
    saved, largest = activation_bytes(model, batch, seq, half_as)
    if checkpointing:
        with activation_checkpointing(model, True):
            kept, largest = activation_bytes(model, batch, seq, half_as)
        saved = kept + max(0, saved - kept) // int(getattr(config, "num_hidden_layers", 1) or 1)
    per_sample = 4 * values * (batch + 1) if private else 0
    return MemoryPlan(weights=weights, lora=16 * values, per_sample=per_sample, activations=saved,
                      backward=2 * largest, runtime=RUNTIME["cuda" if device.startswith("cuda") else "cpu"])
