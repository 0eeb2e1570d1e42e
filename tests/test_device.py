"""Device and precision of the frozen base: model.device and model.dtype, per-sample gradients in each dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsecure.config import LoraSettings, ModelSettings, PrivacySettings, TrainSettings
from fedsecure.data.dataset import TokenizedDataset, collate
from fedsecure.errors import ConfigError, ModelError
from fedsecure.model import adapter_state, attach_lora, load_model_and_tokenizer
from fedsecure.model.presets import resolve_device
from fedsecure.privacy.guard import DPStepPlan
from fedsecure.training.dpsgd import train_private, unwrap, wrap
from fedsecure.training.local import per_sequence_loss

from .conftest import per_example_gradients

DTYPES = ["float32", "bfloat16", "float16"]
#: How far Opacus' per-sample gradients may be from per-example autograd, relative to the gradient's norm. The
#: LoRA weights and their gradients are float32 in every case; what differs between the two computations is the
#: frozen base's forward and backward in its dtype over a batch of 4 against a batch of 1 (other blocking of the
#: same sums). float32: ~1e-6; bfloat16 has an 8-bit mantissa (unit roundoff 2^-8 = 0.4%) and float16 a 11-bit
#: one (2^-11 = 0.05%), accumulated over the two layers and the cross-entropy: a few units of roundoff. Measured
#: here (worst parameter, worst record): 1.7e-6, 1.1e-2 and 4.8e-3; the bounds leave 4-60x room.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}


def _model(dtype: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    base, _ = load_model_and_tokenizer(ModelSettings(preset="deepseek-v3-tiny", device="cpu", dtype=dtype))
    model = attach_lora(base, LoraSettings(r=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make every gradient path non-trivial
            p.data.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_base_takes_the_dtype_and_lora_stays_float32(dtype):
    model = _model(dtype)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {getattr(torch, dtype)} and trainable == {torch.float32}
    assert all(v.dtype.name == "float32" for v in adapter_state(model).values())


@pytest.mark.parametrize("mode", ["ew", "hooks"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_gradients_match_per_example_autograd_in_each_dtype(dtype, mode):
    model = _model(dtype)
    seqs = [[1, *torch.randint(3, 1000, (n,)).tolist(), 2] for n in (5, 14, 2, 9)]
    params = [p for p in model.parameters() if p.requires_grad]
    reference = per_example_gradients(model, seqs, params)
    gsm = wrap(model, mode)
    b = collate(seqs, 0)
    kwargs = {"attention_mask": b["attention_mask"]}
    out = gsm(b["input_ids"], **kwargs) if mode == "ew" else gsm(input_ids=b["input_ids"], **kwargs)
    per_sequence_loss(out.logits, b["labels"]).mean().backward()
    try:
        worst = 0.0
        for j, p in enumerate(params):
            assert p.grad_sample.dtype == torch.float32 and p.grad_sample.shape[0] == len(seqs)
            for i in range(len(seqs)):
                ref = reference[i][j]
                worst = max(worst, float((p.grad_sample[i] - ref).norm() / ref.norm().clamp(min=1e-12)))
        assert worst < TOLERANCE[dtype], f"{dtype}/{mode}: relative error {worst:.2e}"
    finally:
        unwrap(gsm, model)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_private_round_trains_lora_on_a_half_precision_base(dtype):
    model = _model(dtype)
    before = adapter_state(model)
    data = TokenizedDataset([[1, *torch.randint(3, 1000, (12,)).tolist(), 2] for _ in range(16)])
    plan = DPStepPlan(sigma=1.0, q=0.5, steps=2, max_grad_norm=1.0)
    result = train_private(model, data, TrainSettings(batch_size=8, local_steps=2, learning_rate=0.01), plan,
                           pad_id=0, randomness=7, grad_sample_mode=PrivacySettings().grad_sample_mode)
    after = adapter_state(model)
    assert result.steps == 2 and result.loss == result.loss  # finite, not NaN
    assert any(float(abs(after[k] - before[k]).max()) > 0 for k in after)


def test_device_and_dtype_are_checked_with_the_fix():
    with pytest.raises(ConfigError, match=r"model.device.*auto, cpu, cuda or cuda:N"):
        ModelSettings(device="gpu").validate("model")
    with pytest.raises(ConfigError, match=r"model.dtype.*float32, bfloat16, float16"):
        ModelSettings(dtype="int8").validate("model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_asked_for_and_absent_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelError, match=r"model.device = cuda:1.*no usable CUDA device.*Fix: set model.device"):
        resolve_device("cuda:1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: scripts/gpu_checks.sh runs this on a GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_per_sample_gradients_and_a_private_round_on_the_gpu(dtype):
    torch.manual_seed(0)
    base, _ = load_model_and_tokenizer(ModelSettings(preset="deepseek-v3-tiny", device="cuda", dtype=dtype))
    model = attach_lora(base, LoraSettings(r=4))
    assert all(p.device.type == "cuda" for p in model.parameters())
    data = TokenizedDataset([[1, *torch.randint(3, 1000, (12,)).tolist(), 2] for _ in range(16)])
    before = adapter_state(model)
    train_private(model, data, TrainSettings(batch_size=8, local_steps=2, learning_rate=0.01),
                  DPStepPlan(sigma=1.0, q=0.5, steps=2, max_grad_norm=1.0), pad_id=0, randomness=7,
                  grad_sample_mode="ew")
    after = adapter_state(model)
    assert any(float(abs(after[k] - before[k]).max()) > 0 for k in after)


def test_a_sharded_local_checkpoint_is_read_in_its_dtype(tmp_path):
    from fedsecure.model.presets import build_base_model, export_preset

    export_preset("r1-distill-qwen-tiny", tmp_path / "m")
    ref = build_base_model("r1-distill-qwen-tiny", 0).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "m", max_shard_size="200KB")  # sharded, bfloat16 on disk
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    base, _ = load_model_and_tokenizer(ModelSettings(preset=None, path=str(tmp_path / "m"), device="cpu",
                                                     dtype="bfloat16"))
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    for (name, p), q in zip(base.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("preset", ["r1-distill-qwen-tiny", "deepseek-v3-tiny"])
def test_gradient_checkpointing_keeps_per_sample_gradients_exact_in_hooks_mode(preset):
    from fedsecure.training.local import activation_checkpointing

    torch.manual_seed(0)
    base, _ = load_model_and_tokenizer(ModelSettings(preset=preset, device="cpu"))
    model = attach_lora(base, LoraSettings(r=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    seqs = [[1, *torch.randint(3, 1000, (n,)).tolist(), 2] for n in (5, 14, 2, 9)]
    params = [p for p in model.parameters() if p.requires_grad]

    def per_sample(checkpoint: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.train()
        gsm = wrap(model, "hooks")
        b = collate(seqs, 0)
        try:
            with activation_checkpointing(model, checkpoint):
                out = gsm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                per_sequence_loss(out.logits, b["labels"]).mean().backward()
            assert all(getattr(p, "grad_sample", None) is not None for p in params), "a LoRA weight got none"
            return [p.grad_sample.clone() for p in params]
        finally:
            unwrap(gsm, model)

    plain, recomputed = per_sample(False), per_sample(True)
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # and the model is back to normal afterwards: no checkpointing, no gradient on the embeddings' output
    assert not model.get_base_model().is_gradient_checkpointing


def test_gradient_checkpointing_with_the_ew_mode_is_refused_with_the_fix():
    from .conftest import small_config

    with pytest.raises(ConfigError, match=r"gradient_checkpointing.*ew.*Fix: set privacy.grad_sample_mode: hooks"):
        small_config(train={"gradient_checkpointing": True}, privacy={"grad_sample_mode": "ew"})
    small_config(train={"gradient_checkpointing": True}, privacy={"grad_sample_mode": "hooks"})  # accepted


def test_a_private_round_with_checkpointing_trains_like_one_without():
    data = TokenizedDataset([[1, *torch.randint(3, 1000, (12,)).tolist(), 2] for _ in range(16)])
    plan = DPStepPlan(sigma=1.0, q=0.5, steps=2, max_grad_norm=1.0)
    states = []
    for checkpoint in (False, True):
        model = _model("float32")
        settings = TrainSettings(batch_size=8, local_steps=2, learning_rate=0.01, gradient_checkpointing=checkpoint)
        train_private(model, data, settings, plan, pad_id=0, randomness=7, grad_sample_mode="hooks")
        states.append(adapter_state(model))
    for k in states[0]:
        np.testing.assert_allclose(states[1][k], states[0][k], rtol=1e-4, atol=1e-6)


def test_the_gpu_check_script_runs_in_its_cpu_form():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--config", "r1-distill-qwen-tiny",
                          "--dtype", "float32", "--batch", "2", "--seq", "16", "--steps", "1"], cwd=root,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "GiB" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["non-private", "dp-ew", "dp-hooks-checkpointing"]


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_a_quantized_base_keeps_attention_lora_float32_and_per_sample_gradients_exact(quantization):
    settings = ModelSettings(preset="r1-distill-qwen-tiny", device="cpu", quantization=quantization)
    settings.validate("model")
    torch.manual_seed(0)
    base, _ = load_model_and_tokenizer(settings)
    layer = base.model.layers[0]
    # the MLP is quantized, the attention projections stay in the base's dtype (model.quantize_attention: false)
    assert type(layer.mlp.up_proj).__name__ == ("Linear8bitLt" if quantization == "int8" else "Linear4bit")
    assert type(layer.self_attn.q_proj) is torch.nn.Linear and layer.self_attn.q_proj.weight.dtype == torch.float32
    plain, _ = load_model_and_tokenizer(ModelSettings(preset="r1-distill-qwen-tiny", device="cpu"))
    size = lambda m: sum(p.numel() * p.element_size() for n, p in m.named_parameters() if ".mlp." in n)  # noqa: E731
    assert size(base) <= size(plain) / (4 if quantization == "int8" else 7)
    model = attach_lora(base, LoraSettings(r=4))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    seqs = [[1, *torch.randint(3, 1000, (n,)).tolist(), 2] for n in (5, 14, 2, 9)]
    params = [p for p in model.parameters() if p.requires_grad]
    reference = per_example_gradients(model, seqs, params)
    gsm = wrap(model, "hooks")
    b = collate(seqs, 0)
    per_sequence_loss(gsm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                      b["labels"]).mean().backward()
    try:
        worst = max(float((p.grad_sample[i] - reference[i][j]).norm() / reference[i][j].norm())
                    for j, p in enumerate(params) for i in range(len(seqs)))
        # the quantized layers are the same (deterministic) function in both computations: exact as in float32
        assert worst < TOLERANCE["float32"], worst
    finally:
        unwrap(gsm, model)


def test_quantization_settings_are_checked_with_the_fix():
    with pytest.raises(ConfigError, match=r"model.quantization.*none, int8, nf4"):
        ModelSettings(quantization="int4").validate("model")
    with pytest.raises(ConfigError, match=r"model.dtype.*float32 or bfloat16 with nf4"):
        ModelSettings(quantization="nf4", dtype="float16").validate("model")


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantizing_the_attention_too_runs_on_multi_head_latent_attention(quantization):
    settings = ModelSettings(preset="deepseek-v3-tiny", device="cpu", quantization=quantization,
                             quantize_attention=True)
    base, _ = load_model_and_tokenizer(settings)
    attn = base.model.layers[0].self_attn
    assert type(attn.q_a_proj) is not torch.nn.Linear  # quantized
    assert (type(attn.kv_b_proj) is torch.nn.Linear) == (quantization == "int8")  # MLA reads it directly
    out = base(input_ids=torch.randint(3, 1000, (2, 12)))
    assert torch.isfinite(out.logits).all()


def test_a_site_refuses_checkpointing_with_the_ew_mode_whatever_the_run_asks():
    # the coordinator's config check is not the site's only guard: a run config from a coordinator that is not
    # ours could ask for it; the site's DP-SGD refuses before any step (no update without per-sample gradients)
    model = _model("float32")
    data = TokenizedDataset([[1, *torch.randint(3, 1000, (12,)).tolist(), 2] for _ in range(8)])
    before = adapter_state(model)
    with pytest.raises(ValueError, match="gradient checkpointing needs grad_sample_mode hooks"):
        train_private(model, data, TrainSettings(batch_size=4, local_steps=1, gradient_checkpointing=True),
                      DPStepPlan(sigma=1.0, q=0.5, steps=1, max_grad_norm=1.0), pad_id=0, randomness=7,
                      grad_sample_mode="ew")
    after = adapter_state(model)
    assert all(np.array_equal(after[k], before[k]) for k in after)
