"""Training on Modal GPUs: launcher flags and checks, the container image, volumes, the remote job.

The Modal scripts (train_efficientvit.py, train_ellipse.py, train.py) are wiring over this module.
Its top level imports only the standard library, ``modal`` and light ``common`` modules: the
launcher runs where only ``modal`` is installed (``uv run`` builds its environment from a
script's PEP 723 block), and every flag is checked there before anything is sent. torch and the
engine are imported inside the job.

State that outlives a container lives on two volumes:
    openeds-dataset-cache  mounted at /data/openeds (--data-dir): a Hub dataset is downloaded once,
                           into a folder of its own per run, then renamed into place; later runs
                           (of any of the three apps) reuse it;
    visionassist-runs      mounted at /runs: <run-name>/ holds checkpoints, metrics, curves, ONNX.
                           It is committed after every epoch, so a retried or preempted run
                           resumes from its last_*.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import modal

from common.cli import training_parser
from common.errors import ConfigurationError, UserError
from common.io import atomic_path

DATA_VOLUME, DATA_MOUNT = "openeds-dataset-cache", "/data/openeds"
RUNS_VOLUME, RUNS_MOUNT = "visionassist-runs", "/runs"
# Folders that stand in for the mounts when the job body runs outside a container (tests).
DATA_MOUNT_ENV, RUNS_MOUNT_ENV = "VISIONASSIST_DATA_MOUNT", "VISIONASSIST_RUNS_MOUNT"
DEFAULT_GPU = "L4"
DEFAULT_SECRET = "databricks-shallow"  # MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID and tokens
MAX_TIMEOUT_HOURS = 24.0  # Modal's limit for one function call
GPU_TYPES = ("T4", "L4", "A10", "A10G", "A100", "A100-40GB", "A100-80GB", "L40S", "H100", "H100!", "H200",
             "B200")
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
PYTHON_VERSION = "3.11"
RETRIES = 2  # a preempted or crashed container is restarted this often; each resumes from last_*.pt
NOT_AUTHENTICATED = ("Modal is not authenticated: run `modal token new` once (or set MODAL_TOKEN_ID and "
                     "MODAL_TOKEN_SECRET), then start the run again")
MODAL_ONLY = ("timeout_hours", "secret", "detach", "local")  # flags the job itself ignores


# ----------------------------------------------------------------------------- flags
def parse_gpu(value: str) -> str:
    """``--gpu``: a Modal GPU type, optionally ``:count``, or a comma-separated fallback list."""
    choices = [part.strip() for part in value.split(",")]
    for choice in choices:
        kind, _, count = choice.partition(":")
        if kind.upper() not in GPU_TYPES:
            raise argparse.ArgumentTypeError(f"unknown GPU '{kind}'; choose from {', '.join(GPU_TYPES)}")
        if count and not (count.isdigit() and 1 <= int(count) <= 8):
            raise argparse.ArgumentTypeError(f"GPU count must be 1..8, got '{count}' in '{choice}'")
    if len({gpu_count(choice) for choice in choices}) > 1:  # the job starts one process per GPU
        raise argparse.ArgumentTypeError(f"the GPUs of a fallback list need the same count: {value}")
    return ",".join(choices)


def gpu_count(value: str) -> int:
    """GPUs per container of a ``--gpu`` value ('H100:4' -> 4; 'L4' -> 1)."""
    _, _, count = value.split(",")[0].partition(":")
    return int(count) if count else 1


def parse_timeout_hours(value: str) -> float:
    hours = float(value)
    if not 0 < hours <= MAX_TIMEOUT_HOURS:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_TIMEOUT_HOURS:g}] hours, got {value}")
    return hours


def parse_run_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise argparse.ArgumentTypeError(f"'{value}': use letters, digits, '.', '_' and '-' only")
    return value


def modal_parser(description: str, default_hf_repo: str | None = None, add_help: bool = True):
    """The local training flags plus the Modal ones; ``--output-dir`` defaults to checkpoints/<run-name>."""
    parser = training_parser(description, add_help=add_help)
    if default_hf_repo:
        parser.set_defaults(hf_repo=default_hf_repo)
    parser.set_defaults(output_dir=None)
    group = parser.add_argument_group("Modal")
    group.add_argument("--gpu", default=DEFAULT_GPU, type=parse_gpu,
                       help="Modal GPU: T4, L4, A100-80GB, H100, ... (':N' for N GPUs; 'H100,A100-80GB' "
                            "falls back in order)")
    group.add_argument("--timeout-hours", default=MAX_TIMEOUT_HOURS, type=parse_timeout_hours,
                       help="stop the remote run after this long (Modal allows at most 24)")
    group.add_argument("--run-name", type=parse_run_name,
                       help="folder on the visionassist-runs volume (default: <model>-<UTC time>); "
                            "rerunning a name resumes it")
    group.add_argument("--secret", action="append",
                       help=f"Modal secret to expose as environment variables (repeatable; default "
                            f"{DEFAULT_SECRET})")
    group.add_argument("--detach", action="store_true", help="start the run and return; fetch outputs later")
    group.add_argument("--local", action="store_true", help="run the same job in-process on this machine")
    return parser


def finish_args(args, spec) -> argparse.Namespace:
    """Fill the defaults that depend on the run: run name, secrets, output folder."""
    if not args.run_name:
        args.run_name = f"{spec.file_stem}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    args.secret = args.secret or [DEFAULT_SECRET]
    args.output_dir = args.output_dir or str(Path("checkpoints") / args.run_name)
    return args


def gpu_from_argv(argv: list[str]) -> list[str]:
    """The ``--gpu`` fallback list of a command line (the function's GPU is fixed when it is defined).

    Anything unparsable gives the default: the real parser reports it before anything is sent.
    """
    value = DEFAULT_GPU
    for i, arg in enumerate(argv):
        if arg == "--gpu" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--gpu="):
            value = arg.split("=", 1)[1]
    try:
        return parse_gpu(value).split(",")
    except argparse.ArgumentTypeError:
        return [DEFAULT_GPU]


# ----------------------------------------------------------------------------- image and volumes
def image() -> modal.Image:
    """The container: requirements.txt's pinned versions (read at build time) and ``common/``."""
    return (modal.Image.debian_slim(python_version=PYTHON_VERSION)
            .pip_install_from_requirements(str(REQUIREMENTS))
            .add_local_python_source("common"))


def function_options(argv: list[str]) -> dict:
    """Keyword arguments of ``@app.function`` for a training job; timeout and secrets come per call."""
    return {
        "image": image(),
        "gpu": gpu_from_argv(argv),
        "volumes": {DATA_MOUNT: modal.Volume.from_name(DATA_VOLUME, create_if_missing=True),
                    RUNS_MOUNT: modal.Volume.from_name(RUNS_VOLUME, create_if_missing=True)},
        "timeout": int(MAX_TIMEOUT_HOURS * 3600),
        "retries": modal.Retries(max_retries=RETRIES, initial_delay=10.0, backoff_coefficient=2.0),
    }


def commit(volume) -> None:
    """Persist a volume's changes; outside a container (``.local()``, tests) there is nothing to commit."""
    if volume is not None and not modal.is_local():
        volume.commit()


def reload(volume) -> None:
    """See other containers' commits; a no-op outside a container."""
    if volume is not None and not modal.is_local():
        volume.reload()


def mount_paths() -> tuple[Path, Path]:
    data_root = Path(os.environ.get(DATA_MOUNT_ENV, DATA_MOUNT))
    return data_root, Path(os.environ.get(RUNS_MOUNT_ENV, RUNS_MOUNT))


# ----------------------------------------------------------------------------- the job
def volume_dataset(repo_id: str, data_root: Path, run_name: str, volume=None, download=None) -> Path:
    """A Hub dataset on the dataset volume: downloaded once, reused by every later run.

    Each run downloads into a staging folder of its own and renames it into place, so concurrent
    runs never write the same files; a run that finds the dataset complete just uses it.
    """
    from common import hub

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

    On Modal the volumes are the data and output folders, a Hub dataset is cached on its
    volume, the output volume is committed after every epoch, and a container with several GPUs
    trains on all of them through torchrun.
    """
    from common.engine import fit

    args = argparse.Namespace(**config)
    on_saved = None
    if on_modal:
        data_root, runs_root = mount_paths()
        args.data_dir, args.output_dir = str(data_root), str(runs_root / args.run_name)
        if not (args.demo or args.dataset):
            data_volume = modal.Volume.from_name(DATA_VOLUME)
            args.dataset = str(volume_dataset(args.hf_repo, data_root, args.run_name, data_volume))
        processes = gpu_count(getattr(args, "gpu", DEFAULT_GPU))
        if processes > 1 and "LOCAL_RANK" not in os.environ:
            return run_torchrun(spec, vars(args), processes)
        runs_volume = modal.Volume.from_name(RUNS_VOLUME)
        on_saved = lambda: commit(runs_volume)  # noqa: E731  (rank 0 alone calls it)
    args.resume = resume_checkpoint(args.resume, Path(args.output_dir), spec)
    return fit(args, spec, on_saved=on_saved)


def run_torchrun(spec, config: dict, processes: int) -> dict:
    """The job on every GPU of the container: torchrun starts one process per GPU, each running
    ``run_job``; rank 0 writes the summary that this process returns."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        config_path, summary_path = Path(folder) / "config.json", Path(folder) / "summary.json"
        config_path.write_text(json.dumps(config))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", "-m", "common.cloud", spec.model_name, str(config_path),
                   str(summary_path)]
        print(f"starting {processes} training processes: torchrun --nproc_per_node={processes}")
        if subprocess.run(command).returncode != 0:
            raise UserError(f"the {processes}-process run failed; its messages are above")
        return json.loads(summary_path.read_text())


