"""Monitoring as code: Prometheus config, alert rules and their unit tests, Grafana dashboard.

Three layers:
* ``promtool`` validates the config and rules and runs the rule unit tests (each alert firing
  and quiet).
* Static checks keep ``monitoring/`` and the service in step: every metric name in every alert
  and panel query must be one of docs/CONTRACTS.md's "Service metrics" (or ``up``), with labels
  the contract gives it, and every panel query must parse as PromQL.
* A real Prometheus server (``monitoring/promtest.py``) loads the project config and rules,
  scrapes a real target (its own /metrics) and fires ``VoltageTargetDown`` for a dead one.

promtool/prometheus come from ``monitoring/setup_prometheus.sh``. Without them the tests skip
locally, but fail under ``CI`` so a missing install step cannot pass as green.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MON = REPO / "monitoring"
CONFIG = MON / "prometheus.yml"
RULES = MON / "rules" / "voltage_alerts.yml"
RULE_TESTS = MON / "rules" / "voltage_alerts_test.yml"
DASHBOARD = MON / "grafana" / "dashboards" / "electrode-voltage.json"
PROVISIONING = MON / "grafana" / "provisioning"
CONTRACTS = REPO / "docs" / "CONTRACTS.md"
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
}  # fmt: skip
ALERTS = {
    "VoltageTargetDown",
    "VoltageHighErrorRatio",
    "VoltageHighLatencyP99",
    "VoltageNoChampion",
    "VoltageModelReloadFailed",
    "VoltagePredictionDriftHigh",
    "VoltageUnseenElementsHigh",
    "VoltageRequestsShed",
}


def _load_promtest() -> ModuleType:
    """Import monitoring/promtest.py by path: ``monitoring`` is not an installed package."""
    name = "monitoring_promtest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MON / "promtest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


promtest = _load_promtest()


def _tool(name: str) -> str:
    """Path of a Prometheus binary; skip locally if absent, fail under CI."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not on PATH (install with: bash monitoring/setup_prometheus.sh)"
        if IN_CI:
            pytest.fail(f"{msg}; CI must install it")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    return _tool("prometheus")


def _run(cmd: list[str], cwd: Path = MON) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


# ---- promtool -----------------------------------------------------------------------------------


