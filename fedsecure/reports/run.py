"""The run summary: ``summary.md`` and the console report, rendered from the same rows.

The data is ``summary.json`` (written by the coordinator). :func:`round_rows` and
:func:`attestation_line` are what both renderers show; :func:`markdown` writes the file and
:func:`render` prints the same to a rich console.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsecure.reports import privacy as privacy_report

ROUND_COLUMNS = ("round", "held-out loss", "sites trained", "bytes down", "bytes up", "seconds", "refused / failed")


def round_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per round (:data:`ROUND_COLUMNS`)."""
    out = []
    for h in summary["rounds"]:
        loss = "n/a" if h["eval_loss"] is None else f"{h['eval_loss']:.4f}"
        notes = [f"{k}: budget exhausted or refused" for k in h.get("refused", []) if k not in h["failures"]]
        notes += [f"{k}: {v}" for k, v in h["failures"].items()]
        out.append([str(h["round"]), loss, "-" if h["round"] == 0 else str(h["sites_ok"]), f"{h['bytes_down']:,}",
                    f"{h['bytes_up']:,}", f"{h['seconds']:.2f}", "; ".join(notes) or "-"])
    return out


def outcome(summary: dict[str, Any]) -> list[str]:
    """What the run achieved, in sentences."""
    lines = []
    i, f = summary["initial_eval_loss"], summary["final_eval_loss"]
    if i is not None and f is not None:
        lines.append(f"Held-out loss {i:.4f} -> {f:.4f} ({f - i:+.4f}) after {summary['rounds_completed']} rounds.")
    if summary.get("stopped"):
        lines.append(f"The run ended early: {summary['stopped']}. Results so far are saved.")
    return lines


def attestation_line(summary: dict[str, Any]) -> str:
    """How many statements were verified, of which kind, under which policy, and the audit log's head."""
    att = summary.get("attestation") or {}
    if not att.get("enabled"):
        return "Attestation was off: updates were accepted without evidence."
    results = [r for h in summary["rounds"] for r in h.get("attestation", {}).values()]
    ok = sum(r.startswith("verified") for r in results)
    kinds = sorted({r.split("(")[1].split(",")[0] for r in results if r.startswith("verified")})
    line = (f"Attestation: {ok}/{len(results)} statements verified ({', '.join(kinds) or 'none'}); policy "
            f"{att['policy']}; audit log {att['audit_entries']} entries, head {att['audit_head'][:16]}.")
    if "software" in kinds:
        line += (" Software evidence was accepted because the policy allows it (a development policy): it shows "
                 "which code and DP settings a site claims, and proves nothing about its platform. A production "
                 "policy accepts TEE evidence only (tdx, sev-snp).")
    return line


def markdown(summary: dict[str, Any]) -> str:
    """``summary.md``."""
    lines = ["# fedsecure run summary", "", f"Run directory: `{summary['run_dir']}`", "",
             "| " + " | ".join(ROUND_COLUMNS) + " |", "|" + "---|" * len(ROUND_COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in round_rows(summary)]
    lines += ["", *outcome(summary), f"Final global adapter: `{summary['final_adapter']}`", "",
              attestation_line(summary)]
    att = summary.get("attestation") or {}
    if att.get("enabled"):
        lines += ["", "## Attestation", "", f"Policy: `{att['policy']}`. Audit log: `{att['audit_log']}` "
                  f"({att['audit_entries']} entries, head `{att['audit_head'][:16]}`).", "",
                  "| round | site | result |", "|---|---|---|"]
        for h in summary["rounds"]:
            for site, result in h.get("attestation", {}).items():
                lines.append(f"| {h['round']} | {site} | {result.replace('|', '/')} |")
    lines += ["", privacy_report.markdown(summary["privacy"], title="## Privacy")]
    return "\n".join(lines) + "\n"


def render(summary: dict[str, Any], console) -> None:
    """Print the summary to a rich console: the same rows and sentences as ``summary.md``."""
    from rich.table import Table

    table = Table(title="Federation", show_lines=False)
    for col in ROUND_COLUMNS:
        table.add_column(col, justify="left" if col.startswith("refused") else "right")
    for r in round_rows(summary):
        table.add_row(*r)
    console.print(table)
    for line in outcome(summary):
        console.print(line, highlight=False)
    privacy = summary["privacy"]
    if not privacy["record_level"]:
        console.print("[bold red]Differential privacy was OFF: these updates are not private.[/]")
    console.print(privacy_report.table(privacy))
    console.print(privacy_report.client_level(privacy), highlight=False)
    console.print(attestation_line(summary), highlight=False)
    console.print(f"Run directory: {summary['run_dir']} (privacy.json, privacy.md, metrics.jsonl, adapters/, "
                  "audit.log)", highlight=False)
    report = Path(summary["run_dir"]) / "report.html"
    if report.is_file():
        console.print(f"Compliance report (signed): {report}", highlight=False)
