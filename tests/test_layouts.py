"""Every dataset layout the original wrote, built as small parquet datasets, reads as precompute would.

Frames are 64x96 synthetic eyes, large enough for fitEllipse to fit real ellipses (not circles).
"Expected" is always ``preprocess.process_sample`` of the same raw frame and 4-class label: what our
precompute would have stored for it.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset

from common.errors import UserError
from common.prep import preprocess
from common.schema import dataset_card, dataset_features, shard_name
from common.train.data import ALL_TARGETS, ArrowBatches, load_splits, open_loaders
from common.train.layout import detect_layout
from common.train.tasks import EllipseTask, SegmentationTask
from tests.helpers import ROOT, run

HEIGHT, WIDTH = 64, 96
ROWS = {"train": 8, "validation": 4}


def raw_frames(split: str, count: int):
    """[(image (H, W) uint8 raw, label (H, W) uint8 OpenEDS classes)] with a visible pupil each."""
    from common.prep.synthetic import render_sample

    frames, seed = [], 0
    while len(frames) < count:
        image, label, _ = render_sample(np.random.default_rng([5, len(split), seed]), HEIGHT, WIDTH)
        seed += 1
        if (label == 3).sum() >= 6:  # a blink or a tiny sliver would make every target trivial
            frames.append((image, label))
    return frames


def expected_rows(split: str) -> list[dict]:
    return [preprocess.process_sample(image, label) for image, label in raw_frames(split, ROWS[split])]


def _flat(arrays, kind) -> pa.Array:
    return pa.array([np.asarray(a).ravel() for a in arrays], type=pa.list_(kind))


def write_original(root: Path, four_class: bool = False, targets: bool = True,
                   flag: dict | None = None) -> Path:
    """The original precompute's layout: data/{split}/shard_00000.parquet, flat lists, raw frames.

    ``four_class`` stores OpenEDS labels, with targets computed from the wrong mask (label > 0, the
    eye region), as a stale dataset might; ``flag`` adds a column such as {"image_preprocessed": True}.
    """
    for split, count in ROWS.items():
        frames = raw_frames(split, count)
        labels = [label if four_class else preprocess.binarize_pupil(label) for _, label in frames]
        masks = [(label > 0).astype(np.uint8) if four_class else label for label in labels]
        columns = {"image": _flat([image for image, _ in frames], pa.uint8()),
                   "label": _flat(labels, pa.uint8())}
        if targets:
            columns["spatial_weights"] = _flat([preprocess.spatial_weights(m) for m in masks], pa.float32())
            columns["dist_map"] = _flat([preprocess.distance_maps(m) for m in masks], pa.float32())
        columns["eye_mask"] = _flat([label > 0 for label in labels], pa.uint8())  # the original's extra
        columns["filename"] = pa.array([f"{split}_{i}" for i in range(count)])
        for name, value in (flag or {}).items():
            columns[name] = pa.array([value] * count)
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), root / "data" / split / "shard_00000.parquet")
    return root


def write_ours(root: Path) -> Path:
    """Our precompute's layout: data/{split}-00000-of-00001.parquet with Array2D features and a card."""
    features = dataset_features(HEIGHT, WIDTH)
    for split in ROWS:
        rows = expected_rows(split)
        for i, row in enumerate(rows):
            row["filename"] = f"{split}_{i}"
        columns = {name: [row[name] for row in rows] for name in features}
        (root / "data").mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(columns, features=features).to_parquet(str(root / "data" / shard_name(split, 0, 1)))
    (root / "README.md").write_text(dataset_card(sorted(ROWS), HEIGHT, WIDTH, "test"))
    return root


def batch_of(root: Path, tmp_path: Path, split: str = "validation", size=(HEIGHT, WIDTH), preprocessed="auto",
             targets=ALL_TARGETS):
    dataset = load_splits(root, tmp_path / "cache")
    layout = detect_layout(dataset, size, preprocessed, root)
    batches = ArrowBatches(dataset[split], layout, targets)
    return batches[list(range(len(batches)))], layout


