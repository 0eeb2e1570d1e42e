"""The shipped configs of the public DeepSeek checkpoints: architecture, size, and where LoRA attaches."""

from __future__ import annotations

import json

import pytest

from fedsecure.config import LoraSettings
from fedsecure.errors import ModelError
from fedsecure.model.catalog import CHECKPOINTS, lora_sites, meta_model, named_config, parameter_count, raw_config
from fedsecure.model.lora import attach_lora

#: published sizes (billions of parameters, as the model cards and the meta model count them)
SIZES = {"r1-distill-qwen-1.5b": 1.78, "r1-distill-qwen-7b": 7.62, "r1-distill-qwen-14b": 14.77,
         "r1-distill-qwen-32b": 32.76, "r1-distill-llama-8b": 8.03, "r1-distill-llama-70b": 70.55,
         "deepseek-v2-lite": 15.71, "deepseek-v3": 671.03}
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_each_checkpoint_builds_at_its_published_size_with_lora_on_attention_and_dense_mlps(name):
    config = named_config(name)
    model = meta_model(config)
    assert type(model).__name__ == raw_config(name)["architectures"][0]
    assert parameter_count(model) / 1e9 == pytest.approx(SIZES[name], rel=0.01)
    sites = lora_sites(model, LoraSettings(r=8))
    layers = config.num_hidden_layers
    for s in sites:
        parts = s.name.split(".")
        leaf = parts[-1]
        assert leaf in ATTENTION | MLP, s.name
        # never a routed expert nor the router: only attention, the dense MLP, or the shared experts
        assert "experts" not in parts[:-1] or "shared_experts" in parts, s.name
        assert leaf != "gate" and ".gate." not in s.name, s.name
        assert (leaf in ATTENTION) == (".self_attn." in s.name)
    per_leaf = {leaf: sum(1 for s in sites if s.name.endswith("." + leaf)) for leaf in MLP}
    assert per_leaf == dict.fromkeys(MLP, layers)  # one dense or shared-expert MLP a layer, every layer
    attention = {s.name.split(".")[-1] for s in sites} & ATTENTION
    if config.model_type in ("qwen2", "llama"):
        assert attention == {"q_proj", "k_proj", "v_proj", "o_proj"}
    else:  # multi-head latent attention; V2-Lite has no query compression
        expected = {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
        expected |= {"q_proj"} if config.q_lora_rank is None else {"q_a_proj", "q_b_proj"}
        assert attention == expected


@pytest.mark.parametrize("name", ["r1-distill-qwen-1.5b", "deepseek-v2-lite", "deepseek-v3"])
def test_peft_attaches_exactly_the_listed_modules_on_the_meta_device(name):
    model = meta_model(named_config(name))
    expected = sum(s.values for s in lora_sites(model, LoraSettings(r=4)))
    peft_model = attach_lora(model, LoraSettings(r=4))  # verifies no other module got LoRA
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected


def test_an_unknown_name_names_the_shipped_ones():
    from typer.testing import CliRunner

    from fedsecure.cli import app

    res = CliRunner().invoke(app, ["model", "show", "--config-of", "deepseek-r2"])
    assert res.exit_code != 0 and "no shipped config named 'deepseek-r2'" in res.output
    with pytest.raises(ModelError, match="r1-distill-qwen-7b.*model.path"):
        raw_config("deepseek-r2")


def test_the_shipped_configs_are_the_files_provenance_names():
    from importlib import resources

    folder = resources.files("fedsecure") / "assets" / "configs"
    provenance = (folder / "PROVENANCE.md").read_text(encoding="utf-8")
    for name in CHECKPOINTS:
        assert f"{name}.json" in provenance
        doc = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        assert doc["model_type"] in ("qwen2", "llama", "deepseek_v2", "deepseek_v3")


def test_model_show_config_of_lists_targets_and_the_update_size():
    from typer.testing import CliRunner

    from fedsecure.cli import app

    res = CliRunner().invoke(app, ["model", "show", "--config-of", "deepseek-v2-lite", "--r", "8"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    out = res.output
    assert "DeepseekV2ForCausalLM" in out and "6,899,712 trainable values" in out
    assert "shared-expert MLP" in out and "kv_b_proj" in out
