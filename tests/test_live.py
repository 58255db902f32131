"""The live loop (common/infer/live.py, predict.py VIDEO / --camera N) on a generated eye video.

The video: 300 frames at 96x160 and 100 fps of the synthetic eye of test_inference.py, the pupil
moving on a smooth path, and a closed eye (no pupil) for frames 150-169. The model is the small
network trained there (the ``trained`` fixture). A camera is played by the same file through the
PREDICT_CAMERA_VIDEO seam.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import predict
from common.infer import live
from common.infer.inference import PupilPredictor, pupil_confidence
from common.infer.smoothing import EllipseSmoother
from common.prep import preprocess
from common.prep.preprocess import Ellipse
from tests import test_inference
from tests.helpers import ROOT
from tests.test_inference import MODEL_SIZE, draw_eye, read_csv, run_predict

trained = test_inference.trained  # the module-scoped fixture: one trained model for both modules

FRAMES, FPS = 300, 100.0
BLINK = range(150, 170)
STATS_LINE = re.compile(r"^fps [\d.]+ \| ms grab [\d.]+, preprocess [\d.]+, model [\d.]+, "
                        r"decode\+ellipse [\d.]+, display - \| dropped \d+$", re.M)
SUMMARY = re.compile(r"(\d+) frames read from .*: (\d+) predicted \(([\d.]+) fps\), "
                     r"(\d+) dropped, (\d+) blinks")


@pytest.fixture(scope="module", autouse=True)
def one_model_thread():
    """One intra-op thread, here and in the scripts these tests start: the loop's grabber and
    display threads share the CI machine's few cores with the model, and an OpenMP team of one
    thread per core then waits on its descheduled members (seconds per frame on a loaded machine)."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


def truth_at(index: int) -> Ellipse:
    """The pupil of frame ``index``: a slow Lissajous path inside the trained range."""
    height, width = MODEL_SIZE
    x = 80 + 20 * math.sin(2 * math.pi * index / 150)
    y = 48 + 10 * math.sin(2 * math.pi * index / 100)
    return preprocess.ellipse_from_pixels((x, y), (12, 10), 30.0, height, width)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("live") / "eye.avi"
    height, width = MODEL_SIZE
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (width, height))
    rng = np.random.default_rng(3)
    for index in range(FRAMES):
        if index in BLINK:  # the closed eye: skin only
            frame = np.clip(rng.normal(175, 10, (height, width)), 0, 255).astype(np.uint8)
        else:
            frame = draw_eye(rng, truth_at(index), height, width)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def summary_of(stdout: str) -> dict:
    frames, predicted, fps, dropped, blinks = SUMMARY.search(stdout).groups()
    return dict(frames=int(frames), predicted=int(predicted), fps=float(fps), dropped=int(dropped),
                blinks=int(blinks))


