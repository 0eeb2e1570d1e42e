"""The ``fedsecure`` command line (Typer). Commands stay thin and call the library.

Every user error is a :class:`~fedsecure.errors.FedSecureError`; it is printed as one line
(``error: ...``) with exit code 2, never as a traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from fedsecure.errors import FedSecureError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="fedsecure",
    help="Federated, differentially private LoRA fine-tuning of DeepSeek models across hospitals, on Flower.",
    no_args_is_help=True, add_completion=False, rich_markup_mode="rich", pretty_exceptions_enable=False)
data_app = typer.Typer(help="Site datasets: synthesise realistic non-IID clinical notes.", no_args_is_help=True)
model_app = typer.Typer(help="Base models and LoRA: inspect a preset or local model, export a preset.",
                        no_args_is_help=True)
budget_app = typer.Typer(help="Privacy budgets: plan the noise for a budget before training.", no_args_is_help=True)
keys_app = typer.Typer(help="Key-encryption keys for sealed storage: init, show, rotate.", no_args_is_help=True)
attest_app = typer.Typer(help="TEE attestation evidence: inspect, verify, this build's code hash.",
                         no_args_is_help=True)
audit_app = typer.Typer(help="The coordinator's hash-chained audit log.", no_args_is_help=True)
certs_app = typer.Typer(help="Consortium TLS CA, coordinator certificate and site authentication keys.",
                        no_args_is_help=True)
app.add_typer(certs_app, name="certs")
app.add_typer(attest_app, name="attest")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
app.add_typer(data_app, name="data")
app.add_typer(budget_app, name="budget")
app.add_typer(model_app, name="model")

console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)


def friendly(fn: F) -> F:
    """Turn a FedSecureError into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FedSecureError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from fedsecure.federation.server import quiet_flower_logs

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)
    quiet_flower_logs(verbose)


@app.command()
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
    """Run a simulated multi-site federation on this machine and print its summary."""
    from fedsecure.config import load_config, parse_override
    from fedsecure.simulation import simulate as run_simulation

    _setup_logging(verbose)
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

        summary = run_simulation(cfg, run_dir, observer=on_round)
    print_summary(summary)


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="Federation", show_lines=False)
    for col in ("round", "held-out loss", "sites trained", "bytes down", "bytes up", "seconds", "refused / failed"):
        table.add_column(col, justify="left" if col.startswith("refused") else "right")
    for h in summary["rounds"]:
        loss = "n/a" if h["eval_loss"] is None else f"{h['eval_loss']:.4f}"
        notes = [f"{k}: budget exhausted" for k in h.get("refused", [])]
        notes += [f"{k}: {v}" for k, v in h["failures"].items()]
        table.add_row(str(h["round"]), loss, "-" if h["round"] == 0 else str(h["sites_ok"]),
                      f"{h['bytes_down']:,}", f"{h['bytes_up']:,}", f"{h['seconds']:.2f}", "; ".join(notes) or "-")
    console.print(table)
    i, f = summary["initial_eval_loss"], summary["final_eval_loss"]
    if i is not None and f is not None:
        console.print(f"Held-out loss {i:.4f} -> {f:.4f} ({f - i:+.4f}) after {summary['rounds_completed']} rounds.")
    if summary.get("stopped"):
        console.print(f"[yellow]The run ended early: {summary['stopped']}. Results so far are saved.[/]")
    print_privacy(summary["privacy"])
    print_attestation(summary)
    console.print(f"Run directory: {summary['run_dir']} (privacy.json, privacy.md, metrics.jsonl, adapters/, "
                  "audit.log)", highlight=False)


def print_attestation(summary: dict[str, Any]) -> None:
    att = summary.get("attestation") or {}
    if not att.get("enabled"):
        console.print("[yellow]Attestation was off: updates were accepted without evidence.[/]")
        return
    results = [r for h in summary["rounds"] for r in h.get("attestation", {}).values()]
    ok = sum(r.startswith("verified") for r in results)
    kinds = sorted({r.split("(")[1].split(",")[0] for r in results if r.startswith("verified")})
    line = (f"Attestation: {ok}/{len(results)} statements verified ({', '.join(kinds) or 'none'}); policy "
            f"{att['policy']}; audit log {att['audit_entries']} entries, head {att['audit_head'][:16]}.")
    console.print(line, highlight=False)
    if "software" in kinds:
        console.print("[yellow]Software evidence proves nothing about the platform: simulation only.[/]")


