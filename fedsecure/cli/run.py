"""``fedsecure simulate``, ``server`` and ``client``: run a federation, a coordinator or a hospital site."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import typer

from fedsecure.cli.common import console, err_console, friendly, setup_logging
from fedsecure.reports.run import render


@friendly
def simulate(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (see configs/simulation.yaml)."),
    sites: int | None = typer.Option(None, help="Number of hospital sites [federation.sites]."),
    rounds: int | None = typer.Option(None, help="Federated rounds [federation.rounds]."),
    preset: str | None = typer.Option(None, help="Tiny built-in model: deepseek-v3-tiny, deepseek-v2-tiny, "
                                                    "r1-distill-qwen-tiny [model.preset]."),
    model_path: Path | None = typer.Option(None, help="Local Hugging Face model directory [model.path]."),
    data_dir: Path | None = typer.Option(None, help="Folder with site-<i>/{train,eval}.jsonl [data.dir]; "
                                                       "unset = synthesise."),
    seed: int | None = typer.Option(None, help="Seed of data, initial adapter and sampling [seed]."),
    engine: str | None = typer.Option(None, help="inprocess (fast, default) or ray (Flower's simulation "
                                                    "engine) [federation.engine]."),
    runs_dir: Path | None = typer.Option(None, help="Where run directories are created [runs_dir]."),
    run_dir: Path | None = typer.Option(None, help="Exact run directory to use (default runs_dir/<run-id>)."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: --set model.lora.r=4 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step."),
) -> None:
    """Run a simulated multi-site federation on this machine and print its summary.

    Exit codes: 0 the run completed; 1 it ended early (all sites out of budget, too few sites); 2 a
    configuration or data error.
    """
    from fedsecure.config import load_config, parse_override
    from fedsecure.launch.simulate import simulate as run_simulation

    setup_logging(verbose)
    from fedsecure.attestation.verify import SoftwareAttestationWarning

    warnings.simplefilter("ignore", SoftwareAttestationWarning)  # each use is logged once, and summarised
    overrides: dict[str, Any] = dict(parse_override(s) for s in set_)
    named = {"federation.sites": sites, "federation.rounds": rounds, "model.preset": preset,
             "model.path": str(model_path) if model_path else None, "data.dir": str(data_dir) if data_dir else None,
             "seed": seed, "federation.engine": engine, "runs_dir": str(runs_dir) if runs_dir else None}
    overrides.update({k: v for k, v in named.items() if v is not None})
    if model_path is not None:
        overrides["model.preset"] = None
    cfg = load_config(config, overrides)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task(f"{cfg.federation.sites} sites, {cfg.model.path or cfg.model.preset}",
                                 total=cfg.federation.rounds)

        def on_round(r: dict[str, Any]) -> None:
            loss = "n/a" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
            progress.console.print(f"round {r['round']}: held-out loss {loss}, {r['sites_ok']} sites, "
                                   f"{r['seconds']:.1f} s", highlight=False)
            progress.update(task, completed=r["round"])

        summary = run_simulation(cfg, run_dir, observer=on_round,
                                 announce=lambda line: progress.console.print(line, highlight=False, soft_wrap=True,
                                                                              markup=False))
    render(summary, console)
    _exit_for(summary)


@friendly
def server_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Coordinator config (see configs/coordinator.yaml)."),
    run_dir: Path | None = typer.Option(None, help="Run directory of this run [server.run_dir]; a new one starts a "
                                                   "new run, the same one resumes an unfinished run."),
    host: str | None = typer.Option(None, help="Address the SuperLink binds [server.host]: 0.0.0.0 in a container "
                                              "(deploy/container/compose.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a federation key: --set federation.rounds=5."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step."),
) -> None:
    """Run the coordinator: a TLS SuperLink with SuperNode authentication, and the fedsecure run on it.

    Exit codes: 0 the run completed; 1 it ended early (all sites out of budget, too few sites); 2 a
    configuration error, or the run directory holds a finished run; 130 stopped (resumable).
    """
    import dataclasses
    import threading

    from fedsecure.config import parse_override
    from fedsecure.errors import ConfigError
    from fedsecure.launch.deploy import Server, install_signal_handlers
    from fedsecure.launch.deploy_config import load_coordinator_config

    setup_logging(verbose)
    dc = load_coordinator_config(config, dict(parse_override(s) for s in set_))
    if run_dir is not None:
        dc = dataclasses.replace(dc, run_dir=run_dir.expanduser().resolve())
    if host is not None:
        if not host.strip():
            raise ConfigError("--host: must be an address to bind, e.g. 0.0.0.0 or 127.0.0.1")
        dc = dataclasses.replace(dc, host=host.strip())
    srv = Server(dc, emit=lambda m: console.print(m, highlight=False, soft_wrap=True, markup=False))
    stopping = threading.Event()
    install_signal_handlers(stopping)
    srv.stopping = stopping
    try:
        summary = srv.run()
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped; the run directory {dc.run_dir} is consistent, and `fedsecure server` with "
                      "the same config resumes after the last completed round[/]")
        raise typer.Exit(130) from None
    render(summary, console)
    _exit_for(summary)


def _exit_for(summary: dict[str, Any]) -> None:
    """Exit 1 with the reason when the run ended before its last round (everything so far is saved)."""
    if summary.get("stopped"):
        err_console.print(f"error: the run ended early after round {summary.get('rounds_completed')}: "
                          f"{summary['stopped']}. Results so far are saved in {summary.get('run_dir')}.",
                          highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)


@friendly
def client_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Site config (see configs/site.yaml)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step."),
) -> None:
    """Run a hospital site: a SuperNode with TLS and its authentication key, kept up across rounds and runs."""
    import threading

    from fedsecure.launch.deploy import install_signal_handlers, run_site
    from fedsecure.launch.deploy_config import load_site_config

    setup_logging(verbose)
    sc = load_site_config(config)
    stopping = threading.Event()
    install_signal_handlers(stopping)
    try:
        code = run_site(sc, emit=lambda m: console.print(m, highlight=False, soft_wrap=True, markup=False),
                        stopping=stopping)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)
