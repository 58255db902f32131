"""The training job inside a Modal container: volumes, the dataset cache, resume, torchrun, results.

``common.cloud`` (the launcher) starts it; the scripts' Modal functions call ``remote_job``. Its
top level imports no torch (the launcher imports it for the volume names and the result format);
the engine is imported inside the job.

State that outlives a container lives on two volumes:
    openeds-dataset-cache  mounted at /data/openeds (--data-dir): a Hub dataset is downloaded once,
                           into a folder of its own per run, then renamed into place; later runs
                           (of any of the three apps) reuse it;
    visionassist-runs      mounted at /runs: <run-name>/ holds checkpoints, metrics, curves, ONNX.
                           It is committed after every epoch (with several GPUs: every minute and
                           when torchrun ends), so a retried or preempted run resumes from its last_*.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NoReturn

import modal

from common.errors import TrainingInterrupted, UserError
from common.files import atomic_path, atomic_write_json
from common.specs import SPECS

DATA_VOLUME, DATA_MOUNT = "openeds-dataset-cache", "/data/openeds"
RUNS_VOLUME, RUNS_MOUNT = "visionassist-runs", "/runs"
# Folders that stand in for the mounts when the job body runs outside a container (tests).
DATA_MOUNT_ENV, RUNS_MOUNT_ENV = "VISIONASSIST_DATA_MOUNT", "VISIONASSIST_RUNS_MOUNT"
DEFAULT_GPU = "L4"
COMMIT_PERIOD_S = 60.0  # how often the Function process commits the runs volume while torchrun trains


def gpu_count(value: str) -> int:
    """GPUs per container of a ``--gpu`` value ('H100:4' -> 4; 'L4' -> 1)."""
    _, _, count = value.split(",")[0].partition(":")
    return int(count) if count else 1


# ----------------------------------------------------------------------------- volumes
def in_function_process() -> bool:
    """True in a Modal Function's own process, the only place a volume can be committed or reloaded.

    ``modal.is_local()`` is True in ``.local()`` calls and in a Function's child processes (torchrun
    workers), so those leave the volumes to the Function process.
    """
    return not modal.is_local()


def commit(volume) -> None:
    """Persist a volume's changes; a no-op outside a Function's own process."""
    if volume is not None and in_function_process():
        volume.commit()


def reload(volume) -> None:
    """See other containers' commits; a no-op outside a Function's own process."""
    if volume is not None and in_function_process():
        volume.reload()


def _try_commit(volume) -> None:
    # A failed commit must not stop training: the next one (or Modal's commit at exit) catches up.
    try:
        commit(volume)
    except (RuntimeError, modal.exception.Error) as exc:
        print(f"warning: committing the {RUNS_VOLUME} volume failed ({exc}); the next commit retries")


def _commit_every(volume, period_s: float, stop: threading.Event) -> None:
    while not stop.wait(period_s):
        _try_commit(volume)


@contextlib.contextmanager
def committing(volume, period_s: float | None = None):
    """Commit ``volume`` every ``period_s`` seconds while the block runs, and once when it ends.

    For torchrun: its workers cannot commit (see ``in_function_process``), so this process does,
    from a background thread. Rank 0 writes every file atomically, so a commit never holds half of one.
    """
    if not in_function_process():
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_commit_every, args=(volume, period_s or COMMIT_PERIOD_S, stop),
                              name="volume-commit", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _try_commit(volume)


def mount_paths() -> tuple[Path, Path]:
    data_root = Path(os.environ.get(DATA_MOUNT_ENV, DATA_MOUNT))
    return data_root, Path(os.environ.get(RUNS_MOUNT_ENV, RUNS_MOUNT))


def volume_dataset(repo_id: str, data_root: Path, run_name: str, volume=None, download=None) -> Path:
    """A Hub dataset on the dataset volume: downloaded once, reused by every later run.

    Each run downloads into a staging folder of its own and renames it into place, so concurrent
    runs never write the same files; a run that finds the dataset complete just uses it.
    """
    from common.prep import hub  # in the container only: the launcher side imports no data libraries

    download = download or (lambda repo, dest: hub.download_dataset(repo, dest, ["train", "validation"]))
    target = data_root / "datasets" / repo_id.replace("/", "--")
    marker = target / ".complete.json"
    reload(volume)
    if marker.exists():
        print(f"dataset {repo_id}: cached on the {DATA_VOLUME} volume ({target})")
        return target
    staging = data_root / ".staging" / run_name
    shutil.rmtree(staging, ignore_errors=True)
    print(f"dataset {repo_id}: downloading to the {DATA_VOLUME} volume (once for all runs)")
    download(repo_id, staging)
    reload(volume)
    if marker.exists():  # another run finished the same download first
        shutil.rmtree(staging, ignore_errors=True)
        return target
    shutil.rmtree(target, ignore_errors=True)  # leftovers of a download that never completed
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps({"repo": repo_id, "run": run_name}))
    commit(volume)
    return target


# ----------------------------------------------------------------------------- the job
def resume_checkpoint(requested: str | None, out_dir: Path, spec) -> Path | None:
    """The checkpoint a run continues from: ``--resume`` (a path, or one relative to the runs
    folder), else the run folder's own ``last_*.pt`` left by an earlier attempt."""
    if requested:
        candidates = [Path(requested), out_dir.parent / requested, out_dir / requested]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise UserError(f"--resume {requested}: no such checkpoint in {out_dir.parent} (on Modal, the "
                            f"{RUNS_VOLUME} volume; list it with `modal volume ls {RUNS_VOLUME}`)")
        return found
    last = out_dir / spec.last_name
    if last.is_file():
        print(f"run {out_dir.name} has {last.name} from an earlier attempt: resuming from it")
        return last
    return None


