"""collect_frames.py end to end on a generated video, and the frame-selection / key-handling logic.

The test video has N_FRAMES frames at FPS; frame i carries a bright vertical bar at columns
x = 2i, 2i+1 on a dark background, so the saved image tells which frame it came from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.errors import ConfigurationError
from common.infer import video_frames as frames
from common.infer.video_frames import (
    FrameError,
    ViewerState,
    handle_key,
    is_selected,
    make_preview,
    prepare_frame,
)
from tests.helpers import ROOT

N_FRAMES, FPS, HEIGHT, WIDTH = 30, 10.0, 64, 96


def bar_frame(index: int) -> np.ndarray:
    frame = np.full((HEIGHT, WIDTH, 3), 20, np.uint8)  # (H, W, 3) BGR
    frame[:, 2 * index:2 * index + 2] = 235
    return frame


def bar_column(image: np.ndarray) -> int:
    """Left column of the bright bar in a (h, w) or (h, w, 3) image (MJPG blurs it; argmax survives)."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    profile = gray.astype(np.float64).mean(axis=0)  # (w,)
    return int(np.argmax(profile[:-1] + profile[1:]))  # the bar is 2 columns wide


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "eye_clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for index in range(N_FRAMES):
        writer.write(bar_frame(index))
    writer.release()
    return path


def headless_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "collect_frames.py", *map(str, args)], check=False,
                          cwd=ROOT, env=headless_env(), capture_output=True, text=True, timeout=120)


def saved_indices(out_dir: Path) -> list[int]:
    return sorted(int(p.stem.rsplit("_", 1)[1]) for p in (out_dir / "images").glob("*.png"))