def _torchrun_worker(model_name: str, config_path: str, summary_path: str) -> None:
    """One torchrun process of ``run_torchrun``."""
    from common.specs import SPECS

    summary = run_job(SPECS[model_name], json.loads(Path(config_path).read_text()))
    if os.environ.get("RANK", "0") == "0":
        Path(summary_path).write_text(json.dumps(summary))


# ----------------------------------------------------------------------------- the launcher
def require_modal_auth() -> None:
    from modal.config import config

    if not (config.get("token_id") and config.get("token_secret")):
        raise ConfigurationError(NOT_AUTHENTICATED)


@contextlib.contextmanager
def modal_errors():
    """Modal's failures as one line each (the job's own UserErrors pass through unchanged)."""
    try:
        yield
    except modal.exception.AuthError:
        raise ConfigurationError(NOT_AUTHENTICATED) from None
    except modal.exception.NotFoundError as exc:
        raise ConfigurationError(
            f"not found on Modal: {exc}. A secret is created with `modal secret create {DEFAULT_SECRET} "
            "MLFLOW_TRACKING_URI=... MLFLOW_EXPERIMENT_ID=...`, or pass another with --secret NAME") from None
    except (modal.exception.ConnectionError, modal.exception.TimeoutError, ConnectionError,
            TimeoutError) as exc:
        raise UserError(f"cannot reach Modal ({type(exc).__name__}: {exc}); check the network "
                        "(and MODAL_SERVER_URL if set)") from None


