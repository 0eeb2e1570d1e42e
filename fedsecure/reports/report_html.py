"""``report.html``: one self-contained page (inline CSS and SVG; no script, no font, no request).

Plain language first (summary, findings), then the figures per site, charts, the accounting and its independent
recomputation, the mechanisms, trust model, attestation, storage, integrity and the regulatory mapping. The page
names the SHA-256 of the ``report.json`` it was rendered from; ``fedsecure report verify`` checks both files
against the signature.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from fedsecure.reports.charts import line_chart

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;max-width:1100px;
margin:24px auto;padding:0 20px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a;font-size:13px}.digest{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.summary{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:10px 16px;font-size:16px}
.summary li{margin:4px 0}
.finding{padding:6px 10px;margin:4px 0;border-radius:4px}.error{background:#ffebe9;border-left:4px solid #cf222e}
.warning{background:#fff8c5;border-left:4px solid #bf8700}.info{background:#ddf4ff;border-left:4px solid #0969da}
table{border-collapse:collapse;width:100%;margin:6px 0;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 6px;text-align:right;vertical-align:top}
th{background:#f6f8fa}td.l,th.l{text-align:left}td:first-child{white-space:nowrap}
.charts{display:flex;flex-wrap:wrap;gap:8px}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.cols{display:flex;gap:16px;flex-wrap:wrap}
.col{flex:1 1 320px;border:1px solid #d0d7de;border-radius:6px;padding:8px 12px}
.chart{max-width:100%;width:540px;height:auto;margin:6px 0}.chart-title{font-weight:600;font-size:13px}
.tick,.legend,.axis{font-size:11px;fill:#57606a}.grid{stroke:#eaeef2}.frame{fill:none;stroke:#d0d7de}
.budget{stroke:#cf222e;stroke-dasharray:6 4;stroke-width:1.5}.budget-label{font-size:11px;fill:#cf222e}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px;white-space:pre-wrap;word-break:break-all}code{font-size:12px}
@media print{body{max-width:none;margin:0}details{display:block}}
"""


