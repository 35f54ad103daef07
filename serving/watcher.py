"""Keep the served models equal to the registry's ``champion`` aliases, in the background.

Why polling: MLflow has no change notifications; a person moves ``champion`` in the UI (or with
``voltage promote``) and the service notices within ``VOLTAGE_RELOAD_INTERVAL`` seconds. A new
version is downloaded and loaded in this background thread while requests keep using the old
model; only then is it swapped in (:meth:`Predictor.set_model`, atomic). A load that fails keeps
the old model, is logged and counted (``voltage_model_reloads_total{result="failure"}``), and is
retried with exponential backoff, so a broken version cannot make the service fail or spin.

Source of models (``VOLTAGE_MODEL_SOURCE``):

* ``registry``: the registry only (an ion without champion is not served: 503);
* ``bento``: the models packaged in the built Bento (``serving/export_models.py``), no watching;
* ``release``: the pretrained release in the repository (``VOLTAGE_RELEASE_DIR``, written by
  ``voltage release``), no watching;
* ``auto`` (default): the registry when it answers at start, else the packaged models; an ion
  still without a model then is served from the release, and (registry mode) swapped for its
  champion as soon as one is promoted. So a checkout with an empty registry serves at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.config import ServingConfig
from serving.models import (
    load_bento_model,
    load_registry_model,
    load_release_model,
)
from serving.predictor import Predictor
from voltage_model.registry import champion_version, registry_reachable

logger = logging.getLogger(__name__)

#: Longest wait before retrying a version that failed to load.
MAX_BACKOFF_S = 600.0


@dataclass(frozen=True)
class PackagedModel:
    """A model exported into the BentoML store: its folder and metadata."""

    path: Path
    metadata: Mapping[str, Any]


class ModelManager:
    """Loads the first models and follows the registry (one daemon thread per process)."""

    def __init__(
        self,
        config: ServingConfig,
        predictor: Predictor,
        packaged: Mapping[str, PackagedModel] | None = None,
        warm: bool = True,
    ) -> None:
        self.config = config
        self.warm = warm  # False: no warm-up prediction (one-shot command line)
        self.predictor = predictor
        self.metrics = predictor.metrics
        self.packaged = dict(packaged or {})
        self.mode = "registry"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures: dict[tuple[str, int], tuple[int, float]] = {}
        self._warned: set[tuple[str, str]] = set()
        self.polls = 0

    # ------------------------------------------------------------------ start
    def initial_load(self) -> str:
        """Choose the model source and load every ion once; returns the mode used."""
        source = self.config.model_source
        uri = self.config.tracking_uri
        if source == "release":
            self.mode = "release"
        elif source == "bento" or (source == "auto" and not registry_reachable(uri)):
            self.mode = "bento"
            if source == "auto":
                logger.warning("registry %s not reachable: serving the packaged models "
                               "(else the release)", uri)  # fmt: skip
            self._load_packaged(quiet=source == "auto")
        else:
            self.mode = "registry"
            self.poll_once()
        if source in ("auto", "release"):
            self._load_release(self.predictor.missing())
        logger.info(
            "models (%s): %s; missing: %s",
            self.mode,
            {i: f"{m.source} v{m.version}" for i, m in self.predictor.models().items()},
            self.predictor.missing() or "none",
        )
        return self.mode

    def _load_packaged(self, quiet: bool = False) -> None:
        """Each ion's packaged model; ``quiet``: a missing one is not an error (the release
        may stand in)."""
        for ion in self.config.enabled_ions:
            pkg = self.packaged.get(ion)
            if pkg is None:
                if not quiet:
                    logger.error("no packaged model for ion %s: it will answer 503", ion)
                continue
            try:
                served = load_bento_model(ion, pkg.path, dict(pkg.metadata))
                if self.warm:
                    self.predictor.warm(served)
            except Exception as exc:
                logger.error("ion %s: packaged model failed to load: %s", ion, exc)
                self.metrics.record_reload(ion, False)
                continue
            self.predictor.set_model(ion, served)
            self.metrics.record_reload(ion, True)

    def _load_release(self, ions: list[str]) -> None:
        """Serve ``ions`` from the pretrained release. No release at all, or none for an ion, is
        a warning (nothing failed to load); a release file that does not load (changed since
        written, unreadable) is a failed load, counted."""
        from voltage_model.release import ReleaseError, release_entry

        folder = self.config.release_dir
        if folder is None or not ions:
            return
        for ion in ions:
            try:
                release_entry(folder, ion)
            except ReleaseError as exc:
                logger.warning("ion %s: no model and no release to fall back on: %s", ion, exc)
                continue
            try:
                served = load_release_model(ion, folder)
                if self.warm:
                    self.predictor.warm(served)
            except Exception as exc:
                logger.error("ion %s: release model failed to load: %s", ion, exc)
                self.metrics.record_reload(ion, False)
                continue
            self.predictor.set_model(ion, served)
            self.metrics.record_reload(ion, True)
            logger.info("ion %s: serving the release (%s v%d, %s)", ion, served.name,
                        served.version, folder)  # fmt: skip

    # ------------------------------------------------------------------ follow
    def _warn_once(self, ion: str, what: str, msg: str, *args: Any) -> None:
        if (ion, what) not in self._warned:
            self._warned.add((ion, what))
            logger.warning(msg, *args)

    def poll_once(self) -> None:
        """Compare each ion's champion with what is served; load and swap what changed."""
        self.polls += 1
        uri = self.config.tracking_uri
        for ion in self.config.enabled_ions:
            name = self.config.model_name(ion)
            try:
                version = champion_version(uri, name)
            except Exception as exc:
                logger.warning("ion %s: cannot read the champion of %s: %s", ion, name, exc)
                self.metrics.record_reload(ion, False)
                continue
            current = self.predictor.model_for(ion)
            if version is None:
                if current is None:
                    self._warn_once(ion, "none", "ion %s: %s has no champion", ion, name)
                elif current.source != "registry":
                    pass  # the release (or a packaged model) serves until a champion exists
                else:
                    self._warn_once(
                        ion, "removed", "ion %s: champion alias removed; still serving v%s",
                        ion, current.version,
                    )  # fmt: skip
                continue
            self._warned.discard((ion, "removed"))
            if (
                current is not None
                and current.source == "registry"
                and current.version == version.version
                and current.name == version.name
            ):
                continue
            key = (ion, version.version)
            tries, not_before = self._failures.get(key, (0, 0.0))
            if time.monotonic() < not_before:
                continue
            t0 = time.perf_counter()
            try:
                served = load_registry_model(ion, uri, version)
                if self.warm:
                    self.predictor.warm(served)  # before the swap: no slow first request
            except Exception as exc:
                tries += 1
                backoff = min(self.config.reload_interval_s * 2**tries, MAX_BACKOFF_S)
                self._failures[key] = (tries, time.monotonic() + backoff)
                logger.error(
                    "ion %s: loading %s failed (attempt %d, next in %.0f s); keeping %s: %s",
                    ion, version.uri, tries, backoff,
                    f"v{current.version}" if current else "no model", exc,
                )  # fmt: skip
                self.metrics.record_reload(ion, False)
                continue
            self._failures.pop(key, None)
            self.predictor.set_model(ion, served)
            self.metrics.record_reload(ion, True)
            logger.info(
                "ion %s: now serving %s v%d (was %s), loaded in %.2f s",
                ion, served.name, served.version,
                f"v{current.version}" if current else "none", time.perf_counter() - t0,
            )  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.config.reload_interval_s):
            try:
                if self.mode == "registry":
                    self.poll_once()
                self.predictor.refresh_drift()
            except Exception:  # the watcher must never die
                logger.exception("model watcher iteration failed")

    def start(self) -> None:
        """Start following the registry (also refreshes drift gauges periodically)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="voltage-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
