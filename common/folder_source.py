"""A user's own labelled folder dataset as a raw source for the preprocessing pipeline.

Two layouts are recognised (images are png/jpg/jpeg, matched to masks by file stem):

    Layout "folder":  DIR/images/<stem>.<ext>  and  DIR/masks/<stem>.png
        Masks are binary (0/255 or 0/1) or class-index maps where the pupil is value K
        (``pupil_class=K``); see ``mask_to_pupil``.
    Layout "cvat":    a CVAT "Segmentation mask 1.1" export:
        DIR/SegmentationClass/<stem>.png  (RGB colour masks)
        DIR/JPEGImages/<stem>.<ext>  or  DIR/images/<stem>.<ext>
        DIR/labelmap.txt  ("# label:color_rgb:parts:actions", then e.g. "pupil:250,50,83::")
        The pupil is the colour of the label named ``label`` (case-insensitive).

An image without a mask gets an empty mask (skipped as "empty pupil mask" unless ``keep_empty``).
Colour images are converted to grayscale with ``cv2.cvtColor(..., COLOR_BGR2GRAY)``: unlike
OpenEDS, this imports ordinary photos. Images are read with ``cv2.IMREAD_COLOR``, which applies
the EXIF orientation, as annotation tools display it.

Splits: ``DIR/splits/train.txt`` and ``DIR/splits/val.txt`` (one stem per line) are used as they
are; without them a seeded stratified split is made and written there (see ``stratified_split``).
Split names are "train" and "validation" (val.txt).

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

from common.errors import UserError
from common.io import atomic_write_text
from common.preprocess import Letterbox, SkipSample, letterbox
from common.schema import SIZE_MULTIPLE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_FILES = {"train": "train.txt", "validation": "val.txt"}


class FolderImportError(UserError):
    """A folder dataset that cannot be imported as it is; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class FolderSample:
    """One image and its mask file (None: no mask, i.e. an empty pupil mask)."""

    split: str | None  # None until a split is assigned
    name: str  # the image file name, unique; becomes the dataset's ``filename``
    image_path: str
    mask_path: str | None

    @property
    def stem(self) -> str:
        return Path(self.name).stem


@dataclasses.dataclass(frozen=True)
class MaskFormat:
    """How a mask file becomes a pupil mask; picklable so pipeline workers can carry it."""

    kind: str  # "folder" | "cvat"
    pupil_class: int | None = None  # folder layout: pupil value of a class-index mask
    pupil_colour: tuple[int, int, int] | None = None  # cvat layout: RGB of the pupil label
    colours: tuple[tuple[int, int, int], ...] = ()  # cvat layout: every RGB in labelmap.txt


class FolderDataset(NamedTuple):
    samples: list[FolderSample]  # sorted by name, split None
    mask_format: MaskFormat


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


def read_pupil_mask(sample: FolderSample, fmt: MaskFormat) -> np.ndarray | None:
    """The sample's 0/1 pupil mask (H, W) at the mask's own size; None when it has no mask."""
    if sample.mask_path is None:
        return None
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
            raise FolderImportError(f"two images share the stem '{path.stem}': {images[path.stem].name}, {path.name}")
        images[path.stem] = path
    return images


