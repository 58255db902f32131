"""MLflow against a real tracking server on 127.0.0.1: what a training run logs, and its failures."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from common.train.tracking import Tracker
from tests.helpers import ROOT, SCRIPTS, TINY_DEMO, clean_env, train
from tests.mlflow_server import MlflowServer, free_port

SEGMENTATION_METRICS = {"train_loss", "valid_loss", "train_iou", "valid_iou", "ce_loss", "dice_loss",
                        "surface_loss", "lr", "alpha"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = MlflowServer(tmp_path_factory.mktemp("mlflow")).wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow-demo")


def _only_run(client, experiment="visionassist"):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
    return runs[0]


@pytest.mark.slow
def test_training_run_logs_params_metrics_tags_and_artifacts(server, demo_data, tmp_path):
    train("efficientvit", tmp_path, demo_data, "--epochs", "2", env=clean_env(MLFLOW_TRACKING_URI=server.uri))
    client = MlflowClient(server.uri)
    run = _only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_type"] == "TinyEfficientViT" and "architecture" in run.data.tags
    assert run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.003"
    assert SEGMENTATION_METRICS <= set(run.data.metrics)
    history = json.loads((tmp_path / "metrics_efficientvit_model.json").read_text())
    logged = client.get_metric_history(run.info.run_id, "valid_iou")
    assert [m.step for m in logged] == [1, 2]
    assert [m.value for m in logged] == pytest.approx([row["valid_iou"] for row in history])
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best_efficientvit_model.onnx", "training_curves_efficientvit_model.png",
            "metrics_efficientvit_model.csv", "checkpoints"} <= top
    checkpoints = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "best_efficientvit_model.pt" in checkpoints
    pictures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "predictions")}
    # the last epoch; the next is due at epoch 5
    assert pictures == {"predictions_efficientvit_model_epoch_2.png"}
    local = client.download_artifacts(run.info.run_id, "best_efficientvit_model.onnx", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (tmp_path / "best_efficientvit_model.onnx").read_bytes()


@pytest.mark.slow
def test_ellipse_run_has_its_own_tags_and_terms(server, demo_data, tmp_path):
    train("ellipse", tmp_path, demo_data, "--epochs", "1", env=clean_env(MLFLOW_TRACKING_URI=server.uri))
    run = _only_run(MlflowClient(server.uri))
    assert run.data.tags["model_type"] == "EllipseRegression"
    assert {"train_loss", "valid_iou", "center_loss", "radius_loss", "valid_center_error_px",
            "valid_radius_error_px", "lr"} <= set(run.data.metrics)
    client = MlflowClient(server.uri)
    picture = "predictions/predictions_ellipse_model_epoch_1.png"
    local = client.download_artifacts(run.info.run_id, picture, str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (tmp_path / "predictions_ellipse_model_epoch_1.png").read_bytes()


@pytest.mark.slow
def test_training_survives_the_server_going_away(demo_data, tmp_path):
    (tmp_path / "doomed").mkdir()
    doomed = MlflowServer(tmp_path / "doomed").wait_ready()
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / SCRIPTS["tiny"]), *TINY_DEMO, "--data-dir", str(demo_data),
               "--output-dir", str(out), "--epochs", "4"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(MLFLOW_TRACKING_URI=doomed.uri))
    try:
        deadline = time.time() + 300
        history = out / "metrics_efficientvit_tiny_model.json"
        while time.time() < deadline and not history.exists() and proc.poll() is None:
            time.sleep(0.05)
        doomed.stop()
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        doomed.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert len(json.loads((out / "metrics_efficientvit_tiny_model.json").read_text())) == 4
    assert "MLflow tracking failed" in stderr and "Traceback" not in stderr
    assert (out / "best_efficientvit_tiny_model.onnx").exists()


def test_unset_uri_warns_once_and_does_nothing(capsys):
    tracker = Tracker.from_env("x", environ={})
    tracker.start({"a": 1}, {"t": "v"})
    tracker.log_metrics({"m": 1.0}, step=1)
    tracker.log_artifact(__file__)
    tracker.finish()
    assert not tracker.enabled
    assert capsys.readouterr().err.count("MLFLOW_TRACKING_URI is not set") == 1


def test_unreachable_server_at_start_is_a_warning(capsys):
    tracker = Tracker.from_env("x", environ={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    start = time.time()
    tracker.start({"a": 1}, {})
    tracker.log_metrics({"m": 1.0}, step=1)
    tracker.finish()
    assert not tracker.enabled
    assert "MLflow tracking failed" in capsys.readouterr().err
    assert time.time() - start < 60  # a liveness bound: no multi-minute retry loop


def test_experiment_id_selects_the_experiment(server):
    client = MlflowClient(server.uri)
    experiment_id = client.create_experiment("chosen-by-id")
    tracker = Tracker.from_env("ignored-name", environ={"MLFLOW_TRACKING_URI": server.uri,
                                                         "MLFLOW_EXPERIMENT_ID": experiment_id})
    tracker.start({"p": 1}, {"model_type": "TinyEfficientViT"})
    tracker.log_metrics({"valid_iou": 0.5}, step=1)
    tracker.finish()
    (run,) = client.search_runs([experiment_id])
    assert run.info.experiment_id == experiment_id and run.data.metrics["valid_iou"] == 0.5
    assert run.data.params["p"] == "1" and run.info.status == "FINISHED"
