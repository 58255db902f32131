"""The preprocessed dataset's on-disk contract: columns, `datasets` Features and shard names.

Layout of a dataset folder (identical locally and on the HuggingFace Hub):

    README.md                                  dataset card; its YAML maps splits to files
    manifest.json                              counts, skipped samples, parameters, versions
    data/{split}-{index:05d}-of-{count:05d}.parquet
    .shards/{same name}.json                   per-shard record used to resume (not uploaded)
"""

from __future__ import annotations

import re

from datasets import Array2D, Array3D, Features, Value

from common.specs import DEFAULT_SIZE

DATA_DIR = "data"
STATE_DIR = ".shards"
MANIFEST_NAME = "manifest.json"
SCALAR_COLUMNS = ("cx", "cy", "rx", "ry", "angle")
# Columns we add to the published dataset's schema: a dataset written by the original lacks them.
EXTRA_COLUMNS = ("angle",)
_FIVE_DIGITS = "[0-9]" * 5
# Split names on the Hub are word characters (with dots), so "-" ends the split in a shard name.
_SHARD_NAME = re.compile(r"(?P<split>\w+(?:\.\w+)*)-\d{5}-of-\d{5}\.parquet")


def dataset_features(height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1]) -> Features:
    """The exact `datasets` schema every preprocessed shard is written with."""
    return Features(
        {
            "image": Array2D((height, width), "uint8"),
            "label": Array2D((height, width), "uint8"),
            "spatial_weights": Array2D((height, width), "float32"),
            "dist_map": Array3D((2, height, width), "float32"),
            **{name: Value("float32") for name in SCALAR_COLUMNS},
            "filename": Value("string"),
            "preprocessed": Value("bool"),
        }
    )


def image_size_of(features: Features) -> tuple[int, int]:
    """(H, W) declared by a dataset's ``image`` column."""
    return tuple(features["image"].shape)


def shard_name(split: str, index: int, count: int) -> str:
    """The name ``datasets``' push_to_hub also gives shards, so ours replace the original's in place."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def split_shard_pattern(split: str) -> str:
    """Glob (fnmatch, as the Hub matches it) of every shard of ``split`` under data/, whatever the count.

    The trailing ``*`` also takes the fingerprint that datasets before 2.15 appended to the names.
    """
    return f"{DATA_DIR}/{split}-{_FIVE_DIGITS}-of-{_FIVE_DIGITS}*.parquet"


def split_of_shard(name: str) -> str | None:
    """The split of a shard file name, or None when the name is not a shard's."""
    match = _SHARD_NAME.fullmatch(name)
    return match["split"] if match else None


def dataset_card(splits: list[str], height: int, width: int, source: str) -> str:
    """README.md for the dataset folder; its `configs` block tells `load_dataset` the splits."""
    files = "\n".join(f"      - split: {s}\n        path: {DATA_DIR}/{s}-*.parquet" for s in splits)
    return (
        "---\nconfigs:\n  - config_name: default\n    data_files:\n"
        f"{files}\n---\n\n"
        "# VisionAssist preprocessed pupil segmentation data\n\n"
        f"Source: {source}. Frames are {height}x{width} (H x W) uint8 after gamma 0.8 and "
        "CLAHE (clip 1.5, 8x8 tiles). `label` is the 0/1 pupil mask, `spatial_weights` the "
        "boundary weights, `dist_map` the signed distance maps (background, pupil) divided by the "
        "image diagonal, `cx, cy, rx, ry, angle` the pupil ellipse. See manifest.json.\n"
    )
