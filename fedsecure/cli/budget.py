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
) -> None:
    """Print the σ a site will use for this plan and ε after each round."""
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
