"""A full disk (ENOSPC in the middle of a write) while writing a checkpoint, a shard or any file."""

import errno
import os
import sys

import pyarrow.parquet as pq
import pytest

from common.checkpoint import load_checkpoint
from common.errors import DiskFullError
from common.files import atomic_path, atomic_write_text
from common.infer.export import export_onnx
from common.models import build_model
from tests.faults.runs import INJECT, LAST, the_error_line, train_tiny
from tests.helpers import run


def test_full_disk_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("before")
    with pytest.raises(DiskFullError, match=f"no space left on the device writing {path}"):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half of it")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_text() == "before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_atomic_files_get_the_permissions_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "a.txt", "x")
        onnx = export_onnx(build_model("efficientvit_micro"), tmp_path / "m.onnx", input_size=(32, 48))
    finally:
        os.umask(old)
    assert text.stat().st_mode & 0o777 == 0o644
    assert onnx.stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_full_disk_while_saving_a_checkpoint(demo_data, tmp_path):
    # the 2nd save of last_*.pt (end of epoch 2) hits a full disk
    result = train_tiny(tmp_path, demo_data, "--epochs", "3", inject=["--enospc", f"{LAST}:2"])
    assert result.returncode == 1, result.stderr[-3000:]
    line = the_error_line(result)
    assert f"no space left on the device writing {tmp_path / LAST} (the previous file is kept)" in line
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 1
    assert not list(tmp_path.glob(".tmp-*"))
    resumed = train_tiny(tmp_path, demo_data, "--epochs", "3", "--resume", tmp_path / LAST)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 3


@pytest.mark.slow
def test_full_disk_while_writing_a_shard(tmp_path):
    out = tmp_path / "out"
    args = ["precompute.py", "--synthetic", "16", "--size", "64", "96", "--raw-dir", tmp_path / "raw",
            "--output-dir", out, "--no-push", "--shard-size", "4", "--workers", "1"]
    result = run([sys.executable, INJECT, "--enospc", "train-00001-of-*.parquet", *args])
    assert result.returncode == 1, result.stderr[-3000:]
    line = the_error_line(result)
    shard = next(p for p in (out / ".shards").glob("train-00001-of-*.parquet.json")).name[: -len(".json")]
    assert f"no space left on the device writing {out / 'data' / shard} (nothing was written)" in line
    assert not list((out / "data").glob(".tmp-*")) and not (out / "data" / shard).exists()
    assert pq.read_metadata(next((out / "data").glob("train-00000-of-*.parquet"))).num_rows > 0  # kept
    rerun = run([sys.executable, *args])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already complete" in rerun.stdout
    assert pq.read_metadata(out / "data" / shard).num_rows > 0

