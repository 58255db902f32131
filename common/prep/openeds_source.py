"""Raw OpenEDS-layout data: finding it, listing its samples, reading them, downloading it.

Raw layout (OpenEDS, the synthetic generator, and mirrors that nest it deeper):
    <root>/.../{train,validation,test}/images/<name>.png
    <root>/.../{train,validation}/labels/<name>.npy      uint8 class map, 0..3
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.errors import ConfigurationError, UserError
from common.files import retry_with_backoff
from common.prep.preprocess import SkipSample

KAGGLE_DATASET = "soumicksarker/openeds-dataset"
IMAGE_SUFFIXES = (".png",)


@dataclass(frozen=True)
class RawSample:
    """One raw frame and its label file (``label_path`` may not exist: that is a skip reason)."""

    split: str
    name: str  # unique within the split; becomes the dataset's ``filename``
    image_path: str
    label_path: str


def find_split_dirs(root: str | os.PathLike, splits: list[str]) -> dict[str, Path]:
    """Locate each split folder (one holding ``images/``) anywhere under ``root``.

    Mirrors of OpenEDS nest the split folders at different depths (``openEDS/openEDS/train``);
    the shallowest match wins. A split that is missing raises UserError naming what was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"raw data folder {root} does not exist")
    found: dict[str, Path] = {}
    for dirpath, dirnames, _ in sorted(os.walk(root), key=lambda entry: entry[0].count(os.sep)):
        name = os.path.basename(dirpath)
        if name in splits and name not in found and "images" in dirnames:
            found[name] = Path(dirpath)
    missing = [s for s in splits if s not in found]
    if missing:
        have = ", ".join(sorted(found)) or "none"
        raise UserError(
            f"no '{'/'.join(missing)}' split folder with an images/ subfolder under {root} "
            f"(found: {have}); choose splits with --splits"
        )
    return {s: found[s] for s in splits}


def list_raw_samples(split_dir: Path, split: str) -> list[RawSample]:
    """Every image of a split folder, sorted by name, paired with its expected label path."""
    images = sorted(p for p in (split_dir / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [
        RawSample(split, p.name, str(p), str(split_dir / "labels" / f"{p.stem}.npy")) for p in images
    ]


def read_raw_sample(sample: RawSample) -> tuple[np.ndarray, np.ndarray]:
    """Read (image, label); SkipSample with the reason if either is missing or unreadable."""
    image = cv2.imread(sample.image_path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SkipSample("image unreadable or corrupt")
    if not os.path.exists(sample.label_path):
        raise SkipSample("label file missing")
    try:
        label = np.load(sample.label_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SkipSample(f"label unreadable ({exc})") from None
    return image, label


# ----------------------------------------------------------------------------- Kaggle download
def kaggle_credentials_found(environ=os.environ) -> bool:
    """True if any credential source the official kaggle client reads is present."""
    if environ.get("KAGGLE_API_TOKEN") or (environ.get("KAGGLE_USERNAME") and environ.get("KAGGLE_KEY")):
        return True
    config_dir = Path(environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file() or (config_dir / "access_token").is_file()


def require_kaggle_credentials() -> None:
    """Fail fast (exit 2) with every way to provide credentials, before any work starts."""
    if not kaggle_credentials_found():
        raise ConfigurationError(
            "Kaggle credentials not found. Provide one of: ~/.kaggle/kaggle.json "
            "(from kaggle.com > Settings > API), the KAGGLE_API_TOKEN environment variable, or "
            "KAGGLE_USERNAME and KAGGLE_KEY. Or skip the download with --raw-dir DIR "
            "(already downloaded data) or --synthetic N."
        )


def download_openeds(dest: str | os.PathLike, attempts: int = 5) -> Path:
    """Download and unzip OpenEDS from Kaggle into ``dest`` with retries; returns ``dest``."""
    require_kaggle_credentials()
    # Imported here: importing kaggle authenticates immediately and prints a banner or exits.
    import kaggle

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    def fetch():
        kaggle.api.dataset_download_files(KAGGLE_DATASET, path=str(dest), unzip=True, quiet=False)

    retry_with_backoff(fetch, attempts=attempts, describe=f"Kaggle download of {KAGGLE_DATASET}")
    return dest
