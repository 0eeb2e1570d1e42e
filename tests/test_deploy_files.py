"""The files under deploy/ speak of metrics the coordinator and the sites really export (a renamed metric breaks
them here), and every alert rule has a unit test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from fedsecure.observe.hardware import DCGM_FIELDS
from fedsecure.observe.metrics import CoordinatorMetrics
from fedsecure.observe.site_metrics import SiteMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMQL_FUNCS = {"rate", "increase", "histogram_quantile", "sum", "by", "ignoring", "group_right", "le", "on",
                "max_over_time", "up"}


def _exported() -> set[str]:
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}
    for endpoint in (CoordinatorMetrics(), SiteMetrics("h")):
        for fam in endpoint.registry.collect():  # labelled families have no samples yet: names by type
            names |= {fam.name + s for s in suffixes.get(fam.type, ("",))}
    return names | set(DCGM_FIELDS)  # GPU series exist only where NVML answers


def _metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)))
    return {w for w in words if w.startswith(("fedsecure_", "DCGM_"))}


def test_the_exported_names_are_what_the_deploy_files_expect():
    exported = _exported()
    assert {"fedsecure_round", "fedsecure_epsilon_remaining", "fedsecure_round_duration_seconds_bucket",
            "fedsecure_bytes_total", "fedsecure_attestation_total", "fedsecure_updates_rejected_total",
            "fedsecure_site_epsilon_remaining", "fedsecure_site_messages_total", "fedsecure_cpu_utilization_ratio",
            "process_cpu_seconds_total", "DCGM_FI_DEV_GPU_TEMP"} <= exported


def test_alert_rules_use_only_exported_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used and used <= _exported(), used - _exported()


def test_every_alert_has_a_unit_test_that_fires_it():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    fired = {c["alertname"] for t in tests["tests"] for c in t["alert_rule_test"] if c["exp_alerts"]}
    assert alerts == fired, alerts ^ fired
    assert {"FedsecureGpuHot", "FedsecureSiteOwnEpsilonLow", "FedsecureSiteSilent"} <= alerts


@pytest.mark.parametrize("name", ["fedsecure-coordinator", "fedsecure-site"])
def test_grafana_dashboards_use_only_exported_metrics_and_a_datasource_variable(name):
    dash = json.loads((DEPLOY / "grafana" / f"{name}.json").read_text())
    assert dash["uid"] == name and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used and used <= _exported(), used - _exported()
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_the_name_check_can_fail():
    assert _metric_names('rate(fedsecure_bytes_totl{direction="up"}[5m])') == {"fedsecure_bytes_totl"}
    assert "fedsecure_bytes_totl" not in _exported()
