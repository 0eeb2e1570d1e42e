"""``fedsecure simulate``: prepare a run directory and data, then run the federation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsecure.config import SimulationConfig
from fedsecure.data.synth import synthesize
from fedsecure.errors import DataError
from fedsecure.model.presets import _check_model_dir
from fedsecure.runs import RunDir, new_run_id


def prepare(cfg: SimulationConfig, run_dir: str | Path | None = None) -> tuple[SimulationConfig, RunDir]:
    """Create the run directory; synthesise data if ``data.dir`` is unset; check inputs before any work."""
    path = Path(run_dir) if run_dir else Path(cfg.runs_dir) / new_run_id()
    if cfg.model.path:
        _check_model_dir(Path(cfg.model.path))
    if cfg.data.dir:
        data_dir = Path(cfg.data.dir).resolve()
        for i in range(cfg.federation.sites):
            for split in ("train.jsonl", "eval.jsonl"):
                f = data_dir / f"site-{i}" / split
                if not f.is_file():
                    raise DataError(f"data.dir: {f} is missing ({cfg.federation.sites} sites need site-0 .. "
                                    f"site-{cfg.federation.sites - 1}). Fix: run `fedsecure data synth --sites "
                                    f"{cfg.federation.sites} --out {data_dir}` or lower federation.sites.")
        run = RunDir(path)
    else:
        run = RunDir(path)
        data_dir = (run.path / "data").resolve()
        synthesize(data_dir, sites=cfg.federation.sites, records_per_site=cfg.data.records_per_site,
                   eval_fraction=cfg.data.eval_fraction, seed=cfg.seed)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(data_dir)))
    run.write_config(cfg.to_dict())
    return cfg, run


def simulate(cfg: SimulationConfig, run_dir: str | Path | None = None,
             observer: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one simulated federation end to end; returns the run summary."""
    from fedsecure.federation import engines, server

    cfg, run = prepare(cfg, run_dir)
    if observer:
        server.OBSERVERS.append(observer)
    try:
        if cfg.federation.engine == "ray":
            engines.run_flwr_engine(cfg, run.path)
        else:
            engines.run_inprocess_engine(cfg, run.path)
    finally:
        if observer:
            server.OBSERVERS.remove(observer)
    return run.read_summary()
