"""Predict pupil masks and ellipses for eye images, folders of images or videos, or live from a
camera or a video.

Examples:
    python predict.py --model best_efficientvit_model.pt --input frame.png --output-dir predictions/
    python predict.py --model model.onnx --input frames/ --output-dir predictions/ \\
        --expected-model efficientvit
    python predict.py --model best_efficientvit_model.pt --input eye.mp4 --every 5 --output-dir predictions/
    # the same crop as collect_frames.py --roi, for a model trained on those frames
    python predict.py --model best_efficientvit_model.pt --input eye.mp4 --roi 100 40 640 400
    # live: a window with the ellipse, FPS and per-stage latency; q or Esc quits
    python predict.py --model best_efficientvit_model.pt --camera 0 --smooth
    python predict.py --model model.onnx eye.mp4              # the same as --input eye.mp4 --live
    # live without a window, printing a statistics line a second; every frame (a benchmark)
    python predict.py --model model.onnx eye.mp4 --headless --no-realtime
    # an edge device's single core
    python predict.py --model model.onnx --camera 0 --threads 1

Batch (--input): writes, under --output-dir:
    masks/<name>.png     pupil mask, 0 / 255, at the input frame's size
    overlays/<name>.png  the frame with the mask tinted and the ellipse outlined (unless --no-overlay)
    ellipses.csv         one row per frame: pixel and normalized ellipse, ``found`` 0/1

ellipses.csv columns: ``cx_px, cy_px`` the centre and ``semi_axis_1_px, semi_axis_2_px`` the
semi-axes in pixels, in cv2.fitEllipse's order with its ``angle_deg``; ``cx, cy, rx, ry`` the same
ellipse normalized as in the dataset (cx = x / W, cy = y / H, rx and ry = semi-axes / R, with R
half the frame's diagonal). The ellipse regressor's ellipse is axis-aligned (angle 0).

<name> is the image's file stem, or <video stem>_<frame index, 6 digits> for video frames.
With --roi X Y W H every frame is first cropped to that rectangle (as collect_frames.py does):
masks and overlays show the crop, the ``*_px`` columns of ellipses.csv are in full-frame pixels,
and the normalized columns are relative to the crop.
Images must be single-channel 8-bit unless --grayscale is given; video frames are decoded by
OpenCV as BGR and always converted to grayscale.

An .onnx model runs in ONNX Runtime on --threads threads (default: all cores). --ort-layout auto
(the default) times ONNX Runtime's channel-blocked convolution layout against the plain one on the
loaded file (22 model runs) and keeps the faster, printing both times; thin models such as
TinyEfficientViT-Micro run faster in the plain layout on some CPUs. blocked or plain skip the trial.

Live (a positional VIDEO, --input VIDEO --live, or --camera N; common/infer/live.py): frames are
grabbed, predicted and shown by separate threads, so a slow window never holds inference up. In real
time (the default) only the newest frame is predicted: a video plays at its own frame rate, and a
frame that was replaced or whose time passed while the model was busy is dropped and counted; with
--no-realtime every frame of a video is predicted, as fast as the model goes. Once a second a line
gives the frames per second, the median ms of each stage (grab, preprocess, model, decode+ellipse,
display) over that second and the dropped count; the window shows it too. --headless: no window.
It stops at the end of the video, on q / Esc, after --max-frames frames, or on Ctrl-C (all normal
ends, exit 0). Writes --output-dir/live.csv, one row per predicted frame:
    frame       the frame's index in the video, or among the frames read from the camera
    time        seconds: the frame's time in the video (frame / fps), or, for a camera, when it was
                read, since the first frame
    cx, cy      the pupil centre normalized as in ellipses.csv and the dataset: x / W, y / H
    rx, ry      the semi-axes / R (R half the frame's diagonal), in cv2.fitEllipse's order; W, H and R
                are those of the frame, or of the --roi crop
    angle       degrees, fitEllipse's angle (0 for the ellipse regressor); never smoothed
    confidence  0..1: for a segmentation model the mean pupil probability inside the predicted mask
                (0 when it is empty); for the ellipse regressor, how much darker the ellipse is than
                the ring around it in the preprocessed frame (a proxy; see pupil_confidence)
    blink       1 when no pupil was found (or its confidence is below --min-confidence), else 0;
                cx ... angle are empty on blink rows
While it runs the rows go to live.csv.partial, flushed once a second, renamed to live.csv at the end:
a killed run leaves live.csv.partial with its rows. --smooth filters cx, cy, rx, ry with the One Euro
filter (--min-cutoff Hz at rest, --beta Hz per pixel/s of speed, --d-cutoff Hz for the speed; see
common/infer/smoothing.py), reset at every blink. For tests without a camera, the environment
variable PREDICT_CAMERA_VIDEO=clip.avi makes --camera N play that file as the camera.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from common.cli import non_negative_float, non_negative_int, positive_float, positive_int, report_errors
from common.errors import InputError
from common.files import atomic_write_text
from common.images import read_frame, to_grayscale, write_image
from common.infer import live
from common.infer.inference import ORT_LAYOUTS, PupilPredictor, overlay
from common.infer.smoothing import DEFAULT_BETA, DEFAULT_D_CUTOFF, DEFAULT_MIN_CUTOFF, EllipseSmoother
from common.infer.video_frames import FrameError, iter_selected_frames, open_video, prepare_frame
from common.models import MODEL_NAMES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
CSV_COLUMNS = ("source", "frame", "cx_px", "cy_px", "semi_axis_1_px", "semi_axis_2_px",
               "angle_deg", "cx", "cy", "rx", "ry", "found")
SMOOTHING = ("min_cutoff", "beta", "d_cutoff")
LIVE_ONLY = ("headless", "no_realtime", "max_frames", "min_confidence", "smooth", *SMOOTHING)
BATCH_ONLY = ("every", "grayscale", "no_overlay")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Pupil segmentation inference", add_help=add_help)
    parser.add_argument("--model", required=True, type=Path, help="checkpoint (.pt) or .onnx file")
    parser.add_argument("video", nargs="?", type=Path, default=None,
                        help="a video to run live (the same as --input VIDEO --live)")
    parser.add_argument("--input", type=Path, default=None, help="image, folder of images, or video")
    parser.add_argument("--output-dir", default=Path("predictions"), type=Path)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--expected-model", choices=MODEL_NAMES, default=None,
                        help="refuse a model file of another architecture")
    parser.add_argument("--threshold", type=float, default=None,
                        help="pupil probability threshold (default: argmax)")
    parser.add_argument("--every", type=int, default=1, help="videos: predict every N-th frame")
    parser.add_argument("--grayscale", action="store_true", help="convert colour images to gray")
    parser.add_argument("--no-overlay", action="store_true", help="do not write overlays/")
    parser.add_argument("--roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"), default=None,
                        help="crop every frame to this rectangle of the full frame first")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="ONNX Runtime threads for an .onnx model (default: all cores)")
    parser.add_argument("--ort-layout", choices=ORT_LAYOUTS, default="auto",
                        help="ONNX Runtime's CPU convolution layout; auto times both, keeps the faster")
    add_live_arguments(parser)
    return parser


def add_live_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live loop (a VIDEO, --input VIDEO --live, or --camera N)")
    group.add_argument("--camera", type=non_negative_int, default=None,
                       help="camera index N (cv2.VideoCapture(N))")
    group.add_argument("--live", action="store_true", help="run --input VIDEO live instead of writing masks")
    group.add_argument("--headless", action="store_true", help="no window; statistics lines only")
    group.add_argument("--no-realtime", action="store_true",
                       help="video: predict every frame as fast as the model goes (no pacing, no drops)")
    group.add_argument("--max-frames", type=positive_int, default=None, help="stop after N predicted frames")
    group.add_argument("--min-confidence", type=confidence_value, default=0.0,
                       help="a pupil whose confidence is below this is a blink (default 0: any pupil)")
    group.add_argument("--smooth", action="store_true", help="One Euro filter on the ellipse")
    group.add_argument("--min-cutoff", type=positive_float, default=DEFAULT_MIN_CUTOFF,
                       help=f"--smooth: cutoff at rest, Hz (default {DEFAULT_MIN_CUTOFF})")
    group.add_argument("--beta", type=non_negative_float, default=DEFAULT_BETA,
                       help=f"--smooth: cutoff increase per pixel/s of speed, Hz (default {DEFAULT_BETA})")
    group.add_argument("--d-cutoff", type=positive_float, default=DEFAULT_D_CUTOFF,
                       help=f"--smooth: cutoff of the speed estimate, Hz (default {DEFAULT_D_CUTOFF})")


def confidence_value(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got '{text}'")
    return value


def list_inputs(path: Path) -> list[Path]:
    """The image and video files ``path`` names: itself, or the supported files of a folder."""
    if path.is_dir():
        named = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        files = [p for p in named if p.is_file()]
        if not files:
            raise InputError(f"no images or videos in folder {path}")
        return files + [p for p in named if not p.is_file()]  # skipped, with a warning, when read
    if not path.exists():
        raise InputError(f"input not found: {path}")
    return [path]


FrameItem = tuple[Path, int, str, np.ndarray]  # (source file, frame index, output name, frame)


def iter_frames(files: list[Path], every: int, grayscale: bool, skipped: list | None = None
                ) -> Iterator[FrameItem]:
    """Yield (source file, frame index, output name, (H, W) uint8 frame) for every input frame.

    With ``skipped`` (a folder of inputs), an image that cannot be used is reported on one line,
    appended there and passed over; without it, it stops the run (one named input).
    """
    for path in files:
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            yield from iter_video(path, every)
            continue
        try:
            frame = read_frame(path, grayscale=grayscale)
        except InputError as exc:
            if skipped is None:
                raise
            print(f"warning: skipped {exc}", file=sys.stderr)
            skipped.append(path)
            continue
        yield path, 0, path.stem, frame


def iter_video(path: Path, every: int) -> Iterator[FrameItem]:
    """Every ``every``-th frame of a video, as (H, W) grayscale; an unreadable video is an InputError."""
    try:
        capture, _ = open_video(path)
        try:
            for index, frame in iter_selected_frames(capture, start=0, step=float(every)):
                yield path, index, f"{path.stem}_{index:06d}", to_grayscale(frame)
        finally:
            capture.release()
    except FrameError as exc:
        message = str(exc)
        raise InputError(message if str(path) in message else f"{message} ({path})") from None


def csv_row(source: Path, frame_index: int, prediction, offset: tuple[int, int] = (0, 0)) -> dict:
    """One ellipses.csv row; ``offset`` (x, y) of the ROI moves the pixel centre to full-frame pixels."""
    row = dict.fromkeys(CSV_COLUMNS, "")
    row.update(source=str(source), frame=frame_index, found=int(prediction.ellipse is not None))
    if prediction.ellipse is not None:
        (x, y), (a, b), angle = prediction.ellipse_pixels()
        e = prediction.ellipse
        values = dict(cx_px=x + offset[0], cy_px=y + offset[1], semi_axis_1_px=a, semi_axis_2_px=b,
                      angle_deg=angle, cx=e.cx, cy=e.cy, rx=e.rx, ry=e.ry)
        row.update({key: f"{value:.6f}" for key, value in values.items()})
    return row


def check_unique_names(files: list[Path]) -> None:
    stems = [p.stem for p in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise InputError(f"several inputs share the name(s) {duplicates}; outputs would collide")


def changed_flags(args: argparse.Namespace, names) -> list[str]:
    """The flags among ``names`` (argparse dests) that differ from their defaults, as '--name'."""
    defaults = get_args_parser()
    return [f"--{name.replace('_', '-')}" for name in names
            if getattr(args, name) != defaults.get_default(name)]


def is_live_run(args: argparse.Namespace) -> bool:
    """Whether the flags ask for the live loop (else a batch run); InputError for flags that do not mix."""
    inputs = {"a VIDEO": args.video, "--input": args.input, "--camera": args.camera}
    given = [name for name, value in inputs.items() if value is not None]
    if len(given) != 1:
        got = f"; got {' and '.join(given)}" if given else ""
        raise InputError(f"give one input: --input PATH, or a VIDEO or --camera N for the live loop{got}")
    live_run = args.live or args.input is None
    misplaced = changed_flags(args, BATCH_ONLY if live_run else LIVE_ONLY)
    if misplaced:
        where = "batch runs (--input without --live)" if live_run else "the live loop (a VIDEO or --camera N)"
        raise InputError(f"{', '.join(misplaced)} only apply to {where}")
    if changed_flags(args, SMOOTHING) and not args.smooth:
        raise InputError(f"{', '.join(changed_flags(args, SMOOTHING))} tune the smoothing: add --smooth")
    if args.camera is not None and args.no_realtime:
        raise InputError("--no-realtime is for video files; a camera is always read in real time")
    video = args.video or args.input
    if live_run and video is not None and (video.is_dir() or video.suffix.lower() in IMAGE_SUFFIXES):
        kind = "a folder" if video.is_dir() else "an image"
        raise InputError(f"the live loop reads a video or a camera, not {kind} ({video}); "
                         "use --input for images and folders")
    return live_run


def run_live(args: argparse.Namespace, predictor: PupilPredictor) -> Path:
    """The live loop over --camera N or the video, with the window unless --headless."""
    display = None if args.headless else live.WindowDisplay()
    try:
        if args.camera is not None:
            source = live.open_camera(args.camera)
        else:
            source = live.open_video_source(args.video or args.input, realtime=not args.no_realtime)
    except FrameError as exc:
        raise InputError(str(exc)) from None
    smoother = EllipseSmoother(args.min_cutoff, args.beta, args.d_cutoff) if args.smooth else None
    options = live.LiveOptions(roi=tuple(args.roi) if args.roi else None, smoother=smoother,
                               min_confidence=args.min_confidence, max_frames=args.max_frames)
    summary = live.LiveLoop(predictor, source, Path(args.output_dir) / "live.csv", options, display).run()
    stopped = f", stopped by {summary.stopped_by}" if summary.stopped_by else ""
    print(f"{summary.frames} frames read from {source.name}: {summary.processed} predicted "
          f"({summary.fps:.1f} fps), {summary.dropped} dropped, {summary.blinks} blinks{stopped}; "
          f"wrote {summary.csv}")
    return summary.csv


@report_errors
def main(args: argparse.Namespace) -> Path:
    live_run = is_live_run(args)
    if args.every < 1:
        raise InputError(f"--every must be >= 1, got {args.every}")
    predictor = PupilPredictor(args.model, device=args.device, threshold=args.threshold,
                               expected_model=args.expected_model, threads=args.threads,
                               layout=args.ort_layout)
    if predictor.layout_ms:
        trial = ", ".join(f"{layout} {ms:.2f} ms" for layout, ms in predictor.layout_ms.items())
        print(f"onnxruntime layout: {trial} per frame; using {predictor.layout}")
    if live_run:
        return run_live(args, predictor)
    files = list_inputs(args.input)
    check_unique_names(files)
    out = Path(args.output_dir)
    rows, skipped = [], [] if args.input.is_dir() else None
    # disable=None: a progress bar on a terminal, none in logs and pipes.
    progress = tqdm(iter_frames(files, args.every, args.grayscale, skipped), desc="predict", unit="frame",
                    disable=None)
    offset = (args.roi[0], args.roi[1]) if args.roi else (0, 0)
    for source, index, name, frame in progress:
        frame = prepare_frame(frame, args.roi, grayscale=False)  # (h, w): the ROI, or the whole frame
        prediction = predictor.predict(frame)
        write_image(out / "masks" / f"{name}.png", prediction.mask * 255)
        if not args.no_overlay:
            write_image(out / "overlays" / f"{name}.png", overlay(frame, prediction))
        rows.append(csv_row(source, index, prediction, offset))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = atomic_write_text(out / "ellipses.csv", text.getvalue())
    found = sum(row["found"] for row in rows)
    unused = f", {len(skipped)} unreadable files skipped" if skipped else ""
    print(f"{len(rows)} frames, pupil found in {found}{unused}; wrote {csv_path}")
    return csv_path


if __name__ == "__main__":
    main(get_args_parser().parse_args())