def assert_matches_precompute(batch: dict, split: str, image_key: str = "image") -> None:
    rows = expected_rows(split)
    np.testing.assert_array_equal(batch["image"].numpy(), np.stack([r[image_key] for r in rows]))
    np.testing.assert_array_equal(batch["label"].numpy(), np.stack([r["label"] for r in rows]))
    if "spatial_weights" in batch:
        weights = np.stack([r["spatial_weights"] for r in rows])
        np.testing.assert_allclose(batch["spatial_weights"].numpy(), weights, rtol=0, atol=1e-6)
        # OpenCV's multi-threaded distance transform may differ in the last float32 bit between calls.
        np.testing.assert_allclose(batch["dist_map"].numpy(), np.stack([r["dist_map"] for r in rows]),
                                   rtol=0, atol=1e-6)
    if "ellipse" in batch:
        ellipse = np.array([[r["cx"], r["cy"], r["rx"], r["ry"]] for r in rows], np.float32)
        np.testing.assert_array_equal(batch["ellipse"].numpy(), ellipse)


@pytest.mark.parametrize("four_class", [False, True], ids=["binary", "4class"])
@pytest.mark.parametrize("targets", [True, False], ids=["targets", "no-targets"])
def test_original_layout_reads_as_precompute_would_write_it(four_class, targets, tmp_path):
    root = write_original(tmp_path / "original", four_class=four_class, targets=targets)
    batch, layout = batch_of(root, tmp_path)
    stored = ("spatial_weights", "dist_map") if targets else ()
    assert layout.flat_columns == ("image", "label", *stored)
    assert layout.image_size == (HEIGHT, WIDTH) and layout.four_class == four_class
    assert not layout.preprocessed and not layout.has_ellipse
    # stored targets are used only when they describe the 0/1 pupil mask
    assert layout.stored_targets == (("spatial_weights", "dist_map") if targets and not four_class else ())
    assert_matches_precompute(batch, "validation")
    assert batch["image"].dtype == torch.uint8 and batch["ellipse"].shape == (ROWS["validation"], 4)


def test_our_layout_reads_the_stored_rows(tmp_path):
    root = write_ours(tmp_path / "ours")
    batch, layout = batch_of(root, tmp_path, size=None)
    assert layout.flat_columns == () and layout.preprocessed and layout.has_ellipse and not layout.four_class
    assert layout.stored_targets == ("spatial_weights", "dist_map")
    assert layout.describe(ALL_TARGETS) == ("64x96 arrays, 0/1 labels, targets stored, ellipse stored, "
                                            "frames already gamma+CLAHE (preprocessed column is True)")
    assert_matches_precompute(batch, "validation")


def test_task_targets_choose_the_batch_keys(tmp_path):
    """A segmentation run never needs ellipse columns; the ellipse run fits them to the mask."""
    root = write_original(tmp_path / "original", four_class=True, targets=False)
    segmentation, layout = batch_of(root, tmp_path, targets=SegmentationTask.targets)
    assert set(segmentation) == {"image", "label", "spatial_weights", "dist_map"}
    ellipse, _ = batch_of(root, tmp_path, targets=EllipseTask.targets)
    assert set(ellipse) == {"image", "label", "ellipse"}
    assert_matches_precompute(ellipse, "validation")
    assert layout.describe(EllipseTask.targets) == (
        "flat lists (image, label) reshaped to 64x96, 4-class labels binarized (pupil = class 3), "
        "ellipse fitted to the mask, gamma+CLAHE applied at load (no preprocessed column)")
    assert "targets recomputed from the mask" in layout.describe(SegmentationTask.targets)


def test_frame_size_comes_from_the_manifest_or_card_without_size(tmp_path):
    root = write_original(tmp_path / "original")
    with pytest.raises(UserError, match=r"'image' holds 6144 values a row, but the frame size 400x640"):
        batch_of(root, tmp_path, size=None)  # nothing declares a size: OpenEDS' 400x640
    (root / "README.md").write_text(f"Frames are {HEIGHT}x{WIDTH} (H x W) uint8.\n")
    assert batch_of(root, tmp_path, size=None)[1].image_size == (HEIGHT, WIDTH)
    (root / "manifest.json").write_text(json.dumps({"image_size": [HEIGHT, WIDTH]}))
    (root / "README.md").unlink()
    assert batch_of(root, tmp_path, size=None)[1].image_size == (HEIGHT, WIDTH)