def _pair_samples(image_dir: Path, mask_dir: Path) -> list[FolderSample]:
    """Every image with the mask of the same stem (or None); a mask without image is an error."""
    images = _images_by_stem(image_dir)
    masks = {p.stem: p for p in mask_dir.glob("*") if p.suffix.lower() == ".png"}
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise FolderImportError(
            f"{len(orphans)} mask(s) in {mask_dir} have no image in {image_dir}: {', '.join(orphans[:5])}"
        )
    if not images:
        raise FolderImportError(f"no images (png/jpg/jpeg) in {image_dir}")
    return [
        FolderSample(None, path.name, str(path), str(masks[stem]) if stem in masks else None)
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


def discover_folder(root, label: str = "pupil", pupil_class: int | None = None) -> FolderDataset:
    """Find the layout of ``root`` and list its samples (split None) with their mask format.

    ``label`` names the pupil in a CVAT labelmap; ``pupil_class`` is the pupil value of
    class-index masks in the folder layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise FolderImportError(f"dataset folder {root} does not exist")
    if (root / "SegmentationClass").is_dir():
        image_dir = next((root / d for d in ("JPEGImages", "images") if (root / d).is_dir()), None)
        if image_dir is None:
            raise FolderImportError(f"CVAT export {root} has no JPEGImages/ or images/ folder")
        return FolderDataset(_pair_samples(image_dir, root / "SegmentationClass"), _cvat_format(root, label))
    if (root / "images").is_dir():
        mask_dir = root / "masks"
        samples = _pair_samples(root / "images", mask_dir) if mask_dir.is_dir() else [
            FolderSample(None, p.name, str(p), None) for p in _images_by_stem(root / "images").values()
        ]
        return FolderDataset(sorted(samples, key=lambda s: s.name), MaskFormat("folder", pupil_class))
    raise FolderImportError(
        f"{root} is neither an images/ + masks/ folder nor a CVAT segmentation export "
        "(SegmentationClass/, JPEGImages/, labelmap.txt)"
    )


def find_positives(dataset: FolderDataset) -> set[str]:
    """Names of the samples whose pupil mask is not empty (reads every mask once)."""
    positives = set()
    for sample in dataset.samples:
        mask = read_pupil_mask(sample, dataset.mask_format)
        if mask is not None and mask.any():
            positives.add(sample.name)
    return positives


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
        raise FolderImportError(f"{len(both)} stem(s) are in both train.txt and val.txt: {', '.join(both[:5])}")
    unlisted = len(samples) - len(stems["train"]) - len(stems["validation"])
    if unlisted:
        print(f"warning: {unlisted} image(s) are in neither {split_dir}/train.txt nor val.txt and are left out; "
              "add them to a split file, or delete both files to make a new split", file=sys.stderr)
    return stems


def make_or_load_splits(root, samples: list[FolderSample], positives: set[str], val_ratio: float = 0.10,
                        min_val_pos: int = 10, seed: int = 0) -> dict[str, list[FolderSample]]:
    """{"train": [...], "validation": [...]} samples (split set, sorted by name).

    Uses ``root/splits/{train,val}.txt`` when both exist; otherwise makes a ``stratified_split``
    and writes those files atomically. Each split must hold a positive sample.
    """
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
    splits = {}
    for split, names in stems.items():
        chosen = sorted((by_stem[stem] for stem in names), key=lambda s: s.name)
        if not any(s.name in positives for s in chosen):
            raise FolderImportError(f"No positive samples in {split} split")
        splits[split] = [dataclasses.replace(s, split=split) for s in chosen]
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
                       size: tuple[int, int] | str | None = (400, 640)):
    """Read one sample: (image uint8 (H, W), pupil mask uint8 0/1 (H, W), letterbox info dict).

    The frame is converted to grayscale and letterboxed into ``size`` (H, W) keeping its aspect
    ratio; ``size=None`` or "native" keeps the native size (both sides multiples of 16). The info
    dict holds ``Letterbox``'s fields (orig_h, orig_w, scale, pad_top, pad_left, out_h, out_w);
    ``Letterbox(**info)`` maps predictions back with ``unletterbox_*``. Pass the mask to
    ``process_sample`` with ``pupil_class=1``.
    """
    image = _read_gray_image(sample.image_path)
    mask = read_pupil_mask(sample, mask_format)
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


def describe_splits(dataset: FolderDataset, splits: dict[str, list[FolderSample]], positives: set[str]) -> str:
    """'N images (cvat layout): train 90 (81 with a pupil), validation 10 (9 with a pupil)'."""
    parts = [f"{split} {len(items)} ({sum(s.name in positives for s in items)} with a pupil)"
             for split, items in splits.items()]
    return f"{len(dataset.samples)} images ({dataset.mask_format.kind} layout): " + ", ".join(parts)
