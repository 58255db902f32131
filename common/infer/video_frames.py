"""Frame collection from videos: frame selection, ROI crop, saving with metadata, viewer key handling.

collect_frames.py wires these together; everything here except ``run_viewer`` works without a display.

Layout written under ``<dataset>/<video stem>/``:
    images/<video stem>_<frame index, 6 digits>.png    the (ROI-cropped, optionally gray) frame
    previews/<same>.jpg                                  the image shrunk to at most PREVIEW_MAX_WIDTH
    meta/<same>.json                                     source, frame index, time, ROI, size
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from common.errors import ConfigurationError, UserError
from common.files import atomic_write_json
from common.images import write_image

PREVIEW_MAX_WIDTH = 320
NO_DISPLAY_MESSAGE = "no display available for interactive mode; use --every N or --every-sec S"
# Frame positions are compared as floats (seconds * fps); this absorbs rounding of e.g. 0.1 * 30.
_EPS = 1e-6

Roi = tuple[int, int, int, int]  # (x, y, w, h) in pixels of the full frame


class FrameError(UserError):
    """A video that cannot be read, an ROI that does not fit the frame, an impossible schedule."""


# ----------------------------------------------------------------------------- display

def display_available() -> bool:
    """Whether an OpenCV window can be shown: a GUI backend is built in and (on Linux) a display is set."""
    has_display_env = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if sys.platform.startswith("linux") and not has_display_env:
        return False
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):  # "GUI: NONE" in opencv-python-headless
            return line.split(":", 1)[1].strip().upper() != "NONE"
    return True


def require_display() -> None:
    if not display_available():
        raise ConfigurationError(NO_DISPLAY_MESSAGE)


# ----------------------------------------------------------------------------- video and selection

@dataclass(frozen=True)
class VideoInfo:
    fps: float  # 0.0 when the container does not say
    width: int  # 0 when unknown before decoding
    height: int


def open_video(path: str | os.PathLike) -> tuple[cv2.VideoCapture, VideoInfo]:
    """Open ``path`` for decoding; FrameError with the path if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FrameError(f"video not found: {path}")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise FrameError(f"cannot open video {path}")
    fps = capture.get(cv2.CAP_PROP_FPS)
    info = VideoInfo(fps=fps if math.isfinite(fps) and fps > 0 else 0.0,
                     width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return capture, info


def start_frame_index(start_sec: float, fps: float) -> int:
    """The first frame shown at or after ``start_sec``."""
    if start_sec <= 0:
        return 0
    if fps <= 0:
        raise FrameError("the video reports no frame rate, so --start-sec cannot be used")
    return math.ceil(start_sec * fps - _EPS)


def frame_step(fps: float, every: int | None = None, every_sec: float | None = None) -> float:
    """Distance between selected frames, in frames (fractional for --every-sec)."""
    if every is not None:
        if every < 1:
            raise FrameError(f"--every must be >= 1, got {every}")
        return float(every)
    if every_sec is None or every_sec <= 0:
        raise FrameError(f"--every-sec must be > 0, got {every_sec}")
    if fps <= 0:
        raise FrameError("the video reports no frame rate; use --every N instead of --every-sec")
    return every_sec * fps


def is_selected(index: int, start: int, step: float) -> bool:
    """True for the first frame at or after each target position start + k * step (k = 0, 1, ...).

    Example: start 0, step 2.5 -> frames 0, 3, 5, 8, 10, ...
    """
    if index < start:
        return False
    k = math.floor((index - start) / step + _EPS)  # last target at or before ``index``
    return start + k * step > index - 1 + _EPS


def iter_selected_frames(capture: cv2.VideoCapture, start: int, step: float,
                         max_frames: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (frame index, (H, W, 3) BGR frame) for the selected frames, at most ``max_frames``."""
    index, yielded = 0, 0
    while (max_frames is None or yielded < max_frames) and capture.grab():
        if is_selected(index, start, step):  # other frames are grabbed but never decoded
            ok, frame = capture.retrieve()
            if not ok:
                raise FrameError(f"cannot decode frame {index}")
            yield index, frame
            yielded += 1
        index += 1
    if index == 0:
        raise FrameError("cannot decode any frame of the video")


# ----------------------------------------------------------------------------- ROI and saving

def validate_roi(roi: Roi | None, height: int, width: int) -> None:
    """FrameError unless ``roi`` = (x, y, w, h) has a positive size and lies inside the frame."""
    if roi is None:
        return
    x, y, w, h = roi
    if w <= 0 or h <= 0:
        raise FrameError(f"ROI width and height must be > 0, got {w}x{h}")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise FrameError(f"ROI x={x} y={y} w={w} h={h} lies outside the {width}x{height} "
                         f"(width x height) frame")


def prepare_frame(frame: np.ndarray, roi: Roi | None, grayscale: bool) -> np.ndarray:
    """Crop (H, W[, 3]) ``frame`` to ``roi`` and optionally convert BGR to gray (h, w)."""
    validate_roi(roi, *frame.shape[:2])
    if roi is not None:
        x, y, w, h = roi
        frame = frame[y:y + h, x:x + w]
    if grayscale and frame.ndim == 3:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    return np.ascontiguousarray(frame)


def make_preview(image: np.ndarray, max_width: int = PREVIEW_MAX_WIDTH) -> np.ndarray:
    """``image`` shrunk (never enlarged) to at most ``max_width`` pixels wide, aspect kept."""
    height, width = image.shape[:2]
    if width <= max_width:
        return image
    new_height = max(1, round(height * max_width / width))
    return cv2.resize(image, (max_width, new_height), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class FrameSaver:
    """Writes selected frames of one video under ``out_dir`` = <dataset>/<video stem>."""

    out_dir: Path
    source_video: Path
    fps: float
    roi: Roi | None = None
    grayscale: bool = False

    @classmethod
    def for_video(cls, dataset: str | os.PathLike, video: str | os.PathLike, fps: float,
                  roi: Roi | None = None, grayscale: bool = False) -> FrameSaver:
        video = Path(video).resolve()
        return cls(Path(dataset) / video.stem, video, fps, tuple(roi) if roi else None, grayscale)

    def frame_name(self, index: int) -> str:
        return f"{self.source_video.stem}_{index:06d}"

    def metadata(self, index: int, image: np.ndarray) -> dict:
        return {"source_video": str(self.source_video), "frame_index": int(index),
                "time_sec": round(index / self.fps, 6) if self.fps > 0 else None,
                "roi": list(self.roi) if self.roi else None, "grayscale": self.grayscale,
                "size": [int(image.shape[0]), int(image.shape[1])]}

    def save(self, index: int, frame: np.ndarray) -> Path:
        """Write image, preview and metadata for BGR ``frame`` number ``index``; returns the image path."""
        image = prepare_frame(frame, self.roi, self.grayscale)
        name = self.frame_name(index)
        image_path = self.out_dir / "images" / f"{name}.png"
        write_image(image_path, image)
        write_image(self.out_dir / "previews" / f"{name}.jpg", make_preview(image))
        # Metadata last: a frame with a meta file is complete.
        atomic_write_json(self.out_dir / "meta" / f"{name}.json", self.metadata(index, image))
        return image_path


# ----------------------------------------------------------------------------- interactive viewer

@dataclass(frozen=True)
class ViewerState:
    paused: bool = False
    done: bool = False


def handle_key(key: int, state: ViewerState) -> tuple[ViewerState, bool]:
    """Apply one ``cv2.waitKey`` result: 's' save, SPACE pause/resume, 'q'/ESC quit.

    Returns (new state, whether to save the current frame). -1 (no key) and other keys change nothing.
    """
    if key < 0:
        return state, False
    char = key & 0xFF  # waitKey may set modifier bits above the low byte
    if char == ord("s"):
        return state, True
    if char == ord(" "):
        return replace(state, paused=not state.paused), False
    if char in (ord("q"), 27):
        return replace(state, done=True), False
    return state, False


def draw_status(frame: np.ndarray, index: int, state: ViewerState, saved: int,
                roi: Roi | None) -> np.ndarray:
    """A copy of BGR ``frame`` with the ROI outlined and a status line (display only, never saved)."""
    canvas = frame.copy() if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if roi is not None:
        x, y, w, h = roi
        cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), (0, 255, 0), 1)
    status = f"frame {index}  saved {saved}{'  PAUSED' if state.paused else ''}  [s]ave [space] [q]uit"
    cv2.putText(canvas, status, (5, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
    return canvas


def show(window: str, image: np.ndarray) -> None:
    try:
        cv2.imshow(window, image)
    except cv2.error as exc:  # built without a GUI backend, or the display went away
        raise ConfigurationError(NO_DISPLAY_MESSAGE) from exc


def close_windows() -> None:
    try:
        cv2.destroyAllWindows()
    except cv2.error:  # nothing was ever shown
        pass


def run_viewer(capture: cv2.VideoCapture, saver: FrameSaver, start: int = 0,
               max_frames: int | None = None, window: str = "collect_frames") -> int:
    """Play the video in a window from frame ``start``; save frames on 's'. Returns how many were saved."""
    for _ in range(start):  # skipped frames are grabbed but never decoded
        if not capture.grab():
            return 0
    state, index, frame, saved = ViewerState(), start - 1, None, 0
    delay_ms = max(1, round(1000 / saver.fps)) if saver.fps > 0 else 33
    try:
        while not state.done and (max_frames is None or saved < max_frames):
            if frame is None or not state.paused:
                ok, frame = capture.read()  # (H, W, 3) BGR
                if not ok:
                    break
                index += 1
            show(window, draw_status(frame, index, state, saved, saver.roi))
            state, save = handle_key(cv2.waitKey(30 if state.paused else delay_ms), state)
            if save:
                saver.save(index, frame)
                saved += 1
            if cv2.getWindowProperty(window, cv2.WND_PROP_VISIBLE) < 1:  # closed with the mouse
                break
    finally:
        close_windows()
    return saved
