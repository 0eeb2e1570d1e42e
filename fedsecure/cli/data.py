"""``fedsecure data``: site datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from fedsecure.cli.common import console, friendly
from fedsecure.config import DataSettings
from fedsecure.errors import FedSecureError

#: what `fedsecure simulate` synthesises when data.dir is unset: one default for both commands
_DATA = DataSettings()


@friendly
def data_synth(
    sites: int = typer.Option(..., help="Number of hospitals."),
    out: Path = typer.Option(..., help="Output folder; gets site-<i>/train.jsonl, eval.jsonl and profile.json."),
    records_per_site: int = typer.Option(_DATA.records_per_site, help="Records (patient notes) per site, before "
                                         "the split; the default is what `fedsecure simulate` synthesises "
                                         "[data.records_per_site]."),
    eval_fraction: float = typer.Option(_DATA.eval_fraction, help="Share of each site's records held out for "
                                        "evaluation [data.eval_fraction]."),
    seed: int = typer.Option(0, help="Same seed, same bytes."),
) -> None:
    """Write synthetic, non-IID clinical notes for SITES hospitals (JSONL, one note per line).

    Each site-<i>/ gets train.jsonl and eval.jsonl (one {"text": ..., "specialty": ...} record per line) and
    profile.json: the synthetic hospital the notes were drawn from (name, specialty_mix, style, mean_findings,
    age_range), so you can see how the sites differ. profile.json is for people: training reads only
    train.jsonl and eval.jsonl, and nothing in fedsecure reads profile.json.
    """
    from fedsecure.data.synth import synthesize

    if sites < 1 or records_per_site < 2 or not 0 < eval_fraction < 1:
        raise FedSecureError("need --sites >= 1, --records-per-site >= 2 and 0 < --eval-fraction < 1")
    if sites > 1000 or records_per_site > 10_000_000:
        raise FedSecureError("--sites is at most 1000 and --records-per-site at most 10,000,000")
    dirs = synthesize(out, sites=sites, records_per_site=records_per_site, eval_fraction=eval_fraction, seed=seed)
    for d in dirs:
        console.print(f"{d}", highlight=False)