def test_a_wrong_frame_size_stops_with_one_line(tmp_path):
    root = write_original(tmp_path / "original")
    message = (r"column 'image' holds 6144 values a row, but the frame size 64x128 needs 8192 \(64x128\); "
               r"give the dataset's frame size with --size H W")
    with pytest.raises(UserError, match=message):
        batch_of(root, tmp_path, size=(64, 128))


def test_a_one_channel_dist_map_is_refused(tmp_path):
    root = write_original(tmp_path / "original")
    for path in root.glob("data/*/*.parquet"):
        table = pq.read_table(path)
        pupil = pa.array([row[HEIGHT * WIDTH:] for row in table.column("dist_map").to_pylist()],
                         type=pa.list_(pa.float32()))
        pq.write_table(table.set_column(table.schema.get_field_index("dist_map"), "dist_map", pupil), path)
    message = r"column 'dist_map' holds 6144 values a row, but the frame size 64x96 needs 12288 \(2x64x96\)"
    with pytest.raises(UserError, match=message):
        batch_of(root, tmp_path)


def test_size_that_contradicts_array2d_shapes_is_refused(tmp_path):
    root = write_ours(tmp_path / "ours")
    with pytest.raises(UserError, match="--size 96 64 does not match the dataset, whose 'image' column is"):
        batch_of(root, tmp_path, size=(96, 64))


def test_preprocessed_flag_is_read_and_can_be_overridden(tmp_path):
    root = write_original(tmp_path / "design", flag={"image_preprocessed": True})
    batch, layout = batch_of(root, tmp_path)
    assert layout.preprocessed and layout.preprocessed_from == "image_preprocessed column is True"
    raw = np.stack([image for image, _ in raw_frames("validation", ROWS["validation"])])
    np.testing.assert_array_equal(batch["image"].numpy(), raw)  # trusted: no second gamma + CLAHE
    batch, layout = batch_of(root, tmp_path, preprocessed="no")  # the flag is wrong: enhance at load
    assert layout.preprocessed_from == "--preprocessed no"
    assert_matches_precompute(batch, "validation")
    ours = write_ours(tmp_path / "ours")
    batch, layout = batch_of(ours, tmp_path, size=None, preprocessed="no")
    enhanced = np.stack([preprocess.enhance_frame(r["image"]) for r in expected_rows("validation")])
    np.testing.assert_array_equal(batch["image"].numpy(), enhanced)
    batch, layout = batch_of(write_original(tmp_path / "plain"), tmp_path, preprocessed="yes")
    np.testing.assert_array_equal(batch["image"].numpy(), raw)


def test_four_class_is_decided_once_for_the_dataset(tmp_path):
    """A split whose labels happen to hold only 0 and 1 (sclera) still holds OpenEDS classes."""
    root = write_original(tmp_path / "original", four_class=True)
    path = root / "data" / "train" / "shard_00000.parquet"
    table = pq.read_table(path)
    labels = [np.minimum(np.asarray(row, np.uint8), 1) for row in table.column("label").to_pylist()]
    pq.write_table(table.set_column(1, "label", _flat(labels, pa.uint8())), path)
    dataset = load_splits(root, tmp_path / "cache")
    layout = detect_layout(dataset, (HEIGHT, WIDTH))
    assert layout.four_class
    first = ArrowBatches(dataset["train"], layout)[[0, 1, 2, 3]]
    assert first["label"].sum() == 0  # class 1 is sclera: no pupil in these rows
    assert first["spatial_weights"].abs().sum() == 0 and first["ellipse"].abs().sum() == 0


