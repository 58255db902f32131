"""Random kill -9 soak: precompute.py and a training run are killed with SIGKILL at random moments,
SOAK_KILLS times each (10 by default, 20 in all), and every kill is followed by a rerun (precompute)
or a ``--resume`` (training), which may be killed in turn.

After every kill, each file a reader would pick up (shards, manifest, checkpoints, metrics, ONNX)
reads whole; only hidden ``.tmp-*`` temporaries may be partial. Every build or run that is let
finish holds exactly what an uninterrupted one holds: the dataset's rows (a content hash of every
shard), its manifest and ``precompute.py --validate``; the training's metrics history, best
weights and ONNX file. After a finished run no temporary is left anywhere.

A kill lands at a random moment of the work, not of the interpreter's start-up: the clock starts
when the run's output folder gets its first entry, and the delay is drawn uniformly over the time
an uninterrupted run spends from then on. SOAK_SEED (17 by default) draws the delays; a failure
names it so it can be replayed. Each part prints its kills, runs and seconds (``pytest -s``).
"""

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common.checkpoint import load_checkpoint
from common.files import remove_stale_temporaries
from tests.faults.runs import BEST, LAST, METRICS, TINY_DEMO, TINY_SCRIPT
from tests.helpers import ROOT, clean_env, epoch_rows

SEED = int(os.environ.get("SOAK_SEED", "17"))
KILLS = int(os.environ.get("SOAK_KILLS", "10"))
ONNX = "best_efficientvit_tiny_model.onnx"


class Soak:
    """Runs a command until it finishes, killing it at random moments; counts kills and runs."""

    def __init__(self, name: str, seed: int):
        self.name, self.rng = name, random.Random(f"{name}-{seed}")
        self.kills = self.runs = 0
        self.lead = self.work = 0.0  # an uninterrupted run's start-up and working seconds

    def measure(self, command, folder: Path) -> None:
        """Time an uninterrupted run: until ``folder`` has an entry, and from then to its exit."""
        self.lead, self.work = self._run(command, folder, kill_after=None)

    def run_until_done(self, command_for, folder: Path, after_kill) -> None:
        """``command_for(folder)`` again and again, each killed after a random delay while kills are
        left; ``after_kill(folder)`` checks what each kill left. Returns once a run exits 0."""
        while True:
            delay = self.rng.uniform(0, self.work) if self.kills < KILLS else None
            if self._run(command_for(folder), folder, kill_after=delay) is not None:
                return
            self.kills += 1
            after_kill(folder)

    def _run(self, command, folder: Path, kill_after):
        """Start ``command``; with ``kill_after`` (seconds after ``folder`` gets its first entry)
        SIGKILL it then. Returns (lead, work) seconds when it exited 0, None when it was killed."""
        self.runs += 1
        log = folder.parent / f"{folder.name}-{self.runs}.log"
        start = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT,
                                    env=clean_env(), cwd=ROOT)
        while proc.poll() is None and not (folder.exists() and any(folder.iterdir())):
            time.sleep(0.005)
        started = time.perf_counter()
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
        assert proc.returncode == 0, f"{self.name} (SOAK_SEED={SEED}): exit {proc.returncode}\n" + \
            log.read_text()[-3000:]
        return started - start, time.perf_counter() - started

    def report(self, seconds: float) -> None:
        print(f"\nsoak {self.name}: {self.kills} kills in {self.runs} runs, {seconds:.0f} s "
              f"(SOAK_SEED={SEED}; an uninterrupted run: {self.lead:.1f} s start-up, {self.work:.1f} s work)")


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".tmp-*"))


def readers_files(folder: Path, pattern: str) -> list[Path]:
    return [path for path in folder.rglob(pattern) if not path.name.startswith(".")]


def test_only_a_dead_writers_temporaries_are_removed(tmp_path):
    """What a run clears at its start: temporaries of killed writers, not those of a live process
    (another script writing into the same folder) nor real files."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f".tmp-{dead.pid}-last.pt", f".tmp-{alive.pid}-best.pt", ".tmp-x-odd.pt", "last.pt"]
        for name in names:
            (tmp_path / name).write_bytes(b"part")
        assert remove_stale_temporaries(tmp_path) == 2
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[1::2])
    finally:
        alive.kill()
        alive.wait()


# ----------------------------------------------------------------------------- precompute
PRECOMPUTE = ["--synthetic", "24", "--size", "64", "96", "--no-push", "--shard-size", "2", "--workers", "1"]


def precompute_command(folder: Path) -> list:
    return [sys.executable, ROOT / "precompute.py", *PRECOMPUTE, "--raw-dir", folder / "raw",
            "--output-dir", folder / "out"]


def dataset_digest(out: Path) -> dict:
    """Every shard's rows as a hash of their Arrow stream, and the manifest without its time stamp."""
    digest = {}
    for shard in sorted((out / "data").glob("*.parquet")):
        sink = pa.BufferOutputStream()
        table = pq.read_table(shard).combine_chunks()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest[shard.name] = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("updated")
    return {"shards": digest, "manifest": manifest}


