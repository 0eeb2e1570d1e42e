"""Models and LoRA: the right classes, LoRA only where it belongs, adapter state round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedsecure.config import LoraSettings, ModelSettings
from fedsecure.errors import AdapterError, ModelError
from fedsecure.model import (
    adapter_state,
    attach_lora,
    export_preset,
    load_adapter_file,
    load_model_and_tokenizer,
    lora_module_names,
    save_adapter_file,
    set_adapter_state,
)
from fedsecure.model.presets import build_base_model


def _lora_model(preset: str = "deepseek-v3-tiny", r: int = 4):
    base, tok = load_model_and_tokenizer(ModelSettings(preset=preset, lora=LoraSettings(r=r)))
    return attach_lora(base, LoraSettings(r=r)), tok


@pytest.mark.parametrize(("preset", "cls"), [
    ("deepseek-v3-tiny", "DeepseekV3ForCausalLM"),
    ("deepseek-v2-tiny", "DeepseekV2ForCausalLM"),
    ("r1-distill-qwen-tiny", "Qwen2ForCausalLM"),
])
def test_presets_use_the_real_transformers_classes(preset, cls):
    model = build_base_model(preset)
    assert type(model).__name__ == cls
    out = model(input_ids=torch.tensor([[1, 5, 9, 2]]))
    assert out.logits.shape == (1, 4, 1024)


def test_presets_are_bit_identical_for_the_same_seed():
    a, b, c = build_base_model("deepseek-v3-tiny", 0), build_base_model("deepseek-v3-tiny", 0), \
        build_base_model("deepseek-v3-tiny", 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_v3_lora_lands_on_attention_dense_and_shared_expert_mlps_only():
    model, _ = _lora_model()
    got = {n.removeprefix("base_model.model.") for n in lora_module_names(model)}
    attn = {f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
            for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
    dense = {f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    shared = {f"model.layers.1.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert got == attn | dense | shared
    # router, routed experts, norms, embeddings and head stay frozen
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    frozen = [n for n, _ in model.named_parameters() if ".experts." in n or ".mlp.gate." in n]
    assert frozen and not any("lora_" in n for n in frozen)


def test_v2_and_qwen_targets():
    v2, _ = _lora_model("deepseek-v2-tiny")
    v2_names = {n.split(".")[-1] for n in lora_module_names(v2)}
    assert v2_names == {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    qwen, _ = _lora_model("r1-distill-qwen-tiny")
    assert {n.split(".")[-1] for n in lora_module_names(qwen)} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_only_lora_tensors_travel():
    model, _ = _lora_model(r=4)
    state = adapter_state(model)
    assert len(state) == 2 * 16  # A and B for each of the 16 adapted Linear modules
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in state)
    n_lora = sum(v.size for v in state.values())
    n_total = sum(p.numel() for p in model.parameters())
    assert n_lora == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_lora < 0.2 * n_total


def test_adapter_state_round_trip_in_place():
    model, _ = _lora_model()
    rng = np.random.default_rng(0)
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in adapter_state(model).items()}
    params_before = {id(p) for p in model.parameters()}
    set_adapter_state(model, new)
    back = adapter_state(model)
    assert all(np.array_equal(back[k], new[k]) for k in new)
    assert {id(p) for p in model.parameters()} == params_before  # copied in place: hooks would survive


@pytest.mark.parametrize("damage", ["missing", "extra", "shape", "nan"])
def test_mismatched_adapter_is_refused(damage):
    model, _ = _lora_model()
    state = adapter_state(model)
    key = next(iter(state))
    if damage == "missing":
        state.pop(key)
    elif damage == "extra":
        state["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)
    elif damage == "shape":
        state[key] = np.zeros((3, 3), np.float32)
    else:
        state[key] = state[key].copy()
        state[key].flat[0] = np.nan
    before = adapter_state(model)
    with pytest.raises(AdapterError):
        set_adapter_state(model, state)
    after = adapter_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing half-applied


def test_adapter_file_round_trip_and_corruption(tmp_path):
    model, _ = _lora_model()
    state = adapter_state(model)
    p = save_adapter_file(tmp_path / "a.safetensors", state, {"round": "1"})
    loaded, meta = load_adapter_file(p)
    assert meta["round"] == "1" and meta["format"] == "fedsecure-lora-adapter"
    assert all(np.array_equal(loaded[k], state[k]) for k in state)
    raw = bytearray(p.read_bytes())
    raw[3] ^= 0xFF  # break the header length
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(AdapterError, match="corrupt"):
        load_adapter_file(bad)


def test_a_saved_model_directory_loads_back_through_the_local_path(tmp_path):
    out = export_preset("deepseek-v3-tiny", tmp_path / "v3")
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"
    local, tok = load_model_and_tokenizer(ModelSettings(preset=None, path=str(out)))
    preset = build_base_model("deepseek-v3-tiny")
    x = torch.tensor([[1, 17, 300, 44, 2]])
    with torch.no_grad():
        assert torch.allclose(local(input_ids=x).logits, preset(input_ids=x).logits, atol=1e-6)
    assert tok.vocab_size == 1024 and tok.pad_id == 0
    assert tok.encode("Pt is a 45 year old female", 64) == \
        load_model_and_tokenizer(ModelSettings())[1].encode("Pt is a 45 year old female", 64)


def test_local_directory_errors(tmp_path):
    with pytest.raises(ModelError, match="is not a directory"):
        load_model_and_tokenizer(ModelSettings(preset=None, path=str(tmp_path / "nope")))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="not a DeepSeek"):
        load_model_and_tokenizer(ModelSettings(preset=None, path=str(tmp_path / "gpt")))
    (tmp_path / "noweights").mkdir()
    export_preset("deepseek-v3-tiny", tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="cannot load the weights"):
        load_model_and_tokenizer(ModelSettings(preset=None, path=str(tmp_path / "noweights")))


def test_unknown_lora_target_is_a_clear_error():
    base = build_base_model("deepseek-v3-tiny")
    with pytest.raises(ModelError, match="matched no Linear module"):
        attach_lora(base, LoraSettings(targets=("c_attn",)))
