"""The training scripts end to end on tiny demo data: outputs, names, resume, devices, data sources."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Array2D, Dataset, Features, Value

from common.checkpoint import load_checkpoint
from common.cli import training_parser
from common.device import resolve_device
from common.errors import ConfigurationError
from common.prep import preprocess
from common.specs import EFFICIENTVIT_TINY, TrainSpec
from common.train import data as data_module
from common.train.engine import fit
from tests.helpers import ROOT, SCRIPTS, TINY_DEMO, clean_env, epoch_rows, run, train


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A data dir whose tiny demo dataset is built once, through the real precompute pipeline."""
    return tmp_path_factory.mktemp("demo-data")


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_one_epoch_writes_every_run_file(script, demo_dir, tmp_path):
    result = train(script, tmp_path, demo_dir, "--epochs", "1")
    stem = {"efficientvit": "efficientvit_model", "tiny": "efficientvit_tiny_model",
            "ellipse": "ellipse_model"}
    s = stem[script]
    for name in (f"best_{s}.pt", f"last_{s}.pt", f"best_{s}.onnx", f"args_{s}.json", f"metrics_{s}.csv",
                 f"metrics_{s}.json", f"training_curves_{s}.png", f"predictions_{s}_epoch_1.png"):
        assert (tmp_path / name).is_file(), name
    history = json.loads((tmp_path / f"metrics_{s}.json").read_text())
    assert len(history) == 1 and history[0]["epoch"] == 1
    assert json.loads((tmp_path / f"args_{s}.json").read_text())["args"]["epochs"] == 1
    assert "epoch   1/1 |" in result.stdout and "final validation" in result.stdout
    assert "warning: MLFLOW_TRACKING_URI is not set" in result.stderr
    checkpoint = load_checkpoint(tmp_path / f"best_{stem[script]}.pt")
    assert checkpoint["model_config"]["input_size"] == [96, 160]
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_checkpoint_names_and_no_collision(demo_dir, tmp_path):
    shared = tmp_path / "shared"
    train("efficientvit", shared, demo_dir, "--epochs", "1")
    first = {p.name: p.stat().st_mtime_ns for p in shared.glob("*.*")}
    train("tiny", shared, demo_dir, "--epochs", "1")
    after = {p.name: p.stat().st_mtime_ns for p in shared.glob("*.*")}
    assert all(after[name] == mtime for name, mtime in first.items())  # nothing overwritten
    names = set(after)
    assert {"best_efficientvit_model.pt", "best_efficientvit_tiny_model.pt",
            "efficientvit_tiny_model_epoch_1.pt"} <= names
    assert {"args_efficientvit_model.json", "args_efficientvit_tiny_model.json",
            "metrics_efficientvit_model.json", "metrics_efficientvit_tiny_model.json",
            "training_curves_efficientvit_model.png", "training_curves_efficientvit_tiny_model.png"} <= names
    # the epoch checkpoint is named after that epoch's validation mIoU, to 4 decimals
    valid_iou = json.loads((shared / "metrics_efficientvit_model.json").read_text())[0]["valid_iou"]
    assert [n for n in names if n.startswith("efficientvit_model_epoch_1_miou_")] == [
        f"efficientvit_model_epoch_1_miou_{valid_iou:.4f}.pt"]
    history = json.loads((shared / "metrics_efficientvit_tiny_model.json").read_text())
    assert history[0]["epoch"] == 1
    train("ellipse", tmp_path / "ellipse", demo_dir, "--epochs", "1")
    assert {"best_ellipse_model.pt", "ellipse_model_epoch_1.pt"} <= {
        p.name for p in (tmp_path / "ellipse").glob("*.pt")}


