"""Training on Modal GPUs, the launcher side: flags and checks, the container image, submitting a
run, fetching its outputs. The job that runs in the container is ``common.cloud_job``.

The Modal scripts (train_efficientvit.py, train_ellipse.py, train.py) are wiring over this module.
Its top level imports only the standard library, ``modal`` (and its ``click``) and light
``common`` modules: the launcher runs where only ``modal`` is installed (``uv run`` builds its
environment from a script's PEP 723 block), and every flag is checked there before anything is sent.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import click
import modal

from common.cli import training_parser
from common.cloud_job import (
    DATA_MOUNT,
    DATA_VOLUME,
    DEFAULT_GPU,
    RUNS_MOUNT,
    RUNS_VOLUME,
    gpu_count,
    job_summary,
    run_job,
)
from common.errors import ConfigurationError, UserError
from common.files import atomic_path, remove_stale_temporaries

MAX_TIMEOUT_HOURS = 24.0  # Modal's limit for one attempt of a function call
# Modal's GPU guide (modal.com/docs/guide/gpu): the types it accepts and the most GPUs one container
# may have ("B200, H200, H100, A100, L4, T4 and L40S ... up to 8 GPUs ... A10 ... up to 4"). A10G is
# the older name of A10. The guide gives no count for RTX-PRO-6000: 8, the largest machine, is allowed.
GPU_MAX = {"T4": 8, "L4": 8, "A10": 4, "A10G": 4, "L40S": 8, "A100": 8, "A100-40GB": 8, "A100-80GB": 8,
           "RTX-PRO-6000": 8, "H100": 8, "H100!": 8, "H200": 8, "B200": 8, "B200+": 8}
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
PYTHON_VERSION = "3.11"
# Attempts after the first when the job raises (a UserError comes back as a result and is not retried).
# Each attempt has the whole --timeout-hours and resumes from last_*.pt; preemptions restart on top of these.
RETRIES = 2
NOT_AUTHENTICATED = ("run `modal token new` once (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or choose "
                     "a profile of ~/.modal.toml with MODAL_PROFILE), then run the command again")
MODAL_ONLY = ("timeout_hours", "secret", "detach", "local", "fetch")  # flags the job itself ignores


# ----------------------------------------------------------------------------- flags
def parse_gpu(value: str) -> str:
    """``--gpu``: a Modal GPU type, optionally ``:count``, or a comma-separated fallback list."""
    choices = [part.strip() for part in value.split(",")]
    for choice in choices:
        kind, _, count = choice.partition(":")
        most = GPU_MAX.get(kind.upper())
        if most is None:
            raise argparse.ArgumentTypeError(f"unknown GPU '{kind}'; choose from {', '.join(GPU_MAX)}")
        if count and not (count.isdigit() and 1 <= int(count) <= most):
            raise argparse.ArgumentTypeError(f"{kind.upper()} takes 1..{most} GPUs per container, "
                                             f"got '{count}' in '{choice}'")
    if len({gpu_count(choice) for choice in choices}) > 1:  # the job starts one process per GPU
        raise argparse.ArgumentTypeError(f"the GPUs of a fallback list need the same count: {value}")
    return ",".join(choices)


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
                       help="stop an attempt of the run after this long (Modal allows at most 24)")
    group.add_argument("--run-name", type=parse_run_name,
                       help="folder on the visionassist-runs volume (default: <model>-<UTC time>); "
                            "rerunning a name resumes it")
    group.add_argument("--secret", action="append", default=[],
                       help="Modal secret to expose as environment variables, e.g. MLflow's (repeatable)")
    group.add_argument("--detach", action="store_true", help="start the run and return; --fetch it later")
    group.add_argument("--fetch", metavar="RUN", type=parse_run_name,
                       help="only download run RUN from the volume into --output-dir "
                            "(default checkpoints/RUN)")
    group.add_argument("--local", action="store_true", help="run the same job in-process on this machine")
    return parser


def finish_args(args, spec) -> argparse.Namespace:
    """Fill the defaults that depend on the run: run name and output folder."""
    if args.fetch and (args.local or args.detach):
        raise ConfigurationError("--fetch RUN only downloads a run: leave out --local and --detach")
    args.run_name = args.fetch or args.run_name or f"{spec.file_stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
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


# ----------------------------------------------------------------------------- image and function
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


# ----------------------------------------------------------------------------- Modal's errors
NOT_FOUND = re.compile(r"(Secret|Volume|Environment|App) '([^']+)' not found(?: in environment '([^']+)')?")


def not_found_message(exc: Exception) -> str:
    """A NotFoundError as what was not found, read from the server's text ("Secret 'x' not found in
    environment 'main'"); Modal's own words when the text has another form."""
    match = NOT_FOUND.match(str(exc).strip())
    if match is None:
        return f"not found on Modal: {exc}"
    kind, name, environment = match.groups()
    hint = {"Secret": f"create it with `modal secret create {name} KEY=VALUE ...`, "
                      f"or leave out --secret {name}",
            "Volume": "`modal volume list` shows this environment's volumes",
            "Environment": "`modal environment list` shows the environments (MODAL_ENVIRONMENT picks one)",
            "App": "`modal app list` shows this environment's apps"}[kind]
    where = f" in environment '{environment}'" if environment else ""
    return f"Modal {kind.lower()} '{name}' not found{where}: {hint}"