def run_job(spec, config: dict, on_modal: bool = True) -> dict:
    """The training job, in a Modal container or (``on_modal=False``) in this process.

    On Modal the volumes are the data and output folders, a Hub dataset is cached on its volume,
    the runs volume is committed after every epoch, and a container with several GPUs trains on
    all of them through torchrun (this process commits for its workers).
    """
    from common.train.engine import fit  # in the container only: the launcher side imports no torch

    args = argparse.Namespace(**config)
    on_saved = None
    if on_modal:
        data_root, runs_root = mount_paths()
        args.data_dir, args.output_dir = str(data_root), str(runs_root / args.run_name)
        if not (args.demo or args.dataset):
            data_volume = modal.Volume.from_name(DATA_VOLUME)
            args.dataset = str(volume_dataset(args.hf_repo, data_root, args.run_name, data_volume))
        processes = gpu_count(getattr(args, "gpu", DEFAULT_GPU))
        if "LOCAL_RANK" not in os.environ:  # the Function process (a torchrun worker cannot commit)
            runs_volume = modal.Volume.from_name(RUNS_VOLUME)
            if processes > 1:
                with committing(runs_volume):
                    return run_torchrun(spec, vars(args), processes)
            on_saved = lambda: commit(runs_volume)
    args.resume = resume_checkpoint(args.resume, Path(args.output_dir), spec)
    return fit(args, spec, on_saved=on_saved)


def run_torchrun(spec, config: dict, processes: int) -> dict:
    """The job on every GPU of the container: torchrun starts one process per GPU, each running
    ``run_job``; rank 0 writes the summary that this process returns."""
    with tempfile.TemporaryDirectory() as folder:
        config_path, summary_path = Path(folder) / "config.json", Path(folder) / "summary.json"
        config_path.write_text(json.dumps(config))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", "-m", "common.cloud_job", spec.model_name,
                   str(config_path), str(summary_path)]
        print(f"starting {processes} training processes: torchrun --nproc_per_node={processes}")
        returncode = subprocess.run(command, check=False).returncode
        if returncode != 0:
            raise_worker_failure(Path(folder), processes, returncode)
        return json.loads(summary_path.read_text())


def raise_worker_failure(folder: Path, processes: int, returncode: int) -> NoReturn:
    """A worker's UserError (bad input, NaN loss) as itself; anything else as an error Modal retries."""
    records = sorted(folder.glob("error-rank*.json"))  # rank 0's first
    if records:
        raise_error_record(json.loads(records[0].read_text()))
    raise RuntimeError(f"the {processes}-process run failed (torchrun exit code {returncode}); "
                       "its messages are above")


def _torchrun_worker(model_name: str, config_path: str, summary_path: str) -> None:
    """One torchrun process of ``run_torchrun``; a UserError is left as a record for the parent."""
    rank = os.environ.get("RANK", "0")
    try:
        summary = run_job(SPECS[model_name], json.loads(Path(config_path).read_text()))
    except TrainingInterrupted:
        raise
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        atomic_write_json(Path(summary_path).parent / f"error-rank{rank}.json", error_record(exc))
        raise SystemExit(exc.exit_code) from None
    if rank == "0":
        Path(summary_path).write_text(json.dumps(summary))


# ----------------------------------------------------------------------------- results
def error_record(exc: UserError) -> dict:
    return {"error": str(exc), "exit_code": exc.exit_code}


def raise_error_record(record: dict) -> NoReturn:
    raise UserError(record["error"], exit_code=record["exit_code"])


def remote_job(spec, config: dict) -> dict:
    """The body of a script's Modal function: ``{"summary": ...}`` or an error record.

    ``modal.Retries`` re-runs every exception on a new GPU container, so a UserError (a bad
    ``--hf-repo``, a NaN loss, a missing ``--resume``) comes back as data instead, and the launcher
    raises it as the same one line. Anything else (a crashed process, a lost GPU) raises and is
    retried; so does TrainingInterrupted, the signal of a preemption, after which Modal restarts the input.
    """
    try:
        return {"summary": run_job(spec, config)}
    except TrainingInterrupted:
        raise
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return error_record(exc)


def job_summary(result: dict) -> dict:
    """The launcher's side of ``remote_job``: the summary, or the job's UserError raised here."""
    if "error" in result:
        raise_error_record(result)
    return result["summary"]


if __name__ == "__main__":  # a torchrun process started by run_torchrun
    _torchrun_worker(*sys.argv[1:])
