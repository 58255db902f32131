"""Optional MLflow tracking that never stops training.

Enabled when MLFLOW_TRACKING_URI is set (MLFLOW_EXPERIMENT_ID, if set, picks the experiment;
otherwise the experiment named by the caller is looked up or created). Unset: one warning, and every
call is a no-op.

A failing server (down at the start, or going away mid-run) costs one warning per streak of failures
and never an exception. A run that could not be created stays disabled; a run that loses its server
keeps its metrics and tags queued and sends them with the next call that gets through. HTTP retries
and timeouts are shortened (unless the user set them) so a dead server costs seconds, not minutes,
per call: MLflow's defaults are 7 retries with exponential backoff and a 120 s timeout.

Only ``mlflow.tracking.MlflowClient`` is used (``mlflow-skinny`` is enough), with an explicit tracking
URI, so no global fluent-API state is touched and several trackers can coexist.
"""

from __future__ import annotations

import os
import posixpath
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# The user's own settings win; these apply only while this module talks to the server. One retry
# (urllib3 retries the first time without backoff) absorbs a kept-alive connection the server closed
# between epochs; a second failure means the server is gone, and that costs at most 2 x 5 s.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
STATUSES = ("FINISHED", "FAILED", "KILLED")

# Limits enforced by the MLflow server (mlflow/utils/validation.py); exceeding one rejects the batch.
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PENDING_METRICS = 100_000  # bounds memory if the server never comes back

# Names may hold alphanumerics, "_", "-", ".", " " and "/" (":" only on POSIX servers, so not here).
_INVALID_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def sanitize_key(key) -> str:
    """A param, metric or tag name the server accepts: bad characters become "_", length capped."""
    key = _INVALID_KEY_CHARS.sub("_", str(key))[:MAX_KEY_LENGTH]
    # The server treats names as file paths and rejects ones that normalize to another name
    # ("a//b", "a/", "/a", "..", "."), so such names lose their slashes and gain a prefix.
    if key in ("", ".") or key.startswith(("..", "/")) or posixpath.normpath(key) != key:
        key = ("_" + key.replace("/", "_"))[:MAX_KEY_LENGTH]
    return key


