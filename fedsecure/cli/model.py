"""``fedsecure model``: base models and LoRA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedsecure.cli.common import console, friendly
from fedsecure.errors import FedSecureError

if TYPE_CHECKING:
    from fedsecure.config import LoraSettings


@contextlib.contextmanager
def quiet_hugging_face() -> Iterator[None]:
    """Silence Hugging Face's progress bars and log lines ("Writing model shards", "Loading weights") for the
    duration of one command, then restore what was set: the command prints its own lines only.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bars, hub_bars, level = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled(), \
        hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # transformers' own bars, and huggingface_hub's
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()


@friendly
def model_show(
    preset: str | None = typer.Option("deepseek-v3-tiny", help="Built-in preset."),
    path: Path | None = typer.Option(None, help="Local model directory (overrides --preset)."),
    config_of: str | None = typer.Option(None, "--config-of", help="A public checkpoint by name, built on the meta "
                                         "device from its shipped config.json (no weights): r1-distill-qwen-1.5b "
                                         "|-7b|-14b|-32b, r1-distill-llama-8b|-70b, deepseek-v2-lite, deepseek-v3."),
    r: int = typer.Option(8, help="LoRA rank."),
) -> None:
    """List which modules get LoRA and how many parameters train."""
    from fedsecure.config import LoraSettings, ModelSettings
    from fedsecure.model import attach_lora, load_model_and_tokenizer, lora_module_names

    if config_of:
        _show_config_of(config_of, LoraSettings(r=r))
        return
    settings = ModelSettings(preset=None if path else preset, path=str(path) if path else None,
                             lora=LoraSettings(r=r))
    settings.validate("model")
    with quiet_hugging_face():
        base, tok = load_model_and_tokenizer(settings)
        total = sum(p.numel() for p in base.parameters())
        model = attach_lora(base, settings.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"{type(base).__name__} ({base.config.model_type}), tokenizer {tok.name} "
                  f"({tok.vocab_size} tokens)", highlight=False)
    console.print(f"trainable {trainable:,} of {total + trainable:,} parameters (LoRA r={r})")
    for name in lora_module_names(model):
        console.print(f"  lora  {name.removeprefix('base_model.model.')}", highlight=False)


def _show_config_of(name: str, lora: LoraSettings) -> None:
    from collections import defaultdict

    from fedsecure.model.catalog import CHECKPOINTS, lora_sites, meta_model, named_config, parameter_count

    lora.validate("model.lora")
    with quiet_hugging_face():
        config = named_config(name)
        model = meta_model(config)
    sites = lora_sites(model, lora)
    values = sum(s.values for s in sites)
    console.print(f"{name}: {CHECKPOINTS[name]}", highlight=False)
    console.print(f"{type(model).__name__} ({config.model_type}), {parameter_count(model):,} parameters, "
                  f"{config.num_hidden_layers} layers, hidden {config.hidden_size} (meta device: no weights)",
                  highlight=False)
    console.print(f"LoRA r={lora.r} on {len(sites)} Linear modules: {values:,} trainable values, "
                  f"{4 * values / 2**20:,.1f} MiB an fp32 update (before the transport codec)", highlight=False)
    groups: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    for s in sites:
        groups[(s.name.split(".")[-1], s.in_features, s.out_features)].append(s.name)
    for (leaf, fan_in, fan_out), names in sorted(groups.items()):
        where = "shared-expert MLP" if ".shared_experts." in names[0] else \
            "MLP" if ".mlp." in names[0] else "attention"
        console.print(f"  lora  {leaf:<20} {fan_in:>6} -> {fan_out:<6} x {len(names):>3}  ({where}; e.g. "
                      f"{names[0]})", highlight=False)
    console.print("Frozen: embeddings, norms, lm_head, the router and the routed experts.", highlight=False)


@friendly
def model_export(
    preset: str = typer.Option(..., help="Built-in preset to save."),
    out: Path = typer.Option(..., help="Output directory (a normal Hugging Face model directory)."),
    seed: int = typer.Option(0, help="Initialisation seed [model.seed]."),
) -> None:
    """Save a tiny preset with its tokenizer, to use through model.path; prints the directory only."""
    from fedsecure.config import PRESETS
    from fedsecure.model import export_preset

    if preset not in PRESETS:
        raise FedSecureError(f"--preset must be one of {', '.join(PRESETS)}; found {preset!r}")
    with quiet_hugging_face():
        saved = export_preset(preset, out, seed)
    console.print(str(saved), highlight=False)