def test_ellipse_epoch_checkpoint_schedule():
    spec = TrainSpec("ellipse", "EllipseRegression", "cnn", "ellipse_model", "ellipse_model_epoch_{epoch}.pt",
                     "every_10")
    saved = [e for e in range(1, 26) if spec.wants_epoch_checkpoint(e, 25, improved=e == 3)]
    assert saved == [10, 20, 25]
    assert spec.epoch_name(20, 0.5) == "ellipse_model_epoch_20.pt"


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(demo_dir, tmp_path):
    args = ["--epochs", "3", "--lr", "0.003"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    train("tiny", full, demo_dir, *args)
    command = [sys.executable, str(ROOT / SCRIPTS["tiny"]), *TINY_DEMO, "--data-dir", str(demo_dir),
               "--output-dir", str(killed), *args]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    history = killed / "metrics_efficientvit_tiny_model.json"
    last = killed / "last_efficientvit_tiny_model.pt"  # an epoch's last file: it is done once this exists
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = load_checkpoint(last)["epoch"]
    assert 1 <= done < 3, "the run must be killed part-way"
    assert len(json.loads(history.read_text())) >= done  # the history is written before last
    result = train("tiny", killed, demo_dir, *args, "--resume", last)
    assert "resumed from" in result.stdout
    metrics = "metrics_efficientvit_tiny_model.json"
    assert epoch_rows(killed / metrics) == epoch_rows(full / metrics)


@pytest.mark.slow
def test_ema_resume_matches_uninterrupted_run_and_validation_scores_the_average(demo_dir, tmp_path):
    """--ema in one process: resuming from epoch 1's checkpoint replays epoch 2 exactly (history,
    average and trained weights), and the validation figures are those of the checkpoint's model,
    the average, as --test-only scores it."""
    def run_fit(out: Path, *extra):
        argv = [*TINY_DEMO, "--data-dir", str(demo_dir), "--output-dir", str(out), "--epochs", "2",
                "--ema", "0.9", "--no-export", *extra]
        return fit(training_parser("test").parse_args([str(a) for a in argv]), EFFICIENTVIT_TINY)

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_fit(full)
    assert not (full / EFFICIENTVIT_TINY.onnx_name).exists()  # --no-export
    run_fit(resumed, "--resume", full / "efficientvit_tiny_model_epoch_1.pt")
    metrics = f"{EFFICIENTVIT_TINY.metrics_name}.json"
    assert epoch_rows(resumed / metrics) == epoch_rows(full / metrics)
    ends = [load_checkpoint(folder / EFFICIENTVIT_TINY.last_name) for folder in (full, resumed)]
    # 30 frames: 7 full batches of 4 an epoch
    assert ends[0]["ema"]["updates"] == ends[1]["ema"]["updates"] == 2 * 7
    for part in ("model", "online"):
        first, second = (end["model"] if part == "model" else end["ema"]["online"] for end in ends)
        assert all(torch.equal(first[key], second[key]) for key in first), part
    assert any(not torch.equal(value, ends[0]["ema"]["online"][key])
               for key, value in ends[0]["model"].items() if value.is_floating_point())
    scored = run_fit(tmp_path / "test-only", "--resume", full / EFFICIENTVIT_TINY.last_name, "--test-only")
    last = json.loads((full / metrics).read_text())[-1]
    assert scored["valid_iou"] == last["valid_iou"] and scored["valid_pupil_iou"] == last["valid_pupil_iou"]


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps", "tpu"])
def test_unavailable_device_exits_2(device, demo_dir, tmp_path):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA exists on this machine")
    result = train("tiny", tmp_path, demo_dir, "--device", device, check=False)
    assert result.returncode == 2
    assert f"device '{device}'" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("args*.json"))


def test_resolve_device_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigurationError):
        resolve_device("cuda:99")