def download_run(volume, run_name: str, dest: Path) -> int:
    """Copy ``<run_name>/`` from the runs volume into ``dest`` (each file atomically); returns the count."""
    from modal.volume import FileEntryType

    count = 0
    for entry in volume.listdir(run_name, recursive=True):
        if entry.type != FileEntryType.FILE:
            continue
        target = dest / PurePosixPath(entry.path).relative_to(run_name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            for chunk in volume.read_file(entry.path):
                handle.write(chunk)
        count += 1
    return count


def check_resume_on_volume(volume, requested: str, run_name: str) -> None:
    """Stop before a container starts when ``--resume`` names a file the runs volume lacks.

    The job looks for the path as given, relative to the volume and relative to the run folder.
    """
    relative = requested.removeprefix(RUNS_MOUNT + "/").lstrip("/")
    for candidate in (PurePosixPath(relative), PurePosixPath(run_name) / relative):
        try:
            entries = volume.listdir(str(candidate.parent))
        except (modal.exception.NotFoundError, FileNotFoundError):
            continue
        if any(PurePosixPath(entry.path) == candidate for entry in entries):
            return
    raise UserError(f"--resume {requested}: no such checkpoint on the {RUNS_VOLUME} volume (list it with "
                    f"`modal volume ls {RUNS_VOLUME} {run_name}`)")


def _submit(args, function) -> dict | None:
    configured = function.with_options(timeout=int(args.timeout_hours * 3600),
                                       secrets=[modal.Secret.from_name(name) for name in args.secret])
    config = {key: value for key, value in vars(args).items() if key not in MODAL_ONLY}
    fetch = f"modal volume get {RUNS_VOLUME} {args.run_name} {args.output_dir}"
    runs_volume = modal.Volume.from_name(RUNS_VOLUME, create_if_missing=True)
    if args.resume:
        check_resume_on_volume(runs_volume, args.resume, args.run_name)
    if args.detach:
        call = configured.spawn(config)
        print(f"started run {args.run_name} on Modal (call {call.object_id}); "
              f"fetch its outputs with:\n  {fetch}")
        return None
    summary = configured.remote(config)
    count = download_run(runs_volume, args.run_name, Path(args.output_dir))
    print(f"downloaded {count} files of run {args.run_name} to {args.output_dir}")
    return summary


def run_local(args, spec) -> dict:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigurationError("--local trains on this machine and needs the project's requirements: "
                                 "pip install -r requirements.txt") from None
    return run_job(spec, {k: v for k, v in vars(args).items() if k not in MODAL_ONLY}, on_modal=False)


def launch(args, spec, function, app: modal.App) -> dict | None:
    """Run ``function`` (the script's Modal job) as ``args`` say, or in-process with ``--local``."""
    finish_args(args, spec)
    if args.local:
        return run_local(args, spec)
    require_modal_auth()
    with modal_errors():
        if app.app_id is not None:  # `modal run` already started the app
            return _submit(args, function)
        with modal.enable_output(), app.run(detach=args.detach):
            return _submit(args, function)


if __name__ == "__main__":  # a torchrun process started by run_torchrun
    _torchrun_worker(*sys.argv[1:])
