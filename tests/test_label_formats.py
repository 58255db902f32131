"""YOLO segmentation and COCO labels in the folder import: masks exactly as hand-computed, split
folders, class choice, and one-line errors naming the file and line or annotation.

Fixtures are tiny 32x48 colour images whose pupils are axis-aligned rectangles and a right
triangle; the expected masks are built pixel by pixel with explicit loops (pixel (row y, column x)
is in a polygon whose vertices are pixel centres when it lies inside it or on its outline)."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from common.prep.folder_source import (
    FolderImportError,
    discover_folder,
    find_positives,
    load_folder_sample,
    make_or_load_splits,
)
from common.prep.label_formats import decode_rle, decode_rle_string, polygon_mask
from tests.helpers import load_output
from tests.test_training import ROOT

H, W = 32, 48
# A compressed RLE written by pycocotools (mask.encode) for RLE_MASK, and its counts uncompressed.
RLE_STRING = "b4:g0O1O1O1O1O1O1O1O1O[57^J000000000000000000000j?"
RLE_COUNTS = ([146, 10, 23, 9, 24, 8, 25, 7, 26, 6, 27, 5, 28, 4, 29, 3, 30, 2, 31, 1, 202]
              + [8, 24] * 11 + [8, 530])


def rectangle(x0, y0, x1, y1) -> np.ndarray:
    """Pixels with x0 <= x <= x1 and y0 <= y <= y1."""
    mask = np.zeros((H, W), np.uint8)
    for y in range(H):
        for x in range(W):
            mask[y, x] = x0 <= x <= x1 and y0 <= y <= y1
    return mask


def triangle(x0, y0, side) -> np.ndarray:
    """The right triangle with vertices (x0, y0), (x0 + side, y0), (x0, y0 + side), outline included."""
    mask = np.zeros((H, W), np.uint8)
    for y in range(H):
        for x in range(W):
            mask[y, x] = x >= x0 and y >= y0 and (x - x0) + (y - y0) <= side
    return mask


RLE_MASK = rectangle(20, 6, 31, 13) | np.array(
    [[int(18 <= y <= 27 and 4 <= x <= 4 + (y - 18)) for x in range(W)] for y in range(H)], np.uint8)
# image stem -> (pupil polygons in pixels, expected mask); "c" has an empty label, "d" none at all
RECT = [(6, 4), (17, 4), (17, 11), (6, 11)]
TRI = [(20, 10), (32, 10), (20, 22)]
SMALL = [(40, 24), (44, 24), (44, 28), (40, 28)]
EXPECTED = {"a": rectangle(6, 4, 17, 11), "b": triangle(20, 10, 12) | rectangle(40, 24, 44, 28),
            "c": np.zeros((H, W), np.uint8), "d": np.zeros((H, W), np.uint8)}
POLYGONS = {"a": [RECT], "b": [TRI, SMALL], "c": [], "d": None}
DISTRACTOR = [(0, 0), (47, 0), (47, 31), (0, 31)]  # the whole frame, in another class


def colour_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def yolo_line(class_id: int, points) -> str:
    return " ".join([str(class_id)] + [repr(v) for x, y in points for v in (x / W, y / H)])


def write_yolo(images, labels, stems=("a", "b", "c", "d"), seed=0):
    """Colour images and YOLO label files: the pupil is class 1, class 0 covers the whole frame."""
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(stems):
        cv2.imwrite(str(images / f"{stem}.png"), colour_image(seed + i))
        if POLYGONS[stem] is not None:
            lines = [yolo_line(0, DISTRACTOR)] if POLYGONS[stem] else []
            lines += [yolo_line(1, points) for points in POLYGONS[stem]]
            (labels / f"{stem}.txt").write_text("".join(f"{line}\n" for line in lines))


def coco_file(stems, with_rle=True) -> dict:
    """COCO annotations of the same pupils (category 7 'pupil', 3 'iris' covering the frame); 'c'
    is listed without annotations, 'd' is not listed; 'e' and 'f' carry RLEs."""
    listed = [s for s in stems if s != "d"]
    images = [{"id": 100 + i, "file_name": f"{s}.png", "width": W, "height": H} for i, s in enumerate(listed)]
    ids = {s: 100 + i for i, s in enumerate(listed)}
    annotations = []
    for stem in listed:
        for points in POLYGONS.get(stem) or []:
            flat = [float(v) for xy in points for v in xy]
            annotations.append({"image_id": ids[stem], "category_id": 7, "segmentation": [flat]})
        annotations.append({"image_id": ids[stem], "category_id": 3, "segmentation": [[0, 0, 48, 0, 48, 32]]})
    if with_rle and "e" in ids:
        annotations.append({"image_id": ids["e"], "category_id": 7, "iscrowd": 1,
                            "segmentation": {"size": [H, W], "counts": RLE_STRING}})
        annotations.append({"image_id": ids["f"], "category_id": 7, "iscrowd": 1,
                            "segmentation": {"size": [H, W], "counts": RLE_COUNTS}})
    for index, annotation in enumerate(annotations):
        annotation["id"] = index + 1
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 3, "name": "iris"}, {"id": 7, "name": "Pupil"}]}


def write_coco(folder, stems=("a", "b", "c", "d", "e", "f"), name="_annotations.coco.json", data=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(stems):
        cv2.imwrite(str(folder / f"{stem}.png"), colour_image(i))
    (folder / name).write_text(json.dumps(data or coco_file(stems)))
    return folder


def masks_of(dataset) -> dict[str, np.ndarray]:
    out = {}
    for sample in dataset.samples:
        image, mask, _ = load_folder_sample(sample, dataset.mask_format, size="native")
        assert image.shape == (H, W) and image.dtype == np.uint8
        out[sample.stem] = mask
    return out


# ----------------------------------------------------------------------------- rasterization
def test_fill_poly_matches_the_hand_made_masks():
    np.testing.assert_array_equal(polygon_mask([np.array(RECT, float)], H, W), EXPECTED["a"])
    np.testing.assert_array_equal(polygon_mask([np.array(TRI, float), np.array(SMALL, float)], H, W),
                                  EXPECTED["b"])
    # vertices round to the nearest pixel centre (halves up) and are clipped into the frame
    shifted = np.array(RECT, float) + (0.49, -0.5)
    np.testing.assert_array_equal(polygon_mask([shifted], H, W), rectangle(6, 4, 17, 11))
    np.testing.assert_array_equal(
        polygon_mask([np.array([(40, 24), (60, 24), (60, 40), (40, 40)], float)], H, W),
        rectangle(40, 24, 47, 31))


def test_rle_string_and_counts_decode_to_the_same_mask():
    assert decode_rle_string(RLE_STRING) == RLE_COUNTS
    np.testing.assert_array_equal(decode_rle(RLE_COUNTS, H, W), RLE_MASK)
    with pytest.raises(FolderImportError, match="ends in the middle of a count"):
        decode_rle_string("b")  # 'b' - 48 = 50 has the "more follows" bit
    with pytest.raises(FolderImportError, match="sum to 10, not 32x48"):
        decode_rle([5, 5], H, W)


# ----------------------------------------------------------------------------- YOLO
def test_yolo_labels_give_the_hand_made_masks(tmp_path):
    write_yolo(tmp_path / "images", tmp_path / "labels")
    dataset = discover_folder(tmp_path, pupil_class=1)
    assert dataset.mask_format.kind == "yolo" and dataset.mask_format.pupil_class == 1
    assert [s.name for s in dataset.samples] == ["a.png", "b.png", "c.png", "d.png"]
    assert dataset.samples[3].mask_path is None  # no label file: an empty mask, skipped unless --keep-empty
    masks = masks_of(dataset)
    for stem, expected in EXPECTED.items():
        np.testing.assert_array_equal(masks[stem], expected, err_msg=stem)
    assert find_positives(dataset) == {"a.png", "b.png"}
    image, _, _ = load_folder_sample(dataset.samples[0], dataset.mask_format, size="native")
    np.testing.assert_array_equal(image, cv2.cvtColor(colour_image(0), cv2.COLOR_BGR2GRAY))


def test_yolo_class_named_in_data_yaml(tmp_path):
    write_yolo(tmp_path / "images", tmp_path / "labels")
    (tmp_path / "data.yaml").write_text("path: /somewhere/else\ntrain: images/train\n"
                                        "names: ['eye', 'pupil']\n")
    dataset = discover_folder(tmp_path)  # --label pupil: class 1
    assert dataset.mask_format.pupil_class == 1 and dataset.pupil == "class 1 'pupil'"
    assert discover_folder(tmp_path, pupil_class="eye").mask_format.pupil_class == 0
    with pytest.raises(FolderImportError,
                       match=r"no YOLO class named 'iris' \(classes: 0 'eye', 1 'pupil'\)"):
        discover_folder(tmp_path, pupil_class="iris")
    (tmp_path / "data.yaml").unlink()
    assert discover_folder(tmp_path).mask_format.pupil_class == 0  # without names: class 0


def test_ultralytics_split_folders_are_the_splits(tmp_path):
    write_yolo(tmp_path / "images" / "train", tmp_path / "labels" / "train", stems=("a", "b", "c"))
    write_yolo(tmp_path / "images" / "val", tmp_path / "labels" / "val", stems=("d",), seed=9)
    (tmp_path / "labels" / "val" / "e.txt").write_text(yolo_line(1, RECT) + "\n")
    cv2.imwrite(str(tmp_path / "images" / "val" / "e.png"), colour_image(5))
    write_yolo(tmp_path / "images" / "test", tmp_path / "labels" / "test", stems=("a",))  # left out
    dataset = discover_folder(tmp_path, pupil_class=1)
    assert {s.name: s.split for s in dataset.samples} == {
        "a.png": "train", "b.png": "train", "c.png": "train", "d.png": "validation", "e.png": "validation"}
    splits = make_or_load_splits(tmp_path, dataset.samples, find_positives(dataset))
    assert [s.name for s in splits["validation"]] == ["d.png", "e.png"]
    assert not (tmp_path / "splits").exists()  # nothing written into the export


def test_roboflow_yolo_and_coco_split_layouts(tmp_path):
    for folder, stems in (("train", ("a", "b")), ("valid", ("c", "e", "f"))):
        write_yolo(tmp_path / "yolo" / folder / "images", tmp_path / "yolo" / folder / "labels",
                   stems=("a", "b"))
        write_coco(tmp_path / "coco" / folder, stems=stems)
    for folder in ("train", "valid"):  # names must be unique across the splits
        for path in list((tmp_path / "yolo" / folder).rglob("*.*")):
            path.rename(path.with_name(f"{folder}_{path.name}"))
    yolo = discover_folder(tmp_path / "yolo", pupil_class=1)
    assert {s.name: s.split for s in yolo.samples} == {"train_a.png": "train", "train_b.png": "train",
                                                       "valid_a.png": "validation",
                                                       "valid_b.png": "validation"}
    coco = discover_folder(tmp_path / "coco")
    assert coco.pupil == "category 7 'Pupil'"
    assert {s.name: s.split for s in coco.samples} == {"a.png": "train", "b.png": "train",
                                                       "c.png": "validation", "e.png": "validation",
                                                       "f.png": "validation"}
    np.testing.assert_array_equal(masks_of(coco)["e"], RLE_MASK)


@pytest.mark.parametrize("line, message", [
    ("1 0.1 0.2 0.3 0.4", "4 numbers are a bounding box"),
    ("1 0.1 0.2 0.3 0.4 0.5", "at least 3 points"),
    ("1 0.1 0.2 0.3 0.4 0.5 1.2", "normalized to 0..1"),
    ("1 0.1 0.2 0.3 0.4 0.5 x", "not a number"),
    ("pupil 0.1 0.2 0.3 0.4 0.5 0.6", "'pupil' is not an integer index"),
])
def test_malformed_yolo_line_names_file_and_line(tmp_path, line, message):
    write_yolo(tmp_path / "images", tmp_path / "labels")
    with open(tmp_path / "labels" / "b.txt", "a") as handle:
        handle.write(f"\n{line}\n")  # line 5: after 3 lines and a blank one
    with pytest.raises(FolderImportError, match=rf"labels/b\.txt:5: .*{message}"):
        find_positives(discover_folder(tmp_path, pupil_class=1))


def test_yolo_label_without_image_is_an_error(tmp_path):
    write_yolo(tmp_path / "images", tmp_path / "labels")
    (tmp_path / "labels" / "ghost.txt").write_text("")
    (tmp_path / "labels" / "classes.txt").write_text("eye\npupil\n")  # labelImg's list of names: not a label
    with pytest.raises(FolderImportError, match=r"1 label file\(s\) in .*labels have no image .*: ghost"):
        discover_folder(tmp_path)


# ----------------------------------------------------------------------------- COCO
def test_coco_polygons_and_rle_give_the_hand_made_masks(tmp_path):
    write_coco(tmp_path, name="annotations.json")
    dataset = discover_folder(tmp_path)  # the category named --label ("pupil", any case)
    assert dataset.mask_format == discover_folder(tmp_path, pupil_class=7).mask_format
    assert dataset.mask_format.kind == "coco" and dataset.mask_format.pupil_class == 7
    masks = masks_of(dataset)
    for stem, expected in EXPECTED.items():
        np.testing.assert_array_equal(masks[stem], expected, err_msg=stem)
    np.testing.assert_array_equal(masks["e"], RLE_MASK)  # compressed string
    np.testing.assert_array_equal(masks["f"], RLE_MASK)  # uncompressed counts
    assert [s.annotation_id for s in dataset.samples] == [100, 101, 102, None, 103, 104]
    assert find_positives(dataset) == {"a.png", "b.png", "e.png", "f.png"}
    iris = masks_of(discover_folder(tmp_path, pupil_class="iris"))
    assert iris["a"].sum() > H * W / 2  # the triangle over half the frame


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].update(image_id=999),
     r"annotation 0 \(id 1\): image_id 999 is not in 'images'"),
    (lambda d: d["annotations"][-1]["segmentation"].update(size=[16, 48]), r"RLE size \[16, 48\] differs"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]), "at least 3 points"),
    (lambda d: d["annotations"][0].update(segmentation=[]), r"no segmentation \(a detection export\?\)"),
    (lambda d: d["annotations"][0].update(segmentation=[[0, 0, 60, 0, 0, 9]]), "outside the 48x32 image"),
    (lambda d: d["images"].append({"id": 1, "file_name": "gone.png", "width": W, "height": H}),
     r"1 listed image\(s\) are not in .*: gone\.png"),
    (lambda d: d["categories"][1].update(name="cornea"),
     r"no category named 'pupil' \(categories: 3 'iris', 7 'cornea'\)"),
    (lambda d: d["annotations"][0].update(category_id=5),
     r"annotation 0 \(id 1\): category_id 5 is not in 'categories'"),
])
def test_malformed_coco_names_file_and_annotation(tmp_path, change, message):
    data = coco_file(("a", "b", "c", "d", "e", "f"))
    change(data)
    write_coco(tmp_path, data=data)
    with pytest.raises(FolderImportError, match=rf"_annotations\.coco\.json: .*{message}"):
        find_positives(discover_folder(tmp_path))


def test_coco_syntax_error_names_the_line_and_a_wrong_size_the_image(tmp_path):
    write_coco(tmp_path / "bad")
    (tmp_path / "bad" / "_annotations.coco.json").write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(FolderImportError, match=r"_annotations\.coco\.json:2: not valid JSON"):
        discover_folder(tmp_path / "bad")
    data = coco_file(("a", "b"))
    data["images"][1].update(width=64)
    data["annotations"] = data["annotations"][:1]  # no region outside 64 wide, so the file is valid
    write_coco(tmp_path / "size", stems=("a", "b"), data=data)
    dataset = discover_folder(tmp_path / "size")
    with pytest.raises(FolderImportError,
                       match=r"image b\.png is 32x48 on disk but 32x64 in the annotations"):
        masks_of(dataset)


# ----------------------------------------------------------------------------- precompute.py
def run_precompute(*args):
    return subprocess.run([sys.executable, str(ROOT / "precompute.py"), "--source", "folder", "--no-push",
                           "--workers", "1", "--size", "native", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_precompute_imports_an_ultralytics_export(tmp_path):
    write_yolo(tmp_path / "raw" / "images" / "train", tmp_path / "raw" / "labels" / "train")
    write_yolo(tmp_path / "raw" / "images" / "val", tmp_path / "raw" / "labels" / "val", stems=("b",), seed=7)
    (tmp_path / "raw" / "images" / "val" / "b.png").rename(tmp_path / "raw" / "images" / "val" / "v.png")
    (tmp_path / "raw" / "labels" / "val" / "b.txt").rename(tmp_path / "raw" / "labels" / "val" / "v.txt")
    (tmp_path / "raw" / "data.yaml").write_text("names:\n  0: eye\n  1: pupil\n")
    result = run_precompute("--raw-dir", tmp_path / "raw", "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "5 images (yolo layout, pupil = class 1 'pupil'): train 4 (2 with a pupil), validation 1 (1 with" \
           in result.stdout
    dataset = load_output(tmp_path / "out")
    rows = {row["filename"]: np.asarray(row["label"], np.uint8)
            for split in dataset.values() for row in split}
    assert sorted(rows) == ["a.png", "b.png", "v.png"]
    for name, stem in (("a.png", "a"), ("b.png", "b"), ("v.png", "b")):
        np.testing.assert_array_equal(rows[name], EXPECTED[stem])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(s["file"] for s in manifest["skipped"]) == ["c.png", "d.png"]  # empty file, no file
    assert {s["reason"] for s in manifest["skipped"]} == {"empty pupil mask"}
    with open(tmp_path / "raw" / "labels" / "train" / "a.txt", "a") as handle:
        handle.write("1 0.5 0.5\n")
    broken = run_precompute("--raw-dir", tmp_path / "raw", "--output-dir", tmp_path / "out2")
    assert broken.returncode != 0 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "labels/train/a.txt:3: expected 'class x1 y1 x2 y2 x3 y3 ...'" in broken.stderr
