"""Bad data and bad files in real runs: corrupt shards, NaN targets, changed datasets, foreign checkpoints."""

import pickle
import shutil
import sys

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.faults.runs import BEST, LAST, METRICS, demo_dataset, epochs_done, the_error_line, train_tiny
from tests.helpers import ROOT, run


def _copy(demo_data, tmp_path):
    copy = tmp_path / "dataset"
    shutil.copytree(demo_dataset(demo_data), copy)
    return copy, next((copy / "data").glob("train-*.parquet"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_unreadable_shard_is_named_in_one_line(damage, demo_data, tmp_path):
    dataset, shard = _copy(demo_data, tmp_path)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else np.random.bytes(len(data)))
    result = train_tiny(tmp_path / "out", demo_data, "--dataset", dataset, "--epochs", "1")
    assert result.returncode == 1
    line = the_error_line(result)
    assert f"cannot read shard {shard}" in line and "precompute.py --validate" in line
    assert not (tmp_path / "out" / LAST).exists()


@pytest.mark.slow
def test_nan_in_a_batch_stops_and_keeps_the_last_good_checkpoint(demo_data, tmp_path):
    out = tmp_path / "out"
    assert train_tiny(out, demo_data, "--epochs", "1").returncode == 0
    last, best = (out / LAST).read_bytes(), (out / BEST).read_bytes()
    dataset, shard = _copy(demo_data, tmp_path)
    table = pq.read_table(shard)
    weights = table.column("spatial_weights").to_pylist()
    for row in (0, 1):  # two frames: the last partial batch is dropped, so one is always trained on
        weights[row] = np.full(np.shape(weights[row]), np.nan, np.float32).tolist()
    column = table.schema.get_field_index("spatial_weights")
    field = table.schema.field(column)
    poisoned = table.set_column(column, field, pa.array(weights, type=field.type))
    pq.write_table(poisoned.replace_schema_metadata(table.schema.metadata), shard)
    result = train_tiny(out, demo_data, "--dataset", dataset, "--epochs", "3", "--resume", out / LAST)
    assert result.returncode == 1, result.stderr[-3000:]
    line = the_error_line(result)
    assert "train loss was NaN or inf in epoch 2 at steps " in line and "of 3" in line
    assert (out / LAST).read_bytes() == last and (out / BEST).read_bytes() == best
    assert epochs_done(out / METRICS) == 1
    # the resumed run trained on another folder: the warning names both fingerprints
    warning = next(x for x in result.stderr.splitlines() if "the dataset changed" in x)
    assert warning.count("fingerprint") == 1 and len(warning.split("fingerprint ")[1].split(", now ")) == 2


@pytest.mark.slow
def test_resume_of_another_model_or_frame_size_is_one_line(demo_data, tmp_path):
    out = tmp_path / "out"
    assert train_tiny(out, demo_data, "--epochs", "1").returncode == 0
    other = run([sys.executable, ROOT / "train_efficientvit_local.py", "--demo", "--demo-samples", "16",
                 "--demo-size", "64", "96", "--num-workers", "0", "--data-dir", demo_data,
                 "--output-dir", tmp_path / "vit", "--resume", out / LAST])
    assert other.returncode == 2
    assert "holds a 'efficientvit_micro' model and this script trains 'efficientvit'" in the_error_line(other)
    size = run([sys.executable, ROOT / "train_efficientvit_tiny_local.py", "--demo", "--demo-samples", "16",
                "--demo-size", "32", "48", "--num-workers", "0", "--data-dir", tmp_path / "small",
                "--output-dir", tmp_path / "small-out", "--resume", out / LAST])
    assert size.returncode == 2
    assert "trained on 64x96 frames and this dataset has 32x48" in the_error_line(size)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copyfile, (__file__, self.marker))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "random bytes", "pickle with code"])
def test_bad_checkpoint_file_is_refused_in_one_line(kind, demo_data, tmp_path):
    out = tmp_path / "out"
    assert train_tiny(out, demo_data, "--epochs", "1").returncode == 0
    bad, marker = tmp_path / "bad.pt", tmp_path / "code-ran"
    good = (out / LAST).read_bytes()
    if kind == "truncated":
        bad.write_bytes(good[: len(good) // 3])
    elif kind == "random bytes":
        bad.write_bytes(np.random.bytes(4096))
    else:
        bad.write_bytes(pickle.dumps({"model": _RunsCode(str(marker)), "model_config": {"name": "x"}}))
    resumed = train_tiny(tmp_path / "again", demo_data, "--epochs", "2", "--resume", bad)
    frame = tmp_path / "eye.png"
    cv2.imwrite(str(frame), np.full((64, 96), 128, np.uint8))
    predicted = run([sys.executable, ROOT / "predict.py", "--model", bad, "--input", frame,
                     "--output-dir", tmp_path / "pred"])
    for result in (resumed, predicted):
        assert result.returncode == 2, result.stderr[-3000:]
        line = the_error_line(result)
        assert f"cannot read checkpoint {bad}" in line
    assert not marker.exists(), "loading must stay weights_only"
