"""``fedsecure simulate``: prepare a run directory and data, then run the federation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsecure.attestation.evidence import code_hash
from fedsecure.attestation.policy import MinDP, Policy
from fedsecure.config import SimulationConfig
from fedsecure.data.synth import synthesize
from fedsecure.errors import ConfigError, DataError, FedSecureError
from fedsecure.model.presets import _check_model_dir
from fedsecure.privacy.policy import PolicyRefusal, check_delta, resolve
from fedsecure.store.rundir import RunDir, new_run_id


def check_sites_accept(cfg: SimulationConfig, records: int) -> None:
    """Fail before any work when the simulated sites' own policy would refuse what the run asks for (each
    site would refuse every round), naming the key, both values and the fix.
    """
    terms = resolve(cfg.site.privacy, cfg.site.limits, cfg, records)
    if isinstance(terms, PolicyRefusal):
        raise ConfigError(f"the simulated sites would refuse this run: {terms.reason} (In simulation the sites' "
                          "own settings are the site: section; a run config can only tighten them.)")
    if cfg.privacy.delta is not None:
        bad = check_delta(cfg.privacy.delta, records, "privacy.delta")
        if bad is not None:
            raise ConfigError(bad)


def _count_records(path: Path) -> int:
    """Non-blank lines of a JSONL file: at least the records a site will train on (a broken line is that
    site's own error, reported in its round, and must not stop the other sites).
    """
    with path.open("rb") as f:
        return max(1, sum(1 for line in f if line.strip()))


def prepare(cfg: SimulationConfig, run_dir: str | Path | None = None) -> tuple[SimulationConfig, RunDir]:
    """Create the run directory; synthesise data if ``data.dir`` is unset; check inputs before any work."""
    path = Path(run_dir) if run_dir else Path(cfg.runs_dir) / new_run_id()
    if (path / "summary.json").exists() or (path / "coordinator-state.json").exists():
        from fedsecure.federation.checkpoint import finished_run

        why = finished_run(RunDir(path))
        if why is not None:  # before anything in it is rewritten
            raise ConfigError(why)
    if cfg.model.path:
        _check_model_dir(Path(cfg.model.path))
    if cfg.data.dir is None:  # synthesised: the smallest training split is known before any work
        check_sites_accept(cfg, cfg.data.records_per_site - max(1, round(cfg.data.records_per_site
                                                                          * cfg.data.eval_fraction)))
    if cfg.data.dir:
        data_dir = Path(cfg.data.dir).resolve()
        for i in range(cfg.federation.sites):
            for split in ("train.jsonl", "eval.jsonl"):
                f = data_dir / f"site-{i}" / split
                if not f.is_file():
                    raise DataError(f"data.dir: {f} is missing ({cfg.federation.sites} sites need site-0 .. "
                                    f"site-{cfg.federation.sites - 1}). Fix: run `fedsecure data synth --sites "
                                    f"{cfg.federation.sites} --out {data_dir}` or lower federation.sites.")
            check_sites_accept(cfg, _count_records(data_dir / f"site-{i}" / "train.jsonl"))
        run = RunDir(path)
    else:
        run = RunDir(path)
        data_dir = (run.path / "data").resolve()
        synthesize(data_dir, sites=cfg.federation.sites, records_per_site=cfg.data.records_per_site,
                   eval_fraction=cfg.data.eval_fraction, seed=cfg.seed)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(data_dir)))
    sa = cfg.federation.secure_aggregation
    if sa.enabled and not sa.roster:
        roster = simulation_roster(cfg, run.path)
        cfg = dataclasses.replace(cfg, federation=dataclasses.replace(
            cfg.federation, secure_aggregation=dataclasses.replace(sa, roster=str(roster))))
    if cfg.attestation.enabled and not cfg.attestation.policy:
        policy_path = run.write_file("attestation-policy.yaml", simulation_policy(cfg).to_yaml())
        cfg = dataclasses.replace(cfg, attestation=dataclasses.replace(cfg.attestation, policy=str(policy_path)))
    run.write_config(cfg.to_dict())
    return cfg, run


def simulation_roster(cfg: SimulationConfig, run_dir: Path) -> Path:
    """The secure-aggregation roster of the simulated sites: each one's node key (made now in its state
    directory, where its attestation uses it), written to ``<run-dir>/secagg-roster.yaml``.
    """
    from fedsecure.attestation.providers import load_or_create_ed25519
    from fedsecure.data.dataset import site_dir
    from fedsecure.secagg.roster import write_roster

    node_keys = {}
    for i in range(cfg.federation.sites):
        site = cfg.site.for_site(f"site-{i}", site_dir(str(cfg.data.dir), i), run_dir)
        key = load_or_create_ed25519(Path(str(site.state_dir)) / "attestation" / "node-key.pem")
        node_keys[f"site-{i}"] = key.public_key()
    return write_roster(run_dir / "secagg-roster.yaml", node_keys)


def simulation_policy(cfg: SimulationConfig) -> Policy:
    """The policy `fedsecure simulate` generates when none is given: software evidence from this very build,
    and DP settings no weaker than the run's own privacy config.
    """
    ch = code_hash()
    min_dp = None
    if cfg.privacy.enabled:
        own = cfg.site.privacy
        min_dp = MinDP(epsilon_budget=cfg.privacy.epsilon_budget or own.epsilon_budget,
                       delta=cfg.privacy.delta or own.delta or 1e-5,
                       min_sigma=cfg.privacy.noise_multiplier or own.min_sigma,
                       secure_noise=cfg.site.noise_seed is None)
    return Policy(measurements={"software": (ch,)}, code=(ch,), min_dp=min_dp, max_evidence_age_s=3600.0,
                  on_failure="reject-update", source="generated by fedsecure simulate")


def budget_warnings(cfg: SimulationConfig, run_dir: str | Path) -> list[str]:
    """Before any work: for each simulated site whose ledgers persist (``site.state_dir``), what its budget
    allows this run. A site out of budget will refuse every round; one left with a remnant would spend it
    on updates that are mostly noise. Sites with no ledger yet are skipped (and no keyring is created).
    """
    from fedsecure.data.dataset import site_dir
    from fedsecure.federation.site import dataset_key
    from fedsecure.privacy.guard import Refusal, SitePrivacyGuard
    from fedsecure.store.keyrings import site_keyring

    if not cfg.site.state_dir or not cfg.privacy.enabled or not cfg.data.dir:
        return []
    out = []
    for i in range(cfg.federation.sites):
        site = cfg.site.for_site(f"site-{i}", site_dir(cfg.data.dir, i), run_dir)
        if not any(Path(str(site.state_dir)).glob("privacy-ledger-*")):
            continue
        records = _count_records(Path(str(site.data_dir)) / "train.jsonl")
        terms = resolve(site.privacy, site.limits, cfg, records)
        if isinstance(terms, PolicyRefusal) or not terms.private:
            continue
        try:
            guard = SitePrivacyGuard(terms, state_dir=str(site.state_dir), dataset=dataset_key(site),
                                     num_records=records, ring=site_keyring(site))
            decision = guard.plan(server_round=1, rounds_total=cfg.federation.rounds)
        except FedSecureError as e:  # that site's own problem: it will say so in its rounds, the others go on
            out.append(f"{site.name}: its privacy ledger cannot be used ({e}); it will fail its rounds")
            continue
        if isinstance(decision, Refusal):
            out.append(f"{site.name} will refuse every round: its privacy budget for this dataset is spent "
                       f"(epsilon {decision.epsilon_spent:.4g} of {decision.epsilon_budget:g}, ledger in "
                       f"{site.state_dir})")
        else:
            note = guard.remnant(decision, server_round=1, rounds_total=cfg.federation.rounds)
            if note:
                out.append(f"{site.name}: {note}")
    return out


def simulate(cfg: SimulationConfig, run_dir: str | Path | None = None,
             observer: Callable[[dict[str, Any]], None] | None = None,
             announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one simulated federation end to end; returns the run summary. ``observer`` gets each round's
    federation record as it is written; ``announce`` gets the engine's start-up lines.
    """
    import threading

    from fedsecure.launch import engines

    cfg, run = prepare(cfg, run_dir)
    for warning in budget_warnings(cfg, run.path):
        (announce or print)(f"warning: {warning}")
    stop = threading.Event()
    watcher = engines.watch_rounds(run.metrics_path, observer, stop) if observer else None
    sites = serve_site_metrics(cfg, run.path, stop, announce or print) if cfg.metrics.enabled else None
    try:
        if cfg.federation.engine == "ray":
            engines.run_flwr_engine(cfg, run.path, emit=announce)
        else:
            engines.run_inprocess_engine(cfg, run.path)
    finally:
        from fedsecure.training.spawn import shutdown_pools

        shutdown_pools()  # the simulated sites' warm ranks end with the run
        stop.set()
        if watcher is not None:
            watcher.join(timeout=5)
        if sites is not None:
            sites.join(timeout=5)
    return run.read_summary()