def _legacy_dataset(root: Path, count: int = 12, height: int = 96, width: int = 160) -> Path:
    """An older-style dataset: raw frames and 4-class labels, no `preprocessed` flag."""
    from common.prep.synthetic import render_sample

    features = Features({"image": Array2D((height, width), "uint8"),
                         "label": Array2D((height, width), "uint8"),
                         "cx": Value("float32"), "cy": Value("float32"), "rx": Value("float32"),
                         "ry": Value("float32"), "filename": Value("string")})
    for split, offset in (("train", 0), ("validation", 100)):
        rows = {name: [] for name in features}
        for i in range(count):
            image, label, info = render_sample(np.random.default_rng([7, offset + i]), height, width)
            ellipse = preprocess.fit_ellipse(preprocess.binarize_pupil(label)) or preprocess.EMPTY_ELLIPSE
            for key, value in (("image", image), ("label", label), ("cx", ellipse.cx), ("cy", ellipse.cy),
                               ("rx", ellipse.rx), ("ry", ellipse.ry), ("filename", f"{i}.png")):
                rows[key].append(value)
        (root / "data").mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(rows, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.mark.slow
def test_legacy_dataset_gets_gamma_and_clahe_at_load_time(tmp_path):
    root = _legacy_dataset(tmp_path / "legacy")
    dataset = data_module.load_splits(root, tmp_path / "cache")
    batches = data_module.ArrowBatches(dataset["train"])
    assert not batches.preprocessed
    batch = batches[[0, 3]]
    raw = dataset["train"].with_format("arrow")[[0, 3]]
    raw_images = raw.column("image").combine_chunks().to_numpy(zero_copy_only=False)
    raw_labels = raw.column("label").combine_chunks().to_numpy(zero_copy_only=False)
    for i in range(2):
        np.testing.assert_array_equal(batch["image"][i].numpy(), preprocess.enhance_frame(raw_images[i]))
        np.testing.assert_array_equal(batch["label"][i].numpy(), preprocess.binarize_pupil(raw_labels[i]))
        # OpenCV's multi-threaded distance transform may differ in the last float32 bit between calls.
        np.testing.assert_allclose(batch["dist_map"][i].numpy(),
                                   preprocess.distance_maps(preprocess.binarize_pupil(raw_labels[i])),
                                   rtol=0, atol=1e-6)
    assert batch["image"].dtype == torch.uint8 and batch["ellipse"].shape == (2, 4)
    result = run([sys.executable, ROOT / SCRIPTS["tiny"], "--dataset", root, "--epochs", "1",
                  "--batch-size", "4", "--num-workers", "0", "--data-dir", tmp_path / "cache",
                  "--output-dir", tmp_path / "out"])
    assert result.returncode == 0, result.stderr[-3000:]


def test_preprocessed_batches_are_the_stored_rows(demo_dir):
    source = data_module.ensure_demo_dataset(demo_dir, 40, 0, (96, 160))
    dataset = data_module.load_splits(source, demo_dir)
    batches = data_module.ArrowBatches(dataset["validation"])
    assert batches.preprocessed
    rows = dataset["validation"].with_format("numpy")[0:2]
    batch = batches[[0, 1]]
    np.testing.assert_array_equal(batch["image"].numpy(), rows["image"])
    np.testing.assert_array_equal(batch["ellipse"][:, 0].numpy(), rows["cx"])
    moved = data_module.to_device(batch, torch.device("cpu"))
    assert moved["image"].shape == (2, 1, 96, 160) and moved["label"].dtype == torch.int64
    expected = torch.from_numpy(preprocess.normalize_frame(rows["image"][0].astype(np.uint8)))
    assert torch.equal(moved["image"][0, 0], expected)


def _seed_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay out ``folder`` as huggingface_hub leaves a downloaded dataset snapshot in its cache."""
    repo_dir = cache / f"datasets--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo_dir / "snapshots" / commit, ignore=shutil.ignore_patterns(".shards"))


@pytest.mark.slow
def test_hub_dataset_is_read_from_cache_offline(demo_dir, tmp_path):
    source = data_module.ensure_demo_dataset(demo_dir, 40, 0, (96, 160))
    data_dir = tmp_path / "openeds"
    _seed_hub_cache(data_dir / "hub", "team/eyes", source)
    command = [sys.executable, str(ROOT / SCRIPTS["tiny"]), "--hf-repo", "team/eyes", "--epochs", "1",
               "--batch-size", "4", "--num-workers", "0", "--data-dir", str(data_dir)]
    for attempt in range(2):
        result = run([*command, "--output-dir", tmp_path / f"out{attempt}"], clean_env(HF_HUB_OFFLINE="1"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "datasets--team--eyes/snapshots" in result.stdout
    caches = list((data_dir / "datasets").iterdir())
    assert len(caches) == 1  # the second run reused the Arrow cache of the first
    missing = run([*command[:3], "team/other", *command[4:], "--output-dir", tmp_path / "o"],
                  clean_env(HF_HUB_OFFLINE="1"))
    assert missing.returncode != 0
    assert "not in the cache" in missing.stderr and "Traceback" not in missing.stderr


def test_frames_that_are_not_multiples_of_16_are_refused(tmp_path):
    root = _legacy_dataset(tmp_path / "odd", count=2, height=90, width=160)
    dataset = data_module.load_splits(root, tmp_path / "cache")
    args = type("Args", (), {"batch_size": 2, "seed": 0, "num_workers": 0})()
    with pytest.raises(data_module.UserError, match="multiples of 16"):
        data_module.make_loaders(dataset, args, pin_memory=False)


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    a = data_module.EpochBatchSampler(10, 3, shuffle=True, seed=1, drop_last=True)
    b = data_module.EpochBatchSampler(10, 3, shuffle=True, seed=1, drop_last=True)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b) and len(list(a)) == 3
    b.set_epoch(3)
    assert list(a) != list(b)
    flat = sorted(i for batch in data_module.EpochBatchSampler(10, 3, shuffle=False) for i in batch)
    assert flat == list(range(10))


def test_demo_cache_from_other_preprocessing_is_rebuilt(tmp_path, capsys):
    source = data_module.ensure_demo_dataset(tmp_path, 10, 0, (32, 48))
    manifest_path = source / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    expected = dict(manifest["options"]["preprocessing"])
    manifest["options"]["preprocessing"]["gamma_lut"] = "round"  # as an earlier convention wrote it
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert data_module.ensure_demo_dataset(tmp_path, 10, 0, (32, 48)) == source
    assert "rebuilding" in capsys.readouterr().out
    assert json.loads(manifest_path.read_text())["options"]["preprocessing"] == expected
    data_module.ensure_demo_dataset(tmp_path, 10, 0, (32, 48))
    assert "building" not in capsys.readouterr().out  # current again: reused as is
