"""Image files: read an 8-bit frame with one clear error, write an image atomically.

Every module that reads a frame for inference or writes a PNG/JPEG goes through here, so a
half-written file or a silently colour-converted frame cannot happen in one place and not another.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from common.errors import InputError
from common.files import atomic_path


def as_grayscale_frame(frame) -> np.ndarray:
    """Validate a raw frame: (H, W) or (H, W, 1) uint8 -> (H, W) uint8; InputError otherwise."""
    if not isinstance(frame, np.ndarray):
        raise InputError(f"expected a numpy array frame, got {type(frame).__name__}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim != 2:
        raise InputError(f"expected a single-channel grayscale frame, got shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise InputError(f"expected a uint8 frame, got dtype {frame.dtype}")
    if frame.size == 0:
        raise InputError(f"frame is empty (shape {frame.shape})")
    return frame


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) BGR or (H, W, 4) BGRA -> (H, W); anything else is returned unchanged."""
    if image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        return cv2.cvtColor(image, code)
    return image


def read_frame(path: str | os.PathLike, grayscale: bool = False) -> np.ndarray:
    """Read an 8-bit image file as an (H, W) uint8 frame.

    Colour files are refused unless ``grayscale`` is set, in which case they are converted
    (BGR or BGRA -> gray), so a colour image is never silently fed to a grayscale model.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image")
    if not path.is_file():
        raise InputError(f"input not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"cannot read image {path}: not an image file OpenCV can decode")
    if grayscale:
        image = to_grayscale(image)
    try:
        return as_grayscale_frame(image)
    except InputError as exc:
        hint = " (pass --grayscale to convert colour images)" if image.ndim == 3 else ""
        raise InputError(f"{path}: {exc}{hint}") from None


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write ``image`` (format from the suffix) atomically: a kill leaves the old file or the new one."""
    with atomic_path(path) as tmp:  # the temporary keeps the suffix, so imwrite picks the format
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"cannot write {path}")
    return Path(path)
