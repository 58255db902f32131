"""The live loop: pupil ellipses from a camera or a video, frame by frame, in real time.

Three threads; every OpenCV object is used by one of them only:

    grabber    reads the capture (``Source``) and hands each frame to inference through a
               ``FrameSlot``. In real time (a camera, or a video paced at its own frame rate) the
               slot holds one frame, the newest: a frame replaced before inference took it is
               dropped and counted, and so is a video frame whose time had already passed when it
               was reached (it is skipped without decoding). With every frame (``realtime=False``,
               e.g. ``--no-realtime`` for a benchmark) the slot is a short blocking queue and
               nothing is dropped.
    inference  a worker thread: grayscale + ROI, ``PupilPredictor`` (preprocess, model, decode),
               blink decision, One Euro smoothing (``common.infer.smoothing``), one CSV row per
               frame, and the newest result for the display through a one-result slot.
    display    the main thread: draws the newest result and calls cv2.imshow / cv2.waitKey (from
               this thread only: macOS shows windows from the main thread only). A slow display
               skips results and never holds inference up. Headless, there is no window at all and
               the main thread only waits, which is also where Ctrl-C (SIGINT) and SIGTERM land.

The loop stops at the end of the video, on 'q' or Esc in the window (or closing it), after
``max_frames`` predicted frames, or on Ctrl-C / SIGTERM; each is a normal end: the threads are
joined, the capture released and the CSV finished. Counts: ``frames`` read from the source =
``processed`` (one CSV row each) + ``dropped`` (replaced, late, or still queued at the stop).

The CSV (``LIVE_COLUMNS``; see ``live_row``) is written as ``<name>.partial`` while the loop runs,
appended to in whole rows and flushed to the OS at most once a second, and renamed to ``<name>``
when the loop ends: a finished run leaves only the finished file, and a killed one (kill -9) leaves
``<name>.partial`` with every row up to its last second.

Stage latencies (``STAGES``) are printed once a second, as one line: frames per second over that
second, the median milliseconds of each stage over it, and the dropped count so far; the window
shows the same line.

The camera seam: ``open_camera(N)`` opens ``cv2.VideoCapture(N)``, unless the environment variable
``PREDICT_CAMERA_VIDEO`` names a video file, which is then played as the camera (at its own frame
rate, frame times from the clock); tests and demos without a camera use it, and in-process tests
may monkeypatch ``open_camera`` itself.
"""

from __future__ import annotations

import csv
import io
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from common.cli import signals_as_interrupt
from common.errors import ConfigurationError
from common.images import to_grayscale
from common.infer.inference import Prediction, PupilPredictor, overlay
from common.infer.smoothing import EllipseSmoother
from common.infer.video_frames import (
    FrameError,
    Roi,
    ViewerState,
    close_windows,
    display_available,
    handle_key,
    open_video,
    prepare_frame,
    show,
)
from common.prep.preprocess import Ellipse

LIVE_COLUMNS = ("frame", "time", "cx", "cy", "rx", "ry", "angle", "confidence", "blink")
STAGES = ("grab", "preprocess", "model", "decode", "display")
STAGE_LABELS = {"decode": "decode+ellipse"}
CAMERA_VIDEO_ENV = "PREDICT_CAMERA_VIDEO"
FALLBACK_FPS = 30.0  # for a video file that reports no frame rate
STATS_PERIOD_S = 1.0
CSV_FLUSH_PERIOD_S = 1.0
POLL_S = 0.05  # how often a waiting thread looks at the stop flag


# ----------------------------------------------------------------------------- sources
@dataclass
class Source:
    """An opened capture and how to read it.

    fps: frames per second, for pacing and video frame times (0: unknown, a camera may say so).
    paced: hand frames over no faster than ``fps`` (a video file in real time, a camera stand-in);
        a real camera paces itself (its read waits for the next frame).
    media_time: a frame's time is its position in the file (index / fps); else seconds on the
        clock since the first frame was read (a camera).
    realtime: keep only the newest frame (drops counted); else every frame is predicted.
    """

    capture: cv2.VideoCapture
    name: str
    fps: float
    paced: bool
    media_time: bool
    realtime: bool = True


