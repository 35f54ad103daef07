"""The deployment files (deploy/, docs/deploy.md) hold together, without a container runtime.

They are not run by CI (no Docker or Kubernetes there); tests/project/test_cluster.py rehearses the
same setup with the real servers on 127.0.0.1. What can drift silently is checked here, in a second:
every file parses; the replicas' settings are variables the service really reads and docs/serving.md
documents; the probes ask the endpoints that mean "up" and "ready"; Services, ServiceMonitor and
Deployment labels and ports line up; compose and Kubernetes start the tracking server alike; every
secret read is in the example Secret; the Prometheus configurations pass ``promtool check config``
with the project's rules (where promtool is installed).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SERVICE_PORT = 3000  # bentoml serve's port, in the Bento image too


def _docs_settings() -> set[str]:
    """Variable names in the tables of docs/serving.md (the Settings table)."""
    text = (REPO / "docs/serving.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row)}


def _read_by_service(name: str) -> bool:
    """Whether the service's code reads ``name`` (its literal appears in serving/)."""
    return any(f'"{name}"' in p.read_text() for p in (REPO / "serving").glob("*.py"))


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _k8s(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _flags(args: list[str]) -> dict[str, str | None]:
    """``--flag value`` / ``--switch`` pairs of a command line."""
    out: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_every_deploy_yaml_parses() -> None:
    files = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    assert len(files) >= 8
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_replica_settings_are_documented_variables_the_service_reads() -> None:
    documented = _docs_settings()
    compose_env = _compose()["services"]["voltage"]["environment"]
    (container,) = _k8s("Deployment", "voltage")["spec"]["template"]["spec"]["containers"]
    k8s_env = {e["name"]: e.get("value") for e in container["env"]}
    assert compose_env == k8s_env  # one configuration, two formats
    for name in k8s_env:
        assert name in documented, f"{name} is not in docs/serving.md"
        read = name == "MLFLOW_TRACKING_URI" or _read_by_service(name)
        assert read, f"serving/ never reads {name}"
    assert k8s_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # Every VOLTAGE_* variable docs/deploy.md mentions is a documented one.
    mentioned = set(re.findall(r"\bVOLTAGE_[A-Z_]+\b", (REPO / "docs/deploy.md").read_text()))
    assert mentioned <= documented, mentioned - documented


def test_k8s_replicas_probes_service_and_monitor_line_up() -> None:
    deployment = _k8s("Deployment", "voltage")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == SERVICE_PORT
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    grpc_port = {e["name"]: e.get("value") for e in container["env"]}["VOLTAGE_GRPC_PORT"]
    assert ports["grpc"] == int(grpc_port)

    service = _k8s("Service", "voltage")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    monitor = _k8s("ServiceMonitor", "electrode-voltage")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_compose_and_k8s_run_the_same_tracking_server() -> None:
    mlflow = _compose()["services"]["mlflow"]
    compose = _flags(shlex.split(mlflow["command"][0].removeprefix("exec mlflow server")))
    (container,) = _k8s("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    k8s = _flags(container["args"])
    assert set(compose) == set(k8s)
    for flags in (compose, k8s):
        assert "--serve-artifacts" in flags and flags["--serve-artifacts"] is None
        assert flags["--artifacts-destination"] == "s3://voltage-mlflow/artifacts"
        assert (flags["--backend-store-uri"] or "").startswith("postgresql://mlflow:")
        assert (flags["--backend-store-uri"] or "").endswith("@postgres:5432/mlflow")
        assert "mlflow:*" in (flags["--allowed-hosts"] or "").split(",")
    env = {e["name"] for e in container["env"]}
    assert {"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env
    assert "MLFLOW_S3_ENDPOINT_URL" in mlflow["environment"]


def test_only_storage_services_hold_credentials_and_all_are_in_the_example_secret() -> None:
    secret = yaml.safe_load((K8S / "secrets.example.yaml").read_text())
    keys = set(secret["stringData"])
    used: dict[str, set[str]] = {}
    for doc in _k8s_docs():
        text = yaml.safe_dump(doc)
        for key in re.findall(r"key: ([A-Z_]+)\n\s+name: voltage-secrets", text):
            used.setdefault(doc["metadata"]["name"], set()).add(key)
    assert set().union(*used.values()) <= keys
    assert "voltage" not in used, "the service replicas must not need credentials"
    compose = _compose()["services"]
    assert not any("AWS" in k or "PASSWORD" in k for k in compose["voltage"]["environment"])


def test_ports_are_published_on_localhost_only() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_database_init_script_is_the_same_in_compose_and_k8s() -> None:
    def code(text: str) -> list[str]:
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    script = (DEPLOY / "postgres/init-databases.sh").read_text()
    config = _k8s("ConfigMap", "postgres-init")["data"]["10-databases.sh"]
    assert code(script) == [ln for ln in code(config) if not ln.startswith("#")]
    mount = "./postgres/init-databases.sh:/docker-entrypoint-initdb.d/10-databases.sh:ro"
    assert mount in _compose()["services"]["postgres"]["volumes"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
@pytest.mark.parametrize("source", ["compose", "k8s"])
def test_prometheus_configs_pass_promtool(source: str, tmp_path: Path) -> None:
    if source == "compose":
        text = (DEPLOY / "prometheus/prometheus.yml").read_text()
    else:
        text = _k8s("ConfigMap", "prometheus-scrape-config")["data"]["prometheus.yml"]
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copytree(REPO / "monitoring/rules", tmp_path / "rules")
    res = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    if "field kubernetes_sd_configs not found" in res.stdout + res.stderr:
        pytest.skip("this promtool is built without Kubernetes discovery (Debian's package)")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomization_renders() -> None:
    res = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(res.stdout) if d]
    assert {"Deployment", "Service", "StatefulSet", "ServiceMonitor", "Job"} <= set(kinds)
    assert "Secret" not in kinds  # created by hand or a secret manager, never from the repo
