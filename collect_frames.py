"""Extract frames from a video into a dataset folder, automatically or by hand.

Examples:
    python collect_frames.py eye.mp4 --dataset frames/ --every 10
    python collect_frames.py eye.mp4 --dataset frames/ --every-sec 0.5 --start-sec 2 --max-frames 100
    python collect_frames.py eye.mp4 --dataset frames/ --every 5 --grayscale --roi 100 40 640 400
    python collect_frames.py eye.mp4 --dataset frames/            # interactive: needs a display

Writes, under <dataset>/<video stem>/:
    images/<video stem>_<frame index, 6 digits>.png   the frame, cropped to --roi, gray with --grayscale
    previews/<same>.jpg                               a copy at most 320 pixels wide
    meta/<same>.json                                  source_video, frame_index, time_sec, roi,
                                                      grayscale, size ([h, w] of the saved image)

Without --every or --every-sec the video plays in a window (--interactive): 's' saves the current
frame, SPACE pauses and resumes, 'q' (or ESC) quits. --roi is X Y W H in pixels of the full frame.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from common.cli import report_errors
from common.infer.video_frames import (
    FrameError,
    FrameSaver,
    frame_step,
    iter_selected_frames,
    open_video,
    require_display,
    run_viewer,
    start_frame_index,
    validate_roi,
)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Extract frames from a video", add_help=add_help)
    parser.add_argument("video", type=Path, help="video file")
    parser.add_argument("--dataset", required=True, type=Path,
                        help="output root; frames go to <dataset>/<video stem>/")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--every", type=int, help="save every N-th frame")
    mode.add_argument("--every-sec", type=float, help="save one frame every S seconds")
    mode.add_argument("--interactive", action="store_true",
                      help="choose frames in a window (default without --every/--every-sec)")
    parser.add_argument("--start-sec", type=float, default=0.0, help="skip the first T seconds")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after saving K frames")
    parser.add_argument("--grayscale", action="store_true", help="save single-channel images")
    parser.add_argument("--roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"), default=None,
                        help="crop saved frames to this rectangle")
    return parser


def check_options(args: argparse.Namespace) -> None:
    if args.start_sec < 0:
        raise FrameError(f"--start-sec must be >= 0, got {args.start_sec}")
    if args.max_frames is not None and args.max_frames < 1:
        raise FrameError(f"--max-frames must be >= 1, got {args.max_frames}")


def collect_automatically(capture, saver: FrameSaver, args: argparse.Namespace) -> int:
    step = frame_step(saver.fps, every=args.every, every_sec=args.every_sec)
    start = start_frame_index(args.start_sec, saver.fps)
    frames = iter_selected_frames(capture, start, step, args.max_frames)
    saved = 0
    # disable=None: a progress bar on a terminal, none in logs and pipes.
    for index, frame in tqdm(frames, desc="collect", unit="frame", disable=None):
        saver.save(index, frame)
        saved += 1
    return saved


@report_errors
def main(args: argparse.Namespace) -> Path:
    check_options(args)
    interactive = args.interactive or (args.every is None and args.every_sec is None)
    if interactive:
        require_display()  # before touching the video, so a headless run fails at once
    capture, info = open_video(args.video)
    try:
        if info.width > 0 and info.height > 0:
            validate_roi(args.roi, info.height, info.width)  # frames are checked again when saved
        saver = FrameSaver.for_video(args.dataset, args.video, info.fps, args.roi, args.grayscale)
        if interactive:
            saved = run_viewer(capture, saver, start_frame_index(args.start_sec, info.fps), args.max_frames)
        else:
            saved = collect_automatically(capture, saver, args)
    finally:
        capture.release()
    print(f"saved {saved} frames to {saver.out_dir}")
    return saver.out_dir


if __name__ == "__main__":
    main(get_args_parser().parse_args())
