"""`fedsecure budget plan --suggest`: batch and local steps for a budget (fedsecure/privacy/plan.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedsecure.cli import app
from fedsecure.errors import ConfigError
from fedsecure.privacy import plan as planning
from fedsecure.privacy.plan import Plan, candidates, suggest

runner = CliRunner()


def test_the_score_orders_plans_as_the_measured_dp_losses_do():
    # BENCHMARKS.md (bench_private_defaults, demo, 384 records, 3 rounds, eps 3, lr 0.0035): DP final loss
    # 128/24 0.7295 < 128/16 0.7389 < 64/24 0.7390 < 64/16 0.7513
    plans = candidates(epsilon_budget=3.0, delta=1e-5, records=384, rounds=3, batches=(64, 128), steps=(16, 24))
    assert [(p.batch, p.local_steps) for p in plans] == [(128, 24), (128, 16), (64, 24), (64, 16)]


def test_every_plan_fits_the_budget_by_an_independent_accountant():
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    for p in candidates(epsilon_budget=2.0, delta=1e-5, records=1000, rounds=4, batches=(16, 64, 256),
                        steps=(8, 32)):
        acc = rdp_privacy_accountant.RdpAccountant()
        acc.compose(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(p.batch / 1000, dp_event.GaussianDpEvent(p.sigma)), 4 * p.local_steps))
        assert acc.get_epsilon(1e-5) <= 2.0 * 1.005, p  # RDP bounds agree to conversion slack


def test_the_suggestion_is_the_cheapest_plan_near_the_best():
    plans = [Plan(256, 32, 9.0, 100.0), Plan(128, 16, 4.0, 96.0), Plan(64, 8, 2.0, 96.0), Plan(32, 4, 1.0, 80.0)]
    assert suggest(plans) == Plan(64, 8, 2.0, 96.0)  # within 5% of 100 and the fewest examples per round
    assert suggest(plans, tolerance=0.01) == plans[0]


def test_no_plan_fits_gets_a_clear_error():
    with pytest.raises(ConfigError, match="Fix: raise the budget"):
        candidates(epsilon_budget=0.01, delta=1e-3, records=20, rounds=50, batches=(8,), steps=(64,))
    with pytest.raises(ConfigError, match="at least 2"):
        candidates(epsilon_budget=3.0, delta=1e-5, records=1, rounds=3)


def test_cli_suggests_and_plans_the_suggestion(monkeypatch):
    monkeypatch.setattr(planning, "BATCHES", (32, 64, 128))
    monkeypatch.setattr(planning, "STEPS", (16, 24))
    res = runner.invoke(app, ["budget", "plan", "--records", "384", "--rounds", "3", "--batch-size", "32",
                              "--local-steps", "16", "--suggest", "--accountant", "rdp"])
    assert res.exit_code == 0, res.output
    assert "suggested: --batch-size 128 --local-steps 16" in res.output
    assert "q = 128/384" in res.output and "3 rounds × 16 steps" in res.output  # the plan printed is the suggestion
    assert "yours" in res.output