@contextlib.contextmanager
def modal_errors():
    """Modal's failures as one line each (the job's own UserErrors pass through unchanged)."""
    try:
        yield
    except modal.exception.AuthError as exc:  # no credentials, or MODAL_PROFILE names no profile
        reason = str(exc).split(". ")[0].rstrip(".")
        raise ConfigurationError(f"Modal is not authenticated ({reason}): {NOT_AUTHENTICATED}") from None
    except modal.exception.InvalidError as exc:
        if not re.search(r"credentials|OAuth", str(exc)):
            raise
        raise ConfigurationError(f"Modal's credentials: {exc}") from None
    except modal.exception.NotFoundError as exc:
        raise ConfigurationError(not_found_message(exc)) from None
    except (modal.exception.ConnectionError, modal.exception.ServiceError, modal.exception.TimeoutError,
            ConnectionError, TimeoutError) as exc:
        raise UserError(f"cannot reach Modal ({type(exc).__name__}: {exc}); check the network "
                        "(and MODAL_SERVER_URL if set)") from None


def check_secrets(names: list[str]) -> list:
    """Load every ``--secret`` before the app runs (and its image is built): a missing one stops the
    launcher in one line naming it."""
    secrets = []
    for name in names:
        secret = modal.Secret.from_name(name)
        try:
            secret.hydrate()
        except modal.exception.NotFoundError as exc:
            if not str(exc).startswith(f"Secret '{name}'"):
                raise  # e.g. the environment is missing: modal_errors names it
            raise ConfigurationError(not_found_message(exc)) from None
        secrets.append(secret)
    return secrets


# ----------------------------------------------------------------------------- `modal run`
def modal_run_detach() -> bool | None:
    """Under ``modal run``: whether Modal's own ``--detach`` (before the script name) was given, which
    keeps the app alive when this command exits; None when ``modal run`` did not start us.

    Modal keeps that flag only in its click context (modal/cli/run.py); a ``--detach`` after the
    script name reaches our parser instead.
    """
    ctx = click.get_current_context(silent=True)
    obj = ctx.obj if ctx is not None else None
    return bool(obj["detach"]) if isinstance(obj, dict) and "detach" in obj else None


def script_path() -> str:
    """The script as the user named it: ``modal run``'s FUNC_REF, else the command line's."""
    if modal_run_detach() is not None:
        return click.get_current_context().info_name.split("::")[0]
    return sys.argv[0]


def fetch_command(args) -> str:
    """The command that downloads this run again (``--output-dir`` only when not the default)."""
    command = f"uv run {script_path()} --fetch {args.run_name}"
    if Path(args.output_dir) != Path("checkpoints") / args.run_name:
        command += f" --output-dir {args.output_dir}"
    return command