def serve_site_metrics(cfg: SimulationConfig, run_dir: Path, stop: Any, emit: Callable[[str], None],
                       every_s: float = 0.2) -> Any:
    """The simulated sites' own endpoints (``metrics.site_port + i``), as each site's supervisor serves them in a
    deployment: fed from the site's events file until ``stop`` is set; returns the thread that feeds them.
    """
    import json
    import threading

    from fedsecure.data.dataset import site_dir
    from fedsecure.federation.site_events import EVENTS
    from fedsecure.launch.engines import LogFollower
    from fedsecure.observe.site_metrics import SiteMetrics

    feeds = []
    for i in range(cfg.federation.sites):
        site = cfg.site.for_site(f"site-{i}", site_dir(str(cfg.data.dir), i), run_dir)
        events = Path(str(site.state_dir)) / EVENTS
        metrics = SiteMetrics(site.name)
        metrics.restore(events)
        port = metrics.serve(cfg.metrics.host, cfg.metrics.site_port + i if cfg.metrics.site_port else 0)
        emit(f"metrics: {site.name}'s own endpoint on http://{cfg.metrics.host}:{port}/metrics")
        feeds.append((metrics, LogFollower(events, from_end=True)))

    def feed() -> None:
        while True:
            last = stop.wait(every_s)
            for metrics, follower in feeds:
                for line in follower.lines():
                    try:
                        metrics.observe(json.loads(line))
                    except (ValueError, TypeError, AttributeError):
                        continue
            if last:
                break
        for metrics, _ in feeds:
            metrics.close()

    thread = threading.Thread(target=feed, name="site-metrics", daemon=True)
    thread.start()
    return thread
