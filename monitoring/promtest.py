"""Run a real Prometheus server for tests: generated config, free loopback port, query helpers.

Why: ``promtool test rules`` proves the alert logic on synthetic series, but not that the real
config loads, that targets are scraped, or that the rule files load in a running server. This
helper starts the ``prometheus`` binary (Debian package, see ``monitoring/setup_prometheus.sh``)
on ``127.0.0.1:<free port>`` with a config derived from the project's ``monitoring/prometheus.yml``
(targets replaced, 1 s scrape/evaluation intervals, rule files copied with an optional ``for:``
override so alerts fire within seconds), waits for ``/-/ready``, and stops it on exit.

A service-level test is then a few lines::

    with run_prometheus(CONFIG, tmp_path, f"127.0.0.1:{service_port}", for_override="1s") as prom:
        prom.wait_for_alert("VoltageNoChampion", state="firing", timeout=30)

Only the standard library is used so ``monitoring`` stays importable without the service.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MONITORING_DIR = Path(__file__).resolve().parent
PROJECT_CONFIG = MONITORING_DIR / "prometheus.yml"
HOST = "127.0.0.1"
#: Marker for "scrape the Prometheus server itself": its own /metrics is a real target whose
#: address is only known once the port is chosen.
SELF = "self"


class PrometheusError(RuntimeError):
    """Prometheus did not start, answer, or reach the awaited state in time."""


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` binary (``$PROMETHEUS_BIN`` wins), or None."""
    return os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")