@pytest.mark.slow
def test_every_n_frames_saves_images_previews_and_meta(video, tmp_path):
    result = run_script(video, "--dataset", tmp_path, "--every", 5)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "eye_clip"
    assert saved_indices(out) == [0, 5, 10, 15, 20, 25]
    for index in (0, 5, 10, 15, 20, 25):
        name = f"eye_clip_{index:06d}"
        image = cv2.imread(str(out / "images" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert image.shape == (HEIGHT, WIDTH, 3)
        assert bar_column(image) == 2 * index
        preview = cv2.imread(str(out / "previews" / f"{name}.jpg"), cv2.IMREAD_UNCHANGED)
        assert preview.shape == (HEIGHT, WIDTH, 3)  # already under 320 wide: not resized
        meta = json.loads((out / "meta" / f"{name}.json").read_text())
        assert meta == {"source_video": str(video.resolve()), "frame_index": index,
                        "time_sec": index / 10, "roi": None, "grayscale": False,
                        "size": [HEIGHT, WIDTH]}
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.slow
def test_every_sec_with_start_sec(video, tmp_path):
    result = run_script(video, "--dataset", tmp_path, "--every-sec", 1.0, "--start-sec", 1.0)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "eye_clip"
    assert saved_indices(out) == [10, 20]
    image = cv2.imread(str(out / "images" / "eye_clip_000020.png"), cv2.IMREAD_UNCHANGED)
    assert bar_column(image) == 40
    meta = json.loads((out / "meta" / "eye_clip_000020.json").read_text())
    assert meta["time_sec"] == 2.0


@pytest.mark.slow
def test_grayscale_roi_and_max_frames(video, tmp_path):
    result = run_script(video, "--dataset", tmp_path, "--every", 3, "--grayscale",
                        "--roi", 10, 4, 50, 40, "--max-frames", 4)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "eye_clip"
    assert saved_indices(out) == [0, 3, 6, 9]
    image = cv2.imread(str(out / "images" / "eye_clip_000009.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (40, 50)  # 2-D: single channel
    assert bar_column(image) == 18 - 10  # frame 9's bar at x = 18, ROI starts at x = 10
    meta = json.loads((out / "meta" / "eye_clip_000009.json").read_text())
    assert meta["roi"] == [10, 4, 50, 40]
    assert meta["grayscale"] is True
    assert meta["size"] == [40, 50]


@pytest.mark.slow
def test_no_display_is_a_configuration_error(tmp_path):
    # The check comes before the video is opened, so even a missing video reports the display.
    result = run_script(tmp_path / "missing.avi", "--dataset", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: no display available for interactive mode; use --every N or --every-sec S")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_missing_video_is_reported(tmp_path):
    result = run_script(tmp_path / "missing.avi", "--dataset", tmp_path, "--every", 5)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: video not found: {tmp_path / 'missing.avi'}"


@pytest.mark.slow
def test_unreadable_video_is_reported(tmp_path):
    bogus = tmp_path / "bogus.avi"
    bogus.write_bytes(b"not a video at all" * 10)
    result = run_script(bogus, "--dataset", tmp_path, "--every", 5)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert result.stderr.strip() == f"error: cannot open video {bogus}"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bogus" / "images").exists()


@pytest.mark.slow
def test_roi_outside_frame_is_reported(video, tmp_path):
    result = run_script(video, "--dataset", tmp_path, "--every", 5, "--roi", 60, 0, 40, 10)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: ROI x=60 y=0 w=40 h=10 lies outside the 96x64 (width x height) frame")
    assert not (tmp_path / "eye_clip").exists()


@pytest.mark.parametrize("index, start, step, expected", [
    (0, 0, 5.0, True), (4, 0, 5.0, False), (5, 0, 5.0, True), (9, 0, 5.0, False),
    (9, 10, 10.0, False), (10, 10, 10.0, True), (19, 10, 10.0, False), (20, 10, 10.0, True),
    # step 2.5: targets 0, 2.5, 5, 7.5 -> first frames at or after them: 0, 3, 5, 8
    (2, 0, 2.5, False), (3, 0, 2.5, True), (4, 0, 2.5, False), (5, 0, 2.5, True), (8, 0, 2.5, True),
])
def test_is_selected(index, start, step, expected):
    assert is_selected(index, start, step) is expected


def test_prepare_frame_crops_and_grays():
    frame = np.zeros((6, 8, 3), np.uint8)
    frame[2, 3] = (0, 0, 255)  # pure red in BGR -> gray round(0.299 * 255) = 76
    crop = prepare_frame(frame, (3, 2, 4, 3), grayscale=True)
    assert crop.shape == (3, 4)
    assert crop[0, 0] == 76 and crop.sum() == 76
    with pytest.raises(FrameError, match="outside"):
        prepare_frame(frame, (5, 0, 4, 3), grayscale=False)  # x + w = 9 > 8


def test_make_preview_shrinks_wide_images_only():
    assert make_preview(np.zeros((400, 640), np.uint8)).shape == (200, 320)
    assert make_preview(np.zeros((64, 96, 3), np.uint8)).shape == (64, 96, 3)


@pytest.mark.parametrize("paused", [False, True])
def test_handle_key_s_saves_without_changing_state(paused):
    state = ViewerState(paused=paused)
    assert handle_key(ord("s"), state) == (state, True)


def test_handle_key_space_toggles_pause():
    state, save = handle_key(ord(" "), ViewerState())
    assert state == ViewerState(paused=True) and not save
    state, save = handle_key(ord(" "), state)
    assert state == ViewerState(paused=False) and not save


@pytest.mark.parametrize("key", [ord("q"), 27, ord("q") | 0x100000])  # q, ESC, q with a modifier bit
def test_handle_key_q_quits(key):
    assert handle_key(key, ViewerState(paused=True)) == (ViewerState(paused=True, done=True), False)


@pytest.mark.parametrize("key", [-1, ord("x")])
def test_handle_key_other_keys_change_nothing(key):
    assert handle_key(key, ViewerState()) == (ViewerState(), False)


class ScriptedGui:
    """Stands in for the OpenCV window: records shown frames, answers waitKey from a key script."""

    def __init__(self, monkeypatch, keys):
        self.keys, self.shown = list(keys), 0
        monkeypatch.setattr(frames.cv2, "imshow", self.imshow)
        monkeypatch.setattr(frames.cv2, "waitKey", lambda delay: self.keys.pop(0) if self.keys else ord("q"))
        monkeypatch.setattr(frames.cv2, "getWindowProperty", lambda window, prop: 1.0)
        monkeypatch.setattr(frames.cv2, "destroyAllWindows", lambda: None)

    def imshow(self, window, image):
        self.shown += 1


def test_run_viewer_saves_on_s_and_holds_the_frame_while_paused(video, tmp_path, monkeypatch):
    # Frames shown: 10 (-1), 11 (s), 12 (space: pause), 12 (s), 12 (space: resume), 13 (q).
    gui = ScriptedGui(monkeypatch, [-1, ord("s"), ord(" "), ord("s"), ord(" "), ord("q")])
    capture, info = frames.open_video(video)
    saver = frames.FrameSaver.for_video(tmp_path, video, info.fps)
    try:
        saved = frames.run_viewer(capture, saver, start=10)
    finally:
        capture.release()
    assert saved == 2 and gui.shown == 6
    assert saved_indices(tmp_path / "eye_clip") == [11, 12]
    image = cv2.imread(str(tmp_path / "eye_clip" / "images" / "eye_clip_000012.png"))
    assert bar_column(image) == 24


def test_run_viewer_without_gui_backend_is_a_configuration_error(video, tmp_path, monkeypatch):
    def no_gui(window, image):
        raise cv2.error("The function is not implemented")

    monkeypatch.setattr(frames.cv2, "imshow", no_gui)
    capture, info = frames.open_video(video)
    try:
        with pytest.raises(ConfigurationError, match="no display available"):
            frames.run_viewer(capture, frames.FrameSaver.for_video(tmp_path, video, info.fps))
    finally:
        capture.release()
