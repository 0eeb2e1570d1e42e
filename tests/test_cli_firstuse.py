"""First use of the command line (issue 20): what a new user following the README sees is complete and quiet."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from fedsecure.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
BRACKETED = re.compile(r"\[[^\[\]\n]+\]")


# --------------------------------------------------------------------------- help text keeps its brackets
def _texts_of(fn) -> list[str]:
    """The docstring and the help of every option/argument of a command, as written in the source."""
    texts = [inspect.getdoc(fn) or ""]
    for param in inspect.signature(fn).parameters.values():
        help_text = getattr(param.default, "help", None)
        if isinstance(help_text, str):
            texts.append(help_text)
    return texts


def _commands(ty: typer.Typer, path: tuple[str, ...] = ()):
    """(command path, source texts) for the app, every group and every command, from the typer registrations."""
    yield path, [ty.info.help] if isinstance(ty.info.help, str) else []
    for cmd in ty.registered_commands:
        assert cmd.name, f"register {cmd.callback} under an explicit name"
        yield (*path, cmd.name), _texts_of(cmd.callback)
    for group in ty.registered_groups:
        assert group.name and group.typer_instance is not None
        yield from _commands(group.typer_instance, (*path, group.name))


def _click_paths(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _click_paths(sub, (*path, name))


def _flat(text: str) -> str:
    """Help output without the layout (rich's boxes and line wrapping), to look for a phrase in it."""
    return re.sub(r"[\s│╭╮╰╯─]+", "", text)


def test_every_command_is_walked():
    walked = {p for p, _ in _commands(app)}
    assert walked == set(_click_paths(typer.main.get_command(app)))
    assert ("simulate",) in walked and ("model", "export") in walked and ("ledger", "show") in walked


def test_help_shows_every_bracketed_key_literally():
    missing, seen = [], 0
    for path, texts in _commands(app):
        res = runner.invoke(app, [*path, "--help"])
        assert res.exit_code == 0, (path, res.output)
        shown = _flat(res.output)
        for text in texts:
            for needle in BRACKETED.findall(text):
                seen += 1
                if _flat(needle) not in shown:
                    missing.append(f"fedsecure {' '.join(path)} --help: {needle}")
    assert seen >= 10  # the check looks at real bracketed keys ([federation.sites], [model.seed], ...)
    assert missing == []


def test_every_help_text_is_shown_whole():
    # every paragraph of every docstring, option and argument help (click 8.2+ dropped arguments' help under typer)
    missing = []
    for path, texts in _commands(app):
        shown = _flat(runner.invoke(app, [*path, "--help"]).output)
        missing += [f"fedsecure {' '.join(path)} --help: {p[:60]}" for text in texts for p in text.split("\n\n")
                    if _flat(p) not in shown]
    assert missing == []


def test_the_bracket_check_can_fail():
    # rich markup (what the help used to go through) drops a bracketed config key: the check above would see it
    from rich.text import Text

    assert "[federation.sites]" not in Text.from_markup("Number of sites [federation.sites].").plain


# --------------------------------------------------------------------------- --version
def test_version_names_fedsecure_flower_torch_and_opacus():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert 1 <= len(lines) <= 2
    assert lines[0] == f"fedsecure {metadata.version('fedsecure')}"
    rest = " ".join(lines[1:])
    for dist, label in (("flwr", "Flower"), ("torch", "torch"), ("opacus", "Opacus")):
        assert f"{label} {metadata.version(dist)}" in rest, rest


# --------------------------------------------------------------------------- quiet model export
def test_model_export_prints_only_its_own_line(tmp_path):
    out = tmp_path / "v3-tiny"
    proc = subprocess.run([sys.executable, "-c", "from fedsecure.cli import main; main()", "model", "export",
                           "--preset", "deepseek-v3-tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    assert "%|" not in both and "it/s" not in both and "Writing model shards" not in both, both
    assert both.strip().splitlines() == [str(out)]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_quiet_hugging_face_restores_the_progress_bars():
    from transformers.utils import logging as hf_logging

    from fedsecure.cli.model import quiet_hugging_face

    before = (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity())
    with quiet_hugging_face():
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    assert (hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()) == before


# --------------------------------------------------------------------------- data synth defaults and profile.json
def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default.default


def test_data_synth_defaults_are_what_simulate_synthesises():
    from fedsecure.cli.data import data_synth
    from fedsecure.config import SimulationConfig

    cfg = SimulationConfig.from_mapping({})
    assert _default(data_synth, "records_per_site") == cfg.data.records_per_site
    assert _default(data_synth, "eval_fraction") == cfg.data.eval_fraction
    res = runner.invoke(app, ["data", "synth", "--help"])
    assert f"{cfg.data.records_per_site}" in res.output


def test_simulate_synthesises_with_the_data_settings(tmp_path, monkeypatch):
    # the one place simulate synthesises passes the data settings through (so the shared default is what it uses)
    from fedsecure.launch import simulate

    seen = {}

    def fake(out, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(simulate, "synthesize", fake)
    from fedsecure.config import SimulationConfig

    cfg = SimulationConfig.from_mapping({"runs_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match="stop here"):
        simulate.prepare(cfg)
    assert seen["records_per_site"] == cfg.data.records_per_site
    assert seen["eval_fraction"] == cfg.data.eval_fraction


def test_profile_json_is_documented(tmp_path):
    from fedsecure.cli.data import data_synth

    res = runner.invoke(app, ["data", "synth", "--help"])
    assert "profile.json" in res.output
    assert "profile.json" in (inspect.getdoc(data_synth) or "")
    readme = (ROOT / "README.md").read_text()
    site_data = readme.split("### Site data", 1)[1].split("\n### ", 1)[0]
    assert "profile.json" in site_data
    assert f"with {_default(data_synth, 'records_per_site')} records per site by default" in " ".join(site_data.split())
    res = runner.invoke(app, ["data", "synth", "--sites", "1", "--out", str(tmp_path), "--records-per-site", "4"])
    assert res.exit_code == 0, res.output
    profile = (tmp_path / "site-0" / "profile.json").read_text()
    for field in ("specialty_mix", "style", "mean_findings", "age_range"):  # the fields the docs describe
        assert field in profile and field in site_data


# --------------------------------------------------------------------------- attest verify without a warning
SNP = ROOT / "tests" / "data" / "attestation"
SNP_CHIP = ("3ac3fe21e13fb0990eb28a802e3fb6a29483a6b0753590c951bdd3b8e53786184ca39e359669a2b76a1936776b564ea464cdce40c"
            "05f63c9b610c5068b006b5d")


def _vcek_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "vcek"
    cache.mkdir()
    (cache / "cert_chain.pem").write_bytes((SNP / "snp_milan.testcer").read_bytes())
    (cache / f"{SNP_CHIP}.der").write_bytes((SNP / "snp_vcek.testcer").read_bytes())
    return cache


def test_snp_verify_emits_no_warning(tmp_path):
    import datetime as dt
    import warnings

    from fedsecure.attestation.tee.sevsnp import verify

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, the serial-number one included, fails the test
        claims = verify((SNP / "snp_attestation.bin").read_bytes(), (SNP / "snp_vcek.testcer").read_bytes(),
                        (SNP / "snp_milan.testcer").read_bytes(), at_time=dt.datetime(2023, 7, 1, 1, tzinfo=dt.UTC))
    assert claims.root == "ARK-Milan"


def test_the_vcek_warning_is_real_and_suppressed_only_at_the_load():
    # the genuine VCEK does make cryptography warn: the test above would fail without the suppression
    from cryptography import x509
    from cryptography.utils import CryptographyDeprecationWarning

    with pytest.warns(CryptographyDeprecationWarning, match="Parsed a serial number"):
        x509.load_der_x509_certificate((SNP / "snp_vcek.testcer").read_bytes())
    text = (ROOT / "fedsecure" / "attestation" / "tee" / "sevsnp.py").read_text()
    tree = ast.parse(text)
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.With)
               and any("catch_warnings" in ast.unparse(i.context_expr) for i in n.items)]
    assert len(guarded) == 1 and "load_der_x509_certificate" in ast.unparse(guarded[0])


def test_attest_verify_output_is_clean(tmp_path):
    cache = _vcek_cache(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "from fedsecure.cli import main; main()", "attest",
                           "verify", str(SNP / "snp_attestation.bin"), "--at", "2023-01-01T00:00:00Z",
                           "--vcek-dir", str(cache)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("OK: sev-snp evidence verified")
    assert "Warning" not in proc.stdout


# --------------------------------------------------------------------------- the audit log's events are documented
def _audit_events() -> tuple[set[str], list[str]]:
    """Every event name the library passes to an audit log's ``append``: a literal, a module constant, or a
    parameter of the enclosing function, resolved at that function's call sites. Returns (events, unresolved).
    """
    trees = {p: ast.parse(p.read_text()) for p in sorted((ROOT / "fedsecure").rglob("*.py"))}
    consts: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                consts.setdefault(node.targets[0].id, set()).add(node.value.value)

    def values(expr: ast.expr) -> set[str] | None:
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if isinstance(expr, ast.Name) and expr.id in consts:
            return consts[expr.id]
        return None

    events: set[str] = set()
    unresolved: list[str] = []
    forwarders: list[tuple[str, str, int]] = []  # (function, parameter, position without self)
    for path, tree in trees.items():
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]:
            params = [a.arg for a in fn.args.args if a.arg not in ("self", "cls")]
            for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call)]:
                f = call.func
                if not (isinstance(f, ast.Attribute) and f.attr == "append"
                        and ast.unparse(f.value).split(".")[-1] == "audit" and call.args):
                    continue
                got = values(call.args[0])
                if got is not None:
                    events |= got
                elif isinstance(call.args[0], ast.Name) and call.args[0].id in params:
                    forwarders.append((fn.name, call.args[0].id, params.index(call.args[0].id)))
                else:
                    unresolved.append(f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)[:80]}")
    for name, param, pos in forwarders:
        for path, tree in trees.items():
            for call in [n for n in ast.walk(tree) if isinstance(n, ast.Call)]:
                f = call.func
                if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) != name:
                    continue
                arg = next((k.value for k in call.keywords if k.arg == param), None)
                if arg is None and len(call.args) > pos:
                    arg = call.args[pos]
                got = values(arg) if arg is not None else None
                if got is None:
                    unresolved.append(f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(call)[:80]}")
                else:
                    events |= got
    return events, unresolved


def test_every_audit_event_is_documented():
    events, unresolved = _audit_events()
    assert unresolved == [], "an audit event name the test cannot resolve: pass a literal or a module constant"
    # literal events, and events passed through a helper (Bookkeeping.retire) are both found
    assert {"attestation.accepted", "attestation.nonce-issued", "round.aggregated", "site.retired",
            "site.refused"} <= events
    doc = (ROOT / "docs" / "audit-format.md").read_text()
    assert sorted(e for e in events if f"`{e}`" not in doc) == []
    assert "`run.completed`" in doc and "rounds_completed" in doc and "stopped" in doc
    assert "summary.json" in doc and "coordinator-state.json" in doc


def test_the_format_docs_are_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/ledger-format.md", "docs/audit-format.md"):
        assert f"]({doc})" in readme and (ROOT / doc).is_file()
    ledger_doc = (ROOT / "docs" / "ledger-format.md").read_text()
    from fedsecure.privacy.ledger import KINDS, LedgerEntry

    for field in LedgerEntry.__dataclass_fields__:
        assert f"`{field}`" in ledger_doc, field
    for kind in KINDS:
        assert f"`{kind}`" in ledger_doc, kind
