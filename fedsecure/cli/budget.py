"""``fedsecure budget``: plan the noise for a budget before training."""

from __future__ import annotations

import typer
from rich.table import Table

from fedsecure.cli.common import console, friendly
from fedsecure.errors import FedSecureError


@friendly
def budget_plan(
    epsilon_budget: float = typer.Option(3.0, help="The site's budget ε (over every run of the dataset)."),
    delta: float | None = typer.Option(None, help="δ; default min(1e-5, 1/(10·records))."),
    records: int = typer.Option(..., help="Training records (patient documents) at the site."),
    batch_size: int = typer.Option(32, help="Expected batch size; q = batch_size / records."),
    rounds: int = typer.Option(3, help="Federated rounds the site will train in."),
    local_steps: int = typer.Option(16, help="DP-SGD steps per round."),
    accountant: str = typer.Option("prv", help="prv (default) or rdp."),
    suggest: bool = typer.Option(False, "--suggest", help="Rank expected batch x local steps for this budget and "
                                 "plan the one with the most signal per noise at the least compute."),
) -> None:
    """Print the σ a site will use for this plan and ε after each round (--suggest: choose batch and steps)."""
    import math

    from fedsecure.privacy.accounting import Spend, calibrate_noise, check_accountant, default_delta, epsilon_of
    from fedsecure.privacy.policy import check_delta

    check_accountant(accountant, "--accountant")
    if records < 1 or batch_size < 1 or rounds < 1 or local_steps < 1:
        raise FedSecureError("--records, --batch-size, --rounds and --local-steps must all be >= 1")
    if not (math.isfinite(epsilon_budget) and 0 < epsilon_budget <= 100):
        raise FedSecureError(f"--epsilon-budget {epsilon_budget} must be a finite number in (0, 100]. Fix: e.g. "
                             "--epsilon-budget 3")
    if delta is not None and not (math.isfinite(delta) and 0 < delta < 1):
        raise FedSecureError(f"--delta {delta} must be a number in (0, 1). Fix: leave it out for min(1e-5, "
                             "1/(10 records))")
    if rounds * local_steps > 1_000_000:
        raise FedSecureError(f"{rounds} rounds x {local_steps} steps is over a million steps. Fix: plan fewer.")
    d = delta if delta is not None else default_delta(records)
    bad = check_delta(d, records, "--delta")
    if bad is not None:
        raise FedSecureError(bad)
    if suggest:
        batch_size, local_steps = _suggest(epsilon_budget, d, records, rounds, batch_size, local_steps)
    q = min(1.0, batch_size / records)
    sigma = calibrate_noise(epsilon_budget=epsilon_budget, delta=d, spent=[], q=q, steps=rounds * local_steps,
                            accountant=accountant)
    if sigma is None:
        raise FedSecureError(f"no noise multiplier up to 64 fits epsilon_budget={epsilon_budget} for "
                             f"{rounds * local_steps} steps at q={q:.4f}. Fix: raise the budget, train fewer steps or "
                             "use more records.")
    console.print(f"budget ε = {epsilon_budget} at δ = {d:.1e} ({accountant}); q = {batch_size}/{records} = {q:.4f}; "
                  f"{rounds} rounds × {local_steps} steps", highlight=False)
    console.print(f"noise multiplier σ = {sigma:.4f} (noise std σ·C per summed gradient)", highlight=False)
    table = Table()
    table.add_column("after round", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("ε", justify="right")
    for r in range(1, rounds + 1):
        eps_r = epsilon_of([Spend(sigma, q, r * local_steps)], d, accountant)
        table.add_row(str(r), str(r * local_steps), f"{eps_r:.4f}")
    console.print(table)


def _suggest(epsilon_budget: float, delta: float, records: int, rounds: int, batch: int, steps: int
             ) -> tuple[int, int]:
    """Print the ranked plans (fedsecure.privacy.plan) and return the suggested (batch, local steps)."""
    from fedsecure.privacy.plan import candidates, score, suggest

    plans = candidates(epsilon_budget=epsilon_budget, delta=delta, records=records, rounds=rounds)
    chosen = suggest(plans)
    best = plans[0].score
    table = Table(title=f"plans for ε = {epsilon_budget} over {rounds} rounds, {records} records (RDP, ranked by "
                        "signal-to-noise score sqrt(steps) x batch / σ)")
    for col in ("batch", "steps/round", "σ", "score (best = 1)", "examples/round", ""):
        table.add_column(col, justify="right")
    shown = plans[:8] + [p for p in plans[8:] if p == chosen or (p.batch, p.local_steps) == (batch, steps)]
    for p in shown:
        mark = "suggested" if p == chosen else ("yours" if (p.batch, p.local_steps) == (batch, steps) else "")
        table.add_row(str(p.batch), str(p.local_steps), f"{p.sigma:.3f}", f"{p.score / best:.3f}",
                      f"{p.examples_per_round():,}", mark)
    console.print(table)
    mine = next((p for p in plans if (p.batch, p.local_steps) == (batch, steps)), None)
    if mine is not None and mine != chosen:
        rel = score(batch, rounds * steps, mine.sigma) / best
        console.print(f"yours (batch {batch}, {steps} steps) scores {rel:.3f} of the best", highlight=False)
    console.print(f"suggested: --batch-size {chosen.batch} --local-steps {chosen.local_steps} (the least compute "
                  "within 5% of the best score; the score ranks plans, tune the learning rate by measurement: "
                  "bench/bench_private_defaults.py)", highlight=False, soft_wrap=True)
    return chosen.batch, chosen.local_steps
