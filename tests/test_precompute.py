"""precompute.py end to end on synthetic raw data, plus resume, validation, bad input and credentials."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fnmatch import fnmatchcase
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

import precompute
from common.prep import hub, preprocess
from common.schema import dataset_features, split_of_shard, split_shard_pattern
from tests.helpers import ROOT, load_output
from tests.hub_standin import RecordingHfApi


def run_cli(*args, env=None, cwd=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "precompute.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def synthetic40(tmp_path_factory):
    base = tmp_path_factory.mktemp("pre40")
    raw, out = base / "raw", base / "out"
    result = run_cli("--synthetic", 40, "--no-push", "--raw-dir", raw, "--output-dir", out,
                     "--shard-size", 8, "--workers", 2)
    assert result.returncode == 0, result.stderr
    return raw, out, result


@pytest.mark.slow
def test_synthetic_end_to_end_schema_and_values(synthetic40):
    raw, out, result = synthetic40
    dataset = load_output(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(dataset) == {"train", "validation"}
    for split, ds in dataset.items():
        assert ds.features == dataset_features(400, 640)
        assert ds.num_rows == manifest["splits"][split]["rows"] > 0
    rows = dataset["train"].with_format("numpy")[:3]
    raw_dir = raw / "train"
    for i, name in enumerate(rows["filename"]):
        image = cv2.imread(str(raw_dir / "images" / name), cv2.IMREAD_UNCHANGED)
        label = np.load(raw_dir / "labels" / f"{Path(name).stem}.npy")
        np.testing.assert_array_equal(rows["image"][i], preprocess.enhance_frame(image))
        np.testing.assert_array_equal(rows["label"][i], preprocess.binarize_pupil(label))
        fit = preprocess.fit_ellipse(preprocess.binarize_pupil(label))
        assert rows["cx"][i] == pytest.approx(fit.cx, abs=1e-6)
        assert rows["angle"][i] == pytest.approx(fit.angle, abs=1e-4)
        assert rows["dist_map"][i].shape == (2, 400, 640) and bool(rows["preprocessed"][i])
    assert manifest["options"]["preprocessing"]["gamma"] == 0.8
    assert {"numpy", "opencv", "datasets", "pyarrow"} <= set(manifest["versions"])
    total_raw = sum(len(list((raw / s / "images").glob("*.png"))) for s in ("train", "validation"))
    counted = sum(v["rows"] + v["skipped"] for v in manifest["splits"].values())
    assert counted == total_raw
    assert all(s["reason"] == "empty pupil mask" for s in manifest["skipped"])  # synthetic blinks
    assert "throughput" in result.stdout


@pytest.mark.slow
def test_rerun_skips_complete_shards(synthetic40, tmp_path):
    raw, out, _ = synthetic40
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (copy / "data").iterdir()}
    result = run_cli("--synthetic", 40, "--no-push", "--raw-dir", raw, "--output-dir", copy,
                     "--shard-size", 8)
    assert result.returncode == 0, result.stderr
    assert "0 shards written" in result.stdout
    assert "generating" not in result.stdout  # the raw data of the same --synthetic run is reused
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (copy / "data").iterdir()}


@pytest.mark.slow
def test_adding_a_split_leaves_existing_shards_alone(synthetic40, tmp_path):
    raw, _, _ = synthetic40
    out = tmp_path / "out"
    common = ("--skip-download", "--raw-dir", raw, "--output-dir", out, "--no-push", "--shard-size", 8)
    assert run_cli(*common, "--splits", "train").returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    result = run_cli(*common, "--splits", "validation")
    assert result.returncode == 0, result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    assert all(after[name] == mtime for name, mtime in before.items())
    assert any(name.startswith("validation-") for name in after)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "validation"}
    assert set(load_output(out)) == {"train", "validation"}


@pytest.mark.slow
def test_validate_passes_then_fails_on_tampered_shard(synthetic40, tmp_path):
    raw, out, _ = synthetic40
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    args = ("--validate", "--skip-download", "--raw-dir", raw, "--output-dir", copy, "--validate-samples", 50)
    good = run_cli(*args)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "all checked rows match" in good.stdout
    _tamper_cx(sorted((copy / "data").glob("train-*.parquet"))[0])
    bad = run_cli(*args)
    assert bad.returncode != 0
    assert "MISMATCH" in bad.stdout and "validation failed" in bad.stderr
    assert "Traceback" not in bad.stderr


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_resume_after_kill_minus_9(synthetic40, tmp_path):
    raw, _, _ = synthetic40
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "precompute.py"), "--skip-download", "--raw-dir", str(raw),
            "--output-dir", str(out), "--no-push", "--shard-size", 4, "--workers", 1]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: len(list((out / "data").glob("train-*.parquet"))) >= 2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {p.name for p in (out / "data").glob("train-*.parquet")}
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    for shard in done_before:  # every shard a loader would pick up is complete and readable
        assert pq.read_table(out / "data" / shard).num_rows > 0
    partial = load_output(None, data_files=str(out / "data" / "train-*.parquet"))["train"]
    assert partial.num_rows == sum(pq.read_metadata(out / "data" / s).num_rows for s in done_before)
    result = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"{len(done_before)} already complete" in result.stdout
    assert not list((out / "data").glob(".tmp-*"))
    manifest = json.loads((out / "manifest.json").read_text())
    reference = json.loads((synthetic40[1] / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == reference["splits"]["train"]["rows"]
    assert load_output(out)["train"].num_rows == reference["splits"]["train"]["rows"]


def _write_sample(root, split, name, image, label):
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "labels").mkdir(parents=True, exist_ok=True)
    if image is not None:
        cv2.imwrite(str(root / split / "images" / f"{name}.png"), image)
    if label is not None:
        np.save(root / split / "labels" / f"{name}.npy", label)


def _good_pair(height=400, width=640):
    label = np.zeros((height, width), np.uint8)
    label[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 2
    label |= preprocess.draw_ellipse(preprocess.Ellipse(0.5, 0.5, 0.04, 0.06, 0), height, width) * 3
    image = np.full((height, width), 150, np.uint8)
    image[label == 3] = 20
    return image, label


@pytest.mark.slow
def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    image, label = _good_pair()
    _write_sample(raw, "train", "good", image, label)
    _write_sample(raw, "train", "missing_label", image, None)
    _write_sample(raw, "train", "wrong_shape", image[:200], label[:200])
    _write_sample(raw, "train", "wrong_dtype", image.astype(np.uint16) * 200, label)
    _write_sample(raw, "train", "bad_classes", image, np.where(label == 2, 7, label).astype(np.uint8))
    _write_sample(raw, "train", "rgb", cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), label)
    (raw / "train" / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run_cli("--skip-download", "--raw-dir", raw, "--output-dir", out, "--no-push",
                     "--splits", "train")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert manifest["splits"]["train"]["rows"] == 1
    assert reasons["missing_label.png"] == "label file missing"
    assert "shape (200, 640)" in reasons["wrong_shape.png"]
    assert "uint16" in reasons["wrong_dtype.png"]
    assert "0..7" in reasons["bad_classes.png"]
    assert "3 channels" in reasons["rgb.png"]
    assert "corrupt" in reasons["corrupt.png"]


@pytest.mark.slow
def test_all_skipped_stops_with_a_useful_error(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for i in range(3):
        _write_sample(raw, "train", f"s{i}", *_good_pair(480, 640))
    result = run_cli("--skip-download", "--raw-dir", raw, "--output-dir", out, "--no-push",
                     "--splits", "train")
    assert result.returncode != 0
    assert "all 3 samples of split 'train' were skipped" in result.stderr
    assert "(480, 640)" in result.stderr and "--size" in result.stderr and "--letterbox" in result.stderr
    assert "Traceback" not in result.stderr
    fixed = run_cli("--skip-download", "--raw-dir", raw, "--output-dir", out, "--no-push",
                    "--splits", "train", "--letterbox")
    assert fixed.returncode == 0, fixed.stderr
    assert "train: 3 rows" in fixed.stdout


def _no_credentials_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE", "HF_"))}
    env.update(HOME=str(tmp_path), KAGGLE_CONFIG_DIR=str(tmp_path / "kaggle"), HF_HOME=str(tmp_path / "hf"))
    return env


@pytest.mark.slow
def test_missing_kaggle_credentials_exit_2_before_work(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "precompute.py"), "--no-push", "--raw-dir",
                             str(tmp_path / "raw"), "--output-dir", str(out)],
                            capture_output=True, text=True, env=_no_credentials_env(tmp_path), timeout=120)
    assert result.returncode == 2
    for needle in ("~/.kaggle/kaggle.json", "KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "raw").exists()


@pytest.mark.slow
def test_missing_hf_token_exit_2_before_work(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "precompute.py"), "--synthetic", "4", "--raw-dir",
                             str(tmp_path / "raw"), "--output-dir", str(out)],
                            capture_output=True, text=True, env=_no_credentials_env(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "HF_TOKEN" in result.stderr and "--no-push" in result.stderr
    assert not out.exists() and not (tmp_path / "raw").exists()


@pytest.mark.slow
def test_push_uploads_folder_with_retry(synthetic40, tmp_path, monkeypatch, capsys):
    raw, out, _ = synthetic40
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    api = RecordingHfApi()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(hub, "make_hub_api", lambda token: api)
    monkeypatch.setattr("common.files.time.sleep", lambda seconds: None)
    args = precompute.get_args_parser().parse_args(
        ["--synthetic", "40", "--raw-dir", str(raw), "--output-dir", str(copy), "--hf-repo", "team/eyes",
         "--shard-size", "8"])
    precompute.main(args)
    kinds = [call[0] for call in api.calls]
    assert kinds == ["create_repo", "upload_folder", "upload_folder"]  # one transient failure retried
    create_kwargs = api.calls[0][2]
    assert create_kwargs == {"repo_type": "dataset", "exist_ok": True}
    upload = api.calls[-1][2]
    assert upload["repo_type"] == "dataset" and Path(upload["folder_path"]) == copy
    assert ".shards/*" in upload["ignore_patterns"]
    assert upload["delete_patterns"] == [split_shard_pattern("train"), split_shard_pattern("validation")]
    assert "manifest.json" in api.uploaded and any(f.startswith("data/train-") for f in api.uploaded)
    assert "pushed to team/eyes" in capsys.readouterr().out


@pytest.mark.parametrize("path, split", [
    ("data/train-00002-of-00003.parquet", "train"),  # datasets 4 push_to_hub, and ours
    ("data/train-00000-of-00001-5b3a2d1e0f9c8a7b.parquet", "train"),  # older push_to_hub
    ("data/validation-00000-of-00002.parquet", "validation"),
    ("data/train.clean-00000-of-00001.parquet", "train.clean"),
])
def test_shard_patterns_match_only_their_split(path, split):
    matches = [s for s in ("train", "validation", "train.clean") if fnmatchcase(path, split_shard_pattern(s))]
    assert matches == [split]
    others = ("README.md", "manifest.json", "data/x-train-00000-of-00001.parquet", f"data/{split}.parquet")
    assert not [other for other in others if fnmatchcase(other, split_shard_pattern(split))]


def test_split_of_shard_reads_our_shard_names():
    assert split_of_shard("validation-00001-of-00002.parquet") == "validation"
    assert split_of_shard(".tmp-123-train-00000-of-00001.parquet") is None  # a writer's temporary
    assert split_of_shard("other.parquet") is None


def _push(raw, out, api, shard_size, repo="team/eyes"):
    args = precompute.get_args_parser().parse_args(
        ["--skip-download", "--raw-dir", str(raw), "--output-dir", str(out), "--hf-repo", repo,
         "--shard-size", str(shard_size), "--workers", "1"])
    precompute.main(args)
    return {f for f in api.remote_files(repo) if f.startswith("data/")}


@pytest.mark.slow
def test_push_with_fewer_shards_removes_the_stale_ones(synthetic40, tmp_path, monkeypatch):
    raw, out, _ = synthetic40
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    api = RecordingHfApi(tmp_path / "hub", failures_left=0)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(hub, "make_hub_api", lambda token: api)
    remote = api.repo_dir("team/eyes")
    (remote / "data").mkdir(parents=True)
    foreign = ["data/test-00000-of-00001.parquet", "notes.txt", ".gitattributes"]  # not ours to delete
    for name in foreign:
        shutil.copyfile(next((copy / "data").glob("validation-*.parquet")), remote / name)
    first = _push(raw, copy, api, shard_size=8)
    assert len([f for f in first if f.startswith("data/train-")]) == 4
    second = _push(raw, copy, api, shard_size=16)
    local = {f"data/{p.name}" for p in (copy / "data").glob("*.parquet")}
    assert {f for f in second if f.startswith("data/train-")} == {"data/train-00000-of-00002.parquet",
                                                                  "data/train-00001-of-00002.parquet"}
    assert second == local | {"data/test-00000-of-00001.parquet"}
    assert set(foreign) <= api.remote_files("team/eyes")
    manifest = json.loads((copy / "manifest.json").read_text())
    served = load_output(remote)  # what a user of the Hub dataset gets: each row once
    assert {split: ds.num_rows for split, ds in served.items()} == {
        split: counts["rows"] for split, counts in manifest["splits"].items()}


def _tamper_cx(shard):
    table = pq.read_table(shard)
    cx = table.column("cx").to_numpy().copy()
    cx[0] += 0.01  # 6.4 px: a silent corruption of one ellipse target
    pq.write_table(table.set_column(table.schema.get_field_index("cx"), "cx", [cx.astype(np.float32)]), shard)


@pytest.mark.slow
def test_validate_with_explicit_hf_repo_checks_the_hub_copy(synthetic40, tmp_path, monkeypatch, capsys):
    raw, out, _ = synthetic40
    api = RecordingHfApi(tmp_path / "hub")
    shutil.copytree(out, api.repo_dir("team/eyes"), ignore=shutil.ignore_patterns(".shards"))
    local = tmp_path / "local"  # a broken local output that happens to exist
    shutil.copytree(out, local)
    _tamper_cx(sorted((local / "data").glob("train-*.parquet"))[0])
    monkeypatch.setattr(hub, "make_hub_api", lambda token: api)
    common = ["--validate", "--skip-download", "--raw-dir", str(raw), "--output-dir", str(local),
              "--validate-samples", "50"]
    precompute.main(precompute.get_args_parser().parse_args(common + ["--hf-repo", "team/eyes"]))
    stdout = capsys.readouterr().out
    assert "validated team/eyes (Hub)" in stdout and "all checked rows match" in stdout
    assert [call[:2] for call in api.calls] == [("snapshot_download", "team/eyes")]
    with pytest.raises(SystemExit) as failed:  # without --hf-repo the local folder is checked
        precompute.main(precompute.get_args_parser().parse_args(common))
    assert failed.value.code == 1
    captured = capsys.readouterr()
    assert f"validated {local}" in captured.out and "MISMATCH" in captured.out
    assert "validation failed" in captured.err
    assert len(api.calls) == 1


@pytest.mark.slow
def test_validate_of_a_missing_hub_repo_is_one_clean_error(synthetic40, tmp_path, monkeypatch, capsys):
    raw, _, _ = synthetic40
    api = RecordingHfApi(tmp_path / "hub")
    monkeypatch.setattr(hub, "make_hub_api", lambda token: api)
    monkeypatch.setattr("common.files.time.sleep", lambda seconds: None)
    args = precompute.get_args_parser().parse_args(
        ["--validate", "--skip-download", "--raw-dir", str(raw), "--output-dir", str(tmp_path / "none"),
         "--hf-repo", "team/missing"])
    with pytest.raises(SystemExit) as failed:
        precompute.main(args)
    assert failed.value.code == 1
    assert "could not download dataset team/missing from the Hub" in capsys.readouterr().err


def test_kaggle_download_finds_nested_splits(tmp_path, monkeypatch):
    """The Kaggle client cannot run here: a stand-in module writes a nested mirror layout."""
    calls = []

    class FakeApi:
        def dataset_download_files(self, dataset, path, unzip, quiet):
            calls.append((dataset, unzip))
            if len(calls) == 1:
                raise ConnectionError("transient network error")
            image, label = _good_pair()
            nested = Path(path) / "openEDS" / "openEDS"
            _write_sample(nested, "train", "000001", image, label)
            _write_sample(nested, "validation", "000002", image, label)

    monkeypatch.setitem(sys.modules, "kaggle", type(sys)("kaggle"))
    sys.modules["kaggle"].api = FakeApi()
    monkeypatch.setenv("KAGGLE_USERNAME", "user")
    monkeypatch.setenv("KAGGLE_KEY", "key")
    monkeypatch.setattr("common.files.time.sleep", lambda seconds: None)
    out = tmp_path / "out"
    args = precompute.get_args_parser().parse_args(
        ["--no-push", "--raw-dir", str(tmp_path / "raw"), "--output-dir", str(out)])
    precompute.main(args)
    assert calls == [("soumicksarker/openeds-dataset", True)] * 2
    assert set(load_output(out)) == {"train", "validation"}
