"""A user's own labelled folder dataset as a raw source for the preprocessing pipeline.

Four layouts are recognised (images are png/jpg/jpeg, matched to their labels by file stem):

    Layout "folder":  DIR/images/<stem>.<ext>  and  DIR/masks/<stem>.png
        Masks are binary (0/255 or 0/1) or class-index maps where the pupil is value K
        (``pupil_class=K``); see ``mask_to_pupil``.
    Layout "cvat":    a CVAT "Segmentation mask 1.1" export:
        DIR/SegmentationClass/<stem>.png  (RGB colour masks)
        DIR/JPEGImages/<stem>.<ext>  or  DIR/images/<stem>.<ext>
        DIR/labelmap.txt  ("# label:color_rgb:parts:actions", then e.g. "pupil:250,50,83::")
        The pupil is the colour of the label named ``label`` (case-insensitive).
    Layout "yolo":    YOLO segmentation polygons (Ultralytics, Roboflow), one .txt per image:
        DIR/images/<stem>.<ext>  and  DIR/labels/<stem>.txt, or split into folders,
        DIR/images/{train,val}/ + DIR/labels/{train,val}/ (Ultralytics) or
        DIR/{train,valid}/images/ + DIR/{train,valid}/labels/ (Roboflow). The pupil is class
        index ``pupil_class``, or the class named ``label`` in DIR/data.yaml (or classes.txt),
        else class 0.
    Layout "coco":    COCO JSON with polygons or RLE: DIR/_annotations.coco.json or
        DIR/annotations.json, images beside it or in DIR/images/; or split, as Roboflow exports
        it, DIR/{train,valid}/_annotations.coco.json with the images beside each. The pupil is the
        category ``pupil_class`` (an id or a name), else the one named ``label``, else the only one.
    Polygons and RLE are read and rasterized by ``common.prep.label_formats`` (its docstring gives
    the pixel convention).

Split folders: "train" is the train split and "val" or "valid" the validation split; other
folders (e.g. "test") are left out. Names must then be unique across the splits.

An image without a mask, label file or annotation gets an empty mask (skipped as "empty pupil
mask" unless ``keep_empty``), as does an empty YOLO file. A label without its image, or a label
that cannot be read, stops the import with one line naming the file (and the line or annotation).
Colour images are converted to grayscale with ``cv2.cvtColor(..., COLOR_BGR2GRAY)``: unlike
OpenEDS, this imports ordinary photos. Images are read with ``cv2.IMREAD_COLOR``, which applies
the EXIF orientation, as annotation tools display it.

Splits: split folders (above) are used as they are. Otherwise ``DIR/splits/train.txt`` and
``DIR/splits/val.txt`` (one stem per line) are used as they are; without them a seeded stratified
split is made and written there (see ``stratified_split``). Split names are "train" and
"validation" (val.txt).

Typical use:
    dataset = discover_folder(root, pupil_class=None)
    positives = find_positives(dataset)
    splits = make_or_load_splits(root, dataset.samples, positives)
    image, mask01, box = load_folder_sample(sample, dataset.mask_format, size=(400, 640))
    row = process_sample(image, mask01, (400, 640), pupil_class=1, keep_empty=...)

``load_folder_sample`` returns a 0/1 pupil mask, so ``process_sample`` must be called with
``pupil_class=1``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from common.files import atomic_write_text
from common.prep.label_formats import (
    FolderImportError,
    load_coco,
    read_yolo_polygons,
    yolo_class_names,
    yolo_mask,
    yolo_pupil_class,
)
from common.prep.preprocess import Letterbox, SkipSample, letterbox
from common.specs import DEFAULT_SIZE, SIZE_MULTIPLE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_FILES = {"train": "train.txt", "validation": "val.txt"}
SPLIT_FOLDERS = {"train": "train", "val": "validation", "valid": "validation"}  # folder -> split
COCO_FILES = ("_annotations.coco.json", "annotations.json")


@dataclasses.dataclass(frozen=True)
class FolderSample:
    """One image and its label file: a mask, a YOLO .txt or a COCO .json (None: no label, i.e. an
    empty pupil mask)."""

    split: str | None  # None until a split is assigned (split folders assign it at discovery)
    name: str  # the image file name, unique; becomes the dataset's ``filename``
    image_path: str
    mask_path: str | None
    annotation_id: int | None = None  # COCO: the image's id in the .json file mask_path

    @property
    def stem(self) -> str:
        return Path(self.name).stem


@dataclasses.dataclass(frozen=True)
class MaskFormat:
    """How a mask file becomes a pupil mask; picklable so pipeline workers can carry it."""

    kind: str  # "folder" | "cvat" | "yolo" | "coco"
    pupil_class: int | None = None  # folder: pupil value of class-index masks; yolo: class; coco: category id
    pupil_colour: tuple[int, int, int] | None = None  # cvat layout: RGB of the pupil label
    colours: tuple[tuple[int, int, int], ...] = ()  # cvat layout: every RGB in labelmap.txt


class FolderDataset(NamedTuple):
    samples: list[FolderSample]  # sorted by name; split None unless the layout has split folders
    mask_format: MaskFormat
    pupil: str = ""  # which class is the pupil, in words, for the import's summary line


# ----------------------------------------------------------------------------- masks
def mask_to_pupil(mask: np.ndarray, pupil_class: int | None = None) -> np.ndarray:
    """Single-channel mask (H, W) -> uint8 pupil mask (H, W) with values 0/1.

    With ``pupil_class`` K the pupil is ``mask == K``. Otherwise the mask must be binary:
    values within {0, 255} (pupil 255) or within {0, 1} (pupil 1); anything else is ambiguous.
    """
    if pupil_class is not None:
        return (mask == pupil_class).astype(np.uint8)
    values = set(np.unique(mask).tolist())
    if values <= {0, 255}:
        return (mask == 255).astype(np.uint8)
    if values <= {0, 1}:
        return (mask == 1).astype(np.uint8)
    shown = sorted(values)[:10]
    raise FolderImportError(
        f"mask values {shown} are not binary (0/255 or 0/1); pass --pupil-class K to say which "
        "value is the pupil"
    )


def parse_labelmap(path: Path) -> dict[str, tuple[int, int, int]]:
    """CVAT labelmap.txt -> {label name: (r, g, b)}; comment and blank lines are ignored."""
    labels = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            rgb = tuple(int(v) for v in rest.split(":")[0].split(","))
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise FolderImportError(f"{path}:{number}: expected 'label:r,g,b:parts:actions', got {line!r}")
        labels[name.strip()] = rgb
    return labels


def colour_mask_to_pupil(mask_bgr: np.ndarray, fmt: MaskFormat, path: str) -> np.ndarray:
    """CVAT colour mask (H, W, 3) as cv2 reads it (BGR) -> uint8 pupil mask (H, W) 0/1."""
    rgb = mask_bgr[:, :, ::-1]
    # one uint32 per pixel: np.unique of ints is far faster than of (N, 3) rows
    packed = (rgb[:, :, 0].astype(np.uint32) << 16) | (rgb[:, :, 1].astype(np.uint32) << 8) | rgb[:, :, 2]
    present = {(v >> 16, (v >> 8) & 255, v & 255) for v in np.unique(packed).tolist()}
    unknown = sorted(present - set(fmt.colours))
    if unknown:
        shown = ", ".join(f"({r},{g},{b})" for r, g, b in unknown[:5])
        raise FolderImportError(
            f"{path}: colour(s) {shown} (RGB) are not in labelmap.txt; re-export the masks or "
            "add the labels to labelmap.txt"
        )
    return np.all(rgb == np.array(fmt.pupil_colour, np.uint8), axis=2).astype(np.uint8)


def read_pupil_mask(sample: FolderSample, fmt: MaskFormat, shape: tuple[int, int] | None = None
                    ) -> np.ndarray | None:
    """The sample's 0/1 pupil mask (H, W): a mask file at its own size, polygons and RLE rasterized
    at the image's ``shape`` (needed for those); None when it has no label."""
    if sample.mask_path is None:
        return None
    if fmt.kind == "yolo":
        return yolo_mask(sample.mask_path, fmt.pupil_class, *shape)
    if fmt.kind == "coco":
        return load_coco(sample.mask_path, fmt.pupil_class, "").mask(sample.annotation_id, *shape)
    # cvat: (H, W, 3) BGR; folder: as stored, (H, W) or (H, W, C), any integer depth
    mask = cv2.imread(sample.mask_path, cv2.IMREAD_COLOR if fmt.kind == "cvat" else cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise FolderImportError(f"{sample.mask_path}: mask unreadable or corrupt")
    if fmt.kind == "cvat":
        return colour_mask_to_pupil(mask, fmt, sample.mask_path)
    if mask.ndim == 3:  # a grey mask saved as RGB(A): all colour channels must agree
        if not np.all(mask[:, :, 0:1] == mask[:, :, 1:3]):
            raise FolderImportError(
                f"{sample.mask_path}: colour mask in masks/; use single-channel masks, or a CVAT "
                "export with labelmap.txt"
            )
        mask = mask[:, :, 0]
    try:
        return mask_to_pupil(mask, fmt.pupil_class)
    except FolderImportError as exc:
        raise FolderImportError(f"{sample.mask_path}: {exc}") from None


# ----------------------------------------------------------------------------- discovery
def _images_by_stem(folder: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in images:
            raise FolderImportError(f"two images share the stem '{path.stem}': "
                                    f"{images[path.stem].name}, {path.name}")
        images[path.stem] = path
    return images


def _pair_samples(image_dir: Path, mask_dir: Path, suffix: str = ".png") -> list[FolderSample]:
    """Every image with the label file of the same stem and ``suffix`` (or None); a label without
    its image is an error. A YOLO ``classes.txt`` is a list of names, not a label."""
    images = _images_by_stem(image_dir)
    labels = {p.stem: p for p in mask_dir.glob("*") if p.suffix.lower() == suffix and p.name != "classes.txt"}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        kind = "mask(s)" if suffix == ".png" else "label file(s)"
        raise FolderImportError(
            f"{len(orphans)} {kind} in {mask_dir} have no image in {image_dir}: {', '.join(orphans[:5])}"
        )
    if not images:
        raise FolderImportError(f"no images (png/jpg/jpeg) in {image_dir}")
    return [
        FolderSample(None, path.name, str(path), str(labels[stem]) if stem in labels else None)
        for stem, path in sorted(images.items(), key=lambda item: item[1].name)
    ]


def _cvat_format(root: Path, label: str) -> MaskFormat:
    labelmap = root / "labelmap.txt"
    if not labelmap.is_file():
        raise FolderImportError(f"CVAT export {root} has SegmentationClass/ but no labelmap.txt")
    labels = parse_labelmap(labelmap)
    matches = [rgb for name, rgb in labels.items() if name.lower() == label.lower()]
    if not matches:
        raise FolderImportError(f"{labelmap} has no label '{label}' (labels: {', '.join(labels) or 'none'})")
    return MaskFormat("cvat", pupil_colour=matches[0], colours=tuple(labels.values()))


def _with_splits(groups: list[tuple[str | None, list[FolderSample]]], root: Path) -> list[FolderSample]:
    """The samples of every folder (split None, or the folder's split), sorted by name. Split
    folders must give both splits once, and names must be unique across them."""
    splits = [split for split, _ in groups]
    if any(splits):
        for split in SPLIT_FILES:
            if splits.count(split) != 1:
                folders = [name for name, value in SPLIT_FOLDERS.items() if value == split]
                found = "no" if split not in splits else "more than one"
                raise FolderImportError(f"{root} has split folders but {found} {split} folder "
                                        f"({' or '.join(folders)}); give exactly one of each")
    samples = [dataclasses.replace(s, split=split) for split, items in groups for s in items]
    seen: dict[str, FolderSample] = {}
    for sample in samples:
        if sample.name in seen:
            raise FolderImportError(f"the name {sample.name} is in two folders "
                                    f"({seen[sample.name].image_path}, {sample.image_path}); "
                                    "names must be unique across the splits")
        seen[sample.name] = sample
    return sorted(samples, key=lambda s: s.name)


def _yolo_folders(root: Path) -> list[tuple[str | None, Path, Path]]:
    """(split or None, image folder, label folder) of a YOLO export; [] when ``root`` is none."""
    if (root / "images").is_dir() and (root / "labels").is_dir():
        split_dirs = [d for d in sorted((root / "images").iterdir())
                      if d.is_dir() and d.name in SPLIT_FOLDERS]
        if split_dirs:  # Ultralytics: images/train, labels/train, ...
            return [(SPLIT_FOLDERS[d.name], d, root / "labels" / d.name) for d in split_dirs]
        return [(None, root / "images", root / "labels")]
    return [(SPLIT_FOLDERS[name], root / name / "images", root / name / "labels")  # Roboflow: train/images
            for name in SPLIT_FOLDERS if (root / name / "labels").is_dir()]


def _yolo_dataset(root: Path, folders, label: str, pupil_class: int | str | None) -> FolderDataset:
    names = yolo_class_names(root)
    index = yolo_pupil_class(names, pupil_class, label)
    groups = []
    for split, images, labels in folders:
        if not (images.is_dir() and labels.is_dir()):
            raise FolderImportError(f"YOLO layout: {images} and {labels} must both exist")
        groups.append((split, _pair_samples(images, labels, ".txt")))
    named = f" '{names[index]}'" if index in names else ""
    return FolderDataset(_with_splits(groups, root), MaskFormat("yolo", index), f"class {index}{named}")


def _coco_files(root: Path) -> list[tuple[str | None, Path]]:
    """(split or None, annotation file) of a COCO export; [] when ``root`` is none."""
    single = [root / name for name in COCO_FILES if (root / name).is_file()]
    if single:
        return [(None, single[0])]
    return [(SPLIT_FOLDERS[folder], root / folder / name) for folder in SPLIT_FOLDERS for name in COCO_FILES
            if (root / folder / name).is_file()]


def _coco_samples(path: Path, coco) -> list[FolderSample]:
    """The images beside ``path`` (or in images/ there), each with its annotation id if listed."""
    image_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    listed = {}
    for image in coco.images.values():
        name = Path(image.file_name).name
        if name in listed:
            raise FolderImportError(f"{path}: the file name {name} is listed twice "
                                    f"(ids {listed[name].id}, {image.id})")
        listed[name] = image
    missing = sorted(name for name in listed if not (image_dir / name).is_file())
    if missing:
        raise FolderImportError(f"{path}: {len(missing)} listed image(s) are not in {image_dir}: "
                                f"{', '.join(missing[:5])}")
    return [FolderSample(None, p.name, str(p), str(path) if p.name in listed else None,
                         listed[p.name].id if p.name in listed else None)
            for p in sorted(_images_by_stem(image_dir).values(), key=lambda p: p.name)]


def _coco_dataset(root: Path, files, label: str, pupil_class: int | str | None) -> FolderDataset:
    groups, categories = [], {}
    for split, path in files:
        coco = load_coco(path, pupil_class, label)
        categories[str(path)] = (coco.category, coco.categories[coco.category])
        groups.append((split, _coco_samples(path, coco)))
    chosen = set(categories.values())
    if len(chosen) > 1:
        listed = ", ".join(f"{path}: {cid} '{name}'" for path, (cid, name) in categories.items())
        raise FolderImportError(f"the pupil is a different category in each file ({listed}); "
                                "export them alike")
    category, name = chosen.pop()
    samples = _with_splits(groups, root)
    return FolderDataset(samples, MaskFormat("coco", category), f"category {category} '{name}'")


def discover_folder(root, label: str = "pupil", pupil_class: int | str | None = None) -> FolderDataset:
    """Find the layout of ``root`` and list its samples with their mask format (split None, or
    the split of their folder).

    ``label`` names the pupil in a CVAT labelmap, a COCO category or a YOLO data.yaml;
    ``pupil_class`` is the pupil value of class-index masks, the YOLO class index, or the COCO
    category id or name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FolderImportError(f"dataset folder {root} does not exist")
    if (root / "SegmentationClass").is_dir():
        image_dir = next((root / d for d in ("JPEGImages", "images") if (root / d).is_dir()), None)
        if image_dir is None:
            raise FolderImportError(f"CVAT export {root} has no JPEGImages/ or images/ folder")
        return FolderDataset(_pair_samples(image_dir, root / "SegmentationClass"), _cvat_format(root, label))
    coco, yolo = _coco_files(root), _yolo_folders(root)
    if coco:
        return _coco_dataset(root, coco, label, pupil_class)
    if yolo:
        return _yolo_dataset(root, yolo, label, pupil_class)
    if (root / "images").is_dir():
        if isinstance(pupil_class, str):
            raise FolderImportError(f"--pupil-class for masks is the pupil's pixel value (an integer), not "
                                    f"'{pupil_class}'")
        mask_dir = root / "masks"
        samples = _pair_samples(root / "images", mask_dir) if mask_dir.is_dir() else [
            FolderSample(None, p.name, str(p), None) for p in _images_by_stem(root / "images").values()
        ]
        return FolderDataset(sorted(samples, key=lambda s: s.name), MaskFormat("folder", pupil_class))
    raise FolderImportError(
        f"{root} is none of: images/ + masks/, a CVAT segmentation export (SegmentationClass/, "
        "JPEGImages/, labelmap.txt), YOLO segmentation labels (images/ + labels/), a COCO file "
        f"({' or '.join(COCO_FILES)})"
    )


def find_positives(dataset: FolderDataset) -> set[str]:
    """Names of the samples whose pupil mask is not empty (reads every label once)."""
    return {sample.name for sample in dataset.samples if has_pupil(sample, dataset.mask_format)}


def has_pupil(sample: FolderSample, fmt: MaskFormat) -> bool:
    """Whether the sample's pupil mask is not empty; polygons and RLE are not rasterized for this
    (a polygon fills at least one pixel), so no image is read."""
    if sample.mask_path is None:
        return False
    if fmt.kind == "yolo":
        return bool(read_yolo_polygons(sample.mask_path, fmt.pupil_class))
    if fmt.kind == "coco":
        return load_coco(sample.mask_path, fmt.pupil_class, "").has_pupil(sample.annotation_id)
    return bool(read_pupil_mask(sample, fmt).any())  # a mask file, read at its own size


# ----------------------------------------------------------------------------- splits
def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def stratified_split(names: list[str], positives: set[str], val_ratio: float = 0.10,
                     min_val_pos: int = 10, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded split of ``names`` into (train, val), each sorted, keeping the positive ratio.

    Validation gets max(round(val_ratio * n_pos), min_val_pos) positives, but never all of them
    (train keeps at least one), and round(val_ratio * n_neg) negatives (rounded half up).
    The same names, positives and seed always give the same split.
    """
    pos = sorted(n for n in names if n in positives)
    neg = sorted(n for n in names if n not in positives)
    n_val_pos = max(0, min(max(_round_half_up(val_ratio * len(pos)), min_val_pos), len(pos) - 1))
    n_val_neg = _round_half_up(val_ratio * len(neg))
    rng = np.random.default_rng(seed)
    pos = [pos[i] for i in rng.permutation(len(pos))]
    neg = [neg[i] for i in rng.permutation(len(neg))]
    val = pos[:n_val_pos] + neg[:n_val_neg]
    train = pos[n_val_pos:] + neg[n_val_neg:]
    return sorted(train), sorted(val)


def _read_split_file(path: Path, by_stem: dict[str, FolderSample]) -> list[str]:
    stems = [line.strip() for line in path.read_text().splitlines()]
    stems = [s for s in stems if s and not s.startswith("#")]
    for stem in stems:
        if stem not in by_stem:
            raise FolderImportError(f"{path} lists '{stem}', but there is no image with that stem")
    return stems


def load_split_files(split_dir: Path, samples: list[FolderSample]) -> dict[str, list[str]]:
    """{split: stems} from splits/train.txt and splits/val.txt; samples listed in neither are left out."""
    by_stem = {s.stem: s for s in samples}
    stems = {split: _read_split_file(split_dir / file, by_stem) for split, file in SPLIT_FILES.items()}
    both = sorted(set(stems["train"]) & set(stems["validation"]))
    if both:
        raise FolderImportError(f"{len(both)} stem(s) are in both train.txt and val.txt: "
                                f"{', '.join(both[:5])}")
    unlisted = len(samples) - len(stems["train"]) - len(stems["validation"])
    if unlisted:
        print(f"warning: {unlisted} image(s) are in neither {split_dir}/train.txt nor val.txt and are "
              "left out; add them to a split file, or delete both files to make a new split",
              file=sys.stderr)
    return stems


def make_or_load_splits(root, samples: list[FolderSample], positives: set[str], val_ratio: float = 0.10,
                        min_val_pos: int = 10, seed: int = 0) -> dict[str, list[FolderSample]]:
    """{"train": [...], "validation": [...]} samples (split set, sorted by name).

    Samples from split folders keep their split. Otherwise uses ``root/splits/{train,val}.txt``
    when both exist, or makes a ``stratified_split`` and writes those files atomically. Each split
    must hold a positive sample.
    """
    if samples and all(s.split for s in samples):  # split folders (YOLO, COCO)
        return _check_positives({split: sorted((s for s in samples if s.split == split), key=lambda s: s.name)
                                 for split in SPLIT_FILES}, positives)
    split_dir = Path(root) / "splits"
    present = [f for f in SPLIT_FILES.values() if (split_dir / f).is_file()]
    if len(present) == 1:
        raise FolderImportError(f"{split_dir} has {present[0]} but not the other of train.txt/val.txt; "
                                "provide both or remove it")
    if present:
        stems = load_split_files(split_dir, samples)
    else:
        train, val = stratified_split([s.stem for s in samples], {Path(n).stem for n in positives},
                                      val_ratio, min_val_pos, seed)
        stems = {"train": train, "validation": val}
        for split, file in SPLIT_FILES.items():
            atomic_write_text(split_dir / file, "".join(f"{stem}\n" for stem in stems[split]))
    by_stem = {s.stem: s for s in samples}
    splits = {split: [dataclasses.replace(by_stem[stem], split=split) for stem in names]
              for split, names in stems.items()}
    return _check_positives({split: sorted(items, key=lambda s: s.name) for split, items in splits.items()},
                            positives)


def _check_positives(splits: dict[str, list[FolderSample]],
                     positives: set[str]) -> dict[str, list[FolderSample]]:
    for split, items in splits.items():
        if not any(s.name in positives for s in items):
            raise FolderImportError(f"No positive samples in {split} split")
    return splits


# ----------------------------------------------------------------------------- one sample
def _read_gray_image(path: str) -> np.ndarray:
    """Image file -> uint8 grayscale (H, W); SkipSample if it cannot be decoded."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)  # (H, W, 3) BGR, EXIF orientation applied
    if image is None:
        raise SkipSample("image unreadable or corrupt")
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _fit_to_size(image: np.ndarray, mask: np.ndarray, size, name: str):
    """Letterbox image (area) and mask (nearest) to size, or keep the native size for None."""
    h, w = image.shape
    if size is None or size == "native":
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise FolderImportError(
                f"{name}: native size {h}x{w} is not a multiple of {SIZE_MULTIPLE}; give an output size"
            )
        return image, mask, Letterbox(h, w, 1.0, 0, 0, h, w)
    out_h, out_w = size
    image, box = letterbox(image, out_h, out_w)
    mask, _ = letterbox(mask, out_h, out_w, is_mask=True)
    return image, mask, box


def load_folder_sample(sample: FolderSample, mask_format: MaskFormat, *,
                       size: tuple[int, int] | str | None = DEFAULT_SIZE):
    """Read one sample: (image uint8 (H, W), pupil mask uint8 0/1 (H, W), letterbox info dict).

    The frame is converted to grayscale and letterboxed into ``size`` (H, W) keeping its aspect
    ratio; ``size=None`` or "native" keeps the native size (both sides multiples of 16). The info
    dict holds ``Letterbox``'s fields (orig_h, orig_w, scale, pad_top, pad_left, out_h, out_w);
    ``Letterbox(**info)`` maps predictions back with ``unletterbox_*``. Pass the mask to
    ``process_sample`` with ``pupil_class=1``.
    """
    image = _read_gray_image(sample.image_path)
    mask = read_pupil_mask(sample, mask_format, image.shape)
    if mask is None:
        mask = np.zeros(image.shape, np.uint8)
    elif mask.shape != image.shape:
        raise FolderImportError(
            f"{sample.mask_path}: mask size {mask.shape[0]}x{mask.shape[1]} differs from image "
            f"{sample.name} size {image.shape[0]}x{image.shape[1]}"
        )
    image, mask, box = _fit_to_size(image, mask, size, sample.name)
    return image, mask, dataclasses.asdict(box)


def native_frame_size(samples: list[FolderSample]) -> tuple[int, int]:
    """(H, W) of the first sample's image: the output size of ``--size native``."""
    for sample in samples:
        try:
            return _read_gray_image(sample.image_path).shape
        except SkipSample:
            continue  # a corrupt image is skipped later; the next one gives the size
    raise FolderImportError("no readable image to take the native size from")


def describe_splits(dataset: FolderDataset, splits: dict[str, list[FolderSample]],
                    positives: set[str]) -> str:
    """'N images (cvat layout): train 90 (81 with a pupil), validation 10 (9 with a pupil)'; the
    pupil's class follows the layout for YOLO and COCO ("yolo layout, pupil = class 0 'eye'")."""
    parts = [f"{split} {len(items)} ({sum(s.name in positives for s in items)} with a pupil)"
             for split, items in splits.items()]
    kind = dataset.mask_format.kind + (f" layout, pupil = {dataset.pupil}" if dataset.pupil else " layout")
    return f"{len(dataset.samples)} images ({kind}): " + ", ".join(parts)
