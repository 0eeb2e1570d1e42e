"""The files under deploy/ speak of metrics the coordinator really exports (a renamed metric breaks them here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from fedsecure.observe.metrics import CoordinatorMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMQL_FUNCS = {"rate", "increase", "histogram_quantile", "sum", "by", "ignoring", "group_right", "le", "on",
                "max_over_time", "up"}


def _exported() -> set[str]:
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}
    for fam in CoordinatorMetrics().registry.collect():  # labelled families have no samples yet: names by type
        names |= {fam.name + s for s in suffixes.get(fam.type, ("",))}
    return names


def _metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)))
    return {w for w in words if w.startswith("fedsecure_")}


def test_the_exported_names_are_what_the_deploy_files_expect():
    exported = _exported()
    assert {"fedsecure_round", "fedsecure_epsilon_remaining", "fedsecure_round_duration_seconds_bucket",
            "fedsecure_bytes_total", "fedsecure_attestation_total", "fedsecure_updates_rejected_total"} <= exported


def test_alert_rules_use_only_exported_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used and used <= _exported(), used - _exported()


def test_grafana_dashboard_uses_only_exported_metrics_and_a_datasource_variable():
    dash = json.loads((DEPLOY / "grafana" / "fedsecure-coordinator.json").read_text())
    assert dash["uid"] == "fedsecure-coordinator" and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used and used <= _exported(), used - _exported()
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_the_name_check_can_fail():
    assert _metric_names('rate(fedsecure_bytes_totl{direction="up"}[5m])') == {"fedsecure_bytes_totl"}
    assert "fedsecure_bytes_totl" not in _exported()
