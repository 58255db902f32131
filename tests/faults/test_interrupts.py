"""Ctrl-C, SIGTERM and kill -9 in real runs: what was finished is kept, and a rerun continues."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from common.checkpoint import load_checkpoint
from common.cli import Interrupt, signals_as_interrupt
from tests.faults.runs import (
    INJECT,
    LAST,
    METRICS,
    TINY_DEMO,
    TINY_SCRIPT,
    the_error_line,
    wait_for,
)
from tests.helpers import ROOT, clean_env, epoch_rows, run


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_training_keeps_the_last_epoch(sig, code, demo_data, reference_run, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, TINY_SCRIPT, *TINY_DEMO, "--data-dir", demo_data, "--output-dir", out,
               "--epochs", "4"]
    proc = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=clean_env())
    try:
        assert wait_for(lambda: (out / LAST).exists(), proc), "no epoch finished"  # its last file
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    assert proc.returncode == code, stderr[-3000:]
    line = the_error_line(result)
    checkpoint = load_checkpoint(out / LAST)  # readable: never half written
    done = checkpoint["epoch"]
    assert 1 <= done < 4, "the run must be stopped part-way"
    assert f"interrupted ({signal.Signals(sig).name})" in line and f"holds epoch {done}" in line
    assert f"--resume {out / LAST}" in line
    assert len(checkpoint["train_state"]["history"]) == done  # nothing of the stopped epoch inside
    assert not list(out.glob(".tmp-*"))
    assert "\r" not in stdout + stderr  # no progress bars in a log
    resumed = run([*command, "--resume", out / LAST])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after epoch {done}" in resumed.stdout
    assert epoch_rows(out / METRICS) == epoch_rows(reference_run / METRICS)


@pytest.mark.slow
def test_kill_minus_9_during_hub_push_then_rerun_pushes_everything(tmp_path):
    hub, out = tmp_path / "hub", tmp_path / "out"
    args = [sys.executable, INJECT, "--hub", hub, "precompute.py", "--synthetic", "16", "--size", "64", "96",
            "--raw-dir", tmp_path / "raw", "--output-dir", out, "--hf-repo", "team/eyes", "--shard-size", "4",
            "--workers", "1"]
    env = clean_env(HF_TOKEN="hf_test_token")
    slow = args[:4] + ["--slow-upload", "2"] + args[4:]
    proc = subprocess.Popen([str(a) for a in slow], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, cwd=ROOT)
    try:
        assert wait_for(lambda: (hub / "uploading").exists(), proc), "the push never started"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    remote = hub / "team" / "eyes"
    local = {p.relative_to(out).as_posix() for p in out.rglob("*")
             if p.is_file() and ".shards" not in p.parts}
    partial = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    assert partial and partial < local, "the push must be killed part-way"
    result = run(args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already complete" in result.stdout and "pushed to team/eyes" in result.stdout
    pushed = {p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()}
    assert pushed == local
    for name in pushed:
        assert (remote / name).read_bytes() == (out / name).read_bytes(), name
    assert sum(pq.read_metadata(remote / n).num_rows for n in pushed if n.endswith(".parquet")) > 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_that_a_library_turns_into_another_error_is_still_the_interrupt(sig):
    """As pyarrow does when the signal lands in a Python callback it made: the KeyboardInterrupt
    comes out of the library as another exception. The block still ends with the interrupt."""
    def gather_rows():
        try:
            os.kill(os.getpid(), sig)  # the handler raises inside the "callback"
            time.sleep(5)
        except KeyboardInterrupt:
            raise ValueError("Schema at index 3 was different") from None

    with pytest.raises(Interrupt) as caught:
        with signals_as_interrupt():
            gather_rows()
    assert caught.value.signum == sig and isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(ValueError):  # no signal: an error stays itself
        with signals_as_interrupt():
            raise ValueError("a real error")