@friendly
def model_pretrain(
    out: Path = typer.Option(..., help="Folder for deepseek-v3-tiny-clinical.safetensors and .json (its manifest)."),
    steps: int = typer.Option(600, help="Optimizer steps (full-parameter AdamW, batch 32)."),
    records: int = typer.Option(9600, help="Public-corpus notes to train on (480 more are held out)."),
    seed: int = typer.Option(0, help="Initialisation and sampling seed."),
) -> None:
    """Rebuild the shipped pretrained base: deepseek-v3-tiny trained, non-privately, on the public corpus only
    (teaching notes from institutions that are never a site). Prints the file and its SHA-256.
    """
    from fedsecure.training.pretrain import PretrainSettings, pretrain, save_pretrained

    if steps < 1 or records < 32:
        raise FedSecureError(f"--steps must be at least 1 and --records at least 32; got {steps}, {records}")
    settings = PretrainSettings(steps=steps, records=records, seed=seed)
    with quiet_hugging_face():
        model, summary = pretrain(settings, progress=lambda s, loss: console.print(
            f"step {s}/{steps}: train loss {loss:.4f}", highlight=False))
        path = save_pretrained(model, out, summary)
    import json

    manifest = json.loads(path.with_suffix(".json").read_text())
    console.print(f"held-out loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f} in "
                  f"{summary['seconds']:.0f} s", highlight=False)
    console.print(f"{path}  sha256 {manifest['sha256']}", highlight=False, soft_wrap=True)


@friendly
def model_plan(
    name: str = typer.Argument(..., help="A shipped checkpoint (see `model show --config-of`), a preset, or a local "
                                         "model directory."),
    device: str = typer.Option("cuda", help="cpu or cuda: which runtime overhead to count."),
    dtype: str = typer.Option("bfloat16", help="The frozen base's dtype: float32 | bfloat16 | float16."),
    batch: int = typer.Option(8, help="Records a step (DP: the expected Poisson batch)."),
    seq: int = typer.Option(1024, help="Tokens a record (data.max_length)."),
    r: int = typer.Option(8, help="LoRA rank."),
    gpu_memory: float = typer.Option(80.0, help="The device's memory in GiB (H100: 80, H200: 141)."),
    private: bool = typer.Option(True, help="DP-SGD (per-sample gradients) or plain training."),
    checkpointing: bool = typer.Option(False, help="Recompute each layer in backward (gradient checkpointing)."),
    quantization: str = typer.Option("none", help="model.quantization of the frozen base: none | int8 | nf4."),
    quantize_attention: bool = typer.Option(False, help="Quantize the attention projections too."),
) -> None:
    """Estimate one training step's memory (weights, LoRA + AdamW, per-sample gradients, the activations autograd
    keeps: traced on the meta device, no weights) and say whether it fits the device.
    """
    from fedsecure.config import DTYPES, PRESETS, QUANTIZATIONS, LoraSettings
    from fedsecure.model.catalog import CHECKPOINTS, named_config
    from fedsecure.model.presets import preset_config, torch_dtype
    from fedsecure.training.memory import GIB, USABLE, plan_memory

    if quantization not in QUANTIZATIONS:
        raise FedSecureError(f"model plan: --quantization must be one of {', '.join(QUANTIZATIONS)}")
    if dtype not in DTYPES or batch < 1 or seq < 2 or gpu_memory <= 0 or device not in ("cpu", "cuda"):
        raise FedSecureError(f"model plan: --dtype must be one of {', '.join(DTYPES)}, --device cpu or cuda, "
                             "--batch >= 1, --seq >= 2 and --gpu-memory > 0")
    lora = LoraSettings(r=r)
    lora.validate("model.lora")
    with quiet_hugging_face():
        if name in CHECKPOINTS:
            config = named_config(name)
        elif name in PRESETS:
            config = preset_config(name)
        else:
            from transformers import AutoConfig

            from fedsecure.model.presets import _check_model_dir

            _check_model_dir(Path(name))
            config = AutoConfig.from_pretrained(name, local_files_only=True)
        options = {"private": private, "device": device, "checkpointing": checkpointing,
                   "quantization": quantization, "quantize_attention": quantize_attention}
        plan = plan_memory(config, lora, torch_dtype(dtype), batch, seq, **options)
    console.print(f"{name}: one {'DP-SGD' if private else 'training'} step, batch {batch} x {seq} tokens, base in "
                  f"{dtype}, LoRA r={r} (float32), on {device}"
                  f"{', gradient checkpointing' if checkpointing else ''}"
                  f"{f', {quantization} base' if quantization != 'none' else ''}", highlight=False)
    for part, size in plan.rows():
        console.print(f"  {part:<40} {size / GIB:>9.2f} GiB", highlight=False)
    fits = plan.fits(gpu_memory * GIB)
    console.print(f"{'fits' if fits else 'does NOT fit'} a {gpu_memory:g} GiB device ({USABLE:.0%} usable)",
                  highlight=False)
    if not fits:
        smaller = batch // 2
        while smaller >= 1:
            if plan_memory(config, lora, torch_dtype(dtype), smaller, seq, **options).fits(gpu_memory * GIB):
                console.print(f"  batch {smaller} fits (or a shorter --seq)", highlight=False)
                break
            smaller //= 2
        else:
            console.print("  not even batch 1: a shorter --seq, a smaller model, or a larger device", highlight=False)