def print_privacy(privacy: dict[str, Any]) -> None:
    if not privacy["record_level"]:
        console.print("[bold red]Differential privacy was OFF: these updates are not private.[/]")
    table = Table(title=f"Privacy report (record-level DP-SGD, {privacy['accountant']} accountant)")
    for col in ("site", "status", "ε spent / budget", "δ", "σ", "C", "q", "steps", "refused rounds"):
        table.add_column(col, justify="left" if col in ("site", "status", "refused rounds") else "right")

    def fmt(x: Any, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    for s in privacy["sites"].values():
        table.add_row(s["site"], s["status"], f"{fmt(s['epsilon_spent'], '.3f')} / {fmt(s['epsilon_budget'], 'g')}",
                      fmt(s["delta"], ".1e"), fmt(s["sigma"], ".3f"), fmt(s["max_grad_norm"], "g"),
                      fmt(s["q"], ".4f"), str(s["steps_this_run"]),
                      ", ".join(map(str, s["refused_rounds"])) or "-")
    console.print(table)
    cl = privacy["client_level"]
    if cl.get("enabled"):
        console.print(f"Client-level DP (coordinator, separate guarantee): ε = {cl['epsilon']:.3f} at "
                      f"δ = {cl['delta']:.0e} over {cl['rounds']} rounds (S = {cl['clip']}, "
                      f"σ_c = {cl['noise_multiplier']}).")


@data_app.command("synth")
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


@model_app.command("show")
@friendly
def model_show(
    preset: str | None = typer.Option("deepseek-v3-tiny", help="Built-in preset."),
    path: Path | None = typer.Option(None, help="Local model directory (overrides --preset)."),
    r: int = typer.Option(8, help="LoRA rank."),
) -> None:
    """List which modules get LoRA and how many parameters train."""
    from fedsecure.config import LoraSettings, ModelSettings
    from fedsecure.model import attach_lora, load_model_and_tokenizer, lora_module_names

    settings = ModelSettings(preset=None if path else preset, path=str(path) if path else None,
                             lora=LoraSettings(r=r))
    settings.validate("model")
    base, tok = load_model_and_tokenizer(settings)
    total = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, settings.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"{type(base).__name__} ({base.config.model_type}), tokenizer {tok.name} "
                  f"({tok.vocab_size} tokens)", highlight=False)
    console.print(f"trainable {trainable:,} of {total + trainable:,} parameters (LoRA r={r})")
    for name in lora_module_names(model):
        console.print(f"  lora  {name.removeprefix('base_model.model.')}", highlight=False)


@model_app.command("export")
@friendly
def model_export(
    preset: str = typer.Option(..., help="Built-in preset to save."),
    out: Path = typer.Option(..., help="Output directory (a normal Hugging Face model directory)."),
    seed: int = typer.Option(0, help="Initialisation seed [model.seed]."),
) -> None:
    """Save a tiny preset with its tokenizer, to use through model.path."""
    from fedsecure.config import PRESETS
    from fedsecure.model import export_preset

    if preset not in PRESETS:
        raise FedSecureError(f"--preset must be one of {', '.join(PRESETS)}; found {preset!r}")
    console.print(str(export_preset(preset, out, seed)), highlight=False)


