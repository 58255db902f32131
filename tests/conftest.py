"""Fixtures shared by the test modules; plain helpers (ROOT, clean_env, train, ...) are in
tests/helpers.py."""

import pytest

from common.train.data import ensure_demo_dataset
from tests.helpers import DEMO_SAMPLES, DEMO_SIZE
from tests.mlflow_server import MlflowServer, start_mlflow_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """One MLflow server on 127.0.0.1 for the whole session (starting one takes seconds).

    A test that stops a server (to simulate the server going away) starts its own with
    ``start_mlflow_server``; it must never stop this one. A failed start fails the test with the
    server's log: the test dependencies include MLflow, so a missing server is a real failure.
    """
    try:
        server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """A data dir holding the tiny demo dataset (``tests.helpers.demo_args``), built once through
    the real precompute pipeline."""
    folder = tmp_path_factory.mktemp("demo-data")
    ensure_demo_dataset(folder, DEMO_SAMPLES, 0, DEMO_SIZE)
    return folder