def open_video_source(path, realtime: bool = True) -> Source:
    """A video file: paced at its frame rate in real time, else read as fast as inference goes."""
    capture, info = open_video(path)
    fps = info.fps
    if fps <= 0:
        print(f"warning: {path} reports no frame rate; assuming {FALLBACK_FPS:g} fps", file=sys.stderr)
        fps = FALLBACK_FPS
    return Source(capture, str(path), fps, paced=realtime, media_time=True, realtime=realtime)


def open_camera(index: int) -> Source:
    """Camera ``index`` (``cv2.VideoCapture(index)``), or the video file that the environment
    variable ``PREDICT_CAMERA_VIDEO`` names, played like a camera (see the module docstring)."""
    stand_in = os.environ.get(CAMERA_VIDEO_ENV)
    if stand_in:
        source = open_video_source(stand_in, realtime=True)
        return replace(source, name=f"camera {index} ({CAMERA_VIDEO_ENV}={stand_in})", media_time=False)
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        capture.release()
        raise FrameError(f"cannot open camera {index}")
    fps = capture.get(cv2.CAP_PROP_FPS)
    return Source(capture, f"camera {index}", fps if fps > 0 else 0.0, paced=False, media_time=False)


# ----------------------------------------------------------------------------- hand-over between threads
_END = object()  # the producer closed the slot and it is empty


class FrameSlot:
    """A hand-over from one producer thread to one consumer thread.

    lossy: holds ``capacity`` items; ``put`` on a full slot replaces the oldest, which is counted in
    ``dropped``. Otherwise ``put`` waits for room (or for ``close``). ``close`` ends the stream: the
    consumer still gets what is queued, then ``_END``; an item put after it is counted as dropped.
    """

    def __init__(self, capacity: int = 1, lossy: bool = True):
        self.capacity, self.lossy = capacity, lossy
        self.items: list = []
        self.dropped = 0
        self.closed = False
        self.cond = threading.Condition()

    def put(self, item) -> None:
        with self.cond:
            while not self.lossy and len(self.items) >= self.capacity and not self.closed:
                self.cond.wait(POLL_S)
            if self.closed:
                self.dropped += 1
                return
            if len(self.items) >= self.capacity:
                self.items.pop(0)
                self.dropped += 1
            self.items.append(item)
            self.cond.notify_all()

    def get(self, timeout: float = POLL_S):
        """The oldest item, ``_END`` once closed and empty, or None after ``timeout`` seconds."""
        with self.cond:
            if not self.items and not self.closed:
                self.cond.wait(timeout)
            if self.items:
                item = self.items.pop(0)
                self.cond.notify_all()
                return item
            return _END if self.closed else None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def discard(self) -> None:
        """Count what is still queued as dropped (the loop stopped before predicting it)."""
        with self.cond:
            self.dropped += len(self.items)
            self.items.clear()
            self.closed = True


# ----------------------------------------------------------------------------- statistics
class StageStats:
    """Per-stage latencies and the frame rate, from any thread; summarized once a period."""

    def __init__(self, period: float = STATS_PERIOD_S, clock: Callable[[], float] = time.monotonic):
        self.period, self.clock = period, clock
        self.lock = threading.Lock()
        self.samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
        self.frames = 0
        self.window_start = clock()
        self.line = ""  # the last summary, for the window

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.samples[stage].append(seconds)

    def frame_done(self) -> None:
        with self.lock:
            self.frames += 1

    def report(self, dropped: int) -> str | None:
        """The summary line if a period has passed since the last one (then a new period starts)."""
        now = self.clock()
        with self.lock:
            elapsed = now - self.window_start
            if elapsed < self.period:
                return None
            medians = {stage: statistics.median(values) * 1e3 if values else None
                       for stage, values in self.samples.items()}
            fps = self.frames / elapsed
            self.samples = {stage: [] for stage in STAGES}
            self.frames, self.window_start = 0, now
        self.line = format_stats(fps, medians, dropped)
        return self.line


