"""The Modal training scripts: launchers, flag checks, the job body through ``.local()``, errors.

Modal's cloud cannot be reached from CI. Everything else runs for real: uv builds the launcher's
environment from each script's PEP 723 block, the job body trains through the engine with
temporary folders standing in for the volumes, and MLflow is a real server.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from types import SimpleNamespace

import modal
import pytest
from mlflow.tracking import MlflowClient

from common import cloud, cloud_job
from common.errors import ConfigurationError, TrainingInterrupted, UserError
from common.specs import SHALLOWNET
from tests.helpers import ROOT, clean_env, demo_flags

MODAL_SCRIPTS = ("train_efficientvit.py", "train_ellipse.py", "train.py")
TINY = demo_flags(10, 32, 48)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def no_modal_env(tmp_path: Path, **extra) -> dict:
    """An environment with no Modal credentials: an empty config file and no token variables."""
    config = tmp_path / "modal.toml"
    config.write_text("")
    env = {k: v for k, v in clean_env().items() if not k.startswith("MODAL_")}
    return {**env, "MODAL_CONFIG_PATH": str(config), **extra}


def run_script(name: str, *args, env: dict, timeout: int = 300):
    return subprocess.run([sys.executable, str(ROOT / name), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


# ----------------------------------------------------------------------------- launchers
def pep723_block(path: Path) -> dict:
    """A script's inline metadata (PEP 723), as uv reads it."""
    block = re.search(r"^# /// script\n(.*?)^# ///$", path.read_text(), re.S | re.M).group(1)
    return tomllib.loads("\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines()))


@pytest.mark.slow
@pytest.mark.parametrize("script", MODAL_SCRIPTS)
def test_uv_run_help_needs_only_the_pep723_block(script, tmp_path):
    if shutil.which("uv") is None:
        pytest.fail("uv is a test requirement (requirements-dev.txt)")
    env = {**no_modal_env(tmp_path), "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    result = subprocess.run(["uv", "run", "--quiet", script, "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--gpu", "--timeout-hours", "--run-name", "--secret", "--detach", "--fetch", "--local",
                 "--epochs"):
        assert flag in result.stdout
    # The launcher's environment holds what the block lists (modal) and nothing heavy.
    probe = subprocess.run(["uv", "run", "--quiet", "--script", script, "--gpu", "X100"], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=300)
    assert probe.returncode == 2 and "unknown GPU 'X100'" in probe.stderr and "Traceback" not in probe.stderr


def test_pep723_block_pins_the_modal_of_requirements():
    pins = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    modal_pin = next(pin for pin in pins if pin.startswith("modal=="))
    for script in MODAL_SCRIPTS:
        assert pep723_block(ROOT / script)["dependencies"] == [modal_pin]
    assert cloud.REQUIREMENTS == ROOT / "requirements.txt"


def test_requires_python_is_one_floor_that_every_pinned_wheel_accepts():
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert {pep723_block(ROOT / script)["requires-python"] for script in MODAL_SCRIPTS} == {ours}
    pythons = [f"3.{minor}" for minor in range(8, 16)]
    pins = [line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    wheels = {}
    for name, version in pins:  # the test environment is installed from these pins
        assert metadata.version(name).split("+")[0] == version, name
        wheels[name] = SpecifierSet(metadata.metadata(name)["Requires-Python"] or "")
    # The oldest Python on which every pinned wheel installs is our floor, no lower and no higher.
    floor = next(python for python in pythons if all(spec.contains(python) for spec in wheels.values()))
    assert next(python for python in pythons if SpecifierSet(ours).contains(python)) == floor == "3.11"


def test_parser_module_imports_without_torch_datasets_or_opencv():
    code = ("import sys; import common.cloud, common.cli, common.specs; "
            "print(sorted(m for m in ('torch', 'datasets', 'cv2', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_modal_entrypoint_takes_raw_argv():
    script = load_script("train_ellipse.py")
    assert isinstance(script.modal_main, modal.app.LocalEntrypoint)
    argv = ["--gpu", "A100-80GB:2,H100:2", "--run-name", "r1", "--epochs", "3"]
    args = script.get_args_parser().parse_args(argv)
    assert (args.gpu, args.run_name, args.epochs) == ("A100-80GB:2,H100:2", "r1", 3)
    assert args.hf_repo == "Conner/sddec25-01"
    assert load_script("train.py").get_args_parser().parse_args([]).hf_repo == "Conner/openeds-precomputed"


# ----------------------------------------------------------------------------- flags and errors
# Modal's GPU guide (modal.com/docs/guide/gpu): accepted values and "B200, H200, H100, A100, L4, T4 and
# L40S instances support up to 8 GPUs ... A10 instances support up to 4 GPUs".
GUIDE_GPUS = ["T4", "L4", "A10", "L40S", "A100", "A100-40GB", "A100-80GB", "RTX-PRO-6000", "H100", "H100!",
              "H200", "B200", "B200+"]


@pytest.mark.parametrize("value, ok", [
    ("T4", True), ("a100-80gb", True), ("H100:4", True), ("H100,A100-80GB", True), ("X100", False),
    ("H100:0", False), ("H100:x", False), ("", False), ("B200+:8", True), ("RTX-PRO-6000", True),
    ("H100!:8", True), ("h200:8", True), ("L40S:8", True), ("H100:9", False), ("A10:4", True),
    ("A10:5", False), ("A10G:4", True), ("A10G:8", False), ("H100:4,A10:4", True), ("B300", False)])
def test_gpu_strings(value, ok):
    if ok:
        assert cloud.parse_gpu(value) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            cloud.parse_gpu(value)


@pytest.mark.parametrize("gpu", GUIDE_GPUS)
def test_every_gpu_of_the_guide_is_accepted_up_to_its_count(gpu):
    most = 4 if gpu == "A10" else 8
    assert cloud.parse_gpu(f"{gpu}:{most}") == f"{gpu}:{most}"
    with pytest.raises(argparse.ArgumentTypeError, match=f"takes 1..{most} GPUs"):
        cloud.parse_gpu(f"{gpu}:{most + 1}")
    assert set(cloud.GPU_MAX) == {*GUIDE_GPUS, "A10G"}  # A10G: the older name of A10


def test_gpu_count_and_fallback_lists_of_one_count():
    assert [cloud.gpu_count(v) for v in ("L4", "H100:4", "H100:2,A100-80GB:2")] == [1, 4, 2]
    with pytest.raises(argparse.ArgumentTypeError, match="same count"):
        cloud.parse_gpu("H100:4,A100-80GB")


def test_gpu_of_a_command_line_fixes_the_function_gpu():
    assert cloud.gpu_from_argv(["train.py", "--gpu", "H100,A100-80GB"]) == ["H100", "A100-80GB"]
    assert cloud.gpu_from_argv(["modal", "run", "train.py", "--gpu=T4"]) == ["T4"]
    assert cloud.gpu_from_argv(["train.py", "--gpu", "bogus"]) == [cloud.DEFAULT_GPU]
    assert cloud.gpu_from_argv([]) == [cloud.DEFAULT_GPU]


def test_run_defaults_are_filled_once():
    parser = load_script("train_efficientvit.py").get_args_parser()
    args = cloud.finish_args(parser.parse_args([]), SHALLOWNET)
    assert re.fullmatch(r"shallow_model-\d{8}-\d{6}", args.run_name)
    assert args.secret == [] and args.output_dir == f"checkpoints/{args.run_name}"  # MLflow is optional
    named = parser.parse_args(["--run-name", "a", "--secret", "s1", "--secret", "s2"])
    named = cloud.finish_args(named, SHALLOWNET)
    assert (named.run_name, named.secret, named.output_dir) == ("a", ["s1", "s2"], "checkpoints/a")


@pytest.mark.slow
def test_not_authenticated_is_one_line_and_exit_2(tmp_path):
    result = run_script("train_efficientvit.py", "--demo", env=no_modal_env(tmp_path), timeout=120)
    # No pre-check of our own: the client's AuthError (raised by app.run()) becomes the line.
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: Modal is not authenticated (Token missing): {cloud.NOT_AUTHENTICATED}"]
    assert "modal token new" in result.stderr and "MODAL_TOKEN_ID" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [(["--gpu", "X100"], "unknown GPU"),
                                             (["--timeout-hours", "30"], "must be in (0, 24]"),
                                             (["--run-name", "../up"], "letters, digits"),
                                             (["--init", "weights.pt"],
                                              "--init reads a file on this machine")])
def test_bad_flag_is_rejected_before_anything_is_sent(flags, message, tmp_path):
    # Fake credentials and an unroutable server: a launcher that contacted Modal would hang and fail later.
    env = no_modal_env(tmp_path, MODAL_TOKEN_ID="ak-x", MODAL_TOKEN_SECRET="as-x", MODAL_SERVER_URL="http://127.0.0.1:9")
    result = run_script("train.py", *flags, env=env, timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# Texts as the client raises them (modal/client.py, from_env) and as the server words NOT_FOUND.
TOKEN_MISSING = ("Token missing. Could not authenticate client. If you have token credentials, see "
                 "modal.com/docs/sdk/py/latest/config for setup help. If you are a new user, register an "
                 "account at modal.com, then run `modal token new`.")
NO_PROFILE = ("Modal profile 'work' was not found in /home/u/.modal.toml. Run `modal profile list` to see "
              "available profiles, or `modal token new --profile work` to configure it.")


@pytest.mark.parametrize("raised, kind, words", [
    (modal.exception.AuthError(TOKEN_MISSING), ConfigurationError,
     "not authenticated (Token missing): run `modal token new`"),
    (modal.exception.AuthError(NO_PROFILE), ConfigurationError,
     "(Modal profile 'work' was not found in /home/u/.modal.toml): run `modal token new`"),
    (modal.exception.InvalidError("Modal token credentials and OAuth credentials cannot both be configured."),
     ConfigurationError, "Modal's credentials: Modal token credentials and OAuth"),
    (modal.exception.ConnectionError("Could not connect to the Modal server."), UserError,
     "cannot reach Modal"),
    (modal.exception.ServiceError("UNAVAILABLE"), UserError, "cannot reach Modal"),
    (ConnectionRefusedError(111, "refused"), UserError, "cannot reach Modal"),
])
def test_modal_failures_become_one_line(raised, kind, words):
    with pytest.raises(kind, match=re.escape(words)) as caught, cloud.modal_errors():
        raise raised
    assert "\n" not in str(caught.value)


def test_other_invalid_errors_keep_their_traceback():
    with pytest.raises(modal.exception.InvalidError), cloud.modal_errors():
        raise modal.exception.InvalidError("Function has too many arguments")


@pytest.mark.parametrize("text, words", [
    ("Secret 'mlflow' not found in environment 'main'.",
     "Modal secret 'mlflow' not found in environment 'main': create it with `modal secret create mlflow"),
    ("Volume 'visionassist-runs' not found in environment 'dev'",
     "Modal volume 'visionassist-runs' not found in environment 'dev': `modal volume list`"),
    ("Environment 'pytest' not found", "Modal environment 'pytest' not found: `modal environment list`"),
    ("No such environment", "not found on Modal: No such environment"),
])
def test_not_found_names_what_is_missing(text, words):
    with pytest.raises(ConfigurationError) as caught, cloud.modal_errors():
        raise modal.exception.NotFoundError(text)
    assert str(caught.value).startswith(words)
    assert ("modal secret create" in str(caught.value)) == text.startswith("Secret")


@pytest.mark.parametrize("error", [UserError("bad input"), ConfigurationError("no token"),
                                   TrainingInterrupted("interrupted (SIGTERM)", 15)])
def test_job_errors_survive_the_trip_back_from_the_container(error):
    back = pickle.loads(pickle.dumps(error))  # how Modal returns a remote exception
    assert (type(back), str(back), back.exit_code) == (type(error), str(error), error.exit_code)


def test_job_errors_pass_through_unchanged():
    with pytest.raises(UserError, match="^--resume x: no such"), cloud.modal_errors():
        raise UserError("--resume x: no such checkpoint")


# ----------------------------------------------------------------------------- volumes
@pytest.fixture
def volumes(tmp_path, monkeypatch):
    """Temporary folders in place of the two volumes, as the job body sees them."""
    data, runs = tmp_path / "data-volume", tmp_path / "runs-volume"
    monkeypatch.setenv(cloud_job.DATA_MOUNT_ENV, str(data))
    monkeypatch.setenv(cloud_job.RUNS_MOUNT_ENV, str(runs))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return SimpleNamespace(data=data, runs=runs)


def job_config(script, run_name: str, *extra) -> dict:
    args = script.get_args_parser().parse_args([*TINY, "--run-name", run_name, *extra])
    args = cloud.finish_args(args, SHALLOWNET)
    return {k: v for k, v in vars(args).items() if k not in cloud.MODAL_ONLY}


LOCAL_CALL = "ignore:The train_remote function is executing locally"


@pytest.mark.filterwarnings(LOCAL_CALL)
def test_remote_body_trains_on_the_volumes_and_resumes_by_itself(volumes, capsys):
    script = load_script("train.py")
    summary = cloud_job.job_summary(
        script.train_remote.local(job_config(script, "shallow-a", "--epochs", "1")))
    run = volumes.runs / "shallow-a"
    assert {"best_shallow_model.pt", "last_shallow_model.pt", "shallow_model_epoch_1.pt",
            "best_shallow_model.onnx", "metrics_shallow_model.json"} <= {p.name for p in run.iterdir()}
    assert summary["best_checkpoint"] == str(run / "best_shallow_model.pt")
    assert any(volumes.data.glob("demo-10-0-32x48/precomputed/manifest.json"))  # data on the data volume
    capsys.readouterr()
    # A retry (same run name, same config) continues from last_*.pt instead of starting over.
    script.train_remote.local(job_config(script, "shallow-a", "--epochs", "2"))
    out = capsys.readouterr().out
    assert "from an earlier attempt: resuming" in out and "after epoch 1" in out
    assert [row["epoch"] for row in json.loads((run / "metrics_shallow_model.json").read_text())] == [1, 2]


class RecordingVolume:
    """The runs volume as the Function process sees it: each commit records its process, its thread
    and the run folder's files at that moment."""

    def __init__(self, run: Path):
        self.run, self.commits = run, []

    def commit(self):
        files = sorted(p.name for p in self.run.glob("*")) if self.run.is_dir() else []
        self.commits.append((os.getpid(), threading.current_thread() is threading.main_thread(), files))


@pytest.mark.slow
@pytest.mark.filterwarnings(LOCAL_CALL)
def test_several_gpus_start_torchrun_and_the_function_process_commits(volumes, capfd, monkeypatch):
    # --gpu T4:2 on the CPU: the same torchrun launch a 2-GPU container makes, with gloo instead of NCCL.
    # This process plays the Function's (modal.is_local() False there); the torchrun workers are its
    # children, where modal.is_local() is True as in a container, so they cannot commit.
    script = load_script("train_efficientvit.py")
    run = volumes.runs / "vit-2"
    volume = RecordingVolume(run)
    monkeypatch.setattr(modal, "is_local", lambda: False)
    monkeypatch.setattr(modal.Volume, "from_name",
                        lambda name, **_: volume if name == cloud.RUNS_VOLUME else None)
    monkeypatch.setattr(cloud_job, "COMMIT_PERIOD_S", 0.5)
    config = job_config(script, "vit-2", "--epochs", "2", "--gpu", "T4:2", "--device", "cpu",
                        "--demo-samples", "24")
    summary = cloud_job.job_summary(script.train_remote.local(config))
    out = capfd.readouterr()
    assert "starting 2 training processes" in out.out and "rank=0/2" in out.out
    assert summary["best_checkpoint"] == str(run / "best_efficientvit_model.pt")
    assert (run / "best_efficientvit_model.onnx").is_file() and (run / "last_efficientvit_model.pt").is_file()
    # Periodic commits from a background thread while torchrun trained (one saw the epoch-1 checkpoint
    # before the run ended), then a final one from the Function's main thread holding every file.
    assert {pid for pid, _, _ in volume.commits} == {os.getpid()}
    periodic = [files for _, main, files in volume.commits if not main]
    assert [main for _, main, _ in volume.commits][-1:] == [True] and len(periodic) >= 2
    assert any("last_efficientvit_model.pt" in files and "best_efficientvit_model.onnx" not in files
               for files in periodic)
    assert volume.commits[-1][2] == sorted(p.name for p in run.glob("*"))


@pytest.mark.filterwarnings(LOCAL_CALL)
def test_a_user_error_comes_back_as_a_record_and_is_raised_as_the_same_line(volumes):
    # Returned, not raised: Modal's Retries would re-run a raised error on a new GPU container.
    script = load_script("train_ellipse.py")
    record = script.train_remote.local(job_config(script, "e1", "--resume", "gone/last_ellipse_model.pt"))
    assert record["exit_code"] == 1 and record["error"].startswith(
        "--resume gone/last_ellipse_model.pt: no such")
    record = pickle.loads(pickle.dumps(record))  # how Modal returns a result
    with pytest.raises(UserError) as caught:
        cloud_job.job_summary(record)
    assert (str(caught.value), caught.value.exit_code) == (record["error"], 1)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"),
                                   TrainingInterrupted("interrupted (SIGINT)", 2)])
def test_other_failures_raise_so_modal_retries_or_restarts_them(error, monkeypatch):
    def failing_job(spec, config):
        raise error

    monkeypatch.setattr(cloud_job, "run_job", failing_job)
    with pytest.raises(type(error)):
        cloud_job.remote_job(SHALLOWNET, {})


def test_a_torchrun_workers_user_error_reaches_the_function_as_itself(tmp_path):
    with pytest.raises(RuntimeError, match="2-process run failed \\(torchrun exit code 1\\)"):
        cloud_job.raise_worker_failure(tmp_path, 2, 1)  # no record: a crash, which Modal retries
    (tmp_path / "error-rank1.json").write_text(json.dumps({"error": "loss is nan", "exit_code": 1}))
    (tmp_path / "error-rank0.json").write_text(json.dumps({"error": "dataset missing", "exit_code": 2}))
    with pytest.raises(UserError) as caught:
        cloud_job.raise_worker_failure(tmp_path, 2, 1)
    assert (str(caught.value), caught.value.exit_code) == ("dataset missing", 2)


@pytest.mark.filterwarnings(LOCAL_CALL)
def test_a_torchrun_worker_leaves_its_user_error_as_a_record(volumes, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    script = load_script("train_ellipse.py")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(job_config(script, "e2", "--gpu", "T4:2", "--resume", "gone.pt")))
    with pytest.raises(SystemExit) as exited:
        cloud_job._torchrun_worker("ellipse", str(config), str(tmp_path / "summary.json"))
    record = json.loads((tmp_path / "error-rank1.json").read_text())
    assert exited.value.code == 1 and record["error"].startswith("--resume gone.pt: no such checkpoint")


def test_hub_dataset_is_downloaded_once_into_the_volume(tmp_path):
    calls = []

    def download(repo, dest):
        calls.append(dest)
        (dest / "data").mkdir(parents=True)
        (dest / "data" / "train-00000-of-00001.parquet").write_bytes(b"rows")

    first = cloud_job.volume_dataset("team/eyes", tmp_path, "run-1", download=download)
    second = cloud_job.volume_dataset("team/eyes", tmp_path, "run-2", download=download)
    assert first == second == tmp_path / "datasets" / "team--eyes"
    assert len(calls) == 1 and calls[0] == tmp_path / ".staging" / "run-1"
    assert (first / "data" / "train-00000-of-00001.parquet").read_bytes() == b"rows"
    assert not (tmp_path / ".staging" / "run-1").exists()


def test_volume_download_takes_both_shard_layouts_from_the_hub(tmp_path):
    from common.prep import hub
    from tests.hub_standin import RecordingHfApi

    api = RecordingHfApi(tmp_path / "hub")
    for name in ("data/train/shard_00000.parquet", "data/validation/shard_00000.parquet",  # older layout
                 "data/train-00000-of-00001.parquet", "manifest.json", "notes/extra.bin"):
        (api.repo_dir("team/old") / name).parent.mkdir(parents=True, exist_ok=True)
        (api.repo_dir("team/old") / name).write_bytes(b"x")
    def download(repo, dest):
        return hub.download_dataset(repo, dest, ["train", "validation"], api=api)

    path = cloud_job.volume_dataset("team/old", tmp_path / "volume", "r1", download=download)
    got = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert got == {"data/train/shard_00000.parquet", "data/validation/shard_00000.parquet",
                   "data/train-00000-of-00001.parquet", "manifest.json", ".complete.json"}


def test_a_run_that_loses_the_download_race_keeps_the_winners_copy(tmp_path):
    def slow_download(repo, dest):
        (dest / "data").mkdir(parents=True)
        (dest / "data" / "mine.parquet").write_bytes(b"loser")
        # Meanwhile another run completes the same dataset.
        cloud_job.volume_dataset(repo, tmp_path, "winner",
                                 download=lambda r, d: (d / "data").mkdir(parents=True)
                                 or (d / "data" / "theirs.parquet").write_bytes(b"winner"))

    path = cloud_job.volume_dataset("team/eyes", tmp_path, "loser", download=slow_download)
    assert sorted(p.name for p in (path / "data").iterdir()) == ["theirs.parquet"]
    assert not (tmp_path / ".staging" / "loser").exists()


class FolderVolume:
    """The two calls of modal.Volume that download_run uses, served from a folder (Modal's cloud
    cannot be reached here)."""

    def __init__(self, root: Path):
        self.root = root

    def listdir(self, path, recursive=False):
        from modal.volume import FileEntryType

        entries = sorted((self.root / path).rglob("*") if recursive else (self.root / path).iterdir())
        return [SimpleNamespace(path=str(p.relative_to(self.root)),
                                type=FileEntryType.FILE if p.is_file() else FileEntryType.DIRECTORY)
                for p in entries]

    def read_file(self, path):
        data = (self.root / path).read_bytes()
        yield from (data[i:i + 3] for i in range(0, len(data), 3))

    def hydrate(self):
        return self


def test_run_folder_is_downloaded_file_by_file(tmp_path):
    run = tmp_path / "volume" / "r1"
    (run / "sub").mkdir(parents=True)
    (run / "best.pt").write_bytes(b"0123456789")
    (run / "sub" / "metrics.json").write_text("{}")
    dest = tmp_path / "checkpoints" / "r1"
    assert cloud.download_run(FolderVolume(tmp_path / "volume"), "r1", dest) == 2
    assert (dest / "best.pt").read_bytes() == b"0123456789"
    assert (dest / "sub" / "metrics.json").read_text() == "{}"
    assert not [p for p in dest.rglob(".tmp-*")]


def test_resume_is_checked_on_the_volume_before_a_container_starts(tmp_path):
    run = tmp_path / "volume" / "r1"
    run.mkdir(parents=True)
    (run / "last_shallow_model.pt").write_bytes(b"x")
    volume = FolderVolume(tmp_path / "volume")
    for found in ("r1/last_shallow_model.pt", "last_shallow_model.pt", "/runs/r1/last_shallow_model.pt"):
        cloud.check_resume_on_volume(volume, found, "r1")
    for missing in ("r1/best_shallow_model.pt", "r2/last_shallow_model.pt"):
        with pytest.raises(UserError, match=f"--resume {missing}: no such checkpoint on the visionassist"):
            cloud.check_resume_on_volume(volume, missing, "r1")


# ----------------------------------------------------------------------------- fetch and submit
def volume_with_run(root: Path, run: str = "r1") -> FolderVolume:
    (root / run / "sub").mkdir(parents=True)
    (root / run / "best.pt").write_bytes(b"0123456789")
    (root / run / "sub" / "metrics.json").write_text("{}")
    (root / run / ".tmp-77-last.pt").write_bytes(b"half")  # a writer's temporary that a commit caught
    return FolderVolume(root)


def test_fetch_downloads_a_run_into_checkpoints_and_a_cut_download_can_be_rerun(tmp_path, monkeypatch,
                                                                                 capsys):
    script = load_script("train.py")
    volume = volume_with_run(tmp_path / "volume")
    monkeypatch.setattr(modal.Volume, "from_name", lambda name, **_: volume)
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "checkpoints" / "r1"
    dest.mkdir(parents=True)
    (dest / "best.pt").write_bytes(b"01")  # left by a download that was cut short
    (dest / ".tmp-99-best.pt").write_bytes(b"0")  # and its temporary
    cloud.launch(script.get_args_parser().parse_args(["--fetch", "r1"]), SHALLOWNET, script.train_remote,
                 script.app)
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == {"best.pt": b"0123456789", "sub/metrics.json": b"{}"}
    assert "downloaded 2 files of run r1 to checkpoints/r1" in capsys.readouterr().out


def test_fetch_of_a_run_the_volume_lacks_is_one_line(tmp_path):
    with pytest.raises(UserError, match="^run r9 has no files on the visionassist-runs volume"):
        cloud.fetch_run("r9", tmp_path / "out", volume_with_run(tmp_path / "volume"))
    with pytest.raises(ConfigurationError, match="--fetch RUN only downloads"):
        cloud.finish_args(cloud.modal_parser("x").parse_args(["--fetch", "r1", "--local"]), SHALLOWNET)


class StandInFunction:
    """``with_options``/``spawn``/``FunctionCall.get`` of a Modal Function; ``get`` returns or raises
    ``outcome`` (what the server would send back)."""

    def __init__(self, outcome):
        self.outcome, self.options, self.configs = outcome, None, []

    def with_options(self, **options):
        self.options = options
        return self

    def spawn(self, config):
        self.configs.append(config)
        return SimpleNamespace(object_id="fc-test", get=self.get)

    def get(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.fixture
def runs_volume(tmp_path, monkeypatch):
    volume = volume_with_run(tmp_path / "volume")
    monkeypatch.setattr(modal.Volume, "from_name", lambda name, **_: volume)
    monkeypatch.chdir(tmp_path)
    return volume


def submit(function, *flags):
    args = cloud.finish_args(cloud.modal_parser("x").parse_args(["--run-name", "r1", *flags]), SHALLOWNET)
    with cloud.modal_errors():
        return cloud._submit(args, function, [])


def test_a_finished_run_is_downloaded_and_the_fetch_command_printed(runs_volume, tmp_path, capsys):
    function = StandInFunction({"summary": {"best_metric": 0.9}})
    assert submit(function, "--timeout-hours", "3") == {"best_metric": 0.9}
    assert (tmp_path / "checkpoints" / "r1" / "best.pt").read_bytes() == b"0123456789"
    assert re.search(r"\(again any time: uv run \S+ --fetch r1\)$", capsys.readouterr().out.strip())
    assert function.options["timeout"] == 3 * 3600 and function.configs[0]["run_name"] == "r1"
    assert not set(cloud.MODAL_ONLY) & set(function.configs[0])


def test_detach_spawns_returns_and_prints_the_fetch_command(runs_volume, tmp_path, capsys):
    function = StandInFunction(AssertionError("a detached launcher does not wait"))
    assert submit(function, "--detach", "--output-dir", "out/r1") is None
    out = capsys.readouterr().out
    assert "call fc-test" in out and out.strip().endswith("--fetch r1 --output-dir out/r1")
    assert not (tmp_path / "out").exists()


def test_a_job_user_error_is_raised_as_its_line_and_exit_code(runs_volume, tmp_path):
    with pytest.raises(UserError, match="^--hf-repo nobody/none: no such dataset on the Hub$") as caught:
        submit(StandInFunction({"error": "--hf-repo nobody/none: no such dataset on the Hub",
                                "exit_code": 2}))
    assert caught.value.exit_code == 2 and not (tmp_path / "checkpoints").exists()


def test_a_timeout_says_timeout_and_downloads_what_the_volume_holds(runs_volume, tmp_path):
    # FunctionTimeoutError is a kind of Modal's TimeoutError, which modal_errors reads as a network fault.
    assert issubclass(modal.exception.FunctionTimeoutError, modal.exception.TimeoutError)
    with pytest.raises(UserError) as caught:
        submit(StandInFunction(modal.exception.FunctionTimeoutError("Function timed out")),
               "--timeout-hours", "2")
    assert str(caught.value).startswith("run r1 hit its 2 h timeout (--timeout-hours) in its last attempt; "
                                        "downloaded the 2 files it had saved to checkpoints/r1")
    assert (tmp_path / "checkpoints" / "r1" / "best.pt").read_bytes() == b"0123456789"


# ----------------------------------------------------------------------------- secrets and `modal run`
class StandInSecret:
    """``modal.Secret.from_name(name).hydrate()`` against a workspace that holds ``existing``."""

    def __init__(self, name: str, existing: set, environment: str = "main"):
        self.name, self.existing, self.environment = name, existing, environment

    def hydrate(self):
        if self.environment != "main":
            raise modal.exception.NotFoundError(f"Environment '{self.environment}' not found")
        if self.name not in self.existing:
            raise modal.exception.NotFoundError(f"Secret '{self.name}' not found in environment 'main'")
        return self


class StandInApp:
    app_id = None  # not started by `modal run`

    def __init__(self):
        self.runs = []

    def run(self, detach=False):
        self.runs.append(detach)
        return contextlib.nullcontext()


def test_secrets_are_optional_and_checked_before_the_app_runs(monkeypatch):
    script = load_script("train.py")
    submitted = []
    monkeypatch.setattr(cloud, "_submit", lambda args, function, secrets: submitted.append(secrets))
    parse = script.get_args_parser().parse_args
    for environment, message in (("main", "^Modal secret 'hf' not found in environment 'main': create it"),
                                 ("dev", "^Modal environment 'dev' not found")):
        monkeypatch.setattr(modal.Secret, "from_name",
                            lambda name, env=environment, **_: StandInSecret(name, {"mlflow"}, env))
        app = StandInApp()
        with pytest.raises(ConfigurationError, match=message):
            cloud.launch(parse(["--secret", "mlflow", "--secret", "hf"]), SHALLOWNET, script.train_remote,
                         app)
        assert app.runs == [] and submitted == []
    monkeypatch.setattr(modal.Secret, "from_name", lambda name, **_: StandInSecret(name, {"mlflow"}))
    app = StandInApp()
    cloud.launch(parse(["--secret", "mlflow"]), SHALLOWNET, script.train_remote, app)
    cloud.launch(parse([]), SHALLOWNET, script.train_remote, app)  # no secret at all
    assert (app.runs == [False, False]
            and [[s.name for s in secrets] for secrets in submitted] == [["mlflow"], []])


@pytest.fixture
def modal_cli(monkeypatch):
    """Modal's own command line (``modal run ...``), parsed by the real client; only its app run and our
    submit are replaced by recorders, so nothing is sent."""
    from click.testing import CliRunner
    from modal.cli import run as modal_run
    from modal.cli.entry_point import entrypoint_cli

    calls = SimpleNamespace(run_app=[], submit=[])

    @contextlib.contextmanager
    def run_app(app, **options):
        calls.run_app.append(options["detach"])
        yield app

    monkeypatch.setattr(modal_run, "run_app", run_app)
    monkeypatch.setattr(cloud, "_submit", lambda args, function, secrets: calls.submit.append(args.detach))
    monkeypatch.chdir(ROOT)
    return lambda *argv: (CliRunner().invoke(entrypoint_cli, list(argv), catch_exceptions=False), calls)


@pytest.mark.parametrize("argv, detached_app, submitted", [
    (["run", "train_ellipse.py", "--gpu", "T4", "--detach"], [False], []),  # refused: Modal would stop it
    (["run", "--detach", "train_ellipse.py", "--gpu", "T4", "--detach"], [True], [True]),
    (["run", "-d", "train_ellipse.py"], [True], [False]),  # the launcher waits; the run outlives it
    (["run", "train_ellipse.py", "--epochs", "3"], [False], [False]),
])
def test_modal_run_detaches_only_with_modals_own_flag(modal_cli, argv, detached_app, submitted):
    result, calls = modal_cli(*argv)
    assert (calls.run_app, calls.submit) == (detached_app, submitted)
    if submitted:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2
        assert result.stderr.strip() == (
            "error: --detach after the script name does not detach `modal run` (Modal stops the run when "
            "this command exits): use `modal run --detach train_ellipse.py ...` or "
            "`uv run train_ellipse.py ... --detach`")


# ----------------------------------------------------------------------------- ShallowNet --local
@pytest.mark.slow
def test_shallownet_trains_locally_with_its_names_and_mlflow_tag(mlflow_server, tmp_path):
    env = {**no_modal_env(tmp_path), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    result = run_script("train.py", "--local", *TINY, "--epochs", "1", "--data-dir", str(tmp_path / "data"),
                        "--run-name", "shallow-local", "--output-dir", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"best_shallow_model.pt", "best_shallow_model.onnx", "shallow_model_epoch_1.pt",
            "last_shallow_model.pt"} <= names
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("visionassist")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.model_type = 'ShallowNet'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "final validation mIoU" in result.stdout


def test_local_run_defaults_to_a_run_folder_under_checkpoints(tmp_path, monkeypatch):
    script = load_script("train.py")
    args = script.get_args_parser().parse_args([*TINY, "--local", "--epochs", "1", "--run-name", "here",
                                                "--data-dir", str(tmp_path / "data")])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cloud.launch(args, SHALLOWNET, script.train_remote, script.app)
    assert (tmp_path / "checkpoints" / "here" / "best_shallow_model.pt").is_file()