def free_port(host: str = HOST) -> int:
    """A currently free TCP port on ``host`` (the OS picks it; tiny race until it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def override_rules(src: Path, dst: Path, for_override: str | None) -> Path:
    """Copy a rule file, setting every alert's ``for:`` to ``for_override`` (None: unchanged).

    The production ``for:`` durations (minutes) are right for paging and wrong for a test that
    must finish in seconds; the expressions themselves are kept verbatim.
    """
    doc = yaml.safe_load(Path(src).read_text())
    if for_override is not None:
        for group in doc.get("groups", []):
            for rule in group.get("rules", []):
                if "alert" in rule:
                    rule["for"] = for_override
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def render_config(
    targets: Sequence[str],
    rule_files: Sequence[Path],
    *,
    base_config: Path | None = PROJECT_CONFIG,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
) -> dict[str, Any]:
    """A Prometheus config dict: the project's scrape job(s) pointed at ``targets``.

    Keeping the project's job name, metrics path and scheme (rather than writing a fresh job)
    means the test exercises the file operators actually run. With no ``base_config`` a single
    ``electrode-voltage`` job is generated.
    """
    if base_config is not None:
        doc = yaml.safe_load(Path(base_config).read_text())
    else:
        doc = {"scrape_configs": [{"job_name": "electrode-voltage", "metrics_path": "/metrics"}]}
    doc.pop("alerting", None)
    doc["global"] = {
        **doc.get("global", {}),
        "scrape_interval": scrape_interval,
        "scrape_timeout": scrape_interval,
        "evaluation_interval": evaluation_interval,
    }
    for job in doc["scrape_configs"]:
        job["scrape_interval"] = scrape_interval
        job["scrape_timeout"] = scrape_interval
        job["static_configs"] = [{"targets": list(targets)}]
    doc["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
    return doc


@dataclass
class PrometheusServer:
    """A running Prometheus; ``url`` is ``http://127.0.0.1:<port>``."""

    url: str
    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    timeout: float = 5.0
    _closed: bool = field(default=False, repr=False)

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return ``data`` (raises on an error status)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=self.timeout) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; returns the vector's samples (``metric`` labels and ``value``)."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} returned a {data['resultType']}, not a vector")
        return data["result"]

    def query_values(self, expr: str) -> list[float]:
        return [float(s["value"][1]) for s in self.query(expr)]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, flattened across groups."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        return self.api("alerts")["alerts"]

    def wait_for(
        self,
        condition: Callable[[], bool],
        timeout: float = 30.0,
        interval: float = 0.25,
        what: str = "condition",
    ) -> None:
        """Poll ``condition`` until true; ``PrometheusError`` with the log tail on timeout."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (OSError, PrometheusError, KeyError, ValueError) as exc:
                last_exc = exc
            self._check_alive()
            time.sleep(interval)
        raise PrometheusError(f"timed out after {timeout}s waiting for {what} ({last_exc})")

    def wait_for_query(
        self, expr: str, predicate: Callable[[list[float]], bool], timeout: float = 30.0
    ) -> list[float]:
        """Wait until ``predicate(values of expr)`` holds; returns those values."""
        box: list[list[float]] = []

        def check() -> bool:
            box[:] = [self.query_values(expr)]
            return predicate(box[0])

        self.wait_for(check, timeout, what=f"query {expr!r}")
        return box[0]

    def wait_for_alert(
        self, name: str, state: str = "firing", timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Wait until alert ``name`` is in ``state`` (``pending`` or ``firing``)."""
        box: list[list[dict[str, Any]]] = []

        def check() -> bool:
            box[:] = [[a for a in self.alerts() if a["labels"].get("alertname") == name]]
            return any(a["state"] == state for a in box[0])

        self.wait_for(check, timeout, what=f"alert {name} {state}")
        return box[0]

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise PrometheusError(
                f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (clean TSDB shutdown), then SIGKILL if it does not exit in ``timeout``."""
        if self._closed:
            return
        self._closed = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def _start(
    binary: str, config_path: Path, data_dir: Path, port: int, log_path: Path, ready_timeout: float
) -> PrometheusServer:
    """Start one Prometheus and wait for ``/-/ready``; raises with the log tail if it fails."""
    log = log_path.open("ab")
    try:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={data_dir}",
                f"--web.listen-address={HOST}:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        log.close()
    server = PrometheusServer(f"http://{HOST}:{port}", process, config_path, log_path)

    def ready() -> bool:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1.0) as resp:
            return resp.status == 200

    try:
        server.wait_for(ready, timeout=ready_timeout, interval=0.1, what="/-/ready")
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def run_prometheus(
    config_path: Path | None,
    tmp_path: Path,
    scrape_target: str | Sequence[str] = SELF,
    *,
    rule_files: Sequence[Path] | None = None,
    for_override: str | None = None,
    interval: str = "1s",
    ready_timeout: float = 30.0,
    binary: str | None = None,
) -> Iterator[PrometheusServer]:
    """Start Prometheus on a free ``127.0.0.1`` port, scraping ``scrape_target``; stop on exit.

    ``config_path``: the config whose scrape job(s) and rule files are used (the project's
    ``monitoring/prometheus.yml`` by default when None). ``scrape_target``: ``host:port``, a list
    of them, or :data:`SELF` for the server's own ``/metrics``. ``rule_files`` default to the
    config's own (resolved against its folder); each is copied into ``tmp_path`` with
    ``for_override`` applied. Intervals are ``interval`` (1 s) so a test needs seconds, not
    minutes. Retries once on a port race.
    """
    binary = binary or prometheus_binary()
    if binary is None:
        raise PrometheusError("prometheus binary not found (run monitoring/setup_prometheus.sh)")
    base = Path(config_path) if config_path is not None else PROJECT_CONFIG
    base_doc = yaml.safe_load(base.read_text())
    if rule_files is None:
        rule_files = [base.parent / p for p in base_doc.get("rule_files", [])]
    copied = [
        override_rules(Path(p), tmp_path / "rules" / f"{i}_{Path(p).name}", for_override)
        for i, p in enumerate(rule_files)
    ]
    targets = [scrape_target] if isinstance(scrape_target, str) else list(scrape_target)
    last_error: Exception | None = None
    for attempt in range(2):
        port = free_port()
        resolved = [f"{HOST}:{port}" if t == SELF else t for t in targets]
        doc = render_config(
            resolved,
            copied,
            base_config=base,
            scrape_interval=interval,
            evaluation_interval=interval,
        )
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
        data_dir = tmp_path / f"tsdb{attempt}"
        try:
            server = _start(binary, cfg, data_dir, port, tmp_path / "prometheus.log", ready_timeout)
        except PrometheusError as exc:
            last_error = exc
            continue
        try:
            yield server
        finally:
            server.stop()
        return
    raise PrometheusError(f"prometheus did not become ready: {last_error}")