def format_stats(fps: float, medians_ms: dict, dropped: int) -> str:
    """'fps 87.3 | ms grab 1.2, preprocess 0.8, ..., display - | dropped 4' ('-': no sample)."""
    parts = [f"{STAGE_LABELS.get(stage, stage)} " + ("-" if medians_ms.get(stage) is None
                                                       else f"{medians_ms[stage]:.1f}") for stage in STAGES]
    return f"fps {fps:.1f} | ms {', '.join(parts)} | dropped {dropped}"


# ----------------------------------------------------------------------------- the CSV
def live_row(index: int, seconds: float, ellipse: Ellipse | None, confidence: float, blink: bool) -> dict:
    """One row of the live CSV.

    frame: the frame's index in the video file, or among the frames read from the camera (from 0).
    time: seconds; the frame's position in a video file (index / fps), or for a camera the time it
        was read, on the clock, since the first frame was read.
    cx, cy, rx, ry: the pupil ellipse normalized as in the dataset and ellipses.csv: cx = x / W,
        cy = y / H, rx and ry = the semi-axes / R, R half the frame's diagonal, with W and H the
        frame's (or --roi's) size; smoothed when smoothing is on. Empty for a blink.
    angle: degrees, cv2.fitEllipse's angle for (rx, ry) in that order (0 for the ellipse
        regressor); never smoothed. Empty for a blink.
    confidence: ``Prediction.confidence``, in [0, 1].
    blink: 1 when no pupil was found (or its confidence was below the minimum), else 0.
    """
    row = dict.fromkeys(LIVE_COLUMNS, "")
    row.update(frame=index, time=f"{seconds:.6f}", confidence=f"{confidence:.6f}", blink=int(blink))
    if ellipse is not None:
        row.update({key: f"{getattr(ellipse, key):.6f}" for key in ("cx", "cy", "rx", "ry", "angle")})
    return row


class CsvLog:
    """Rows written to ``<path>.partial`` as they come, flushed to the OS in whole rows at most once
    every ``period`` seconds; ``close`` flushes, fsyncs and renames it to ``path``."""

    def __init__(self, path, columns=LIVE_COLUMNS, period: float = CSV_FLUSH_PERIOD_S):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            print(f"warning: replacing {self.partial}, left by a run that did not finish", file=sys.stderr)
        self.fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.buffer = io.StringIO()
        self.writer = csv.DictWriter(self.buffer, fieldnames=columns, lineterminator="\n")
        self.writer.writeheader()
        self.period, self.last_flush = period, time.monotonic()
        self.rows = 0
        self.flush()

    def add(self, row: dict) -> None:
        self.writer.writerow(row)
        self.rows += 1
        if time.monotonic() - self.last_flush >= self.period:
            self.flush()

    def flush(self) -> None:
        data = self.buffer.getvalue().encode()
        while data:  # one write of whole rows; loop only if the OS took part of it
            data = data[os.write(self.fd, data):]
        self.buffer.seek(0)
        self.buffer.truncate()
        self.last_flush = time.monotonic()

    def close(self) -> Path:
        if self.fd is None:
            return self.path
        try:
            self.flush()
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = None
        os.replace(self.partial, self.path)
        return self.path


# ----------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class GrabbedFrame:
    index: int
    time: float  # seconds (see ``live_row``)
    image: np.ndarray  # (H, W, 3) BGR as decoded, or (H, W)


@dataclass(frozen=True)
class LiveResult:
    """What the display gets: the (ROI-cropped, gray) frame and its prediction, whose ellipse is the
    one written to the CSV (smoothed if smoothing is on, None for a blink)."""

    index: int
    time: float
    frame: np.ndarray  # (h, w) uint8
    prediction: Prediction
    blink: bool
    status: str  # the latest statistics line


@dataclass
class LiveOptions:
    roi: Roi | None = None  # (x, y, w, h): crop every frame first, as predict.py --roi
    smoother: EllipseSmoother | None = None
    min_confidence: float = 0.0  # a pupil less confident than this is a blink
    max_frames: int | None = None  # stop after this many predicted frames


