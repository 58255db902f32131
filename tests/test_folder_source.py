"""Importing a user's labelled folder or CVAT export: masks, splits, sizes and errors."""

import cv2
import numpy as np
import pytest

from common.prep.folder_source import (
    FolderImportError,
    FolderSample,
    discover_folder,
    find_positives,
    load_folder_sample,
    make_or_load_splits,
    mask_to_pupil,
    stratified_split,
)
from common.prep.preprocess import (
    Ellipse,
    Letterbox,
    SkipSample,
    draw_ellipse,
    ellipse_from_pixels,
    ellipse_to_pixels,
    fit_ellipse,
    process_sample,
    unletterbox_ellipse,
)
from tests.helpers import in_order_of

H, W = 96, 128
PUPIL = Ellipse(0.5, 0.5, 0.24, 0.24, 10.0)  # 19 x 19 px semi-axes in a 96x128 frame (R = 80)
PUPIL_RGB = (250, 50, 83)


def gray_image(h=H, w=W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def write_folder(root, masks: dict, h=H, w=W, ext=".png"):
    """DIR/images/<stem><ext> (random grey) and DIR/masks/<stem>.png for each given mask (None: no mask)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (stem, mask) in enumerate(masks.items()):
        cv2.imwrite(str(root / "images" / f"{stem}{ext}"), gray_image(h, w, seed=i))
        if mask is not None:
            cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    return root


def write_cvat(root, colour_masks: dict, labels: str):
    """A CVAT segmentation export; colour masks are given in RGB and stored as cv2 does (BGR)."""
    for sub in ("JPEGImages", "SegmentationClass"):
        (root / sub).mkdir(parents=True)
    (root / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + labels)
    for i, (stem, rgb) in enumerate(colour_masks.items()):
        cv2.imwrite(str(root / "JPEGImages" / f"{stem}.png"), gray_image(seed=i))
        cv2.imwrite(str(root / "SegmentationClass" / f"{stem}.png"), np.ascontiguousarray(rgb[:, :, ::-1]))
    return root


# ----------------------------------------------------------------------------- mask values
@pytest.mark.parametrize("values, pupil_class, expected", [
    ([[0, 255], [255, 0]], None, [[0, 1], [1, 0]]),
    ([[0, 1], [0, 0]], None, [[0, 1], [0, 0]]),
    ([[0, 1], [2, 3]], 3, [[0, 0], [0, 1]]),
    ([[0, 1], [2, 3]], 1, [[0, 1], [0, 0]]),
    ([[0, 0], [0, 0]], None, [[0, 0], [0, 0]]),
])
def test_mask_to_pupil(values, pupil_class, expected):
    result = mask_to_pupil(np.array(values, np.uint8), pupil_class)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, np.array(expected, np.uint8))


def test_mask_to_pupil_ambiguous_values_ask_for_pupil_class():
    with pytest.raises(FolderImportError, match="--pupil-class"):
        mask_to_pupil(np.array([[0, 1], [2, 3]], np.uint8))


# ----------------------------------------------------------------------------- folder layout
@pytest.mark.parametrize("scale", [255, 1])
def test_folder_binary_masks_round_trip(tmp_path, scale):
    pupil = draw_ellipse(PUPIL, H, W)
    root = write_folder(tmp_path / "d", {"a": pupil * scale, "b": np.zeros((H, W), np.uint8)})
    dataset = discover_folder(root)
    assert [s.name for s in dataset.samples] == ["a.png", "b.png"]
    assert dataset.mask_format.kind == "folder"
    assert find_positives(dataset) == {"a.png"}
    image, mask, info = load_folder_sample(dataset.samples[0], dataset.mask_format, size=(H, W))
    np.testing.assert_array_equal(mask, pupil)
    np.testing.assert_array_equal(image, gray_image(seed=0))
    assert info == {"orig_h": H, "orig_w": W, "scale": 1.0, "pad_top": 0, "pad_left": 0, "out_h": H,
                    "out_w": W}


def test_folder_class_index_masks_with_pupil_class(tmp_path):
    pupil = draw_ellipse(PUPIL, H, W)
    label = np.ones((H, W), np.uint8)  # 1 = iris everywhere, 2 = pupil
    label[pupil == 1] = 2
    root = write_folder(tmp_path / "d", {"a": label})
    with pytest.raises(FolderImportError, match=r"a\.png.*--pupil-class"):
        load_folder_sample(*_first(discover_folder(root)), size=(H, W))
    _, mask, _ = load_folder_sample(*_first(discover_folder(root, pupil_class=2)), size=(H, W))
    np.testing.assert_array_equal(mask, pupil)


def _first(dataset):
    return dataset.samples[0], dataset.mask_format


def test_colour_image_is_converted_to_grayscale(tmp_path):
    root = write_folder(tmp_path / "d", {"a": draw_ellipse(PUPIL, H, W) * 255})
    colour = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "images" / "a.png"), colour)
    image, _, _ = load_folder_sample(*_first(discover_folder(root)), size=(H, W))
    assert image.shape == (H, W)
    np.testing.assert_array_equal(image, cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))


def test_image_without_mask_is_empty_skipped_or_kept(tmp_path):
    root = write_folder(tmp_path / "d", {"a": None})
    image, mask, _ = load_folder_sample(*_first(discover_folder(root)), size=(H, W))
    assert mask.shape == (H, W) and not mask.any()
    with pytest.raises(SkipSample, match="empty pupil mask"):
        process_sample(image, mask, (H, W), pupil_class=1)
    row = process_sample(image, mask, (H, W), pupil_class=1, keep_empty=True)
    assert not row["label"].any() and row["rx"] == 0.0


def test_mask_size_mismatch_names_file_and_sizes(tmp_path):
    root = write_folder(tmp_path / "d", {"a": np.zeros((80, W), np.uint8)})
    with pytest.raises(FolderImportError, match=r"a\.png.*80x128.*96x128"):
        load_folder_sample(*_first(discover_folder(root)), size=(H, W))


def test_mask_without_image_is_an_error(tmp_path):
    root = write_folder(tmp_path / "d", {"a": None})
    cv2.imwrite(str(root / "masks" / "ghost.png"), np.zeros((H, W), np.uint8))
    with pytest.raises(FolderImportError, match="ghost"):
        discover_folder(root)


# ----------------------------------------------------------------------------- CVAT layout
LABELS = "background:0,0,0::\nPupil:250,50,83::\niris:10,200,30::\n"


def cvat_mask(pupil01):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[20:80, 30:100] = (10, 200, 30)  # iris
    rgb[pupil01 == 1] = PUPIL_RGB
    return rgb


def test_cvat_export_pupil_from_labelmap_colour(tmp_path):
    pupil = draw_ellipse(PUPIL, H, W)
    root = write_cvat(tmp_path / "c", {"x": cvat_mask(pupil)}, LABELS)
    dataset = discover_folder(root, label="pupil")
    assert dataset.mask_format.kind == "cvat" and dataset.mask_format.pupil_colour == PUPIL_RGB
    _, mask, _ = load_folder_sample(*_first(dataset), size=(H, W))
    np.testing.assert_array_equal(mask, pupil)


def test_cvat_unknown_colour_names_file_and_colour(tmp_path):
    rgb = cvat_mask(draw_ellipse(PUPIL, H, W))
    rgb[0, 0] = (1, 2, 3)
    root = write_cvat(tmp_path / "c", {"x": rgb}, LABELS)
    with pytest.raises(FolderImportError, match=r"x\.png.*\(1,2,3\)"):
        load_folder_sample(*_first(discover_folder(root)), size=(H, W))


def test_cvat_missing_label_lists_labels(tmp_path):
    root = write_cvat(tmp_path / "c", {"x": cvat_mask(draw_ellipse(PUPIL, H, W))}, "background:0,0,0::\n")
    with pytest.raises(FolderImportError, match="no label 'pupil'.*background"):
        discover_folder(root)


# ----------------------------------------------------------------------------- splits
def fake_samples(n):
    return [FolderSample(None, f"s{i:03d}.png", f"/nowhere/s{i:03d}.png", None) for i in range(n)]


def test_existing_split_files_are_used_as_they_are(tmp_path):
    samples = fake_samples(4)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("s000\ns002\n")
    (tmp_path / "splits" / "val.txt").write_text("s001\n\ns003\n")
    splits = make_or_load_splits(tmp_path, samples, positives={"s000.png", "s001.png"})
    assert [s.name for s in splits["train"]] == ["s000.png", "s002.png"]
    assert [s.name for s in splits["validation"]] == ["s001.png", "s003.png"]
    assert {s.split for s in splits["validation"]} == {"validation"}


def test_split_file_stem_missing_on_disk(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("s000\n")
    (tmp_path / "splits" / "val.txt").write_text("lost_frame\n")
    with pytest.raises(FolderImportError, match=r"val\.txt.*lost_frame"):
        make_or_load_splits(tmp_path, fake_samples(2), positives={"s000.png"})


def test_no_positive_samples_in_validation_split(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("s000\n")
    (tmp_path / "splits" / "val.txt").write_text("s001\n")
    with pytest.raises(FolderImportError, match="No positive samples in validation split"):
        make_or_load_splits(tmp_path, fake_samples(2), positives={"s000.png"})


def test_single_positive_stays_in_train_so_validation_has_none(tmp_path):
    with pytest.raises(FolderImportError, match="No positive samples in validation split"):
        make_or_load_splits(tmp_path, fake_samples(30), positives={"s005.png"})


@pytest.mark.parametrize("n_pos, n_neg, val_pos, val_neg", [
    (300, 100, 30, 10),  # 10% of each
    (50, 150, 10, 15),  # min_val_pos lifts 5 to 10
    (5, 20, 4, 2),  # min_val_pos capped so train keeps one positive
    (25, 5, 10, 1),  # 10% of 5 negatives = 0.5, rounded half up to 1
])
def test_stratified_split_counts(n_pos, n_neg, val_pos, val_neg):
    names = [f"p{i}" for i in range(n_pos)] + [f"n{i}" for i in range(n_neg)]
    positives = {f"p{i}" for i in range(n_pos)}
    train, val = stratified_split(names, positives)
    assert sum(v in positives for v in val) == val_pos
    assert len(val) - val_pos == val_neg
    assert sorted(train + val) == sorted(names) and not set(train) & set(val)


def test_stratified_split_is_seeded():
    names = [f"s{i}" for i in range(100)]
    positives = set(names[:60])
    assert stratified_split(names, positives, seed=0) == stratified_split(names, positives, seed=0)
    assert stratified_split(names, positives, seed=0) != stratified_split(names, positives, seed=1)


def test_generated_split_is_written_and_reused(tmp_path):
    samples = fake_samples(40)
    positives = {s.name for s in samples[:30]}
    splits = make_or_load_splits(tmp_path, samples, positives, seed=3)
    val_stems = [s.stem for s in splits["validation"]]
    assert len(val_stems) == 10 + 1  # max(3, 10) positives + round(1.0) negatives
    assert (tmp_path / "splits" / "val.txt").read_text() == "".join(f"{s}\n" for s in val_stems)
    train_stems = (tmp_path / "splits" / "train.txt").read_text().split()
    assert train_stems == [s.stem for s in splits["train"]] and len(train_stems) == 29
    # a rerun with another seed reads the files instead of splitting again
    again = make_or_load_splits(tmp_path, samples, positives, seed=4)
    assert [s.stem for s in again["validation"]] == val_stems


# ----------------------------------------------------------------------------- size
@pytest.mark.parametrize("orig, pad", [((480, 480), (0, 120)), ((240, 960), (120, 0))])
def test_letterbox_ellipse_round_trip(tmp_path, orig, pad):
    h, w = orig
    truth = ellipse_from_pixels((0.45 * w, 0.55 * h), (60.0, 40.0), 20.0, h, w)
    root = write_folder(tmp_path / "d", {"a": draw_ellipse(truth, h, w) * 255}, h=h, w=w, ext=".jpg")
    image, mask, info = load_folder_sample(*_first(discover_folder(root)), size=(400, 640))
    assert image.shape == mask.shape == (400, 640)
    assert (info["pad_top"], info["pad_left"]) == pad
    assert not image[: pad[0]].any() and not image[:, : pad[1]].any()  # zero padding
    back = unletterbox_ellipse(fit_ellipse(mask), Letterbox(**info))
    (x, y), (a, b), angle = ellipse_to_pixels(back, h, w)
    (tx, ty), (ta, tb), tangle = ellipse_to_pixels(truth, h, w)
    a, b, angle = in_order_of(ta, tb, a, b, angle)
    assert abs(x - tx) < 1.5 and abs(y - ty) < 1.5
    assert abs(a - ta) < 1.5 and abs(b - tb) < 1.5
    assert abs(angle - tangle) < 1.0


def test_native_size_needs_multiples_of_16(tmp_path):
    root = write_folder(tmp_path / "ok", {"a": None})
    image, _, info = load_folder_sample(*_first(discover_folder(root)), size=None)
    assert image.shape == (H, W) and info["scale"] == 1.0
    bad = write_folder(tmp_path / "bad", {"a": None}, h=100)
    with pytest.raises(FolderImportError, match=r"a\.png.*100x128.*multiple of 16"):
        load_folder_sample(*_first(discover_folder(bad)), size="native")
