"""``fedsecure data``: site datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsecure.cli.common import console, friendly
from fedsecure.errors import FedSecureError


@friendly
def data_synth(
    sites: int = typer.Option(..., help="Number of hospitals."),
    out: Path = typer.Option(..., help="Output folder; gets site-<i>/train.jsonl and eval.jsonl."),
    records_per_site: int = typer.Option(240, help="Records (patient notes) per site, before the split."),
    eval_fraction: float = typer.Option(0.2, help="Share of each site's records held out for evaluation."),
    seed: int = typer.Option(0, help="Same seed, same bytes."),
) -> None:
    """Write synthetic, non-IID clinical notes for SITES hospitals (JSONL, one note per line)."""
    from fedsecure.data.synth import synthesize

    if sites < 1 or records_per_site < 2 or not 0 < eval_fraction < 1:
        raise FedSecureError("need --sites >= 1, --records-per-site >= 2 and 0 < --eval-fraction < 1")
    if sites > 1000 or records_per_site > 10_000_000:
        raise FedSecureError("--sites is at most 1000 and --records-per-site at most 10,000,000")
    dirs = synthesize(out, sites=sites, records_per_site=records_per_site, eval_fraction=eval_fraction, seed=seed)
    for d in dirs:
        console.print(f"{d}", highlight=False)
