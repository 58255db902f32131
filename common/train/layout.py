"""How a dataset's stored columns map onto training arrays: detected once per dataset.

Layouts read (everything else stops with one ``UserError`` line):
    ours       ``data/{split}-NNNNN-of-NNNNN.parquet``; Array2D/Array3D columns, 0/1 labels, all
               targets, ellipse columns and a ``preprocessed`` flag (``common/schema.py``);
    original   ``data/{split}/shard_NNNNN.parquet`` (``Conner/openeds-precomputed``); frames stored
               as flat lists without a shape, raw frames (no flag), no ellipse columns, labels
               0/1 or the 4 OpenEDS classes, maybe stored ``spatial_weights``/``dist_map``;
    legacy     raw frames and 4-class labels with or without targets, in either file layout.

Decisions (``detect_layout``), taken once for the whole dataset, never per batch:
    frame size   the Array2D shape; for flat lists ``--size``, else the dataset's manifest or
                 card, else 400x640; each flat column must hold H*W values a row (2*H*W for
                 ``dist_map``);
    4-class      the label column's maximum over every split (Arrow compute, stopping at the
                 first value above 1): 2..3 means OpenEDS classes, binarized to pupil = class 3;
    preprocessed ``--preprocessed yes|no``, else the first value of ``preprocessed`` (or
                 ``image_preprocessed``), else False: gamma + CLAHE are applied at load time;
    targets      stored ``spatial_weights``/``dist_map`` are used unless labels are 4-class (they
                 may not describe the pupil mask then): missing or such targets are recomputed
                 from the binarized label, as precompute does;
    ellipse      ``cx, cy, rx, ry`` when stored, else fitted to the mask at load time
                 (``preprocess.pupil_ellipse``, the function precompute uses).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.errors import UserError
from common.schema import MANIFEST_NAME
from common.specs import DEFAULT_SIZE

# Frame-like columns and their shape per row for a frame of (H, W): channels in front.
FRAME_CHANNELS = {"image": (), "label": (), "spatial_weights": (), "dist_map": (2,)}
TARGET_COLUMNS = ("spatial_weights", "dist_map")
ELLIPSE_COLUMNS = ("cx", "cy", "rx", "ry")
PREPROCESSED_COLUMNS = ("preprocessed", "image_preprocessed")  # ours, and the design's name
PREPROCESSED_CHOICES = ("auto", "yes", "no")
SCAN_ROWS = 64  # rows per Arrow batch when scanning the label column


@dataclass(frozen=True)
class DatasetLayout:
    """What ``common.train.data.ArrowBatches`` must do to turn stored rows into training batches."""

    image_size: tuple[int, int]        # (H, W) of every frame column
    flat_columns: tuple[str, ...]      # stored as flat lists, reshaped with image_size
    preprocessed: bool                 # frames already carry gamma + CLAHE
    preprocessed_from: str             # why: the column that said so, the flag, or its absence
    four_class: bool                   # OpenEDS labels 0..3, binarized to pupil = class 3
    has_ellipse: bool                  # cx, cy, rx, ry are stored
    stored_targets: tuple[str, ...]    # targets read as stored; the others are recomputed

    def frame_shape(self, column: str) -> tuple[int, ...]:
        return (*FRAME_CHANNELS[column], *self.image_size)

    def computes_at_load(self, targets: tuple[str, ...]) -> bool:
        """Whether a batch needs per-frame work (gamma+CLAHE, binarizing, targets, an ellipse fit)
        rather than only reading stored rows."""
        missing = [t for t in TARGET_COLUMNS if t in targets and t not in self.stored_targets]
        return (not self.preprocessed or self.four_class or bool(missing)
                or ("ellipse" in targets and not self.has_ellipse))

    def describe(self, targets: tuple[str, ...]) -> str:
        """One line for the run log, e.g. 'flat lists reshaped to 400x640, 4-class labels binarized, ...'."""
        height, width = self.image_size
        parts = [f"flat lists ({', '.join(self.flat_columns)}) reshaped to {height}x{width}"
                 if self.flat_columns else f"{height}x{width} arrays"]
        parts.append("4-class labels binarized (pupil = class 3)" if self.four_class else "0/1 labels")
        wanted = [t for t in TARGET_COLUMNS if t in targets]
        computed = [t for t in wanted if t not in self.stored_targets]
        if wanted and not computed:
            parts.append("targets stored")
        elif computed == wanted and wanted:
            parts.append(f"targets {'recomputed' if self.four_class else 'computed'} from the mask")
        elif computed:
            parts.append(f"{', '.join(computed)} computed from the mask, the other targets stored")
        if "ellipse" in targets:
            parts.append("ellipse stored" if self.has_ellipse else "ellipse fitted to the mask")
        enhance = "frames already gamma+CLAHE" if self.preprocessed else "gamma+CLAHE applied at load"
        parts.append(f"{enhance} ({self.preprocessed_from})")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- arrow values
def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _values(array) -> pa.Array:
    """All values of a frame column (chunked or not), as one flat array: (rows * H * W,) or more."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if isinstance(array, pa.ExtensionArray):  # datasets' Array2D/Array3D: nested lists underneath
        array = array.storage
    while _is_list(array.type):
        array = array.flatten()  # respects slicing (offsets), unlike .values
    return array