def stringify(value) -> str:
    """A readable string for a param value: paths as plain paths, sequences as ``[a, b]``."""
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return "[" + ", ".join(stringify(item) for item in items) + "]"
    return str(value)  # Path, str, numbers, None, enums all print sensibly


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys; values become strings within MLflow's length limit.

    Example: ``{"model": {"depth": 2}, "size": [400, 640]}``
    -> ``{"model.depth": "2", "size": "[400, 640]"}``.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[sanitize_key(name)] = stringify(value)[:MAX_PARAM_LENGTH]
    return flat


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _first_line(exc: BaseException) -> str:
    """A one-line reason for a warning (MLflow's messages can span a traceback's worth of lines)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextmanager
def _short_http_timeouts():
    """Apply HTTP_DEFAULTS for the duration of one call, without overriding the user's settings.

    MLflow reads these variables on every request, and only the environment configures them; setting
    them just around our own calls keeps any other MLflow use in the process at its own settings.
    """
    added = [key for key in HTTP_DEFAULTS if key not in os.environ]
    os.environ.update({key: HTTP_DEFAULTS[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class Tracker:
    """One MLflow run, driven through an explicit ``MlflowClient``; no call ever raises.

    Usage::

        with Tracker.from_env("visionassist", run_name="tiny-0") as tracker:
            tracker.start(params=vars(args), tags={"model_type": "TinyEfficientViT"})
            tracker.log_metrics({"valid_iou": 0.91}, step=1)
            tracker.log_artifact("best.pt", artifact_path="checkpoints")
        # finished as FINISHED, FAILED (exception) or KILLED (KeyboardInterrupt)
    """

    def __init__(self, uri: str | None, experiment_name: str, experiment_id: str | None = None,
                 run_name: str | None = None):
        self.uri, self.experiment_name, self.experiment_id = uri, experiment_name, experiment_id
        self.run_name, self.client = run_name, None
        self._run_id: str | None = None
        self._finished = False
        self._failing = False  # inside a streak of failures: warn once, not on every call
        self._pending_metrics: list = []  # mlflow.entities.Metric not yet accepted by the server

    @classmethod
    def from_env(cls, experiment_name: str, run_name: str | None = None, environ=os.environ) -> Tracker:
        """A tracker configured by MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID in ``environ``.

        Without MLFLOW_TRACKING_URI it warns once and returns a tracker whose methods do nothing.
        """
        uri = environ.get("MLFLOW_TRACKING_URI", "").strip() or None
        if uri is None:
            _warn("MLFLOW_TRACKING_URI is not set; training without MLflow tracking")
        experiment_id = environ.get("MLFLOW_EXPERIMENT_ID", "").strip() or None
        return cls(uri, experiment_name, experiment_id, run_name)

    @property
    def enabled(self) -> bool:
        """True once a run exists on the server and has not been finished."""
        return self._run_id is not None and not self._finished

    def _call(self, what: str, fn):
        """Run ``fn`` against the server; a failure is a warning (once per streak), never an exception.

        Returns ``fn()``'s result, or None when it failed.
        """
        try:
            with _short_http_timeouts():
                result = fn()
        except Exception as exc:  # noqa: BLE001 - tracking must never kill training, whatever fails
            if not self._failing:
                _warn(f"MLflow tracking failed ({what}: {_first_line(exc)}); training continues without it")
            self._failing = True
            return None
        if self._failing:
            print(f"MLflow tracking works again ({what})", file=sys.stderr, flush=True)
        self._failing = False
        return True if result is None else result  # None is reserved for "failed"

    def _experiment(self) -> str:
        """The experiment ID: MLFLOW_EXPERIMENT_ID, else the named experiment (created if missing)."""
        if self.experiment_id:
            return self.experiment_id
        found = self.client.get_experiment_by_name(self.experiment_name)
        return found.experiment_id if found else self.client.create_experiment(self.experiment_name)

    def start(self, params: dict, tags: dict) -> None:
        """Create the run and log ``params`` (flattened, stringified) and ``tags``.

        If the run cannot be created, warns and stays disabled: there is no run to log to.
        """
        if not self.uri or self._run_id is not None:
            return  # untracked, or already started

        def create() -> None:
            # Imported here so a missing or broken MLflow install is one more tracking failure.
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            # Kept as soon as the run exists, so a failure below leaves a run that later calls
            # (and finish) still reach rather than an orphan stuck in RUNNING.
            self._run_id = self.client.create_run(self._experiment(), run_name=self.run_name).info.run_id
            param_list = [Param(k, v) for k, v in flatten_params(params).items()]
            tag_list = [RunTag(k, v) for k, v in self._tag_values(tags).items()]
            # One batch per chunk: the server rejects batches over 100 params or 100 tags.
            for chunk in _chunks(param_list, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self._run_id, params=chunk, synchronous=True)
            for chunk in _chunks(tag_list, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self._run_id, tags=chunk, synchronous=True)

        self._call("start run", create)
        if self._run_id:
            print(f"MLflow run {self._run_id} at {self.uri}", flush=True)

    @staticmethod
    def _tag_values(tags: dict) -> dict[str, str]:
        return {sanitize_key(k): stringify(v)[:MAX_TAG_LENGTH] for k, v in tags.items()}

    def _flush(self, what: str) -> bool:
        """Send queued metrics; they stay queued if the server does not take them."""

        def send() -> None:
            while self._pending_metrics:  # drop each chunk only once the server has it
                chunk = self._pending_metrics[:MAX_METRICS_PER_BATCH]
                self.client.log_batch(self._run_id, metrics=chunk, synchronous=True)
                del self._pending_metrics[:len(chunk)]

        return bool(self._call(what, send))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric ``metrics`` at ``step``; values that are not numbers are skipped."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # the time of measurement, kept if the send is delayed
        for key, value in metrics.items():
            try:
                number = float(value)  # also takes numpy scalars and 0-d tensors
            except (TypeError, ValueError):
                continue  # a string or None in a metrics row is not a metric
            self._pending_metrics.append(Metric(sanitize_key(key), number, now, int(step)))
        del self._pending_metrics[:-MAX_PENDING_METRICS]  # oldest go first if the queue overflows
        self._flush(f"log metrics at step {step}")

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """Upload the file ``path`` (under ``artifact_path`` in the run); a missing file is skipped."""
        if not self.enabled or not Path(path).is_file():
            return
        self._call(f"log artifact {Path(path).name}",
                   lambda: self.client.log_artifact(self._run_id, str(path), artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        """Send anything queued, then mark the run ``status``; later calls do nothing."""
        if not self.enabled:
            return
        if status not in STATUSES:
            _warn(f"unknown MLflow run status {status!r}; recording FAILED")
            status = "FAILED"
        if self._pending_metrics:
            self._flush("send queued metrics")
        self._call(f"end run as {status}", lambda: self.client.set_terminated(self._run_id, status))
        self._finished = True  # a failed end leaves the run RUNNING on the server; nothing more to do

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False  # never swallow the exception