@dataclass
class LiveSummary:
    frames: int  # read from the source
    processed: int  # predicted; one CSV row each
    dropped: int  # read but never predicted
    blinks: int
    displayed: int
    seconds: float
    csv: Path
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", "window", "max-frames"; None: the input ended

    @property
    def fps(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


Display = Callable[[LiveResult | None], bool]  # None: no new result; False: stop the loop


class LiveLoop:
    """Run ``predictor`` over ``source`` live; ``run()`` returns a ``LiveSummary``.

    display: called in the main thread with the newest result (or None when there is none, to keep
        a window responsive); returns False to stop. None: headless.
    log: where the once-a-second statistics lines go.
    """

    def __init__(self, predictor: PupilPredictor, source: Source, csv_path,
                 options: LiveOptions | None = None, display: Display | None = None,
                 log: Callable[[str], None] | None = None):
        self.predictor, self.source, self.display = predictor, source, display
        self.options = options or LiveOptions()
        self.log = log or (lambda line: print(line, flush=True))
        self.csv_path = Path(csv_path)
        self.frames = FrameSlot(1, lossy=True) if source.realtime else FrameSlot(4, lossy=False)
        self.results = FrameSlot(1, lossy=True)
        self.stats = StageStats()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.read = self.late = self.processed = self.blinks = self.displayed = 0
        self.stopped_by: str | None = None

    @property
    def dropped(self) -> int:
        return self.late + self.frames.dropped

    def run(self) -> LiveSummary:
        try:
            csv_log = CsvLog(self.csv_path)
        except BaseException:
            self.source.capture.release()
            raise
        # The grabber's end only closes its slot (inference still predicts what is queued); the end
        # of inference ends the run. Daemons: a camera that hangs cannot keep the process alive.
        threads = {name: threading.Thread(target=self._guard, args=(name, loop, stop_at_end), name=name,
                                          daemon=True)
                   for name, loop, stop_at_end in (("grabber", self._grab_loop, False),
                                                   ("inference", partial(self._infer_loop, csv_log), True))}
        self.ended = {name: threading.Event() for name in threads}
        start = time.monotonic()
        try:
            for thread in threads.values():
                thread.start()
            with signals_as_interrupt():
                self._present()
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: a normal way to end a live session
            self.stopped_by = str(exc) or "SIGINT"
        finally:
            self._shut_down(threads, csv_log)
        if self.errors:
            raise self.errors[0]
        return LiveSummary(self.read, self.processed, self.dropped, self.blinks, self.displayed,
                           time.monotonic() - start, self.csv_path, self.stopped_by)

    def _shut_down(self, threads: dict[str, threading.Thread], csv_log: CsvLog) -> None:
        """Stop both threads, release the capture, count what was left, finish the CSV.

        The main thread waits on the threads' ``ended`` events, never in ``Thread.join`` until a
        thread has ended: a Ctrl-C that interrupts ``join`` can leave CPython (3.11, 3.12) believing
        a running thread has stopped, and the process then exits under it.
        """
        self.stop.set()
        self.frames.close()  # wakes a grabber waiting for room
        for name in ("inference", "grabber"):  # inference first: it finishes the frame it holds
            if self.ended[name].wait(timeout=10):
                threads[name].join()
        if self.ended["grabber"].is_set():
            self.source.capture.release()
        else:  # a camera whose read never returns: releasing it under that read could crash
            print(f"warning: {self.source.name} did not answer; not released", file=sys.stderr)
        self.frames.discard()
        csv_log.close()
        if self.display is not None and hasattr(self.display, "close"):
            self.display.close()

    def _guard(self, name: str, loop: Callable[[], None], stop_at_end: bool) -> None:
        """Run a thread's loop; an exception stops everything and is raised again by ``run``."""
        try:
            loop()
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread, raised there
            self.errors.append(exc)
            self.stop.set()
        finally:
            if stop_at_end:
                self.stop.set()
            self.ended[name].set()

    def _grab_loop(self) -> None:
        source, start = self.source, None  # start: the clock when frame 0 was read
        try:
            while not self.stop.is_set():
                if source.paced and start is not None and self._overdue(start):
                    if not source.capture.grab():  # skipped without being decoded
                        break
                    self.read += 1
                    self.late += 1
                    continue
                began = time.perf_counter()
                ok, image = source.capture.read()
                if not ok:
                    break
                self.stats.add("grab", time.perf_counter() - began)
                now = time.monotonic()
                start = now if start is None else start
                if source.paced:  # wait for the frame's time on the file's clock
                    self.stop.wait(max(0.0, start + self.read / source.fps - now))
                seconds = self.read / source.fps if source.media_time else time.monotonic() - start
                self.frames.put(GrabbedFrame(self.read, seconds, image))
                self.read += 1
            if self.read == 0 and not self.stop.is_set():
                raise FrameError(f"cannot read any frame from {source.name}")
        finally:
            self.frames.close()

    def _overdue(self, start: float) -> bool:
        """Paced reading: whether the frame after the next one is already due (the next one's time
        has passed), on the clock started at ``start`` when frame 0 was read."""
        return time.monotonic() > start + (self.read + 1) / self.source.fps

    def _infer_loop(self, csv_log: CsvLog) -> None:
        try:
            while not self.stop.is_set():
                item = self.frames.get()
                if item is _END:
                    break
                if item is None:
                    continue
                result = self._predict(item)
                csv_log.add(live_row(item.index, item.time, result.prediction.ellipse,
                                     result.prediction.confidence, result.blink))
                self.processed += 1
                self.blinks += result.blink
                self.results.put(result)
                self.stats.frame_done()
                line = self.stats.report(self.dropped)
                if line is not None:
                    self.log(line)
                if self.options.max_frames is not None and self.processed >= self.options.max_frames:
                    self.stopped_by = "max-frames"
                    break
        finally:
            self.results.close()

    def _predict(self, item: GrabbedFrame) -> LiveResult:
        """One frame -> its result; adds the preprocess, model and decode+ellipse times."""
        began = time.perf_counter()
        frame = prepare_frame(to_grayscale(item.image), self.options.roi, grayscale=False)  # (h, w)
        timings = {"preprocess": time.perf_counter() - began}
        prediction = self.predictor.predict(frame, timings)
        began = time.perf_counter()
        confidence = prediction.confidence or 0.0
        blink = prediction.ellipse is None or confidence < self.options.min_confidence
        ellipse = None if blink else prediction.ellipse
        if self.options.smoother is not None:
            ellipse = self.options.smoother(ellipse, item.time, *frame.shape)
        timings["decode"] += time.perf_counter() - began
        for stage, seconds in timings.items():
            self.stats.add(stage, seconds)
        shown = replace(prediction, ellipse=ellipse, confidence=confidence)
        return LiveResult(item.index, item.time, frame, shown, blink, self.stats.line)

    def _present(self) -> None:
        """The main thread: show results until the inference thread ends or the display says stop."""
        if self.display is None:
            while not self.ended["inference"].wait(POLL_S):  # short waits: signals are handled promptly
                pass
            return
        while True:
            result = self.results.get()
            if result is _END:
                return
            began = time.perf_counter()
            keep_going = self.display(result)
            if result is not None:
                self.stats.add("display", time.perf_counter() - began)
                self.displayed += 1
            if not keep_going:
                self.stopped_by = "window"
                return


# ----------------------------------------------------------------------------- the window
def render(result: LiveResult, min_width: int = 480) -> np.ndarray:
    """The overlay of ``result`` (mask tinted, ellipse outlined) with the statistics line and the
    frame's index, time and blink state; small frames are enlarged so the text stays readable."""
    image = overlay(result.frame, result.prediction)  # (h, w, 3) BGR
    scale = max(1, -(-min_width // image.shape[1]))
    if scale > 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    lines = [result.status or "measuring...",
             f"frame {result.index}  t {result.time:.2f} s" + ("  BLINK" if result.blink else "")]
    for row, text in enumerate(lines):
        cv2.putText(image, text, (5, 15 + 16 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1,
                    cv2.LINE_AA)
    return image


class WindowDisplay:
    """An OpenCV window showing the newest result; 'q' or Esc (or closing the window) stops."""

    def __init__(self, title: str = "predict"):
        if not display_available():
            raise ConfigurationError("no display available for the live window; use --headless")
        self.title, self.opened = title, False

    def __call__(self, result: LiveResult | None) -> bool:
        if result is not None:
            show(self.title, render(result))
            self.opened = True
        state, _ = handle_key(cv2.waitKey(1), ViewerState())
        if state.done:
            return False
        return not (self.opened and cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1)

    def close(self) -> None:
        close_windows()