@pytest.fixture(scope="module")
def every_frame_run(trained, video, tmp_path_factory):
    out = tmp_path_factory.mktemp("every")
    result = run_predict("--model", trained["pt"], video, "--headless", "--no-realtime", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    return result, read_csv(out / "live.csv"), out


@pytest.mark.slow
def test_every_frame_gives_one_row_per_frame_with_blinks(every_frame_run):
    result, rows, out = every_frame_run
    assert list(rows[0]) == list(live.LIVE_COLUMNS)
    assert [int(r["frame"]) for r in rows] == list(range(FRAMES))
    assert [float(r["time"]) for r in rows] == pytest.approx([i / FPS for i in range(FRAMES)], abs=1e-6)
    assert [int(r["blink"]) for r in rows] == [int(i in BLINK) for i in range(FRAMES)]
    for row in rows:
        if row["blink"] == "1":  # no pupil is a state: an empty ellipse, not an error
            assert row["cx"] == row["rx"] == row["angle"] == "" and float(row["confidence"]) == 0.0
    errors = []
    for index, row in enumerate(rows):
        if index not in BLINK:
            (x, y), _, _ = preprocess.ellipse_to_pixels(truth_at(index), *MODEL_SIZE)
            errors.append(math.hypot(float(row["cx"]) * MODEL_SIZE[1] - x,
                                     float(row["cy"]) * MODEL_SIZE[0] - y))
            assert 0.5 < float(row["confidence"]) <= 1.0
    assert np.median(errors) < 0.75 and max(errors) < 2.0  # pixels
    summary = summary_of(result.stdout)
    assert summary == dict(frames=FRAMES, predicted=FRAMES, fps=summary["fps"], dropped=0, blinks=len(BLINK))
    assert summary["fps"] > 0
    assert not (out / "live.csv.partial").exists()


@pytest.mark.slow
def test_real_time_video_counts_what_it_drops(trained, video, tmp_path):
    started = time.monotonic()
    result = run_predict("--model", trained["pt"], video, "--headless", "--output-dir", tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "live.csv")
    summary = summary_of(result.stdout)
    assert summary["frames"] == FRAMES and summary["predicted"] == len(rows)
    assert len(rows) + summary["dropped"] == FRAMES
    frames = [int(r["frame"]) for r in rows]
    assert frames == sorted(set(frames))
    assert [float(r["time"]) for r in rows] == pytest.approx([f / FPS for f in frames], abs=1e-6)
    # 3 s of video: statistics lines, at most one a second
    assert 1 <= len(STATS_LINE.findall(result.stdout)) <= elapsed + 1


def test_a_slow_display_does_not_hold_inference(trained, video, tmp_path):
    """The display stalls on its first result until inference has finished all its frames: those
    were predicted anyway, and the display then gets only the newest."""
    limit, shown, lines = 60, [], []

    def stalled_display(result):
        if result is not None:
            shown.append(result.index)
            deadline = time.monotonic() + 30  # a display that held inference up would wait here in vain
            while len(shown) == 1 and loop.processed < limit and time.monotonic() < deadline:
                time.sleep(0.01)
        return True

    source = live.open_video_source(video, realtime=False)
    loop = live.LiveLoop(PupilPredictor(trained["pt"]), source, tmp_path / "live.csv",
                         live.LiveOptions(max_frames=limit), stalled_display, log=lines.append)
    summary = loop.run()
    assert summary.processed == limit == len(read_csv(tmp_path / "live.csv"))
    assert summary.displayed == len(shown) <= 2 < summary.processed
    assert shown[-1] == limit - 1  # the newest result
    assert summary.stopped_by == "max-frames"


class SlowPredictor:
    """The real predictor, 30 ms slower per frame than a 100 fps video allows."""

    def __init__(self, inner: PupilPredictor):
        self.inner = inner

    def predict(self, frame, timings=None):
        time.sleep(0.03)
        return self.inner.predict(frame, timings)


def test_real_time_drops_frames_when_inference_is_slower_than_the_video(trained, video, tmp_path):
    lines = []
    loop = live.LiveLoop(SlowPredictor(PupilPredictor(trained["pt"])), live.open_video_source(video),
                         tmp_path / "live.csv", display=None, log=lines.append)
    summary = loop.run()
    rows = read_csv(tmp_path / "live.csv")
    assert summary.frames == FRAMES and summary.processed == len(rows)
    assert summary.processed + summary.dropped == FRAMES
    assert summary.dropped > FRAMES / 3  # >= 30 ms a frame cannot keep up with 10 ms frames
    assert lines and all(STATS_LINE.fullmatch(line) for line in lines)


def test_smoothing_in_the_loop(trained, video, every_frame_run, tmp_path):
    """Smoothed rows: the same blinks, the first pupil after the blink as measured, less jitter."""
    _, raw, _ = every_frame_run
    options = live.LiveOptions(smoother=EllipseSmoother(min_cutoff=2.0, beta=0.05))
    source = live.open_video_source(video, realtime=False)
    live.LiveLoop(PupilPredictor(trained["pt"]), source, tmp_path / "live.csv", options, log=print).run()
    smooth = read_csv(tmp_path / "live.csv")
    assert [r["blink"] for r in smooth] == [r["blink"] for r in raw]
    after_blink = BLINK.stop
    assert smooth[after_blink] == raw[after_blink] and smooth[0] == raw[0]

    def jitter(rows, start, stop):  # mean |second difference| of cx, in pixels
        cx = np.array([float(r["cx"]) for r in rows[start:stop]]) * MODEL_SIZE[1]
        return np.abs(np.diff(cx, 2)).mean()

    assert jitter(smooth, 0, BLINK.start) < 0.7 * jitter(raw, 0, BLINK.start)


def test_onnx_model_runs_live_like_the_checkpoint(trained, video, every_frame_run, tmp_path):
    _, raw, _ = every_frame_run
    source = live.open_video_source(video, realtime=False)
    live.LiveLoop(PupilPredictor(trained["onnx"]), source, tmp_path / "live.csv",
                  live.LiveOptions(max_frames=170), log=print).run()
    rows = read_csv(tmp_path / "live.csv")
    assert [r["blink"] for r in rows] == [r["blink"] for r in raw[:170]]
    for row, reference in zip(rows, raw):
        for key in ("cx", "cy", "rx", "ry", "confidence"):
            if reference[key]:
                assert float(row[key]) == pytest.approx(float(reference[key]), abs=1e-3)


def start_camera(trained, video, out: Path) -> subprocess.Popen:
    env = {**os.environ, live.CAMERA_VIDEO_ENV: str(video)}
    command = [sys.executable, "predict.py", "--model", str(trained["pt"]), "--camera", "0", "--headless",
               "--output-dir", str(out)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_rows(path: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.read_text().count("\n") > count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not get {count} rows; {process.poll()=}")


@pytest.mark.slow
def test_ctrl_c_ends_a_camera_run_cleanly(trained, video, tmp_path):
    process = start_camera(trained, video, tmp_path)
    wait_for_rows(tmp_path / "live.csv.partial", 5, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert f"camera 0 ({live.CAMERA_VIDEO_ENV}=" in stdout and "stopped by SIGINT" in stdout
    summary = summary_of(stdout)
    rows = read_csv(tmp_path / "live.csv")
    assert not (tmp_path / "live.csv.partial").exists()
    assert len(rows) == summary["predicted"] and len(rows) + summary["dropped"] == summary["frames"]
    assert summary["frames"] < FRAMES  # stopped before the end
    times = [float(r["time"]) for r in rows]  # a camera's frames are timed by the clock from 0
    assert times[0] == pytest.approx(0.0, abs=0.05) and times == sorted(times)


@pytest.mark.slow
def test_kill_leaves_the_rows_measured_so_far(trained, video, tmp_path):
    process = start_camera(trained, video, tmp_path)
    partial = tmp_path / "live.csv.partial"
    wait_for_rows(partial, 5, process)
    process.kill()
    process.communicate(timeout=60)
    assert not (tmp_path / "live.csv").exists()
    text = partial.read_text()
    assert text.endswith("\n")  # whole rows only
    rows = read_csv(partial)
    assert len(rows) >= 5 and list(rows[0]) == list(live.LIVE_COLUMNS)
    assert all(len([v for v in row.values() if v is not None]) == len(live.LIVE_COLUMNS) for row in rows)


def main_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))
    assert exc.value.code != 0
    return capsys.readouterr().err


def test_flags_that_do_not_mix_are_one_line_errors(trained, video, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(live, "display_available", lambda: False)  # as on CI; a desktop has one
    model = ("--model", trained["pt"], "--output-dir", tmp_path)
    image = tmp_path / "eye.png"
    cv2.imwrite(str(image), np.zeros(MODEL_SIZE, np.uint8))
    cases = [
        ((), "give one input"),
        ((video, "--input", video), "got a VIDEO and --input"),
        ((video, "--every", 2), "--every only apply to batch runs"),
        (("--input", video, "--headless"), "--headless only apply to the live loop"),
        ((video, "--beta", 1), "--beta tune the smoothing: add --smooth"),
        (("--camera", 0, "--no-realtime"), "a camera is always read in real time"),
        ((image,), "not an image"),
        (("--input", tmp_path, "--live"), "not a folder"),
        ((video,), "no display available for the live window; use --headless"),
        ((tmp_path / "missing.avi", "--headless"), "video not found"),
    ]
    for argv, message in cases:
        err = main_error(capsys, *model, *argv)
        assert err.startswith("error: ") and message in err, (argv, err)
        assert "Traceback" not in err


def test_input_video_live_is_the_positional_video(trained, video, tmp_path):
    args = predict.get_args_parser().parse_args(
        ["--model", str(trained["pt"]), "--input", str(video), "--live", "--headless", "--no-realtime",
         "--max-frames", "5", "--output-dir", str(tmp_path)])
    assert predict.main(args) == tmp_path / "live.csv"
    assert [r["frame"] for r in read_csv(tmp_path / "live.csv")] == ["0", "1", "2", "3", "4"]


def test_frame_slot_keeps_the_newest_and_counts_the_rest():
    slot = live.FrameSlot(1, lossy=True)
    for item in range(5):
        slot.put(item)
    assert slot.get() == 4 and slot.dropped == 4
    assert slot.get(timeout=0.01) is None  # empty, still open
    slot.put(5)
    slot.close()
    slot.put(6)  # after the end: counted, never delivered
    assert slot.get() == 5 and slot.get() is live._END and slot.dropped == 5
    queue = live.FrameSlot(2, lossy=False)
    queue.put(1)
    queue.put(2)
    queue.close()  # a full queue: put returns once closed instead of waiting
    queue.put(3)
    queue.discard()
    assert queue.dropped == 3 and queue.get() is live._END


def test_csv_log_flushes_whole_rows_then_renames(tmp_path):
    path = tmp_path / "live.csv"
    log = live.CsvLog(path, period=3600)  # no flush by time during this test
    partial = tmp_path / "live.csv.partial"
    assert partial.read_text() == ",".join(live.LIVE_COLUMNS) + "\n"
    log.add(live.live_row(0, 0.0, None, 0.0, True))
    assert partial.read_text().count("\n") == 1  # held until the next flush
    log.flush()
    assert partial.read_text().splitlines()[1] == "0,0.000000,,,,,,0.000000,1"
    ellipse = Ellipse(0.5, 0.25, 0.1, 0.05, 30.0)
    log.add(live.live_row(1, 0.01, ellipse, 0.9, False))
    assert log.close() == path and not partial.exists()
    assert path.read_text().splitlines()[2] == ("1,0.010000,0.500000,0.250000,0.100000,0.050000,"
                                                "30.000000,0.900000,0")


def test_pupil_confidence_by_hand():
    height, width = 32, 48
    region = np.ones((height, width), np.uint8)
    ellipse = Ellipse(0.5, 0.5, 0.2, 0.2, 0.0)
    mask = preprocess.draw_ellipse(ellipse, height, width)
    logits = np.zeros((2, height, width), np.float32)
    logits[1] = np.log(3.0)  # softmax pupil probability 3 / (1 + 3) = 0.75 everywhere
    assert pupil_confidence(logits, "segmentation", mask, ellipse, None, region) == pytest.approx(0.75)
    assert pupil_confidence(logits, "segmentation", np.zeros_like(mask), None, None, region) == 0.0
    # The regressor's proxy, on the uint8 enhanced frame: a black disc in a white frame is fully
    # dark; a flat frame is not.
    picture = np.where(mask == 1, 0, 255).astype(np.uint8)
    assert pupil_confidence(None, "ellipse", mask, ellipse, picture, region) == pytest.approx(1.0)
    assert pupil_confidence(None, "ellipse", mask, ellipse, np.zeros_like(picture), region) == 0.0
    quarter = np.where(mask == 1, 100, 100 + 255 // 4).astype(np.uint8)  # ring 63 levels brighter
    assert pupil_confidence(None, "ellipse", mask, ellipse, quarter, region) == pytest.approx(63 / 255)


def test_pupil_confidence_counts_only_mask_pixels_inside_the_region():
    rng = np.random.default_rng(0)
    height, width = 32, 48
    region = np.zeros((height, width), np.uint8)
    region[4:28, :40] = 1  # letterbox-like padding at the top, bottom and right
    ellipse = Ellipse(0.7, 0.5, 0.3, 0.25, 0.0)  # reaches into the padding on the right
    mask = preprocess.draw_ellipse(ellipse, height, width)
    logits = rng.normal(size=(2, height, width)).astype(np.float32)
    inside = (mask == 1) & (region == 1)
    expected = np.mean(1.0 / (1.0 + np.exp(-(logits[1] - logits[0])[inside])))
    assert pupil_confidence(logits, "segmentation", mask, ellipse, None, region) == pytest.approx(expected)
    picture = rng.integers(0, 256, (height, width), dtype=np.uint8)
    grown = Ellipse(ellipse.cx, ellipse.cy, 1.5 * ellipse.rx, 1.5 * ellipse.ry, 0.0)
    ring = (preprocess.draw_ellipse(grown, height, width) == 1) & (region == 1) & ~inside
    contrast = (picture[ring].mean() - picture[inside].mean()) / 255.0
    assert pupil_confidence(None, "ellipse", mask, ellipse, picture, region) == pytest.approx(
        float(np.clip(contrast, 0.0, 1.0)))


def test_window_draws_the_newest_result_and_quits_on_q(monkeypatch):
    """The window's drawing and keys, without a display: cv2's GUI calls are replaced."""
    frame = np.full(MODEL_SIZE, 128, np.uint8)
    ellipse = truth_at(0)
    prediction = live.Prediction(preprocess.draw_ellipse(ellipse, *MODEL_SIZE), ellipse, 0.9)
    result = live.LiveResult(7, 0.07, frame, prediction, False, "fps 50.0 | ...")
    image = live.render(result)
    assert image.shape == (3 * MODEL_SIZE[0], 3 * MODEL_SIZE[1], 3)  # 160 px wide -> 3x, >= 480
    assert np.any(np.all(image == (0, 0, 255), axis=2))  # the ellipse outline (ELLIPSE_COLOR_BGR)
    assert np.any(image[:40, :, 2] != image[:40, :, 0])  # the yellow status text at the top
    shown, keys = [], iter([-1, ord("q")])
    monkeypatch.setattr(live, "display_available", lambda: True)
    monkeypatch.setattr(live, "show", lambda title, picture: shown.append(picture.shape))
    monkeypatch.setattr(live.cv2, "waitKey", lambda delay: next(keys))
    window = live.WindowDisplay()
    assert window(None) is True and shown == []  # nothing new: only the keys are read
    assert window(result) is False and shown == [image.shape]  # q quits
