"""The ``fedsecure`` command line: wiring only (as ``flwr/cli/app.py``); each command group is its own module.

Every user error is a :class:`~fedsecure.errors.FedSecureError`; it is printed as one line
(``error: ...``) with exit code 2, never as a traceback.

Help text is written as plain text and shown as written: typer renders it with rich markup, which would
take a bracketed config key (``[federation.sites]``, ``[model.seed]``) for a style tag and drop it, so every
command, group and option help is escaped once, here (:class:`_LiteralCommand`, :class:`_LiteralGroup`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import click
import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from fedsecure.cli import attest, budget, certs, data, doctor, ledger, model, report, run, storage


def _literal(text: str | None) -> str | None:
    return escape(text) if isinstance(text, str) else text


def _paragraphs(text: str | None) -> str | None:
    """A docstring as paragraphs: its own line breaks are wrapping, as click reads them (a paragraph that starts
    with click's no-rewrap marker keeps its lines).
    """
    if not isinstance(text, str):
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n")) for p in paragraphs)


def _argument_help(callback: Callable[..., Any] | None, name: str | None) -> str | None:
    """An argument's help as declared (``typer.Argument(help=...)``): click 8.2+ gives arguments a help of its own
    and resets the one typer set, so the arguments' help would not be shown at all.
    """
    try:
        info = inspect.signature(callback).parameters[str(name)].default if callback else None
    except (TypeError, ValueError, KeyError):
        return None
    text = getattr(info, "help", None)
    return text if isinstance(text, str) else None


class _LiteralHelp:
    """Mixin: the command's help, short help and every parameter's help are shown literally (no rich markup)."""

    help: str | None
    short_help: str | None
    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _literal(_paragraphs(self.help))
        self.short_help = _literal(self.short_help)
        for param in self.params:
            if isinstance(param, click.Argument) and getattr(param, "help", None) is None:
                param.help = _argument_help(getattr(self, "callback", None), param.name)
            if isinstance(getattr(param, "help", None), str):
                param.help = _literal(param.help)


class _LiteralCommand(_LiteralHelp, TyperCommand):
    """A command whose help is shown as written."""


class _LiteralGroup(_LiteralHelp, TyperGroup):
    """A command group whose help is shown as written."""


app = typer.Typer(
    name="fedsecure", cls=_LiteralGroup,
    help="Federated, differentially private LoRA fine-tuning of DeepSeek models across hospitals, on Flower.",
    no_args_is_help=True, add_completion=False, rich_markup_mode="rich", pretty_exceptions_enable=False)


def version_text() -> str:
    """``fedsecure <version>`` and, on a second line, the versions of the libraries a run depends on."""
    import platform
    from importlib import metadata

    def of(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        own = metadata.version("fedsecure")
    except metadata.PackageNotFoundError:
        import fedsecure

        own = str(getattr(fedsecure, "__version__", "unknown (not installed)"))
    return (f"fedsecure {own}\nFlower {of('flwr')}, torch {of('torch')}, Opacus {of('opacus')}, "
            f"Python {platform.python_version()}")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the versions of fedsecure, Flower, torch and Opacus, and exit.")
          ) -> None:
    """Federated, differentially private LoRA fine-tuning of DeepSeek models across hospitals, on Flower."""


def _command(parent: typer.Typer, name: str, fn: Callable[..., Any]) -> None:
    parent.command(name, cls=_LiteralCommand)(fn)


def _group(name: str, help_text: str, commands: dict[str, Callable[..., Any]]) -> None:
    sub = typer.Typer(help=help_text, no_args_is_help=True, cls=_LiteralGroup)
    for command, fn in commands.items():
        _command(sub, command, fn)
    app.add_typer(sub, name=name)


_command(app, "simulate", run.simulate)
_command(app, "server", run.server_cmd)
_command(app, "client", run.client_cmd)
_command(app, "seal", storage.seal_cmd)
_command(app, "open", storage.open_cmd)
_command(app, "inspect", storage.inspect_cmd)
_command(app, "report", report.report_cmd)
_command(app, "doctor", doctor.doctor_cmd)
_group("certs", "Consortium TLS CA, coordinator certificate and site authentication keys.",
       {"init": certs.certs_init, "add-site": certs.certs_add_site})
_group("attest", "TEE attestation evidence: inspect, verify, this build's code hash.",
       {"inspect": attest.attest_inspect, "verify": attest.attest_verify, "code-hash": attest.attest_code_hash,
        "dev-policy": attest.attest_dev_policy, "node-key": attest.attest_node_key, "roster": attest.attest_roster})
_group("audit", "The coordinator's hash-chained audit log.", {"verify": attest.audit_verify})
_group("keys", "Key-encryption keys for sealed storage: init, show, rotate.",
       {"init": storage.keys_init, "show": storage.keys_show, "rotate": storage.keys_rotate})
_group("data", "Site datasets: synthesise realistic non-IID clinical notes.", {"synth": data.data_synth})
_group("budget", "Privacy budgets: plan the noise for a budget before training.", {"plan": budget.budget_plan})
_group("model", "Base models and LoRA: inspect a preset or local model, export a preset, rebuild the pretrained base.",
       {"show": model.model_show, "plan": model.model_plan, "export": model.model_export,
        "pretrain": model.model_pretrain})
_group("ledger", "A site's privacy ledgers, for a compliance officer: show every entry and what each run spent, "
       "verify the hash chain and the recorded ε.", {"show": ledger.ledger_show, "verify": ledger.ledger_verify})


def main() -> None:
    """The ``fedsecure`` console script."""
    app()
