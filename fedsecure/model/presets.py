"""Base models: built-in tiny presets built from a config, or a local Hugging Face directory.

Nothing here touches the network: presets are random-initialised from a fixed seed (every site
and the coordinator build bit-identical base weights), and local directories are opened with
``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsecure.config import PRESETS, ModelSettings
from fedsecure.data.tokenizer import BUNDLED_VOCAB_SIZE, TextTokenizer, bundled_tokenizer, local_tokenizer
from fedsecure.errors import ModelError

#: pretrained preset -> (architecture preset, asset file, SHA-256 of the asset). Built by `fedsecure model pretrain`
#: (fedsecure.training.pretrain) from the public corpus only; a file with another digest is refused.
PRETRAINED: dict[str, tuple[str, str, str]] = {
    "deepseek-v3-tiny-clinical": ("deepseek-v3-tiny", "deepseek-v3-tiny-clinical.safetensors",
                                  "1c42a45670b2380b73c041d2d4adf736d51debdf55e8fbd61e4a8ebd5f9f58e2"),
}

#: Where a Flower app (run from a bundle that carries no binary file) finds the shipped assets: set by the process
#: that starts Flower's processes (fedsecure.launch.engines.flower_env) to its own installation's folder.
ASSETS_ENV = "FEDSECURE_ASSETS"


def installed_assets() -> Path:
    """This installation's ``fedsecure/assets`` folder."""
    return Path(str(resources.files("fedsecure") / "assets"))


#: model_type values (config.json) that fedsecure knows how to adapt.
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen2", "llama")


def preset_config(name: str) -> Any:
    """The transformers config of a tiny preset (about 150k parameters each)."""
    name = PRETRAINED[name][0] if name in PRETRAINED else name
    common = dict(vocab_size=BUNDLED_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=512, tie_word_embeddings=False,
                  # A random tiny model with the usual std 0.02 has almost uniform next-token
                  # distributions that a frozen head cannot sharpen; 0.1 gives the frozen lm_head
                  # the logit range a pretrained model has, so LoRA has something to adapt.
                  initializer_range=0.1)
    if name == "deepseek-v3-tiny":
        from transformers import DeepseekV3Config

        # Layer 0 has a dense MLP, layer 1 is MoE (4 routed experts in 2 groups + 1 shared), MLA attention.
        return DeepseekV3Config(**common, moe_intermediate_size=32, first_k_dense_replace=1,
                                num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                n_group=2, topk_group=1, n_shared_experts=1)
    if name == "deepseek-v2-tiny":
        from transformers import DeepseekV2Config

        # V2-Lite style: no query compression (q_proj), MLA key/value compression, MoE from layer 1.
        return DeepseekV2Config(**common, moe_intermediate_size=32, first_k_dense_replace=1,
                                num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                n_group=2, topk_group=1, n_shared_experts=1)
    if name == "r1-distill-qwen-tiny":
        from transformers import Qwen2Config

        # DeepSeek-R1-Distill-Qwen checkpoints are Qwen2 models (GQA, SwiGLU MLP).
        return Qwen2Config(**common, num_key_value_heads=2)
    raise ModelError(f"model.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")


def build_base_model(name: str, seed: int = 0) -> torch.nn.Module:
    """Random-initialised tiny preset (the same ``seed`` gives bit-identical weights everywhere), or the shipped
    pretrained one (``seed`` unused).
    """
    if name in PRETRAINED:
        return load_pretrained(name)
    from transformers import AutoModelForCausalLM

    config = preset_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def load_pretrained(name: str, path: str | Path | None = None) -> torch.nn.Module:
    """The shipped pretrained base ``name`` (or the file at ``path``), after checking its pinned SHA-256."""
    from safetensors.torch import load_file

    arch, asset, pinned = PRETRAINED[name]
    if path is not None:
        file = Path(path)
    else:  # this installation's, or (inside a Flower app bundle, which carries no binary file) the launcher's
        file = installed_assets() / asset
        if not file.is_file() and os.environ.get(ASSETS_ENV):
            file = Path(os.environ[ASSETS_ENV]) / asset
    if not file.is_file():
        raise ModelError(f"model.preset {name}: {file} is missing (a damaged install). Fix: reinstall fedsecure, or "
                         f"rebuild it with `fedsecure model pretrain --out {file.parent}`.")
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    if digest != pinned:
        raise ModelError(f"model.preset {name}: {file} has SHA-256 {digest[:16]}..., not the pinned {pinned[:16]}... "
                         "(altered or from another build): every site must start from the same base. Fix: reinstall "
                         "fedsecure.")
    model = build_base_model(arch, 0)
    model.load_state_dict(load_file(str(file)), strict=True)
    return model.eval()


def _check_model_dir(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ModelError(f"model.path {path} is not a directory. Fix: point it at a local Hugging Face model "
                         "folder (with config.json and weights), or use model.preset.")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"model.path {path} has no config.json, so it is not a Hugging Face model directory. "
                         "Fix: save the model with model.save_pretrained(dir).")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file} is not valid JSON ({e}).") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"model.path {path}: model_type {model_type!r} is not a DeepSeek, Qwen2 (R1-Distill-Qwen) "
                         f"or Llama (R1-Distill-Llama) model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    for key, value in raw.items():  # sizes must be positive and counts non-negative integers, checked up front
        size = key.endswith(("_size", "_dim"))
        count = key.endswith(("_rank", "_layers", "_heads", "_experts")) or key.startswith("num_")
        if (size or count) and value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                                      or value < (1 if size else 0)):
            raise ModelError(f"{cfg_file}: {key} = {value!r} is not a {'positive' if size else 'non-negative'} "
                             "integer. Fix: restore the model's config.json (save_pretrained writes a valid one).")
    return raw


