"""The ``fedsecure`` command line: wiring only (as ``flwr/cli/app.py``); each command group is its own module.

Every user error is a :class:`~fedsecure.errors.FedSecureError`; it is printed as one line
(``error: ...``) with exit code 2, never as a traceback.
"""

from __future__ import annotations

import typer

from fedsecure.cli import attest, budget, certs, data, model, run, storage

app = typer.Typer(
    name="fedsecure",
    help="Federated, differentially private LoRA fine-tuning of DeepSeek models across hospitals, on Flower.",
    no_args_is_help=True, add_completion=False, rich_markup_mode="rich", pretty_exceptions_enable=False)


def _group(name: str, help_text: str, commands: dict[str, object]) -> None:
    sub = typer.Typer(help=help_text, no_args_is_help=True)
    for command, fn in commands.items():
        sub.command(command)(fn)  # type: ignore[arg-type]
    app.add_typer(sub, name=name)


app.command("simulate")(run.simulate)
app.command("server")(run.server_cmd)
app.command("client")(run.client_cmd)
app.command("seal")(storage.seal_cmd)
app.command("open")(storage.open_cmd)
app.command("inspect")(storage.inspect_cmd)
_group("certs", "Consortium TLS CA, coordinator certificate and site authentication keys.",
       {"init": certs.certs_init, "add-site": certs.certs_add_site})
_group("attest", "TEE attestation evidence: inspect, verify, this build's code hash.",
       {"inspect": attest.attest_inspect, "verify": attest.attest_verify, "code-hash": attest.attest_code_hash,
        "dev-policy": attest.attest_dev_policy})
_group("audit", "The coordinator's hash-chained audit log.", {"verify": attest.audit_verify})
_group("keys", "Key-encryption keys for sealed storage: init, show, rotate.",
       {"init": storage.keys_init, "show": storage.keys_show, "rotate": storage.keys_rotate})
_group("data", "Site datasets: synthesise realistic non-IID clinical notes.", {"synth": data.data_synth})
_group("budget", "Privacy budgets: plan the noise for a budget before training.", {"plan": budget.budget_plan})
_group("model", "Base models and LoRA: inspect a preset or local model, export a preset.",
       {"show": model.model_show, "export": model.model_export})


def main() -> None:
    """The ``fedsecure`` console script."""
    app()