@budget_app.command("plan")
@friendly
def budget_plan(
    epsilon: float = typer.Option(3.0, help="The site's budget ε."),
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
    if not (math.isfinite(epsilon) and 0 < epsilon <= 100):
        raise FedSecureError(f"--epsilon {epsilon} must be a finite number in (0, 100]. Fix: e.g. --epsilon 3")
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
    sigma = calibrate_noise(target_epsilon=epsilon, delta=d, spent=[], q=q, steps=rounds * local_steps,
                            accountant=accountant)
    if sigma is None:
        raise FedSecureError(f"no noise multiplier up to 64 fits epsilon={epsilon} for {rounds * local_steps} steps "
                             f"at q={q:.4f}. Fix: raise the budget, train fewer steps or use more records.")
    console.print(f"budget ε = {epsilon} at δ = {d:.1e} ({accountant}); q = {batch_size}/{records} = {q:.4f}; "
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


@keys_app.command("init")
@friendly
def keys_init(
    keyring: Path = typer.Option(..., help="Keyring file to create (mode 0600)."),
    force: bool = typer.Option(False, help="Overwrite an existing keyring (its keys are lost)."),
) -> None:
    """Create a keyring with one fresh 256-bit key-encryption key."""
    from fedsecure.crypto import generate_keyring, write_keyring_file

    ring = generate_keyring()
    write_keyring_file(keyring, ring, force=force)
    console.print(f"created {keyring} (0600) with key {ring.current}. Keep it apart from the data it protects.",
                  highlight=False)


@keys_app.command("show")
@friendly
def keys_show(
    keyring: Path = typer.Option(..., help="Keyring file."),
    under: list[Path] = typer.Option([], help="Also count which key seals the *.sealed files under these paths."),
) -> None:
    """Key ids and fingerprints (never key bytes); optionally which files each key seals."""
    from fedsecure.crypto import read_keyring_file
    from fedsecure.crypto.rotation import key_usage

    view = read_keyring_file(keyring).public_view()
    usage = key_usage(under) if under else {}
    for kid, fp in view["keys"].items():
        mark = "current" if kid == view["current"] else "old"
        extra = f", seals {usage.get(kid, 0)} files" if under else ""
        console.print(f"{kid}  fingerprint {fp}  ({mark}{extra})", highlight=False)
    for kid in sorted(set(usage) - set(view["keys"])):
        console.print(f"[red]{kid}: seals {usage[kid]} files but is NOT in this keyring[/]", highlight=False)


@keys_app.command("rotate")
@friendly
def keys_rotate(
    keyring: Path = typer.Option(..., help="Keyring file; gets a new current key."),
    paths: list[Path] = typer.Argument(..., help="Sealed files or folders whose *.sealed files to re-wrap."),
    retire: bool = typer.Option(False, help="Drop the old keys once every file is re-wrapped."),
) -> None:
    """Re-wrap every data key under a new key-encryption key (data is not re-encrypted; resumable)."""
    from fedsecure.crypto.rotation import rotate

    r = rotate(keyring, paths, retire=retire)
    console.print(f"current key {r.new_key}: re-wrapped {r.rewrapped} files, {r.already} already done"
                  + (f"; retired {', '.join(r.retired)}" if r.retired else ""), highlight=False)


@app.command("seal")
@friendly
def seal_cmd(
    file: Path = typer.Argument(..., help="Plain file to seal."),
    keyring: Path = typer.Option(..., help="Keyring file (its current key seals)."),
    out: Path | None = typer.Option(None, help="Output (default FILE.sealed)."),
) -> None:
    """Seal a file (chunked AES-256-GCM, streaming; see docs/sealed-format.md)."""
    from fedsecure.crypto import read_keyring_file, seal_file

    if not file.is_file():
        raise FedSecureError(f"{file} is not a file")
    dst = seal_file(file, out or file.with_name(file.name + ".sealed"), read_keyring_file(keyring),
                    {"original-name": file.name})
    console.print(str(dst), highlight=False)


@app.command("open")
@friendly
def open_cmd(
    file: Path = typer.Argument(..., help="Sealed file."),
    keyring: Path = typer.Option(..., help="Keyring file holding the key that sealed it."),
    out: Path = typer.Option(..., help="Where to write the plaintext (written only if it authenticates)."),
) -> None:
    """Decrypt a sealed file for an operator (nothing is written unless every chunk authenticates)."""
    from fedsecure.crypto import open_to_file, read_keyring_file

    console.print(str(open_to_file(file, out, read_keyring_file(keyring))), highlight=False)


@app.command("inspect")
@friendly
def inspect_cmd(file: Path = typer.Argument(..., help="Sealed file.")) -> None:
    """Show a sealed file's header and key id without decrypting anything (no key needed)."""
    from fedsecure.crypto import inspect

    info = inspect(file)
    console.print_json(data={"file": str(info.path), "format_version": 1, "cipher": info.header["cipher"],
                             "chunk_size": info.chunk_size, "kek_id": info.kek_id,
                             "plaintext_bytes": info.plaintext_size, "metadata": info.metadata})


def _read_evidence(file: Path):
    from fedsecure.attestation.evidence import detect
    from fedsecure.errors import AttestationError

    try:
        data = file.read_bytes()
    except OSError as e:
        raise AttestationError(f"{file}: cannot read it ({e.strerror})") from None
    return detect(data)


@attest_app.command("inspect")
@friendly
def attest_inspect(file: Path = typer.Argument(..., help="Evidence: a fedsecure envelope, a TDX quote or an "
                                                         "SEV-SNP report."),
                   as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print the parsed fields of a piece of evidence (nothing is verified)."""
    import json

    from fedsecure.attestation.inspect import describe

    fields = describe(_read_evidence(file))
    if as_json:
        typer.echo(json.dumps(fields, indent=2))
        return
    for key, value in fields.items():
        if key == "pck_chain":
            for c in value:
                typer.echo(f"{'certificate':14} {c['subject']}  [{c['not_before'][:10]} .. {c['not_after'][:10]}]")
        else:
            typer.echo(f"{key:14} {value}")


@attest_app.command("verify")
@friendly
def attest_verify(
    file: Path = typer.Argument(..., help="Evidence: a fedsecure envelope, a TDX quote or an SEV-SNP report."),
    policy: Path | None = typer.Option(None, help="Policy file: also check TEE type and measurement."),
    at: str | None = typer.Option(None, help="Verify as of this ISO time (default now), e.g. 2023-07-01T01:00:00Z."),
    report_data: str | None = typer.Option(None, "--report-data", help="Expected report data (hex, 64 bytes)."),
    vcek_dir: Path | None = typer.Option(None, help="SEV-SNP: folder with <chip_id>.der and cert_chain.pem."),
) -> None:
    """Check signatures and certificate chains (and, with --policy, the measurement). Exit 0 only if all hold."""
    import datetime as dt

    from fedsecure.attestation.policy import load_policy
    from fedsecure.attestation.verify import verify
    from fedsecure.errors import AttestationError, ConfigError

    ev = _read_evidence(file)
    when = None
    if at is not None:
        try:
            when = dt.datetime.fromisoformat(at.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"--at {at!r} is not an ISO time. Fix: e.g. --at 2023-07-01T01:00:00Z") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
    expected = None
    if report_data is not None:
        try:
            expected = bytes.fromhex(report_data)
        except ValueError:
            raise ConfigError("--report-data must be hex") from None
        if len(expected) != 64:
            raise AttestationError(f"--report-data must be 64 bytes (128 hex digits), got {len(expected)}")
    pol = load_policy(policy) if policy else None
    claims = verify(ev, expected, pol, when, vcek_dir=vcek_dir)
    checked = ["signatures", "certificate chain"] + (["report data"] if expected else []) + \
        (["TEE type and measurement (policy)"] if pol else [])
    typer.echo(f"OK: {claims.tee} evidence verified ({', '.join(checked)})")
    typer.echo(f"measurement    {claims.measurement}")
    typer.echo(f"report_data    {claims.report_data}")
    for key in ("root", "version", "tcb", "chip_id"):
        if key in claims.details:
            typer.echo(f"{key:14} {claims.details[key]}")


@attest_app.command("code-hash")
@friendly
def attest_code_hash() -> None:
    """Print this build's code hash (what a policy's 'code' list approves)."""
    from fedsecure.attestation.evidence import code_hash

    typer.echo(code_hash())


@attest_app.command("dev-policy")
@friendly
def attest_dev_policy(out: Path = typer.Option(..., "--out", help="Policy file to write."),
                      epsilon: float = typer.Option(3.0, help="min_dp.max_epsilon."),
                      delta: float = typer.Option(1e-5, help="min_dp.max_delta."),
                      force: bool = typer.Option(False, help="Overwrite an existing file.")) -> None:
    """Write a development policy: software evidence from this build only (never for real patient data)."""
    from fedsecure.attestation.evidence import code_hash
    from fedsecure.attestation.policy import MinDP, Policy
    from fedsecure.errors import KeyMaterialError
    from fedsecure.fsutil import atomic_write

    if out.exists() and not force:
        raise KeyMaterialError(f"{out} already exists. Fix: pass --force to replace it")
    policy = Policy(measurements={"software": (code_hash(),)}, code=(code_hash(),),
                    min_dp=MinDP(max_epsilon=epsilon, max_delta=delta), source="fedsecure attest dev-policy")
    atomic_write(out, ("# DEVELOPMENT ONLY: accepts software evidence, which proves nothing about the platform.\n"
                       + policy.to_yaml()).encode(), mode=0o644)
    typer.echo(f"wrote {out} (software evidence from code {code_hash()[:16]}...; development only)")


@certs_app.command("init")
@friendly
def certs_init(
    out: Path = typer.Option(..., "--out", help="Folder for ca.pem/.key, coordinator.pem/.key, sites/<name>/."),
    host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host",
                                   help="Name or address the coordinator serves (repeatable)."),
    site: list[str] = typer.Option([], "--site", help="A site to create an authentication key for (repeatable)."),
    force: bool = typer.Option(False, help="Replace existing files (every party then needs the new ones)."),
) -> None:
    """Create the consortium CA, the coordinator's TLS certificate and a SuperNode key pair per site."""
    from fedsecure.deploy.certs import init

    m = init(out, host, site, force=force)
    typer.echo(f"CA            {m.ca_cert} (key {m.ca_key}: keep it offline)")
    typer.echo(f"coordinator   {m.server_cert} for {', '.join(host)} (key {m.server_key})")
    for name, (priv, pub) in m.sites.items():
        typer.echo(f"site {name:9} {priv} (0600, give to the site) / {pub} (list in server.sites)")


@certs_app.command("add-site")
@friendly
def certs_add_site(name: str = typer.Argument(..., help="Site name."),
                   out: Path = typer.Option(..., "--out", help="The folder `certs init` wrote."),
                   force: bool = typer.Option(False, help="Replace an existing key pair.")) -> None:
    """Create one more site's SuperNode authentication key pair."""
    from fedsecure.deploy.certs import Material, create_site_key

    m = Material.at(out, [name])
    create_site_key(m, name, force=force)
    priv, pub = m.sites[name]
    typer.echo(f"site {name}: {priv} (0600, give to the site) / {pub} (list in server.sites)")


@app.command("server")
@friendly
def server_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Coordinator config (see configs/coordinator.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a federation key: --set federation.rounds=5."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step."),
) -> None:
    """Run the coordinator: a TLS SuperLink with SuperNode authentication, and the fedsecure run on it."""
    import threading

    from fedsecure.config import parse_override
    from fedsecure.deploy.config import load_coordinator_config
    from fedsecure.deploy.launcher import Server, install_signal_handlers

    _setup_logging(verbose)
    dc = load_coordinator_config(config, dict(parse_override(s) for s in set_))
    srv = Server(dc, emit=lambda m: console.print(m, highlight=False))
    stopping = threading.Event()
    install_signal_handlers(stopping)
    srv.stopping = stopping
    try:
        summary = srv.run()
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped; the run directory {dc.run_dir} is consistent, and `fedsecure server` with "
                      "the same config resumes after the last completed round[/]")
        raise typer.Exit(130) from None
    print_summary(summary)


@app.command("client")
@friendly
def client_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Site config (see configs/site.yaml)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step."),
) -> None:
    """Run a hospital site: a SuperNode with TLS and its authentication key, kept up across rounds and runs."""
    import threading

    from fedsecure.deploy.config import load_site_config
    from fedsecure.deploy.launcher import install_signal_handlers, run_site

    _setup_logging(verbose)
    sc = load_site_config(config)
    stopping = threading.Event()
    install_signal_handlers(stopping)
    try:
        code = run_site(sc, emit=lambda m: console.print(m, highlight=False), stopping=stopping)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@audit_app.command("verify")
@friendly
def audit_verify(file: Path = typer.Argument(..., help="An audit.log from a run directory.")) -> None:
    """Check the audit log's hash chain; prints the number of entries and the head."""
    from fedsecure.audit import verify_log

    count, head = verify_log(file)
    typer.echo(f"OK: {count} entries, chain intact, head {head}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
