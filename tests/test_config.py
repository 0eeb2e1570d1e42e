"""Configuration: typed, strict, and round-trips through Flower's flat run config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedsecure.cli import app
from fedsecure.config import SimulationConfig, load_config, parse_override
from fedsecure.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_simulation_yaml_is_valid_and_equals_defaults():
    cfg = load_config(ROOT / "configs" / "simulation.yaml")
    assert cfg == SimulationConfig()


def test_run_config_round_trip():
    cfg = SimulationConfig.from_mapping({"model": {"lora": {"targets": ["q_proj", "o_proj"]}},
                                         "data": {"dir": "/x/y"}, "federation": {"sites": 5}})
    rc = cfg.to_run_config()
    assert all(isinstance(v, (bool, int, float, str)) for v in rc.values())
    assert rc["model.lora.targets"] == "q_proj,o_proj"
    assert SimulationConfig.from_run_config(rc) == cfg


def test_pyproject_flower_run_config_declares_every_key_with_the_default():
    # `flwr run --run-config` only overrides keys declared in pyproject.toml.
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    declared = dict(declared)
    assert declared.pop("run-dir")
    assert declared == SimulationConfig().to_run_config()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model.lora.rank": 4}, "model.lora.rank: unknown key"),
    ({"model.lora.r": "eight"}, "model.lora.r: expected an integer; found 'eight'"),
    ({"model.lora.r": 0}, "model.lora.r: must be a positive integer"),
    ({"federation.sites": 2.5}, "federation.sites: expected an integer"),
    ({"federation.engine": "threads"}, "federation.engine: expected one of 'inprocess', 'ray'"),
    ({"train.learning_rate": "fast"}, "train.learning_rate: expected a number"),
    ({"model.preset": "gpt2"}, "model.preset: must be one of deepseek-v3-tiny"),
    ({"model.preset": None}, "set either 'preset'"),
    ({"data.eval_fraction": 1.5}, "data.eval_fraction: must be in (0, 1)"),
    ({"train": 3}, "train: expected a section"),
    ({"federation.min_sites": 9}, "federation.min_sites: must be in [1, federation.sites]"),
    ({"transport.uplink_bits": 2}, "transport.uplink_bits: must be 32, 8 or 4"),
    ({"transport.uplink_topk": 0}, "transport.uplink_topk: must be in (0, 1]"),
    ({"transport.policy": ["*kv_b_proj*"]}, "transport.policy: transport.policy entry '*kv_b_proj*' must look like"),
    ({"transport.uplink_dither": -1.0}, "transport.uplink_dither: must be in [0, 1000]"),
    ({"transport.downlink_dither": "coarse"}, "transport.downlink_dither: expected a number"),
    ({"transport.policy": ["*lora_A*=d-3/1.0"]}, "dither step must be in [0, 1000] (x RMS; 0 = off); got -3.0"),
    ({"storage.key_provider": "command"}, "storage.key_command: must name the program"),
    ({"storage.key_provider": "vault"}, "storage.key_provider: expected one of 'file', 'env'"),
    ({"privacy.accountant": "gdp"}, "privacy.accountant: 'gdp' (the Gaussian/CLT accountant) can under-report"),
    ({"privacy.grad_sample_mode": "ghost"}, "privacy.grad_sample_mode: must be ew or hooks"),
])
def test_bad_values_name_the_key_and_the_problem(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_yaml_names_the_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("federation:\n  sites: 3\n   rounds: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_config(p)


def test_top_level_must_be_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of keys at the top level"):
        load_config(p)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/sim.yaml")


def test_override_parsing_types():
    assert parse_override("model.lora.r=4") == ("model.lora.r", 4)
    assert parse_override("model.path=null") == ("model.path", None)
    assert parse_override("train.learning_rate=1e-3") == ("train.learning_rate", 1e-3)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("model.lora.r")


runner = CliRunner()


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "model.lora.rank=4"], "model.lora.rank: unknown key"),
    (["--sites", "0"], "federation.sites: must be in [1, 1000]"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
    (["--data-dir", "/nonexistent-data"], "site-0/train.jsonl is missing"),
    (["--model-path", "/nonexistent-model"], "is not a directory"),
])
def test_cli_reports_one_clear_line_and_exit_code_2(args, needle, tmp_path):
    result = runner.invoke(app, ["simulate", "--runs-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output.replace("\n", " ").replace("  ", " ") or needle in result.stderr
    assert "Traceback" not in result.output


def test_cli_rejects_a_model_dir_that_is_not_deepseek(tmp_path):
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "bert"}')
    result = runner.invoke(app, ["simulate", "--runs-dir", str(tmp_path), "--model-path", str(model_dir)])
    assert result.exit_code == 2
    assert "model_type 'bert' is not a DeepSeek" in " ".join(result.output.split())


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("simulate", "data", "model"):
        assert cmd in result.output


def test_simulation_yaml_comments_do_not_hide_keys():
    # every key in the shipped YAML is a real key (yaml parse + strict validation above), and
    # every section of the config appears in it, so users see all knobs
    raw = yaml.safe_load((ROOT / "configs" / "simulation.yaml").read_text())
    assert set(raw) == set(SimulationConfig().to_dict())
