"""The Modal training scripts: launchers, flag checks, the job body through ``.local()``, errors.

Modal's cloud cannot be reached from CI. Everything else runs for real: uv builds the launcher's
environment from each script's PEP 723 block, the job body trains through the engine with
temporary folders standing in for the volumes, and MLflow is a real server.
"""

import argparse
import importlib.util
import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import modal
import pytest
from mlflow.tracking import MlflowClient

from common import cloud
from common.errors import ConfigurationError, TrainingInterrupted, UserError
from common.specs import SHALLOWNET
from tests.mlflow_server import mlflow_server_fixture  # noqa: F401  (the mlflow_server fixture)
from tests.test_training import ROOT, clean_env

MODAL_SCRIPTS = ("train_efficientvit.py", "train_ellipse.py", "train.py")
TINY = ["--demo", "--demo-samples", "10", "--demo-size", "32", "48", "--batch-size", "4",
        "--num-workers", "0"]


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
def pep723_dependencies(path: Path) -> list[str]:
    block = re.search(r"^# /// script\n(.*?)^# ///$", path.read_text(), re.S | re.M).group(1)
    return json.loads(re.search(r"dependencies = (\[.*\])", block).group(1))


@pytest.mark.parametrize("script", MODAL_SCRIPTS)
def test_uv_run_help_needs_only_the_pep723_block(script, tmp_path):
    if shutil.which("uv") is None:
        pytest.fail("uv is a test requirement (requirements-dev.txt)")
    env = {**no_modal_env(tmp_path), "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
    result = subprocess.run(["uv", "run", "--quiet", script, "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--gpu", "--timeout-hours", "--run-name", "--secret", "--detach", "--local", "--epochs"):
        assert flag in result.stdout
    # The launcher's environment holds what the block lists (modal) and nothing heavy.
    probe = subprocess.run(["uv", "run", "--quiet", "--script", script, "--gpu", "X100"], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=300)
    assert probe.returncode == 2 and "unknown GPU 'X100'" in probe.stderr and "Traceback" not in probe.stderr


def test_pep723_block_pins_the_modal_of_requirements():
    pins = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    modal_pin = next(pin for pin in pins if pin.startswith("modal=="))
    for script in MODAL_SCRIPTS:
        assert pep723_dependencies(ROOT / script) == [modal_pin]
    assert cloud.REQUIREMENTS == ROOT / "requirements.txt"


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
@pytest.mark.parametrize("value, ok", [("T4", True), ("a100-80gb", True), ("H100:4", True),
                                       ("H100,A100-80GB", True), ("X100", False), ("H100:0", False),
                                       ("H100:x", False), ("", False)])
def test_gpu_strings(value, ok):
    if ok:
        assert cloud.parse_gpu(value) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            cloud.parse_gpu(value)


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
    assert args.secret == ["databricks-shallow"] and args.output_dir == f"checkpoints/{args.run_name}"
    named = parser.parse_args(["--run-name", "a", "--secret", "s1", "--secret", "s2"])
    named = cloud.finish_args(named, SHALLOWNET)
    assert (named.run_name, named.secret, named.output_dir) == ("a", ["s1", "s2"], "checkpoints/a")


def test_not_authenticated_is_one_line_and_exit_2(tmp_path):
    result = run_script("train_efficientvit.py", "--demo", env=no_modal_env(tmp_path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {cloud.NOT_AUTHENTICATED}"]
    assert "modal token new" in result.stderr and "MODAL_TOKEN_ID" in result.stderr


@pytest.mark.parametrize("flags, message", [(["--gpu", "X100"], "unknown GPU"),
                                             (["--timeout-hours", "30"], "must be in (0, 24]"),
                                             (["--run-name", "../up"], "letters, digits")])
def test_bad_flag_is_rejected_before_anything_is_sent(flags, message, tmp_path):
    # Fake credentials and an unroutable server: a launcher that contacted Modal would hang and fail later.
    env = no_modal_env(tmp_path, MODAL_TOKEN_ID="ak-x", MODAL_TOKEN_SECRET="as-x", MODAL_SERVER_URL="http://127.0.0.1:9")
    result = run_script("train.py", *flags, env=env, timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("raised, kind, words", [
    (modal.exception.AuthError("token rejected"), ConfigurationError, "modal token new"),
    (modal.exception.NotFoundError("Secret 'databricks-shallow' not found"), ConfigurationError,
     "modal secret create databricks-shallow"),
    (modal.exception.ConnectionError("Could not connect to the Modal server."), UserError,
     "cannot reach Modal"),
    (ConnectionRefusedError(111, "refused"), UserError, "cannot reach Modal"),
])
def test_modal_failures_become_one_line(raised, kind, words):
    with pytest.raises(kind, match=re.escape(words)):
        with cloud.modal_errors():
            raise raised


@pytest.mark.parametrize("error", [UserError("bad input"), ConfigurationError("no token"),
                                   TrainingInterrupted("interrupted (SIGTERM)", 15)])
def test_job_errors_survive_the_trip_back_from_the_container(error):
    back = pickle.loads(pickle.dumps(error))  # how Modal returns a remote exception
    assert (type(back), str(back), back.exit_code) == (type(error), str(error), error.exit_code)


def test_job_errors_pass_through_unchanged():
    with pytest.raises(UserError, match="^--resume x: no such"):
        with cloud.modal_errors():
            raise UserError("--resume x: no such checkpoint")


# ----------------------------------------------------------------------------- volumes
@pytest.fixture
def volumes(tmp_path, monkeypatch):
    """Temporary folders in place of the two volumes, as the job body sees them."""
    data, runs = tmp_path / "data-volume", tmp_path / "runs-volume"
    monkeypatch.setenv(cloud.DATA_MOUNT_ENV, str(data))
    monkeypatch.setenv(cloud.RUNS_MOUNT_ENV, str(runs))
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
    summary = script.train_remote.local(job_config(script, "shallow-a", "--epochs", "1"))
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


@pytest.mark.slow
@pytest.mark.filterwarnings(LOCAL_CALL)
def test_several_gpus_start_torchrun_inside_the_container(volumes, capfd):
    # --gpu T4:2 on the CPU: the same torchrun launch a 2-GPU container makes, with gloo instead of NCCL.
    script = load_script("train_efficientvit.py")
    config = job_config(script, "vit-2", "--epochs", "1", "--gpu", "T4:2", "--device", "cpu",
                        "--demo-samples", "24")
    summary = script.train_remote.local(config)
    out = capfd.readouterr()
    assert "starting 2 training processes" in out.out and "rank=0/2" in out.out
    run = volumes.runs / "vit-2"
    assert summary["best_checkpoint"] == str(run / "best_efficientvit_model.pt")
    assert (run / "best_efficientvit_model.onnx").is_file() and (run / "last_efficientvit_model.pt").is_file()


@pytest.mark.filterwarnings(LOCAL_CALL)
def test_resume_file_missing_from_the_volume_is_one_line(volumes):
    script = load_script("train_ellipse.py")
    with pytest.raises(UserError, match="--resume gone/last_ellipse_model.pt: no such checkpoint"):
        script.train_remote.local(job_config(script, "e1", "--resume", "gone/last_ellipse_model.pt"))


def test_hub_dataset_is_downloaded_once_into_the_volume(tmp_path):
    calls = []

    def download(repo, dest):
        calls.append(dest)
        (dest / "data").mkdir(parents=True)
        (dest / "data" / "train-00000-of-00001.parquet").write_bytes(b"rows")

    first = cloud.volume_dataset("team/eyes", tmp_path, "run-1", download=download)
    second = cloud.volume_dataset("team/eyes", tmp_path, "run-2", download=download)
    assert first == second == tmp_path / "datasets" / "team--eyes"
    assert len(calls) == 1 and calls[0] == tmp_path / ".staging" / "run-1"
    assert (first / "data" / "train-00000-of-00001.parquet").read_bytes() == b"rows"
    assert not (tmp_path / ".staging" / "run-1").exists()


def test_volume_download_takes_both_shard_layouts_from_the_hub(tmp_path):
    from common import hub
    from tests.hub_standin import RecordingHfApi

    api = RecordingHfApi(tmp_path / "hub")
    for name in ("data/train/shard_00000.parquet", "data/validation/shard_00000.parquet",  # older layout
                 "data/train-00000-of-00001.parquet", "manifest.json", "notes/extra.bin"):
        (api.repo_dir("team/old") / name).parent.mkdir(parents=True, exist_ok=True)
        (api.repo_dir("team/old") / name).write_bytes(b"x")
    def download(repo, dest):
        return hub.download_dataset(repo, dest, ["train", "validation"], api=api)

    path = cloud.volume_dataset("team/old", tmp_path / "volume", "r1", download=download)
    got = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert got == {"data/train/shard_00000.parquet", "data/validation/shard_00000.parquet",
                   "data/train-00000-of-00001.parquet", "manifest.json", ".complete.json"}


def test_a_run_that_loses_the_download_race_keeps_the_winners_copy(tmp_path):
    def slow_download(repo, dest):
        (dest / "data").mkdir(parents=True)
        (dest / "data" / "mine.parquet").write_bytes(b"loser")
        # Meanwhile another run completes the same dataset.
        cloud.volume_dataset(repo, tmp_path, "winner", download=lambda r, d: (d / "data").mkdir(parents=True)
                             or (d / "data" / "theirs.parquet").write_bytes(b"winner"))

    path = cloud.volume_dataset("team/eyes", tmp_path, "loser", download=slow_download)
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


# ----------------------------------------------------------------------------- ShallowNet --local
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
