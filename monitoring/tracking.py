"""MLflow tracking that training never waits on and never dies with.

Everything goes through a bounded queue to one background thread that owns the MLflow client.
If the tracking server is unreachable or fails, the thread warns once and drops what follows; a
full queue drops instead of blocking; :meth:`MlflowTracker.close` waits a bounded time. Runs are
created (or continued, by id) here too, so a resumed run logs into the run it started.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("omnidiff.tracking")
_FAILED: set[str] = set()  # tracking URIs that failed in this process: said once, not retried
DEFAULT_STORE = "mlflow.db"
CLOSE_TIMEOUT_S = 30.0
# one failed request must not stall the thread for minutes (MLflow retries with back-off)
_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else a SQLite store in ``output_dir``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(Path(output_dir) / DEFAULT_STORE).resolve()}"


def local_artifact_root(uri: str) -> str | None:
    """Artefacts of a local SQLite store go beside it (``mlartifacts/``), not into whatever
    folder the run was started from; a server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def _client(uri: str):
    for key, value in _CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _give_up(uri: str, err: Exception) -> None:
    """Warn once per URI and process; tracking to it stops, training goes on."""
    if uri not in _FAILED:
        _FAILED.add(uri)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.warning("MLflow at %s is unavailable (%s); training goes on without tracking",
                    uri, reason)


def start_run(uri: str, experiment: str, name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str | None:
    """A new run's id (a child of ``parent_run_id`` when given); None, with one warning, when
    the tracking store cannot be reached."""
    if uri in _FAILED:
        return None
    try:
        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=local_artifact_root(uri))
        tags = dict(tags or {}, **{"mlflow.runName": name})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return client.create_run(experiment_id, tags=tags).info.run_id
    except Exception as err:  # noqa: BLE001 - tracking must never stop training
        _give_up(uri, err)
        return None


class MlflowTracker:
    """Logs metrics, params, artifacts and the run's end into one run, from a thread."""

    def __init__(self, uri: str, run_id: str, max_queue: int = 10_000) -> None:
        self.uri, self.run_id = uri, run_id
        self.failed = uri in _FAILED
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._work, name="mlflow", daemon=True)
        self._thread.start()

    # --- what training calls: never blocks ------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()
                 if isinstance(value, (int, float)) and value == value]  # NaN never leaves
        self._put(lambda client: client.log_batch(self.run_id, metrics=batch))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            chunk = items[start:start + 100]
            self._put(lambda client, chunk=chunk: client.log_batch(self.run_id, params=chunk))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._put(lambda client: client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Everything under ``folder`` (subfolders kept)."""
        self._put(lambda client: client.log_artifacts(self.run_id, str(folder), artifact_path))

    def set_terminated(self, status: str = "FINISHED") -> None:
        self._put(lambda client: client.set_terminated(self.run_id, status))

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Flush what is queued, waiting at most ``timeout`` seconds."""
        self._put(None)
        self._thread.join(timeout)

    # --- the thread ------------------------------------------------------------------------------
    def _put(self, action: Callable | None) -> None:
        if self.failed and action is not None:
            return
        try:
            self._queue.put_nowait(action)
        except queue.Full:
            pass  # tracking falls behind: drop rather than slow training down

    def _work(self) -> None:
        client = None
        while (action := self._queue.get()) is not None:
            if self.failed:
                continue
            try:
                client = client or _client(self.uri)
                action(client)
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                self.failed = True
                _give_up(self.uri, err)


class MlflowSink:
    """The metric-sink face of a tracker."""

    def __init__(self, tracker: MlflowTracker) -> None:
        self.tracker = tracker

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log(step, metrics)

    def log_folder(self, folder: Path, under: str) -> None:
        self.tracker.log_artifacts(folder, under)

    def close(self) -> None:
        self.tracker.close()
