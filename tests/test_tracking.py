"""common/train/tracking.py against a real MLflow server: what it logs, and that no failure ever raises."""

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from common.train.tracking import Tracker, flatten_params, sanitize_key
from tests.mlflow_server import free_port, start_mlflow_server

UNSET_WARNING = "warning: MLFLOW_TRACKING_URI is not set; training without MLflow tracking\n"
FAILED = "MLflow tracking failed"


def run_id(tracker: Tracker) -> str | None:
    """The id the server gave the tracker's run (None while it has none)."""
    return tracker._run_id


def tracker_for(uri: str, experiment: str = "tracking-tests", run_name: str | None = None, **env) -> Tracker:
    return Tracker.from_env(experiment, run_name=run_name, environ={"MLFLOW_TRACKING_URI": uri, **env})


def test_params_are_flattened_stringified_and_capped():
    params = {"data_dir": Path("/data/openeds"), "size": [400, 640], "model": {"name": "shallownet",
              "kwargs": {"width": 8}}, "note": None, "empty": {}, "long": "x" * 7000, "a:b": 1}
    assert flatten_params(params) == {
        "data_dir": "/data/openeds", "size": "[400, 640]", "model.name": "shallownet",
        "model.kwargs.width": "8", "note": "None", "empty": "{}", "long": "x" * 6000, "a_b": "1"}


@pytest.mark.parametrize("key, expected", [
    ("train/loss", "train/loss"), ("lr (head)", "lr _head_"), ("a:b", "a_b"), ("a//b", "_a__b"),
    ("/abs", "__abs"), ("dir/", "_dir_"), ("..", "_.."), ("", "_"), ("k" * 300, "k" * 250)])
def test_keys_are_made_acceptable_to_the_server(key, expected):
    assert sanitize_key(key) == expected