def test_labels_beyond_the_openeds_classes_are_refused(tmp_path):
    root = write_original(tmp_path / "original")
    for path in root.glob("data/*/*.parquet"):
        table = pq.read_table(path)
        masks = [np.asarray(row, np.uint8) * 255 for row in table.column("label").to_pylist()]
        pq.write_table(table.set_column(1, "label", _flat(masks, pa.uint8())), path)
    with pytest.raises(UserError, match="labels go up to 255; expected 0/1 pupil masks or OpenEDS classes"):
        batch_of(root, tmp_path)


def test_open_loaders_takes_the_script_flags(tmp_path):
    from train_ellipse_local import get_args_parser

    root = write_original(tmp_path / "original", four_class=True)
    args = get_args_parser().parse_args(["--dataset", str(root), "--size", str(HEIGHT), str(WIDTH),
                                         "--preprocessed", "yes", "--data-dir", str(tmp_path / "cache"),
                                         "--batch-size", "4", "--num-workers", "0"])
    loaders, source = open_loaders(args, EllipseTask.targets, pin_memory=False)
    assert source == root and loaders.image_size == (HEIGHT, WIDTH)
    assert loaders.train.dataset.layout is loaders.valid.dataset.layout  # one decision for both splits
    assert loaders.layout.preprocessed and loaders.layout.four_class
    batch = next(iter(loaders.valid))
    assert set(batch) == {"image", "label", "ellipse"} and batch["image"].shape == (4, HEIGHT, WIDTH)
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--preprocessed", "maybe"])


def run_script(script: str, root: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, ROOT / script, "--dataset", root, "--epochs", "1", "--batch-size", "4",
               "--num-workers", "0", "--data-dir", tmp_path / "cache",
               "--output-dir", tmp_path / f"out-{script}", *extra]
    return run(command)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_efficientvit_tiny_local.py", "train_ellipse_local.py"])
def test_training_runs_on_the_original_layout(script, tmp_path):
    root = write_original(tmp_path / "original", four_class=True)
    result = run_script(script, root, tmp_path, "--size", str(HEIGHT), str(WIDTH))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    layout_line = next(line for line in result.stdout.splitlines() if line.startswith("data layout: "))
    assert "reshaped to 64x96, 4-class labels binarized" in layout_line
    assert "gamma+CLAHE applied at load" in layout_line
    assert "final validation mIoU" in result.stdout


@pytest.mark.slow
def test_wrong_size_in_a_script_is_one_error_line(tmp_path):
    root = write_original(tmp_path / "original")
    result = run_script("train_efficientvit_tiny_local.py", root, tmp_path, "--size", "64", "128")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: column 'image' holds 6144 values a row, but the frame size 64x128 needs 8192 "
                      "(64x128); give the dataset's frame size with --size H W"]


@pytest.mark.parametrize("changes, targets, workers", [
    ({}, ALL_TARGETS, 0),                                          # stored rows only: read in-process
    ({"preprocessed": False}, ALL_TARGETS, 2),                     # gamma + CLAHE per frame
    ({"four_class": True}, ALL_TARGETS, 2),                        # labels binarized, targets recomputed
    ({"stored_targets": ("dist_map",)}, ALL_TARGETS, 2),           # spatial weights computed
    ({"stored_targets": ("dist_map",)}, EllipseTask.targets, 0),   # ... but an ellipse run needs none
    ({"has_ellipse": False}, EllipseTask.targets, 2),              # ellipse fitted per frame
])
def test_auto_worker_count_follows_the_work_at_load_time(changes, targets, workers):
    from dataclasses import replace
    from types import SimpleNamespace

    from common.train.data import loader_workers
    from common.train.layout import DatasetLayout

    stored = DatasetLayout(image_size=(32, 48), flat_columns=(), preprocessed=True,
                           preprocessed_from="column", four_class=False, has_ellipse=True,
                           stored_targets=("spatial_weights", "dist_map"))
    layout = replace(stored, **changes)
    assert loader_workers(SimpleNamespace(num_workers=None), layout, targets) == workers
    assert loader_workers(SimpleNamespace(num_workers=3), layout, targets) == 3  # given: used as is
