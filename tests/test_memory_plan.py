"""`fedsecure model plan`: one step's memory, traced on the meta device, against a measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsecure.cli import app
from fedsecure.config import LoraSettings
from fedsecure.model.catalog import named_config
from fedsecure.training.memory import GIB, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def test_the_parts_add_up_and_activations_grow_with_the_batch():
    config = named_config("r1-distill-qwen-1.5b")
    one = plan_memory(config, LoraSettings(r=8), torch.bfloat16, 1, 256, device="cuda")
    four = plan_memory(config, LoraSettings(r=8), torch.bfloat16, 4, 256, device="cuda")
    assert one.total == sum(size for part, size in one.rows() if part != "total")
    assert one.weights == four.weights == 1_777_088_000 * 2  # every base parameter in bfloat16
    assert four.activations == pytest.approx(4 * one.activations, rel=0.01)
    assert four.per_sample > one.per_sample and one.lora == four.lora
    # a float32 base keeps more: its activations are float32 (no LoRA input copies, but twice the bytes)
    assert plan_memory(config, LoraSettings(r=8), torch.float32, 1, 256).weights == 2 * one.weights


def test_the_plan_is_within_a_quarter_of_a_measured_step():
    # a ~20 M-parameter Qwen2 model (the R1-Distill-Qwen architecture) in a fresh process: bench_memory_plan's
    # measurement, on a size where the runtime's own constant does not dominate
    code = (
        "import sys, json; sys.path.insert(0, 'bench'); import bench_memory_plan as b\n"
        "from transformers import Qwen2Config\n"
        "b.config_of = lambda name: Qwen2Config(vocab_size=8000, hidden_size=256, intermediate_size=768, "
        "num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)\n"
        "print(json.dumps(b.measure('small', 'float32', 8, 128)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["measured_mib"] * 2**20
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=8000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    plan = plan_memory(config, LoraSettings(r=8), torch.float32, 8, 128)
    assert 0.75 < plan.total / measured < 1.25, (plan.rows(), measured)


def test_model_plan_says_what_fits():
    runner = CliRunner()
    res = runner.invoke(app, ["model", "plan", "r1-distill-qwen-1.5b", "--batch", "8", "--seq", "1024",
                              "--gpu-memory", "80"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "does NOT fit a 80 GiB device" in res.output and "batch 4 fits" in res.output
    res = runner.invoke(app, ["model", "plan", "r1-distill-qwen-1.5b", "--batch", "8", "--seq", "1024",
                              "--gpu-memory", "141"], env={"COLUMNS": "200"})
    assert "fits a 141 GiB device" in res.output and "NOT" not in res.output
    res = runner.invoke(app, ["model", "plan", "r1-distill-qwen-1.5b", "--dtype", "int3"])
    assert res.exit_code != 0 and "--dtype must be one of" in res.output
    assert GIB == 2**30


def test_checkpointing_keeps_one_layer_instead_of_all():
    config = named_config("r1-distill-qwen-1.5b")
    plain = plan_memory(config, LoraSettings(r=8), torch.bfloat16, 4, 512)
    kept = plan_memory(config, LoraSettings(r=8), torch.bfloat16, 4, 512, checkpointing=True)
    assert kept.weights == plain.weights and kept.lora == plain.lora
    # 28 layers: what remains is the loss' logits, each layer's input and one layer recomputed at a time
    assert kept.activations < plain.activations / 3
    res = CliRunner().invoke(app, ["model", "plan", "r1-distill-qwen-7b", "--batch", "8", "--seq", "1024",
                                   "--checkpointing"], env={"COLUMNS": "200"})
    text = " ".join(res.output.split())  # the console may wrap lines
    assert res.exit_code == 0 and "gradient checkpointing" in text and "fits a 80 GiB device" in text


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
@pytest.mark.parametrize("attention", [False, True])
def test_quantized_weights_are_planned_at_bitsandbytes_storage(quantization, attention):
    from fedsecure.config import ModelSettings
    from fedsecure.model import load_model_and_tokenizer
    from fedsecure.model.catalog import meta_model
    from fedsecure.model.presets import preset_config
    from fedsecure.training.memory import weight_bytes

    real, _ = load_model_and_tokenizer(ModelSettings(preset="deepseek-v3-tiny", device="cpu",
                                                     quantization=quantization, quantize_attention=attention))
    planned = weight_bytes(meta_model(preset_config("deepseek-v3-tiny")), quantization, attention)
    assert planned == pytest.approx(real.get_memory_footprint(), rel=0.01)


def test_model_plan_with_a_quantized_base():
    res = CliRunner().invoke(app, ["model", "plan", "r1-distill-llama-70b", "--batch", "1", "--seq", "512",
                                   "--quantization", "nf4", "--checkpointing"], env={"COLUMNS": "200"})
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "nf4 base" in text and "fits a 80 GiB device" in text
    res = CliRunner().invoke(app, ["model", "plan", "r1-distill-llama-70b", "--quantization", "int3"])
    assert res.exit_code != 0 and "--quantization must be one of none, int8, nf4" in res.output