def _f(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _e(x: Any) -> str:
    return escape(str(x))


def _table(head: list[str], rows: list[list[str]], *, table_id: str = "", row_class: str = "",
           left: tuple[int, ...] = (0,)) -> str:
    th = "".join(f'<th class="l">{_e(h)}</th>' if i in left else f"<th>{_e(h)}</th>" for i, h in enumerate(head))
    body = []
    for r in rows:
        tds = "".join(f'<td class="l">{c}</td>' if i in left else f"<td>{c}</td>" for i, c in enumerate(r))
        body.append(f'<tr class="{row_class}">{tds}</tr>' if row_class else f"<tr>{tds}</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _eps_cell(e: dict[str, Any]) -> str:
    if e["unbounded"]:
        return '<span class="bad">∞ (no DP)</span>'
    if e["shown"] is None:
        return "n/a"
    over = e["budget"] is not None and e["shown"] > e["budget"] * 1.005
    return f'<span class="{"bad" if over else ""}">{e["shown"]:.4f}</span>'


def _site_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in report["sites"]:
        e = s["epsilon"]
        name = s["site"] if report["kind"] == "run" else f"{s['site']} / {str(s['dataset'] or '?')[:12]}"
        delta_ok = s["delta_below_one_over_n"]
        check = ("n/a" if delta_ok is None else
                 '<span class="ok">yes</span>' if delta_ok else '<span class="bad">NO</span>')
        refused = "; ".join(f"{r['round']}: {r['reason']}" for r in s["refused"]) or "-"
        status = s["status"] or "?"
        if s.get("retired_reason"):
            status += f" ({s['retired_reason']})"
        rows.append([_e(name), _e(status), _eps_cell(e), _f(e["this_run"]), _f(e["budget"], "g"),
                     _f(e["remaining"]), _f(s["delta"], ".1e"), _e(s["records"] or "n/a"), check,
                     _f(s["sigma"]), _f(s["max_grad_norm"], "g"), _f(s["q"]), _e(s["sampling"]),
                     _e(s["steps_this_run"]), _e(len(s["rounds_trained"])), _e(refused)])
    return rows


SITE_HEAD = ["site", "status", "ε spent (lifetime)", "ε this run", "ε budget", "remaining", "δ", "records N",
             "δ < 1/N", "σ", "C", "q", "sampling", "steps", "rounds trained", "refused (reason)"]


def _charts(report: dict[str, Any]) -> str:
    sites = report["sites"]
    budgets = {s["epsilon"]["budget"] for s in sites if s["epsilon"]["budget"] is not None}
    budget = max(budgets) if budgets else None
    x_label = "round" if report["kind"] == "run" else "ledger entry"
    eps = {(s["site"] if report["kind"] == "run" else str(s["dataset"])[:12]): s["epsilon_by_round"] for s in sites}
    out = [line_chart(eps, chart_id="chart-epsilon", title="ε spent per site against its budget", x_label=x_label,
                      y_label="ε", hline=budget, hline_label=f"budget {budget:g}" if budget is not None else "")]
    if report["kind"] == "site":
        life = {str(s["dataset"])[:12]: [(i, r["epsilon_after"]) for i, r in enumerate(s.get("runs", []), 1)]
                for s in sites}
        out.append(line_chart(life, chart_id="chart-lifetime", title="Lifetime ε per dataset across runs",
                              x_label="run (in order of first use)", y_label="ε after the run", hline=budget,
                              hline_label=f"budget {budget:g}" if budget is not None else ""))
    if report["kind"] == "run":
        loss = {"held-out loss": [(r, v) for r, v in report["series"]["eval_loss"]]}
    else:  # "<run>#<round>" labels: one line per run, by round
        loss = {}
        for label, v in report["series"]["eval_loss"]:
            run, _, rnd = str(label).rpartition("#")
            loss.setdefault(f"run …{run}", []).append((float(rnd) if rnd.isdigit() else 0.0, v))
    out.append(line_chart(loss, chart_id="chart-loss", title="What the spend bought: held-out loss", x_label="round",
                          y_label="loss", y_from_zero=False))
    if report["series"]["bytes"]:
        b = report["series"]["bytes"]
        out.append(line_chart({"down": [(r, d) for r, d, _ in b], "up": [(r, u) for r, _, u in b]},
                              chart_id="chart-bytes", title="Bytes on the wire per round", x_label="round",
                              y_label="bytes"))
    return "".join(out)


def _accounting(report: dict[str, Any]) -> str:
    a = report["accounting"]
    rows = []
    for s in report["sites"]:
        e = s["epsilon"]
        site_fig = e["lifetime_reported"] if e["checked_against"] == "lifetime_reported" else e["this_run"]
        diff = "n/a" if e["relative_difference"] is None else f"{100 * e['relative_difference']:+.2f}%"
        ok = {True: '<span class="ok">agrees</span>', False: '<span class="bad">differs</span>', None: "n/a"}
        rows.append([_e(s["site"] if report["kind"] == "run" else str(s["dataset"])[:12]), _e(s["accountant"]),
                     _e(e["checked_against"] or "n/a"), _f(site_fig), _f(e["this_run_recomputed"]), diff,
                     ok[e["within_tolerance"]], _eps_cell(e)])
    return (f"<p>Accountant: <b>{_e(a['accountant'])}</b> ({_e(a['library'])}). Recomputed independently from the "
            f"mechanisms below with {_e(a['independent'])}; tolerance {100 * a['tolerance']:.1f}% or "
            f"{a.get('absolute_tolerance', 0):g} absolute, whichever is larger; {_e(a['rule'])}.</p>"
            + _table(["site", "accountant", "compared", "site's ε", "recomputed ε", "difference", "result", "shown"],
                     rows, table_id="accounting-table"))


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def render(report: dict[str, Any], *, json_sha256: str, key_id: str | None) -> str:
    """The HTML page of ``report``; ``json_sha256`` is the digest of the report.json it came from."""
    g = report["generated"]
    signed = (f"Signed (Ed25519, DSSE) by report key <span class=\"digest\">{_e(key_id)}</span>; check with "
              "<code>fedsecure report verify report.json --key PUBLIC_KEY</code>." if key_id else "Not signed.")
    findings = "".join(f'<div class="finding {_e(f["severity"])}"><b>{_e(f["severity"])}:</b> {_e(f["text"])}</div>'
                       for f in report["findings"]) or '<p class="ok">No findings.</p>'
    rl, cl = report["guarantees"]["record_level"], report["guarantees"]["client_level"]
    cl_text = ("off" if not cl.get("enabled") else
               f"ε = {cl['epsilon']:.3f} at δ = {cl['delta']:.0e} over {cl['rounds']} rounds (clip {cl['clip']}, "
               f"σ_c = {cl['noise_multiplier']}, {cl['accountant']})"
               + (f"; mechanism: {cl['mechanism']}" if cl.get("mechanism") else ""))
    tm = report["trust_model"]
    att = report["attestation"]
    att_rows = [[_e(r["round"]), _e(r["site"]), _e(r["tee"]),
                 f'<span class="digest">{_e(str(r["measurement"])[:16])}</span>',
                 f'<span class="digest">{_e(str(r["code_hash"])[:16])}</span>', _e(r["verified_at"]), _e(r["result"])]
                for r in att.get("records", [])]
    st = report["storage"]
    ring = st["keyring"]
    files = [[_e(f["file"]), _e(f.get("cipher", "")), _e(f.get("kek_id", f.get("error", "")))]
             for f in st["files"][:50]]
    integ = report["integrity"]
    audit = integ["audit_log"]
    audit_cls = "ok" if audit["verified"] else "bad"
    heads = [[_e(k), f'<span class="digest">{_e(v)}</span>'] for k, v in integ["ledger_heads"].items()]
    ledgers = "".join(f'<li class="{"ok" if x["verified"] else "bad"}">{_e(x["ledger"])}: {_e(x["result"])}</li>'
                      for x in integ.get("ledgers", []))
    reg = [[_e(r["regulation"]), _e(r["article"]), _e(r["duty"]), _e(r["supported_by"])] for r in report["regulatory"]]
    mechanisms = "".join(f"<details><summary>{_e(m['site'])} {_e(str(m.get('dataset') or '')[:12])}</summary><pre>"
                         f"{_e(json.dumps(m['mechanism'], indent=1))}</pre></details>" for m in report["releases"])
    other = {k: v for k, v in integ.items() if k not in ("audit_log", "ledger_heads", "ledgers")}
    att_table = _table(["round", "site", "TEE", "measurement", "code hash", "verified at (UTC)", "result"], att_rows,
                       table_id="attestation-table", left=(1, 2, 6)) if att_rows else ""
    att_policy = (f"<p>Policy: {_e(att['policy'])} (SHA-256 <span class=\"digest\">{_e(att.get('policy_sha256'))}"
                  "</span>)</p>" if att.get("policy") else "")
    if att.get("node_key_id"):
        att_policy += f"<p>Node key id: <span class=\"digest\">{_e(att['node_key_id'])}</span></p>"
    opendp = _e(json.dumps(report["opendp_registry"], indent=1, ensure_ascii=False))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>{_e(report['title'])}</title><style>{CSS}</style></head><body>
<h1>{_e(report['title'])}</h1>
<p class="meta">Generated {_e(g['at'])} by {_e(g['user'])}@{_e(g['host'])} with fedsecure {_e(g['fedsecure'])}
(code hash <span class="digest">{_e(g['code_hash'][:16])}</span>). Rendered from report.json with SHA-256
<span class="digest" id="json-digest">{_e(json_sha256)}</span>. {signed}</p>
<h2>Summary</h2><ul class="summary" id="summary">{''.join(f'<li>{_e(s)}</li>' for s in report['summary'])}</ul>
<h2>Findings</h2><div id="findings">{findings}</div>
<h2>What is protected: the unit of privacy</h2>
<div class="cols"><div class="col" id="record-level"><h3>Record-level guarantee (each site)</h3>
<p><b>{'ON' if rl['enabled'] else '<span class="bad">OFF</span>'}</b>, {_e(rl.get('accountant') or '')} accountant.</p>
<p>Unit: {_e(report['unit']['record_level'])}</p>
<p>Neighbouring datasets: {_e(report['unit']['neighbouring'])}</p></div>
<div class="col" id="client-level"><h3>Client-level guarantee (coordinator)</h3><p><b>{_e(cl_text)}</b></p>
<p>Unit: {_e(report['unit']['client_level'])}</p><p>A separate guarantee: never added to or merged with the
record-level ε.</p></div></div>
<h2>Privacy spent per site</h2>
{_table(SITE_HEAD, _site_rows(report), table_id="sites-table", row_class="site-row", left=(0, 1, 15))}
<h2>Charts</h2><div class="charts">{_charts(report)}</div>
<h2>Accounting, recomputed independently</h2>{_accounting(report)}
<h2>Mechanisms (dp-accounting DpEvents, to recompute ε)</h2>{mechanisms}
<h2>Trust model</h2><h3>Who sees what</h3>{_list(tm['who_sees_what'])}<h3>What is protected</h3>{_list(tm['protected'])}
<p><b>Noise generator:</b> {_e(tm['noise_generator'])}</p><h3>What is not covered</h3>{_list(tm['not_covered'])}
<h2>Attestation</h2><p>{_e(att.get('note', ''))}</p>
{att_policy}{att_table}
<h2>Storage</h2><p>Sealed: <b>{_f(st['sealed'])}</b>. Algorithm: {_e(st['algorithm'])}. What: {_e(st['what'])}.</p>
<p>Keyring ({_e(ring.get('provider'))}): key ids {_e(', '.join(ring.get('key_ids', [])) or 'n/a')}; current
{_e(ring.get('current') or 'n/a')}; retired {_e(', '.join(ring.get('retired', [])) or 'none')}; file last changed
{_e(ring.get('last_changed') or 'n/a')}. {_e(ring.get('note', ''))} Key bytes are never shown.</p>
{_table(["sealed file", "cipher", "wrapping key id"], files, left=(0, 1, 2)) if files else ''}
<h2>Integrity</h2><p id="audit-result" class="{audit_cls}">Audit log: {_e(audit['result'])}</p>
<ul>{ledgers}</ul>{_table(["ledger / site", "head"], heads, left=(0, 1))}
<pre>{_e(json.dumps(other, indent=1))}</pre>
<h2>Regulatory mapping (informational)</h2><p>{_e(report['regulatory_disclaimer'])}</p>
{_table(["regulation", "article", "duty", "supported in this report by"], reg, left=(0, 1, 2, 3))}
<h2>OpenDP deployments registry</h2><pre id="opendp">{opendp}</pre>
</body></html>
"""
