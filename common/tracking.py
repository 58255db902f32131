"""Optional MLflow tracking that never stops training.

Enabled when MLFLOW_TRACKING_URI is set (MLFLOW_EXPERIMENT_ID, if set, picks the experiment;
otherwise the experiment is looked up or created by name). Unset: one warning, and every call is a
no-op. A failing server (down at the start, or going away mid-run) gives one warning per streak of
failures; training continues, and later calls try again. HTTP retries and timeouts are shortened
(unless the user set them) so a dead server costs seconds, not minutes, per call.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Defaults that keep a dead server from stalling an epoch; the user's own settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
MAX_PARAM_LENGTH = 6000


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def flatten_params(params: dict) -> dict[str, str]:
    """MLflow params are strings of bounded length."""
    return {str(key): str(value)[:MAX_PARAM_LENGTH] for key, value in params.items()}


class Tracker:
    """A thin, failure-proof wrapper over ``mlflow.tracking.MlflowClient`` for one run."""

    def __init__(self, uri: str | None, experiment_name: str, experiment_id: str | None = None,
                 run_name: str | None = None):
        self.uri, self.experiment_name, self.experiment_id = uri, experiment_name, experiment_id
        self.run_name, self.run_id, self.client = run_name, None, None
        self._failing = False

    @classmethod
    def from_env(cls, experiment_name: str, run_name: str | None = None, environ=os.environ) -> "Tracker":
        uri = environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            _warn("MLFLOW_TRACKING_URI is not set; training without MLflow tracking")
        return cls(uri, experiment_name, environ.get("MLFLOW_EXPERIMENT_ID"), run_name)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def _call(self, what: str, fn):
        """Run one MLflow call; any failure is a warning (once per streak), never an exception."""
        try:
            result = fn()
        except Exception as exc:  # tracking must never kill training, whatever the client raises
            if not self._failing:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                _warn(f"MLflow tracking failed ({what}: {reason}); training continues without it")
            self._failing = True
            return None
        if self._failing:
            print(f"MLflow tracking recovered ({what})", file=sys.stderr)
        self._failing = False
        return result

    def _experiment(self) -> str:
        if self.experiment_id:
            return self.experiment_id
        found = self.client.get_experiment_by_name(self.experiment_name)
        return found.experiment_id if found else self.client.create_experiment(self.experiment_name)

    def start(self, params: dict, tags: dict) -> None:
        """Create the run with its params and tags; on failure the tracker stays disabled."""
        if not self.uri:
            return
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)

        def create():
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            run = self.client.create_run(self._experiment(), run_name=self.run_name)
            self.client.log_batch(run.info.run_id,
                                  params=[Param(k, v) for k, v in flatten_params(params).items()],
                                  tags=[RunTag(k, str(v)) for k, v in tags.items()])
            return run.info.run_id

        self.run_id = self._call("start run", create)
        if self.run_id:
            print(f"MLflow run {self.run_id} at {self.uri}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self._call("log metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self._call(f"log artifact {Path(path).name}",
                       lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            for key, value in tags.items():
                self._call("set tag", lambda k=key, v=value: self.client.set_tag(self.run_id, k, str(v)))

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._call("end run", lambda: self.client.set_terminated(self.run_id, status))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finish("KILLED" if exc_type is KeyboardInterrupt else "FAILED" if exc_type else "FINISHED")
        return False
