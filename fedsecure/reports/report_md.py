"""``report.md``: the compliance report as Markdown (the same sections as the HTML page, without charts)."""

from __future__ import annotations

import json
from typing import Any

import yaml


def _f(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(x, spec) if isinstance(x, float) else str(x)


def _cell(x: Any) -> str:
    return str(x).replace("|", "/").replace("\n", " ")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(_cell(c) for c in r) + " |" for r in rows), ""]


def render(report: dict[str, Any], *, json_sha256: str, key_id: str | None) -> str:
    """The Markdown document."""
    g = report["generated"]
    out = [f"# {report['title']}", "",
           f"Generated {g['at']} by {g['user']}@{g['host']} with fedsecure {g['fedsecure']} (code hash "
           f"`{g['code_hash'][:16]}`). Rendered from report.json SHA-256 `{json_sha256}`. "
           + (f"Signed by report key `{key_id}`: `fedsecure report verify report.json --key PUBLIC_KEY`."
              if key_id else "Not signed."), "", "## Summary", ""]
    out += [f"- {s}" for s in report["summary"]] + ["", "## Findings", ""]
    out += [f"- **{f['severity']}**: {f['text']}" for f in report["findings"]] or ["- none"]
    rl, cl = report["guarantees"]["record_level"], report["guarantees"]["client_level"]
    out += ["", "## Unit of privacy", "",
            f"- Record level (each site): {'ON' if rl['enabled'] else 'OFF'}. Unit: {report['unit']['record_level']}",
            f"- Neighbouring datasets: {report['unit']['neighbouring']}",
            "- Client level (coordinator, a separate guarantee, never merged): "
            + ("off" if not cl.get("enabled") else f"ε = {cl['epsilon']:.3f} at δ = {cl['delta']:.0e} over "
               f"{cl['rounds']} rounds" + (f" ({cl['mechanism']})" if cl.get("mechanism") else ""))
            + f". Unit: {report['unit']['client_level']}", "",
            "## Privacy spent per site", ""]
    rows = []
    for s in report["sites"]:
        e = s["epsilon"]
        name = s["site"] if report["kind"] == "run" else f"{s['site']} / {str(s['dataset'] or '?')[:12]}"
        spent = "∞ (no DP)" if e["unbounded"] else _f(e["shown"])
        refused = "; ".join(f"{r['round']}: {r['reason']}" for r in s["refused"]) or "-"
        rows.append([name, s["status"], spent, _f(e["this_run"]), _f(e["budget"], "g"), _f(e["remaining"]),
                     _f(s["delta"], ".1e"), s["records"] or "n/a", _f(s["delta_below_one_over_n"]), _f(s["sigma"]),
                     _f(s["max_grad_norm"], "g"), _f(s["q"]), s["sampling"], s["steps_this_run"],
                     len(s["rounds_trained"]), refused])
    out += _table(["site", "status", "ε spent (lifetime)", "ε this run", "budget", "remaining", "δ", "N", "δ < 1/N",
                   "σ", "C", "q", "sampling", "steps", "rounds", "refused"], rows)
    if report["kind"] == "site":
        for s in report["sites"]:
            if s.get("runs"):
                out += [f"### Runs that used dataset {str(s['dataset'])[:16]}", ""]
                out += _table(["run", "from", "to", "rounds", "refused", "ε added", "ε after"],
                              [[r["run"], r["from"][:19], r["to"][:19], ", ".join(map(str, r["rounds"])) or "-",
                                ", ".join(map(str, r["refused"])) or "-",
                                "∞" if r["epsilon_added"] is None else f"{r['epsilon_added']:.4f}",
                                "∞" if r["epsilon_after"] is None else f"{r['epsilon_after']:.4f}"] for r in s["runs"]])
    a = report["accounting"]
    out += ["## Accounting", "", f"Accountant {a['accountant']} ({a['library']}); recomputed with {a['independent']}; "
            f"tolerance {100 * a['tolerance']:.1f}% or {a.get('absolute_tolerance', 0):g} absolute, whichever is "
            f"larger; {a['rule']}.", ""]
    out += _table(["site", "compared", "site's ε", "recomputed", "difference", "within tolerance"],
                  [[s["site"] if report["kind"] == "run" else str(s["dataset"])[:12], s["epsilon"]["checked_against"],
                    _f(s["epsilon"]["lifetime_reported"] if s["epsilon"]["checked_against"] == "lifetime_reported"
                       else s["epsilon"]["this_run"]), _f(s["epsilon"]["this_run_recomputed"]),
                    "n/a" if s["epsilon"]["relative_difference"] is None
                    else f"{100 * s['epsilon']['relative_difference']:+.2f}%", _f(s["epsilon"]["within_tolerance"])]
                   for s in report["sites"]])
    out += ["Mechanisms (dp-accounting `DpEvent`s) are in report.json under `releases`.", "", "## Trust model", ""]
    tm = report["trust_model"]
    out += [f"- {x}" for x in tm["who_sees_what"] + tm["protected"]] + [f"- Noise generator: {tm['noise_generator']}"]
    out += [f"- Not covered: {x}" for x in tm["not_covered"]]
    att = report["attestation"]
    out += ["", "## Attestation", "", att.get("note", ""), ""]
    if att.get("records"):
        out += _table(["round", "site", "TEE", "measurement", "code hash", "verified at", "result"],
                      [[r["round"], r["site"], r["tee"], str(r["measurement"])[:16], str(r["code_hash"])[:16],
                        r["verified_at"], r["result"]] for r in att["records"]])
    st = report["storage"]
    ring = st["keyring"]
    out += ["## Storage", "", f"Sealed: {_f(st['sealed'])}. {st['algorithm']}. What: {st['what']}.",
            f"Keyring ({ring.get('provider')}): ids {', '.join(ring.get('key_ids', [])) or 'n/a'}; current "
            f"{ring.get('current') or 'n/a'}; retired {', '.join(ring.get('retired', [])) or 'none'}; last changed "
            f"{ring.get('last_changed') or 'n/a'}. Key bytes are never shown.", ""]
    integ = report["integrity"]
    out += ["## Integrity", "", f"- Audit log: {integ['audit_log']['result']}"]
    out += [f"- Ledger {x['ledger']}: {x['result']}" for x in integ.get("ledgers", [])]
    out += [f"- Ledger head {k}: `{v}`" for k, v in integ["ledger_heads"].items()]
    other = {k: v for k, v in integ.items() if k not in ("audit_log", "ledger_heads", "ledgers")}
    out += [f"- {k}: `{json.dumps(v)}`" for k, v in other.items()]
    out += ["", "## Regulatory mapping (informational)", "", report["regulatory_disclaimer"], ""]
    out += _table(["regulation", "article", "duty", "supported by"],
                  [[r["regulation"], r["article"], r["duty"], r["supported_by"]] for r in report["regulatory"]])
    out += ["## OpenDP deployments registry", "", "```yaml",
            yaml.safe_dump(report["opendp_registry"], sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    return "\n".join(out)
