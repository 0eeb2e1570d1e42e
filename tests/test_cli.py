"""The operator commands print what they promise and fail with one clear line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedsecure.cli import app
from fedsecure.privacy.accounting import Spend, epsilon_of

runner = CliRunner()


def test_budget_plan_prints_sigma_and_epsilon_per_round():
    res = runner.invoke(app, ["budget", "plan", "--records", "384", "--batch-size", "32", "--rounds", "3",
                              "--local-steps", "16"])
    assert res.exit_code == 0, res.output
    sigma = float(res.output.split("σ = ")[1].split()[0])
    last = float(res.output.strip().splitlines()[-2].split("│")[3])
    assert last <= 3.0
    assert last == round(epsilon_of([Spend(sigma, 32 / 384, 48)], 1e-5), 4) or abs(
        last - epsilon_of([Spend(sigma, 32 / 384, 48)], 1e-5)) < 1e-3


def test_budget_plan_errors():
    res = runner.invoke(app, ["budget", "plan", "--records", "384", "--accountant", "gdp"])
    assert res.exit_code == 2 and "can under-report" in res.output
    res = runner.invoke(app, ["budget", "plan", "--records", "10", "--epsilon-budget", "0.01", "--rounds", "50",
                              "--batch-size", "10"])
    assert res.exit_code == 2 and "no noise multiplier" in res.output


def test_data_synth_writes_sites(tmp_path):
    res = runner.invoke(app, ["data", "synth", "--sites", "2", "--out", str(tmp_path), "--records-per-site", "10"])
    assert res.exit_code == 0
    for i in range(2):
        lines = (tmp_path / f"site-{i}" / "train.jsonl").read_text().splitlines()
        assert len(lines) == 8 and json.loads(lines[0])["text"]
    assert runner.invoke(app, ["data", "synth", "--sites", "0", "--out", str(tmp_path)]).exit_code == 2


def test_model_show_lists_lora_modules():
    res = runner.invoke(app, ["model", "show", "--preset", "deepseek-v3-tiny", "--r", "4"])
    assert res.exit_code == 0
    assert res.output.count("lora  ") == 16 and "mlp.shared_experts.gate_proj" in res.output
    assert "experts.gate_up_proj" not in res.output


def _one_line_error(res, needle: str) -> None:
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert needle in text, text
    assert "Traceback" not in res.output


def test_bad_inputs_get_one_line_and_exit_code_2(tmp_path):
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\xff\xfe\x00binary\x80")
    _one_line_error(runner.invoke(app, ["simulate", "--config", str(binary)]), "is not a text file (not UTF-8)")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _one_line_error(runner.invoke(app, ["simulate", "--runs-dir", str(a_file), "--sites", "1", "--rounds", "1"]),
                    "cannot create the run directory")
    _one_line_error(runner.invoke(app, ["data", "synth", "--sites", "1", "--out", str(a_file)]),
                    "is a file, not a folder")
    _one_line_error(runner.invoke(app, ["data", "synth", "--sites", "1", "--out", str(tmp_path / "d"),
                                        "--records-per-site", "2", "--eval-fraction", "0.9"]),
                    "leave no training record")
    assert not (tmp_path / "d").exists()  # nothing half-written
    for eps in ("nan", "inf", "1e9", "0"):
        _one_line_error(runner.invoke(app, ["budget", "plan", "--records", "100", "--epsilon-budget", eps]),
                        "must be a finite number in (0, 100]")
    _one_line_error(runner.invoke(app, ["budget", "plan", "--records", "100", "--delta", "0.02"]),
                    "delta 0.02 is not below 1/N = 1/100")
    _one_line_error(runner.invoke(app, ["budget", "plan", "--records", "100", "--delta", "nan"]),
                    "--delta nan must be a number in (0, 1)")


def test_a_model_config_with_a_negative_size_is_refused(tmp_path):
    from fedsecure.model import export_preset

    export_preset("deepseek-v3-tiny", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_size"] = -64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    _one_line_error(runner.invoke(app, ["simulate", "--runs-dir", str(tmp_path / "runs"), "--model-path",
                                        str(tmp_path / "m")]), "hidden_size = -64 is not a positive integer")
    _one_line_error(runner.invoke(app, ["model", "show", "--path", str(tmp_path / "m")]),
                    "hidden_size = -64 is not a positive integer")


def test_a_simulation_whose_sites_would_refuse_the_run_fails_before_any_work(tmp_path):
    _one_line_error(runner.invoke(app, ["simulate", "--runs-dir", str(tmp_path), "--set",
                                        "privacy.epsilon_budget=5"]),
                    "the simulated sites would refuse this run: privacy.epsilon_budget: the run asks for 5 but this "
                    "site allows at most 3 (site.privacy.epsilon_budget)")
    _one_line_error(runner.invoke(app, ["simulate", "--runs-dir", str(tmp_path), "--set", "privacy.enabled=false"]),
                    "privacy.enabled: the run asks for false")
    _one_line_error(runner.invoke(app, ["simulate", "--runs-dir", str(tmp_path), "--set", "privacy.delta=0.008",
                                        "--set", "data.records_per_site=200"]),
                    "privacy.delta: the run asks for 0.008 but this site allows at most 1e-05")
    _one_line_error(runner.invoke(app, ["simulate", "--runs-dir", str(tmp_path), "--set", "privacy.delta=0.008",
                                        "--set", "data.records_per_site=200", "--set", "site.privacy.delta=0.009"]),
                    "delta 0.009 is not below 1/N = 1/160")
    assert not list(tmp_path.iterdir())  # refused before a run directory was made