def check_precompute_after_kill(folder: Path) -> None:
    for shard in readers_files(folder, "*.parquet"):
        pq.read_table(shard)  # raises on a truncated or corrupt file
    for record in readers_files(folder, "*.json"):
        json.loads(record.read_text())


@pytest.mark.slow
def test_precompute_killed_at_random_rebuilds_the_same_dataset(tmp_path):
    began, soak = time.perf_counter(), Soak("precompute", SEED)
    soak.measure(precompute_command(tmp_path / "reference"), tmp_path / "reference")
    reference = dataset_digest(tmp_path / "reference" / "out")
    assert len(reference["shards"]) == 13
    cycle = 0
    while soak.kills < KILLS:  # a build that finishes is checked, then a new one starts from nothing
        folder = tmp_path / f"build{cycle}"
        soak.run_until_done(precompute_command, folder, check_precompute_after_kill)
        assert temporaries(folder) == [], f"SOAK_SEED={SEED}"
        assert dataset_digest(folder / "out") == reference, f"SOAK_SEED={SEED}"
        cycle += 1
    validate = [sys.executable, ROOT / "precompute.py", "--validate", "--skip-download", "--raw-dir",
                folder / "raw", "--output-dir", folder / "out", "--size", "64", "96",
                "--validate-samples", "30"]
    result = subprocess.run([str(c) for c in validate], capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "validated" in result.stdout
    soak.report(time.perf_counter() - began)
    assert soak.kills == KILLS and soak.runs > KILLS


# ----------------------------------------------------------------------------- training
EPOCHS = "6"


def training_command(data_dir: Path):
    def command(folder: Path) -> list:
        resume = ["--resume", folder / LAST] if (folder / LAST).exists() else []
        return [sys.executable, TINY_SCRIPT, *TINY_DEMO, "--data-dir", data_dir, "--output-dir", folder,
                "--epochs", EPOCHS, *resume]
    return command


def check_training_after_kill(folder: Path) -> None:
    for checkpoint in readers_files(folder, "*.pt"):
        load_checkpoint(checkpoint)  # raises on a truncated file
    for record in readers_files(folder, "*.json"):
        json.loads(record.read_text())
    for model in readers_files(folder, "*.onnx"):
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def finished_run(folder: Path) -> dict:
    """What a finished run must hold: its metrics history (without wall-clock times), its best
    weights, and its ONNX file's bytes."""
    best = torch.load(folder / BEST, map_location="cpu", weights_only=True)
    return {"history": epoch_rows(folder / METRICS), "epoch": best["epoch"],
            "weights": {name: tensor.tolist() for name, tensor in best["model"].items()},
            "onnx": hashlib.sha256((folder / ONNX).read_bytes()).hexdigest()}


@pytest.mark.slow
def test_training_killed_at_random_resumes_to_the_uninterrupted_history(tmp_path):
    began, soak = time.perf_counter(), Soak("training", SEED)
    command = training_command(tmp_path / "data")
    warm_up = [sys.executable, TINY_SCRIPT, *TINY_DEMO, "--data-dir", tmp_path / "data", "--output-dir",
               tmp_path / "warm-up", "--epochs", "1", "--no-export"]
    # the demo data
    subprocess.run([str(c) for c in warm_up], check=True, capture_output=True, env=clean_env())
    soak.measure(command(tmp_path / "reference"), tmp_path / "reference")
    reference = finished_run(tmp_path / "reference")
    assert len(reference["history"]) == int(EPOCHS)
    cycle = 0
    while soak.kills < KILLS:
        folder = tmp_path / f"run{cycle}"
        soak.run_until_done(command, folder, check_training_after_kill)
        assert temporaries(folder) == [], f"SOAK_SEED={SEED}"
        assert finished_run(folder) == reference, f"SOAK_SEED={SEED}"
        cycle += 1
    soak.report(time.perf_counter() - began)
    assert soak.kills == KILLS and soak.runs > KILLS