#: Leaf names of attention projections: kept in the base's dtype unless model.quantize_attention (the MLPs and
#: shared experts hold most of the weights; attention is where quantization error hurts most).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                         "kv_b_proj")


def quantization_config(settings: ModelSettings) -> Any:
    """The bitsandbytes config of ``model.quantization`` (None for ``none``): int8 (LLM.int8()) or nf4 (computing
    in the base's dtype), the head and, unless ``model.quantize_attention``, the attention projections left alone.
    Routed experts are fused 3-D parameters, not Linear modules: bitsandbytes leaves them in the base's dtype.
    """
    if settings.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    keep = ["lm_head", *([] if settings.quantize_attention else ATTENTION_PROJECTIONS)]
    if settings.quantization == "int8":
        # DeepSeek's MLA reads kv_b_proj's weight directly, in a shape LLM.int8() does not keep: it stays as is
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[*keep, "kv_b_proj"])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype(
        settings.dtype), llm_int8_skip_modules=keep)


def load_local_model(path: str | Path, dtype: torch.dtype = torch.float32, quantization: Any = None,
                     device: torch.device | None = None) -> torch.nn.Module:
    """Open a local model directory with ``local_files_only=True`` (never the network), its weights read straight
    into ``dtype`` (no float32 copy on the way), quantized on ``device`` when ``quantization`` is given.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path)
    _check_model_dir(p)
    extra: dict[str, Any] = {}
    if quantization is not None:
        extra = {"quantization_config": quantization, "device_map": {"": str(device or "cpu")}}
    try:
        with warnings.catch_warnings():
            # bitsandbytes' int8 matmul says once per layer that it casts its input to float16: by design
            warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
            model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=dtype, **extra)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"model.path {p}: cannot load the weights ({str(e)[:300]}). Fix: check the directory holds "
                         "model.safetensors (or sharded safetensors) and the config.json written by save_pretrained.") \
            from None
    return model.eval()


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: ``auto`` is the first CUDA device when there is one, else the CPU.

    Raises:
        ModelError: CUDA is asked for and absent, or the index names no device; the message says what is there.
    """
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise ModelError(f"model.device = {name}, but this machine has no usable CUDA device (torch {torch.__version__}"
                         f" is {build}). Fix: set model.device to auto or cpu, or run the site where a GPU and a CUDA "
                         "build of torch are installed.")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ModelError(f"model.device = {name}, but only {torch.cuda.device_count()} CUDA device(s) are visible "
                         "(CUDA_VISIBLE_DEVICES). Fix: choose cuda:0 .. cuda:"
                         f"{torch.cuda.device_count() - 1}, or auto.")
    return torch.device("cuda", index)


def torch_dtype(name: str) -> torch.dtype:
    """``model.dtype`` as a torch dtype."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model_and_tokenizer(settings: ModelSettings) -> tuple[torch.nn.Module, TextTokenizer]:
    """The base model (not yet with LoRA) in ``model.dtype`` on ``model.device``, and the tokenizer that goes
    with it. A preset is built in float32 from its seed (bit-identical everywhere), then cast; a local directory
    is read in its dtype directly. The model is moved before LoRA is attached (PEFT's adapters follow their
    base layer; Opacus #820/#830: moving afterwards corrupted LoRA updates).
    """
    device, dtype = resolve_device(settings.device), torch_dtype(settings.dtype)
    quantized = quantization_config(settings)
    if settings.quantization == "int8":  # its matmul says at every call that it computes in float16: by design
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    if settings.path:
        model = load_local_model(settings.path, dtype, quantized, device)
        tokenizer = local_tokenizer(str(Path(settings.path).resolve()))
    else:
        assert settings.preset is not None  # validated in ModelSettings
        model, tokenizer = build_base_model(settings.preset, settings.seed).to(dtype=dtype), bundled_tokenizer()
        if quantized is not None:  # bitsandbytes quantizes while loading: through a private temporary directory
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                model = load_local_model(tmp, dtype, quantized, device)
    return (model if quantized is not None else model.to(device)), tokenizer


def export_preset(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny preset, with a tokenizer, as a normal Hugging Face model directory."""
    from importlib import resources

    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_base_model(name, seed).save_pretrained(out)
    tok_file = resources.files("fedsecure") / "assets" / "tokenizer.json"
    tok = PreTrainedTokenizerFast(tokenizer_object=None, tokenizer_file=str(tok_file), pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(out)
    return out


def initial_adapter(settings: ModelSettings, seed: int) -> dict[str, np.ndarray]:
    """The round-0 global adapter: LoRA A random (seeded with ``seed``), LoRA B zero, so the model starts
    as the base.
    """
    from fedsecure.model.adapter import adapter_state
    from fedsecure.model.lora import attach_lora

    base, _ = load_model_and_tokenizer(settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = attach_lora(base, settings.lora)
    return adapter_state(model)
