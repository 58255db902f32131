"""Mistakes a new user makes on the command line, the Hub and in logs: each is one line, not a traceback."""

import http.server
import io
import sys
import threading

import pytest
import torch

from common import progress as progress_module
from common.cli import training_parser
from common.train import engine
from common.train.augment import flip_batch
from common.train.losses import ellipse_loss
from common.train.metrics import EllipseMetrics
from common.train.runtime import Runtime
from tests.faults.runs import TINY_SCRIPT, the_error_line
from tests.helpers import ROOT, clean_env, run


@pytest.mark.parametrize("flag, value", [
    ("--epochs", "0"), ("--epochs", "-3"), ("--epochs", "two"), ("--batch-size", "0"), ("--lr", "0"),
    ("--lr", "-1e-3"), ("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "-1"), ("--num-workers", "-1"),
    ("--demo-samples", "0"), ("--size", "0"),
])
def test_bad_numbers_are_refused_at_parse_time(flag, value, capsys):
    argv = [flag, value, "5"] if flag == "--size" else [f"{flag}={value}"]
    with pytest.raises(SystemExit) as exit_info:
        training_parser("t").parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}" in err and f"'{value}'" in err


@pytest.mark.slow
def test_epochs_zero_in_a_real_run(tmp_path):
    result = run([sys.executable, TINY_SCRIPT, "--demo", "--epochs", "0", "--output-dir", tmp_path])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --epochs: expected a positive integer, got '0'" in result.stderr
    assert not any(tmp_path.iterdir())


class _Hub(http.server.BaseHTTPRequestHandler):
    """The Hub's answers for a repo that does not exist (or is private), and for a gated one."""

    def do_GET(self):
        gated = "gated" in self.path
        self.send_response(403 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "no"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("repo, expected", [
    ("team/mistyped", "dataset team/mistyped was not found on the Hub: check the name"),
    ("team/gated", "dataset team/gated is gated: accept its terms"),
    ("not a repo id!", "not a repo id!"),
])
def test_hub_repo_errors_are_one_line(repo, expected, hub_endpoint, tmp_path):
    result = run([sys.executable, TINY_SCRIPT, "--hf-repo", repo, "--data-dir", tmp_path / "data",
                  "--output-dir", tmp_path / "out", "--epochs", "1"], env=clean_env(HF_ENDPOINT=hub_endpoint))
    assert result.returncode == 1
    assert expected in the_error_line(result)


@pytest.mark.slow
def test_no_network_is_one_line(tmp_path):
    result = run([sys.executable, TINY_SCRIPT, "--hf-repo", "team/eyes", "--data-dir", tmp_path,
                  "--epochs", "1"], env=clean_env(HF_ENDPOINT="http://127.0.0.1:9"))
    assert result.returncode == 1
    assert "cannot be downloaded (no network" in the_error_line(result)


def test_progress_without_a_terminal_is_plain_lines(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(progress_module, "PLAIN_SECONDS", 0.0)
    runtime = Runtime(torch.device("cpu"), False, False, False, False)
    assert list(engine.progress(range(3), "epoch 1 train", runtime)) == [0, 1, 2]
    assert "\r" not in err.getvalue()
    assert err.getvalue().splitlines()[0].startswith("epoch 1 train: 1/3 batches")
    monkeypatch.setattr(progress_module, "PLAIN_SECONDS", 30.0)
    err.truncate(0)
    assert list(engine.progress(range(3), "epoch 1 train", runtime)) == [0, 1, 2]
    assert err.getvalue() == ""  # a short epoch: its summary line is enough


@pytest.mark.slow
def test_precompute_and_training_logs_have_no_carriage_returns(tmp_path):
    out = tmp_path / "out"
    precompute = run([sys.executable, str(ROOT / "precompute.py"), "--synthetic", "8", "--size", "32", "48",
                      "--raw-dir", tmp_path / "raw", "--output-dir", out, "--no-push", "--shard-size", "4"])
    assert precompute.returncode == 0, precompute.stderr[-2000:]
    training = run([sys.executable, TINY_SCRIPT, "--dataset", out, "--epochs", "1", "--batch-size", "2",
                    "--num-workers", "0", "--data-dir", tmp_path / "cache", "--output-dir", tmp_path / "run"])
    assert training.returncode == 0, training.stderr[-2000:]
    for result in (precompute, training):  # output captured to a pipe, as in a log file
        assert "\r" not in result.stdout + result.stderr


def test_flip_keeps_an_empty_ellipse_empty():
    image = torch.zeros(2, 1, 4, 8)
    ellipse = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.25, 0.5, 0.1, 0.1]])
    out = flip_batch({"image": image, "ellipse": ellipse}, torch.tensor([True, True]))
    assert out["ellipse"][0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert out["ellipse"][1, 0].item() == pytest.approx(7 / 8 - 0.25)


def test_negatives_are_kept_out_of_the_ellipse_loss_and_counted():
    target = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])
    has_pupil = torch.tensor([True, False])
    near = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.9, 0.9, 0.3, 0.3]])
    far = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.1, 0.2, 0.05, 0.01]])
    assert ellipse_loss(near, target, has_pupil=has_pupil)["loss"].item() == 0.0
    assert ellipse_loss(far, target, has_pupil=has_pupil)["loss"].item() == 0.0
    assert ellipse_loss(far, target)["loss"].item() > 0.0  # without the mask, negatives would count
    only_negatives = ellipse_loss(near, target, has_pupil=torch.tensor([False, False]))["loss"]
    assert only_negatives.item() == 0.0 and torch.isfinite(only_negatives)
    metrics = EllipseMetrics(8, 8)
    mask = torch.zeros(2, 8, 8)
    mask[0, 3:5, 3:5] = 1
    metrics.update(near, target, mask)
    assert metrics.compute()["negatives"] == 1