def test_run_round_trips_params_metrics_tags_and_artifact(mlflow_server, tmp_path, capsys):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(bytes(range(256)) * 40)
    tracker = tracker_for(mlflow_server.uri, run_name="round-trip")
    tracker.start(params={"lr": 0.003, "epochs": 3, "data_dir": tmp_path, "size": [400, 640],
                          "model": {"name": "shallownet"}, "bad key!": "kept"},
                  tags={"model_type": "TinyEfficientViT", "architecture": "Conv-BN-ReLU"})
    assert tracker.enabled and run_id(tracker)
    for step, (loss, iou) in enumerate([(0.75, 0.25), (0.5, 0.5), (0.25, 0.875)], start=1):
        # numpy scalars are what metrics code often hands over; a string is not a metric
        tracker.log_metrics({"train_loss": loss, "valid_iou": np.float32(iou), "phase": "x"}, step=step)
    tracker.log_artifact(checkpoint, artifact_path="checkpoints")
    tracker.log_artifact(tmp_path / "missing.pt")  # skipped, not an error
    tracker.finish()
    assert not tracker.enabled

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id(tracker))
    assert run.info.status == "FINISHED" and run.info.run_name == "round-trip"
    assert client.get_experiment(run.info.experiment_id).name == "tracking-tests"
    assert run.data.params == {"lr": "0.003", "epochs": "3", "data_dir": str(tmp_path),
                               "size": "[400, 640]", "model.name": "shallownet", "bad key_": "kept"}
    assert {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")} == {
        "model_type": "TinyEfficientViT", "architecture": "Conv-BN-ReLU"}
    assert set(run.data.metrics) == {"train_loss", "valid_iou"}
    history = client.get_metric_history(run_id(tracker), "valid_iou")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5), (3, 0.875)]
    history = client.get_metric_history(run_id(tracker), "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.75), (2, 0.5), (3, 0.25)]
    assert [a.path for a in client.list_artifacts(run_id(tracker))] == ["checkpoints"]
    assert [(a.path, a.file_size) for a in client.list_artifacts(run_id(tracker), "checkpoints")] == [
        ("checkpoints/best.pt", 10240)]
    local = client.download_artifacts(run_id(tracker), "checkpoints/best.pt", str(tmp_path))
    assert Path(local).read_bytes() == checkpoint.read_bytes()
    assert FAILED not in capsys.readouterr().err


def test_more_params_and_metrics_than_one_batch_allows(mlflow_server):
    tracker = tracker_for(mlflow_server.uri)
    tracker.start(params={f"p{i:03d}": i for i in range(250)}, tags={})
    tracker.log_metrics({f"m{i:04d}": float(i) for i in range(1200)}, step=7)
    tracker.finish()
    run = MlflowClient(mlflow_server.uri).get_run(run_id(tracker))
    assert run.data.params == {f"p{i:03d}": str(i) for i in range(250)}
    assert run.data.metrics == {f"m{i:04d}": float(i) for i in range(1200)}


def test_unset_uri_warns_once_and_every_method_is_a_no_op(tmp_path, capsys):
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    with Tracker.from_env("x", environ={"MLFLOW_EXPERIMENT_ID": "0"}) as tracker:
        tracker.start({"a": 1}, {"t": "v"})
        tracker.log_metrics({"m": 1.0}, step=1)
        tracker.log_artifact(artifact)
    tracker.finish("FAILED")
    assert not tracker.enabled and run_id(tracker) is None and tracker.client is None
    captured = capsys.readouterr()
    assert captured.err == UNSET_WARNING and captured.out == ""


def test_experiment_id_selects_the_experiment(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment("chosen-by-id")
    tracker = tracker_for(mlflow_server.uri, experiment="ignored-name", MLFLOW_EXPERIMENT_ID=experiment_id)
    tracker.start({"p": 1}, {})
    tracker.finish()
    assert client.get_run(run_id(tracker)).info.experiment_id == experiment_id
    assert client.get_experiment_by_name("ignored-name") is None


def test_experiment_is_created_by_name_once_and_reused(mlflow_server):
    first, second = tracker_for(mlflow_server.uri, "by-name"), tracker_for(mlflow_server.uri, "by-name")
    for tracker in (first, second):
        tracker.start({}, {})
        tracker.finish()
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.get_experiment_by_name("by-name").experiment_id
    assert [client.get_run(run_id(t)).info.experiment_id for t in (first, second)] == [experiment_id] * 2


@pytest.mark.parametrize("error, status", [(ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_context_manager_records_how_training_ended(mlflow_server, error, status):
    with pytest.raises(error), tracker_for(mlflow_server.uri) as tracker:
        tracker.start({}, {})
        raise error()
    assert MlflowClient(mlflow_server.uri).get_run(run_id(tracker)).info.status == status


def test_unreachable_server_at_start_warns_and_training_calls_do_not_raise(tmp_path, capsys):
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    tracker = tracker_for(f"http://127.0.0.1:{free_port()}")
    began = time.monotonic()
    tracker.start({"a": 1}, {})
    for step in (1, 2, 3):
        tracker.log_metrics({"m": 1.0}, step=step)
        tracker.log_artifact(artifact)
    tracker.finish()
    elapsed = time.monotonic() - began
    assert not tracker.enabled and run_id(tracker) is None
    err = capsys.readouterr().err
    assert err.count(FAILED) == 1 and err.startswith("warning: MLflow tracking failed (start run: ")
    assert err.rstrip().endswith("training continues without it")
    assert elapsed < 20  # liveness bound: MLflow's default retries would take minutes


def test_server_stopping_mid_run_costs_one_warning_and_no_exception(tmp_path, capsys):
    server = start_mlflow_server(tmp_path / "server")
    artifact = tmp_path / "best.pt"
    artifact.write_bytes(b"weights")
    try:
        tracker = tracker_for(server.uri)
        tracker.start({"a": 1}, {})
        tracker.log_metrics({"m": 0.5}, step=1)
        assert tracker.enabled and FAILED not in capsys.readouterr().err
    finally:
        server.stop()
    began = time.monotonic()
    for step in (2, 3, 4):
        tracker.log_metrics({"m": 0.5}, step=step)
        tracker.log_artifact(artifact, artifact_path="checkpoints")
    tracker.finish("FINISHED")
    elapsed = time.monotonic() - began
    err = capsys.readouterr().err
    assert err.count(FAILED) == 1
    assert err.startswith("warning: MLflow tracking failed (log metrics at step 2: ")
    assert "Traceback" not in err and not tracker.enabled
    assert elapsed < 20  # liveness bound for 10 calls against a dead server


class Gate:
    """A TCP forwarder to a real server that can be shut (connections refused) and reopened.

    It lets a test take the server away and bring it back at the same address without the cost of
    restarting an MLflow server.
    """

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.uri, self._listener, self._conns = f"http://127.0.0.1:{self.port}", None, []

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def shut(self) -> None:
        # shutdown() before close(): a bare close() neither wakes the threads blocked in accept() or
        # recv() nor releases the port, so the "dead" server would linger.
        for sock in [self._listener, *self._conns]:
            _close(sock)
        self._conns.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # shut
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                _close(sock)


def _close(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already shut by the other side
    sock.close()


def test_metrics_logged_while_the_server_is_away_arrive_when_it_returns(mlflow_server, capsys):
    gate = Gate(mlflow_server.port)
    gate.open()
    tracker = tracker_for(gate.uri)
    tracker.start({}, {})
    tracker.log_metrics({"valid_iou": 0.25}, step=1)
    gate.shut()
    tracker.log_metrics({"valid_iou": 0.5}, step=2)
    tracker.log_metrics({"valid_iou": 0.75}, step=3)
    assert capsys.readouterr().err.count(FAILED) == 1
    gate.open()
    tracker.log_metrics({"valid_iou": 0.875}, step=4)
    tracker.finish()
    assert "MLflow tracking works again" in capsys.readouterr().err
    gate.shut()
    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(run_id(tracker), "valid_iou")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 0.875)]
    run = client.get_run(run_id(tracker))
    assert run.info.status == "FINISHED"


def test_user_http_settings_win_and_ours_do_not_leak(mlflow_server, monkeypatch):
    import os

    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    seen = []
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")
    tracker = tracker_for(mlflow_server.uri)
    tracker.start({}, {})
    real_log_batch = tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (
        seen.append((MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_TIMEOUT.get())),
        real_log_batch(*a, **k))[1])
    tracker.log_metrics({"m": 1.0}, step=1)
    tracker.finish()
    assert seen == [(1, 33)]
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
