"""torchrun / DistributedDataParallel on the CPU (gloo): real 2-process runs of the training scripts."""

import json
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from common.train.data import EpochBatchSampler
from common.train.distributed import all_reduce_, init_distributed, world_from_env
from tests.helpers import ROOT, clean_env, demo_flags

SCRIPT = str(ROOT / "train_efficientvit_tiny_local.py")
TINY = demo_flags(24, 32, 48)


def run(nproc: int, *args, data_dir, env=None, timeout=600):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), SCRIPT, *TINY, "--data-dir", str(data_dir),
               *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env or clean_env(), timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def printed_metrics(result) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("test-only ")]
    assert len(lines) == 1, result.stdout[-2000:]  # rank 0 alone prints
    return json.loads(lines[0].removeprefix("test-only "))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch trained by a single process: the weights both evaluations load."""
    root = tmp_path_factory.mktemp("ddp")
    run(1, "--epochs", "1", "--output-dir", str(root / "single"), data_dir=root / "data")
    return root


@pytest.mark.slow
def test_two_processes_report_exactly_the_single_process_metrics(trained):
    checkpoint = trained / "single" / "last_efficientvit_tiny_model.pt"
    common = ["--test-only", "--resume", str(checkpoint), "--output-dir", str(trained / "eval")]
    # One thread per process, as torchrun sets it: a float32 reduction inside a loss otherwise
    # rounds differently with another thread count, whatever the number of processes.
    env = clean_env(OMP_NUM_THREADS="1")
    single = printed_metrics(run(1, *common, data_dir=trained / "data", env=env))
    double = printed_metrics(run(2, *common, data_dir=trained / "data", env=env))
    # exact: whole batches per rank, float64 sums, all-reduced counts and per-frame rows (compared as
    # JSON text, so that a NaN, e.g. a centre error with no pupil found, equals itself)
    assert json.dumps(double, sort_keys=True) == json.dumps(single, sort_keys=True)
    assert set(single) >= {"valid_loss", "valid_iou", "valid_pupil_iou", "valid_background_iou",
                           "valid_pupil_iou_p10", "valid_center_error_px", "valid_detection_rate_5px"}


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", ["8", "2"])
def test_two_process_training_logs_what_its_checkpoint_scores(trained, tmp_path, batch_size):
    """Batches of 8: one validation batch for two ranks, so rank 1 holds none of the split. Batches
    of 2: both ranks validate, each with the BatchNorm statistics rank 0 saved, not its own. Either
    way the run finishes with one set of run files, and what it logged for its last epoch is exactly
    what a single process scores on the checkpoint it saved."""
    env, out, data = clean_env(OMP_NUM_THREADS="1"), tmp_path / "run", trained / "data"
    run(2, "--epochs", "2", "--batch-size", batch_size, "--output-dir", str(out), data_dir=data, env=env)
    stem = "efficientvit_tiny_model"
    names = {path.name for path in out.iterdir()}
    epochs = {name for name in names if name.startswith(f"{stem}_epoch_")}  # one per improving epoch
    assert f"{stem}_epoch_1.pt" in epochs <= {f"{stem}_epoch_1.pt", f"{stem}_epoch_2.pt"}
    assert names - epochs == {
        f"args_{stem}.json", f"best_{stem}.onnx", f"best_{stem}.pt", f"last_{stem}.pt", f"metrics_{stem}.csv",
        f"metrics_{stem}.json", f"predictions_{stem}_epoch_2.png", f"training_curves_{stem}.png"}
    logged = json.loads((out / f"metrics_{stem}.json").read_text())[-1]
    scored = printed_metrics(run(1, "--test-only", "--batch-size", batch_size, "--resume",
                                 str(out / f"last_{stem}.pt"), "--output-dir", str(tmp_path / "eval"),
                                 data_dir=data, env=env))
    # metrics only: the loss's Dice/surface balance depends on the epoch, and --test-only scores as
    # the next one
    scored = {k: v for k, v in scored.items() if "loss" not in k}
    assert len(scored) >= 7
    assert json.dumps({k: logged[k] for k in scored}, sort_keys=True) == json.dumps(scored, sort_keys=True)


@pytest.mark.slow
def test_two_process_run_writes_and_logs_once_and_resumes(trained, mlflow_server, tmp_path):
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_server.uri)
    straight, resumed, data = tmp_path / "straight", tmp_path / "resumed", trained / "data"
    first = run(2, "--epochs", "2", "--output-dir", str(straight), data_dir=data, env=env)
    assert first.stdout.count("final validation mIoU") == 1 and "rank=0/2" in first.stdout
    # Resume both ranks from the checkpoint the run saved after epoch 1 (its first improvement).
    epoch_1 = straight / "efficientvit_tiny_model_epoch_1.pt"
    again = run(2, "--epochs", "2", "--resume", str(epoch_1), "--output-dir", str(resumed), data_dir=data,
                env=env)
    assert "resumed from" in again.stdout and again.stdout.count("final validation mIoU") == 1
    rows = [json.loads((folder / "metrics_efficientvit_tiny_model.json").read_text())[-1]
            for folder in (straight, resumed)]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in rows[:1]] == \
           [{k: v for k, v in row.items() if k != "seconds"} for row in rows[1:]]
    checkpoint = torch.load(resumed / "last_efficientvit_tiny_model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("visionassist").experiment_id
    for run_name in ("efficientvit_tiny_model-straight", "efficientvit_tiny_model-resumed"):
        runs = client.search_runs([experiment], filter_string=f"tags.mlflow.runName = '{run_name}'")
        assert len(runs) == 1  # rank 0 alone logs


def test_training_batches_are_equal_per_rank_and_validation_batches_are_the_single_process_ones():
    single_valid = [b for b in EpochBatchSampler(23, 4, shuffle=False)]
    ranks = [EpochBatchSampler(23, 4, shuffle=False, rank=r, world_size=2) for r in range(2)]
    dealt = sorted((b for sampler in ranks for b in sampler), key=lambda b: b[0])
    assert dealt == single_valid  # every row once, in the same batches
    train = [EpochBatchSampler(23, 4, shuffle=True, drop_last=True, rank=r, world_size=2) for r in range(2)]
    for sampler in train:
        sampler.set_epoch(3)
    assert len(list(train[0])) == len(list(train[1])) == len(train[0])
    assert not set(sum(list(train[0]), [])) & set(sum(list(train[1]), []))


def test_a_rank_with_no_validation_rows_has_no_batches():
    """7 validation rows in batches of 8 over 2 ranks: rank 0 takes the one batch, rank 1 none."""
    ranks = [EpochBatchSampler(7, 8, shuffle=False, rank=r, world_size=2) for r in range(2)]
    assert [list(sampler) for sampler in ranks] == [[list(range(7))], []]
    assert [len(sampler) for sampler in ranks] == [1, 0]
    assert [len(sampler.split(sampler.order())) for sampler in ranks] == [1, 0]


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_env() == (0, 0, 1)
    assert init_distributed(torch.device("cpu")) == (torch.device("cpu"), 0, 1)
    values = torch.tensor([1.0, 2.0])
    assert all_reduce_(values, "max") is values and values.tolist() == [1.0, 2.0]