# ----------------------------------------------------------------------------- runs on the volume
def download_run(volume, run_name: str, dest: Path) -> int:
    """Copy ``<run_name>/`` from the runs volume into ``dest``, each file atomically; returns the count.

    Rerunning it after an interruption fetches every file again and clears the killed download's
    temporaries. A writer's temporary that a commit caught on the volume is skipped.
    """
    from modal.volume import FileEntryType

    count, cleaned = 0, set()
    for entry in volume.listdir(run_name, recursive=True):
        path = PurePosixPath(entry.path)
        if entry.type != FileEntryType.FILE or path.name.startswith(".tmp-"):
            continue
        target = dest / path.relative_to(run_name)
        if target.parent not in cleaned and target.parent.is_dir():
            remove_stale_temporaries(target.parent)
        cleaned.add(target.parent)
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            handle.writelines(volume.read_file(entry.path))  # chunks of bytes
        count += 1
    return count


def fetch_run(run_name: str, dest: Path, volume=None) -> int:
    """``--fetch RUN``: download a run folder from the runs volume into ``dest``."""
    volume = volume or modal.Volume.from_name(RUNS_VOLUME)
    volume.hydrate()  # a missing volume is reported as one (NotFoundError), not as a missing run
    try:
        count = download_run(volume, run_name, dest)
    except (modal.exception.NotFoundError, FileNotFoundError):
        count = 0
    if count == 0:
        raise UserError(f"run {run_name} has no files on the {RUNS_VOLUME} volume (list the runs with "
                        f"`modal volume ls {RUNS_VOLUME}`)")
    print(f"downloaded {count} files of run {run_name} to {dest}")
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


# ----------------------------------------------------------------------------- the launcher
def _submit(args, function, secrets: list) -> dict | None:
    configured = function.with_options(timeout=int(args.timeout_hours * 3600), secrets=secrets)
    config = {key: value for key, value in vars(args).items() if key not in MODAL_ONLY}
    runs_volume = modal.Volume.from_name(RUNS_VOLUME, create_if_missing=True)
    if args.resume:
        check_resume_on_volume(runs_volume, args.resume, args.run_name)
    # spawn() also when waiting: the call then lives on the server, which drives its retries.
    call = configured.spawn(config)
    if args.detach:
        print(f"started run {args.run_name} on Modal (call {call.object_id}); when it has finished, "
              f"download it with:\n  {fetch_command(args)}")
        return None
    try:
        result = call.get()
    # a subclass of the TimeoutError modal_errors reads as network
    except modal.exception.FunctionTimeoutError:
        count = download_run(runs_volume, args.run_name, Path(args.output_dir))
        raise UserError(f"run {args.run_name} hit its {args.timeout_hours:g} h timeout (--timeout-hours) "
                        f"in its last attempt; downloaded the {count} files it had saved to "
                        f"{args.output_dir}; continue it with --run-name {args.run_name}") from None
    summary = job_summary(result)
    count = download_run(runs_volume, args.run_name, Path(args.output_dir))
    print(f"downloaded {count} files of run {args.run_name} to {args.output_dir} "
          f"(again any time: {fetch_command(args)})")
    return summary


def run_local(args, spec) -> dict:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigurationError("--local trains on this machine and needs the project's requirements: "
                                 "pip install -r requirements.txt") from None
    return run_job(spec, {k: v for k, v in vars(args).items() if k not in MODAL_ONLY}, on_modal=False)


def launch(args, spec, function, app: modal.App) -> dict | None:
    """Run ``function`` (the script's Modal job) as ``args`` say, in-process with ``--local``, or only
    download a run with ``--fetch``."""
    finish_args(args, spec)
    if args.local:
        return run_local(args, spec)
    if getattr(args, "init", None):  # a local path means nothing inside the container
        raise ConfigurationError("--init reads a file on this machine: fine-tune with --local or a "
                                 "train_*_local.py script")
    cli_detach = modal_run_detach()
    started_by_modal_run = cli_detach is not None or app.app_id is not None
    if started_by_modal_run and args.detach and not cli_detach:
        # Our --detach would spawn and return, and Modal stops a non-detached app when we return.
        script = script_path()
        raise ConfigurationError(f"--detach after the script name does not detach `modal run` (Modal stops "
                                 f"the run when this command exits): use `modal run --detach {script} ...` "
                                 f"or `uv run {script} ... --detach`")
    with modal_errors():
        if args.fetch:
            fetch_run(args.fetch, Path(args.output_dir))
            return None
        secrets = check_secrets(args.secret)
        if started_by_modal_run:  # the app runs already
            return _submit(args, function, secrets)
        with modal.enable_output(), app.run(detach=args.detach):
            return _submit(args, function, secrets)
