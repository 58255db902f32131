"""A real MLflow tracking server on 127.0.0.1 for the tests.

``python -m mlflow server`` with a SQLite backend store and proxied artifact serving (the server's
default ``--serve-artifacts``): clients upload artifacts over HTTP to ``mlflow-artifacts:/``, as they
would against a deployed server.

Use the shared, session-wide server through the ``mlflow_server`` fixture of tests/conftest.py::

    def test_something(mlflow_server):
        client = MlflowClient(mlflow_server.uri)

A test that stops its server (to simulate the server going away) starts its own with
``start_mlflow_server(tmp_path)`` and calls ``.stop()``; it must never stop the shared one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

READY_TIMEOUT_S = 120.0  # a start on a busy 2-core machine imports a lot (FastAPI, SQLAlchemy, ...)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``python -m mlflow server`` with its SQLite store, artifacts and log in ``root``."""

    def __init__(self, root: Path):
        self.root, self.port = Path(root), free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - the server writes to it until stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group, so stop() also ends the worker processes

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_text(self, limit: int = 4000) -> str:
        """The tail of the server's combined stdout/stderr."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-limit:]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:  # refused while starting, or a timeout: not ready yet
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> MlflowServer:
        """Poll ``GET /health`` until it answers 200; RuntimeError with the server's log if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running:
            if self._healthy():
                return self
            time.sleep(0.25)
        state = f"exited with code {self.process.returncode}" if not self.running else "timed out"
        self.stop()
        raise RuntimeError(f"MLflow server at {self.uri} did not start ({state}); "
                           f"its log:\n{self.log_text()}")

    def stop(self) -> None:
        """Terminate the server (and its workers), then kill it if it lingers. Safe to call twice."""
        if self.running:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if not self._log.closed:
            self._log.close()


def start_mlflow_server(root: Path, timeout: float = READY_TIMEOUT_S) -> MlflowServer:
    """Start a server in ``root`` and wait until it answers; the caller must ``stop()`` it."""
    return MlflowServer(root).wait_ready(timeout)