def read_frames(table: pa.Table, name: str, layout: DatasetLayout) -> np.ndarray:
    """Column ``name`` of an Arrow batch -> writable numpy array (N, [C,] H, W).

    Shaped (Array2D/3D) and flat list columns take the same route: flatten, then reshape.
    """
    shape = layout.frame_shape(name)
    # Chunk by chunk into one new array: a single copy (combine_chunks, then a writable copy for
    # torch, which refuses read-only memory, would be two).
    parts = [_values(chunk).to_numpy(zero_copy_only=False) for chunk in table.column(name).chunks]
    values = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)
    if len(values) != table.num_rows * math.prod(shape):
        raise UserError(_size_message(name, len(values) // max(table.num_rows, 1), shape))
    return values.reshape(table.num_rows, *shape)


def _size_message(name: str, per_row: int, shape: tuple[int, ...]) -> str:
    return (f"column '{name}' holds {per_row} values a row, but the frame size "
            f"{shape[-2]}x{shape[-1]} needs {math.prod(shape)} ({'x'.join(map(str, shape))}); "
            "give the dataset's frame size with --size H W")


# ----------------------------------------------------------------------------- frame size
def declared_frame_size(source: Path | None) -> tuple[int, int] | None:
    """(H, W) that a dataset folder declares: manifest.json ``image_size``, else its card's 'HxW (H x W)'."""
    if source is None:
        return None
    manifest, card = Path(source) / MANIFEST_NAME, Path(source) / "README.md"
    if manifest.is_file():
        size = json.loads(manifest.read_text()).get("image_size")
        if size:
            return int(size[0]), int(size[1])
    if card.is_file():
        match = re.search(r"(\d+)\s*x\s*(\d+)\s*\(H\s*x\s*W\)", card.read_text(errors="replace"))
        if match:
            return int(match.group(1)), int(match.group(2))
    return None


def _frame_size(split, flat: tuple[str, ...], size, source) -> tuple[int, int]:
    """The frame (H, W): from the columns' declared shape, or for flat lists --size/manifest/400x640."""
    for name in FRAME_CHANNELS:
        shape = getattr(split.features.get(name), "shape", None)
        if name not in flat and shape is not None:
            shaped = tuple(shape[-2:])
            if size is not None and tuple(size) != shaped:
                raise UserError(f"--size {size[0]} {size[1]} does not match the dataset, whose '{name}' "
                                f"column is {shaped[0]}x{shaped[1]}; leave --size out")
            return shaped
    if size is not None:
        return tuple(size)
    return declared_frame_size(source) or DEFAULT_SIZE


def _leaf_type(kind: pa.DataType) -> pa.DataType:
    """The value type under any Array2D/3D wrapper and list nesting (uint8 for an image column)."""
    kind = kind.storage_type if isinstance(kind, pa.ExtensionType) else kind
    while _is_list(kind):
        kind = kind.value_type
    return kind


def _flat_columns(split) -> tuple[str, ...]:
    """Frame columns stored as plain lists (no shape in their feature); others must be Array2D/3D."""
    flat = []
    for name in FRAME_CHANNELS:
        if name not in split.column_names:
            continue
        kind = split.data.schema.field(name).type
        if _is_list(kind):
            flat.append(name)
        elif not isinstance(kind, pa.ExtensionType):
            raise UserError(f"column '{name}' has type {kind}; expected an Array2D or a list of values")
    image_type = _leaf_type(split.data.schema.field("image").type)
    if image_type != pa.uint8():
        raise UserError(f"column 'image' holds {image_type} values; expected uint8 grayscale frames")
    return tuple(flat)


def _check_flat_lengths(dataset: dict, layout: DatasetLayout) -> None:
    """Every row of every flat column holds H*W values (dist_map 2*H*W): checked once, on the offsets.

    Done here, in the main process, so a wrong size stops the run with one line before any batch.
    """
    for split in dataset.values():
        for name in layout.flat_columns:
            column, shape = split.data.column(name), layout.frame_shape(name)
            lengths = pc.min_max(pc.list_value_length(column))  # values (or sub-lists) per row
            values = sum(len(_values(chunk)) for chunk in column.chunks)  # no copy of the column
            per_row = values / max(split.data.num_rows, 1)
            if per_row != math.prod(shape) or lengths["min"].as_py() != lengths["max"].as_py():
                raise UserError(_size_message(name, f"{per_row:g}", shape))


# ----------------------------------------------------------------------------- labels, flags
def label_maximum(dataset: dict) -> int:
    """Largest label value over every split; stops at the first batch above 1 (then 4-class is certain).

    Arrow compute on the stored column, SCAN_ROWS rows at a time: a 4-class dataset is settled by its
    first batch, a 0/1 dataset is read once, without decoding rows into Python.
    """
    largest = 0
    for split in dataset.values():
        for batch in split.data.table.select(["label"]).to_batches(max_chunksize=SCAN_ROWS):
            values = _values(batch.column(0))
            largest = max(largest, pc.max(values).as_py() or 0) if len(values) else largest
            if largest > 1:
                return largest
    return largest


def _four_class(dataset: dict) -> bool:
    largest = label_maximum(dataset)
    if largest > 3:
        raise UserError(f"labels go up to {largest}; expected 0/1 pupil masks or OpenEDS classes 0..3 "
                        "(pupil = 3); re-import masks with precompute.py")
    return largest > 1


def _preprocessed(split, choice: str) -> tuple[bool, str]:
    """(frames carry gamma + CLAHE, why): --preprocessed yes/no, else the stored flag, else False."""
    if choice not in PREPROCESSED_CHOICES:
        raise UserError(f"--preprocessed takes {', '.join(PREPROCESSED_CHOICES)}, got '{choice}'")
    if choice != "auto":
        return choice == "yes", f"--preprocessed {choice}"
    for name in PREPROCESSED_COLUMNS:
        if name in split.column_names and split.data.num_rows:
            value = bool(split.data.column(name)[0].as_py())  # one flag for the dataset: its first row
            return value, f"{name} column is {value}"
    return False, "no preprocessed column"


# ----------------------------------------------------------------------------- detection
def detect_layout(dataset, size: tuple[int, int] | None = None, preprocessed: str = "auto",
                  source: Path | None = None) -> DatasetLayout:
    """Decide, once for the whole dataset (a DatasetDict or one split), how its rows are read.

    ``size`` is --size (H, W) for flat lists, ``preprocessed`` the --preprocessed choice and
    ``source`` the dataset folder whose manifest or card may declare the frame size.
    """
    splits = dict(dataset) if isinstance(dataset, dict) else {"split": dataset}  # DatasetDict is a dict
    first = next(iter(splits.values()))
    missing = [c for c in ("image", "label") if c not in first.column_names]
    if missing:
        found = ", ".join(first.column_names)
        raise UserError(f"the dataset has no {' or '.join(missing)} column (found {found})")
    flat = _flat_columns(first)
    four_class = _four_class(splits)
    enhanced, reason = _preprocessed(first, preprocessed)
    stored = () if four_class else tuple(t for t in TARGET_COLUMNS if t in first.column_names)
    layout = DatasetLayout(
        image_size=_frame_size(first, flat, size, source), flat_columns=flat, preprocessed=enhanced,
        preprocessed_from=reason, four_class=four_class,
        has_ellipse=all(c in first.column_names for c in ELLIPSE_COLUMNS), stored_targets=stored)
    _check_flat_lengths(splits, layout)
    return layout
