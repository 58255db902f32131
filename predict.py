"""Predict pupil masks and ellipses for eye images, folders of images or videos.

Examples:
    python predict.py --model best_efficientvit_model.pt --input frame.png --output-dir predictions/
    python predict.py --model model.onnx --input frames/ --output-dir predictions/ --expected-model efficientvit
    python predict.py --model best_efficientvit_model.pt --input eye.mp4 --every 5 --output-dir predictions/
    # the same crop as collect_frames.py --roi, for a model trained on those frames
    python predict.py --model best_efficientvit_model.pt --input eye.mp4 --roi 100 40 640 400

Writes, under --output-dir:
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
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from tqdm import tqdm

from common.cli import report_errors
from common.frames import prepare_frame
from common.inference import InputError, PupilPredictor, overlay, read_frame
from common.io import atomic_path, atomic_write_text
from common.models import MODEL_NAMES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
CSV_COLUMNS = ("source", "frame", "cx_px", "cy_px", "semi_axis_1_px", "semi_axis_2_px",
               "angle_deg", "cx", "cy", "rx", "ry", "found")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Pupil segmentation inference", add_help=add_help)
    parser.add_argument("--model", required=True, type=Path, help="checkpoint (.pt) or .onnx file")
    parser.add_argument("--input", required=True, type=Path, help="image, folder of images, or video")
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
    return parser


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
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise InputError(f"cannot open video {path}")
    index = 0
    try:
        while capture.grab():  # skipped frames are grabbed but never decoded
            if index % every == 0:
                ok, frame = capture.retrieve()  # (H, W, 3) BGR
                if not ok:
                    raise InputError(f"cannot decode frame {index} of video {path}")
                gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
                yield path, index, f"{path.stem}_{index:06d}", gray
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise InputError(f"cannot decode any frame of video {path}")


def write_png(path: Path, image) -> None:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"cannot write {path}")


def csv_row(source: Path, frame_index: int, prediction, offset: tuple[int, int] = (0, 0)) -> dict:
    """One ellipses.csv row; ``offset`` (x, y) of the ROI moves the pixel centre to full-frame pixels."""
    row = dict.fromkeys(CSV_COLUMNS, "")
    row.update(source=str(source), frame=frame_index, found=int(prediction.ellipse is not None))
    if prediction.ellipse is not None:
        (x, y), (a, b), angle = prediction.ellipse_pixels()
        e = prediction.ellipse
        values = dict(cx_px=x + offset[0], cy_px=y + offset[1], semi_axis_1_px=a, semi_axis_2_px=b, angle_deg=angle,
                      cx=e.cx, cy=e.cy, rx=e.rx, ry=e.ry)
        row.update({key: f"{value:.6f}" for key, value in values.items()})
    return row


def check_unique_names(files: list[Path]) -> None:
    stems = [p.stem for p in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise InputError(f"several inputs share the name(s) {duplicates}; outputs would collide")


@report_errors
def main(args: argparse.Namespace) -> Path:
    if args.every < 1:
        raise InputError(f"--every must be >= 1, got {args.every}")
    files = list_inputs(args.input)
    check_unique_names(files)
    predictor = PupilPredictor(args.model, device=args.device, threshold=args.threshold,
                               expected_model=args.expected_model)
    out = Path(args.output_dir)
    rows, skipped = [], [] if args.input.is_dir() else None
    # disable=None: a progress bar on a terminal, none in logs and pipes.
    progress = tqdm(iter_frames(files, args.every, args.grayscale, skipped), desc="predict", unit="frame",
                    disable=None)
    offset = (args.roi[0], args.roi[1]) if args.roi else (0, 0)
    for source, index, name, frame in progress:
        frame = prepare_frame(frame, args.roi, grayscale=False)  # (h, w): the ROI, or the whole frame
        prediction = predictor.predict(frame)
        write_png(out / "masks" / f"{name}.png", prediction.mask * 255)
        if not args.no_overlay:
            write_png(out / "overlays" / f"{name}.png", overlay(frame, prediction))
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