def test_promtool_check_config(promtool: str) -> None:
    out = _run([promtool, "check", "config", str(CONFIG)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_rules(promtool: str) -> None:
    out = _run([promtool, "check", "rules", str(RULES)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout + out.stderr


def test_promtool_rule_unit_tests(promtool: str) -> None:
    out = _run([promtool, "test", "rules", str(RULE_TESTS)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


# ---- rules: content -----------------------------------------------------------------------------


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_is_documented() -> None:
    rules = _alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        ann = rule["annotations"]
        for key in ("summary", "description", "runbook"):
            assert ann.get(key, "").strip(), f"{rule['alert']}: missing {key}"
        assert "Meaning:" in ann["runbook"] and "Do:" in ann["runbook"], rule["alert"]
        assert rule["alert"] in (MON / "README.md").read_text(), f"{rule['alert']} not in README"


def test_rule_unit_tests_cover_each_alert_firing_and_quiet() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in doc["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == ALERTS, f"no firing case for {ALERTS - firing}"
    assert quiet == ALERTS, f"no quiet case for {ALERTS - quiet}"


def test_thresholds_match_the_drift_module() -> None:
    from serving.drift import DEFAULT_MIN_SAMPLES, PSI_ALERT_THRESHOLD, UNSEEN_ALERT_THRESHOLD

    exprs = {r["alert"]: r["expr"] for r in _alert_rules()}
    assert f"voltage_drift_psi > {PSI_ALERT_THRESHOLD}" in exprs["VoltagePredictionDriftHigh"]
    unseen = exprs["VoltageUnseenElementsHigh"]
    assert f"voltage_drift_unseen_element_share > {UNSEEN_ALERT_THRESHOLD}" in unseen
    for name in ("VoltagePredictionDriftHigh", "VoltageUnseenElementsHigh"):
        assert f"voltage_drift_window_requests >= {DEFAULT_MIN_SAMPLES}" in exprs[name]


# ---- metric names vs the contract ---------------------------------------------------------------


def contract_metrics(text: str | None = None) -> dict[str, tuple[str, set[str]]]:
    """``{name: (type, labels)}`` from the "Service metrics" table of docs/CONTRACTS.md."""
    text = CONTRACTS.read_text() if text is None else text
    section = text.split("## Service metrics", 1)[1].split("\n## ", 1)[0]
    out: dict[str, tuple[str, set[str]]] = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*`([a-zA-Z_:][\w:]*)`\s*\|([^|]*)\|([^|]*)\|", line)
        if not m:
            continue
        name, mtype, labels = m.group(1), m.group(2).strip(), m.group(3)
        labels = re.sub(r"\([^)]*\)", "", labels)
        out[name] = (mtype.split()[0], {x.strip() for x in labels.split(",") if x.strip()})
    return out


def allowed_series() -> dict[str, set[str]]:
    """Series names a query may use, each with the labels it carries."""
    out: dict[str, set[str]] = {"up": set(TARGET_LABELS)}
    for name, (mtype, labels) in contract_metrics().items():
        labels = labels | TARGET_LABELS
        if mtype == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = labels
            out[f"{name}_count"] = labels
        else:
            out[name] = labels
    return out


_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
_CLAUSE = r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions, keywords, labels excluded)."""
    s = re.sub(_STRING, '""', expr)
    s = re.sub(r"\$\{?\w+\}?", "", s)  # Grafana variables
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors / subqueries
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(_CLAUSE, " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)\s*(\()?", s):
        name, call = m.groups()
        if call or name.lower() in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def selector_labels(expr: str) -> dict[str, set[str]]:
    """``{metric: label names in its matchers}`` for every ``metric{...}`` selector."""
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"([a-zA-Z_:][\w:]*)\s*\{((?:" + _STRING + r"|[^}\"'`])*)\}", expr):
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*(?:" + _STRING + ")", m.group(2)))
        out.setdefault(m.group(1), set()).update(labels)
    return out


def grouping_labels(expr: str) -> set[str]:
    return {
        x.strip() for m in re.finditer(_CLAUSE, expr) for x in m.group(2).split(",") if x.strip()
    }


def test_promql_name_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, ion) (rate(foo_seconds_bucket{a="x{y}", b=~"$ion"}'
        "[$__rate_interval]))) / on (job) group_left (ion) bar_total offset 5m > 1e-3 and up"
    )
    assert metric_names(expr) == {"foo_seconds_bucket", "bar_total", "up"}
    assert selector_labels(expr) == {"foo_seconds_bucket": {"a", "b"}}
    assert grouping_labels(expr) == {"le", "ion", "job"}
    assert contract_metrics()["voltage_errors_total"] == ("counter", {"kind", "protocol"})


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every alert expression and dashboard panel query."""
    out = [(f"alert {r['alert']}", r["expr"]) for r in _alert_rules()]
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    return out


def test_contract_table_is_parsed() -> None:
    metrics = contract_metrics()
    assert len(metrics) >= 12
    assert metrics["voltage_request_duration_seconds"][0] == "histogram"
    assert metrics["voltage_requests_total"][1] == {"endpoint", "protocol", "ion", "status"}


def test_every_query_uses_contract_metrics_and_labels() -> None:
    allowed = allowed_series()
    queries = _queries()
    assert len(queries) > len(ALERTS)
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - set(allowed)
        assert not unknown, f"{where}: {sorted(unknown)} not in CONTRACTS.md Service metrics"
        for metric, labels in selector_labels(expr).items():
            bad = labels - allowed[metric]
            assert not bad, f"{where}: {metric} has no label(s) {sorted(bad)}"
        available = set().union(*(allowed[n] for n in names))
        bad = grouping_labels(expr) - available
        assert not bad, f"{where}: grouping by {sorted(bad)}, which {sorted(names)} do not carry"


def test_dashboard_panel_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each panel query, Grafana variables substituted, must parse: loaded as a recording rule."""
    subs = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "${ion}": "Li",
            "$ion": "Li"}  # fmt: skip
    rules = []
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in subs.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unsubstituted variable in {expr!r}"
            rules.append(
                {"record": f"dashboard:panel{panel['id']}_{target['refId']}", "expr": expr}
            )
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = _run([promtool, "check", "rules", str(path)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- Grafana ------------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] == "electrode-voltage" and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ion = variables["ion"]
    assert ion["type"] == "query" and ion["multi"] and ion["includeAll"]
    assert ion["definition"] == "label_values(voltage_model_loaded, ion)"
    assert ion["query"]["query"] == ion["definition"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    panels = list(_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    repeated = [p for p in panels if p["type"] == "row" and p.get("repeat") == "ion"]
    assert len(repeated) == 1, "one row repeated per ion"
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])

    # Per-ion section: what an operator needs for one ion, all filtered by the repeated $ion.
    start = dash["panels"].index(repeated[0])
    per_ion = " ".join(t["expr"] for p in dash["panels"][start + 1 :] for t in p.get("targets", []))
    for metric in (
        "voltage_requests_total",
        "voltage_model_version",
        "voltage_model_loaded",
        "voltage_predicted_volts_bucket",
        "voltage_drift_psi",
        "voltage_drift_unseen_element_share",
    ):
        assert re.search(metric + r'\{[^}]*ion="\$ion"', per_ion), f"{metric} not per ion"
    # Service-wide: latency quantiles and errors by kind carry no ion label in the contract.
    every = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for q in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (protocol, le) (rate(voltage_request_duration" in every
        )
    assert "sum by (kind, protocol) (rate(voltage_errors_total" in every
    assert any(p["type"] == "heatmap" for p in panels)


def test_grafana_provisioning() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://127.0.0.1:")
    dash_ds = {v["name"]: v for v in _dashboard()["templating"]["list"]}["datasource"]
    assert dash_ds["current"]["value"] == source["uid"]
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "provider.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


# ---- a real Prometheus --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_real_prometheus_scrapes_and_loads_rules(prometheus_bin: str, tmp_path: Path) -> None:
    """The project config and rules in a running server; the target is Prometheus's own /metrics."""
    with promtest.run_prometheus(CONFIG, tmp_path, promtest.SELF, binary=prometheus_bin) as prom:
        up = prom.wait_for_query('up{job="electrode-voltage"}', lambda v: v == [1.0], timeout=20)
        assert up == [1.0]
        rules = prom.rules()
        assert {r["name"] for r in rules if r["type"] == "alerting"} == ALERTS
        prom.wait_for(
            lambda: all(r.get("health") == "ok" for r in prom.rules()),
            timeout=20,
            what="every rule evaluated without error",
        )
        # No service metrics here and the target is up: nothing may be firing.
        assert [a for a in prom.alerts() if a["state"] == "firing"] == []


@pytest.mark.timeout(60)
def test_real_prometheus_fires_target_down(prometheus_bin: str, tmp_path: Path) -> None:
    """A dead target (closed loopback port) fires VoltageTargetDown; the live one does not."""
    dead = f"127.0.0.1:{promtest.free_port()}"
    with promtest.run_prometheus(
        CONFIG, tmp_path, [promtest.SELF, dead], for_override="1s", binary=prometheus_bin
    ) as prom:
        alerts = prom.wait_for_alert("VoltageTargetDown", "firing", timeout=30)
        firing = [a for a in alerts if a["state"] == "firing"]
        assert [a["labels"]["instance"] for a in firing] == [dead]
        assert firing[0]["annotations"]["runbook"].startswith("Meaning:")


def test_render_config_and_rule_override(tmp_path: Path, promtool: str) -> None:
    """The generated test config is itself valid (checked by promtool), for any target."""
    rules = promtest.override_rules(RULES, tmp_path / "r.yml", "2s")
    fors = {r["alert"]: r["for"] for g in yaml.safe_load(rules.read_text())["groups"]
            for r in g["rules"]}  # fmt: skip
    assert set(fors.values()) == {"2s"} and set(fors) == ALERTS
    doc = promtest.render_config(["127.0.0.1:3999"], [rules])
    assert doc["global"]["scrape_interval"] == "1s"
    assert doc["scrape_configs"][0]["job_name"] == "electrode-voltage"
    assert doc["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:3999"]}]
    cfg = tmp_path / "p.yml"
    cfg.write_text(yaml.safe_dump(doc))
    out = _run([promtool, "check", "config", str(cfg)], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
