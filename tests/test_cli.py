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
    res = runner.invoke(app, ["budget", "plan", "--records", "10", "--epsilon", "0.01", "--rounds", "50",
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
