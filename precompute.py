"""Preprocess OpenEDS (or your own labelled images) once into parquet shards and publish them on the Hub.

Pipeline per sample (common/prep/preprocess.py): binarize -> skip empty masks -> gamma 0.8 ->
CLAHE 1.5/8x8 -> ellipse -> spatial weights -> distance maps. Runs on all cores, resumes where a
previous run stopped, and writes a manifest of counts, skipped samples, parameters and versions.

``--source folder`` imports a folder dataset instead (common/prep/folder_source.py): DIR/images/ with
DIR/masks/, a CVAT "Segmentation mask 1.1" export, YOLO segmentation polygons (DIR/images/ with
DIR/labels/, also split into train/val folders) or COCO JSON (polygons or RLE). Frames are
letterboxed into --size (padding recorded in the manifest), the export's split folders are used
or else a stratified train/validation split is written to DIR/splits/ unless one is there, and the
output has the same schema as OpenEDS.

Examples:
    # the embedded synthetic dataset, kept local
    python precompute.py --synthetic 200 --no-push
    # domain-randomized synthetic frames: a training family and a held-out family of cameras
    python precompute.py --synthetic 2000 --randomized train --raw-dir raw_tr --output-dir data_tr --no-push
    python precompute.py --synthetic 500 --randomized heldout --raw-dir raw_ho --output-dir data_ho --no-push
    # the real dataset: download from Kaggle, preprocess, push to the Hub
    python precompute.py --hf-repo Conner/sddec25-01
    # already downloaded raw data; add the validation split to an existing output
    python precompute.py --skip-download --raw-dir ./openeds_raw --splits validation --no-push
    # recompute a sample of rows from raw and compare them with the stored dataset
    python precompute.py --validate --skip-download --raw-dir ./openeds_raw
    # the same check of the published dataset (downloaded), even if ./precompute_output exists
    python precompute.py --validate --hf-repo Conner/sddec25-01 --skip-download --raw-dir ./openeds_raw
    # your own frames labelled in CVAT, letterboxed to 240x320, kept local
    python precompute.py --source folder --raw-dir my_eyes/ --size 240 320 --output-dir my_eyes_data --no-push
    # class-index masks where the pupil is 3, at the frames' own size
    python precompute.py --source folder --raw-dir labelled/ --pupil-class 3 --size native --no-push
    # an Ultralytics YOLO segmentation export (images/{train,val}, labels/{train,val}), pupil = class 1
    python precompute.py --source folder --raw-dir yolo_export/ --pupil-class 1 --size 320 240 --no-push
    # a Roboflow COCO export (train/, valid/ with _annotations.coco.json), pupil = category "pupil"
    python precompute.py --source folder --raw-dir coco_export/ --pupil-class pupil --no-push
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common.cli import parse_frame_size, report_errors
from common.errors import UserError
from common.files import atomic_write_json
from common.prep import folder_source, hub
from common.prep import openeds_source as raw_sources
from common.prep.build_dataset import SampleOptions, build_dataset, default_workers
from common.prep.synthetic import FAMILIES, generate_raw_dataset
from common.prep.verify_dataset import FLOAT_TOLERANCE, validate_dataset
from common.schema import DATA_DIR
from common.specs import DEFAULT_HF_REPO


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Preprocess OpenEDS into parquet shards", add_help=add_help)
    # None tells "not given" apart: an explicit --hf-repo is what --validate checks
    parser.add_argument("--hf-repo", default=None,
                        help=f"Hub dataset repo to push to / validate (default {DEFAULT_HF_REPO})")
    parser.add_argument("--output-dir", default="./precompute_output", type=Path,
                        help="where shards are written")
    parser.add_argument("--no-push", action="store_true", help="keep the output local")
    parser.add_argument("--validate", action="store_true",
                        help="recompute sampled rows from raw and compare: of --hf-repo if given, else of "
                             "--output-dir if it holds shards, else of the default repo")
    parser.add_argument("--validate-samples", default=20, type=int,
                        help="rows per split checked by --validate")
    parser.add_argument("--skip-download", action="store_true", help="use the raw data already in --raw-dir")
    parser.add_argument("--source", choices=["openeds", "folder"], default="openeds",
                        help="openeds: the OpenEDS layout (Kaggle); folder: images/ + masks/, a CVAT export, "
                             "YOLO segmentation labels or COCO JSON")
    parser.add_argument("--raw-dir", default="./openeds_raw", type=Path,
                        help="raw data: the OpenEDS layout, or the folder dataset of --source folder")
    parser.add_argument("--synthetic", type=int, metavar="N",
                        help="generate N synthetic raw samples instead of downloading")
    parser.add_argument("--randomized", nargs="?", const="train", choices=FAMILIES, metavar="FAMILY",
                        help="--synthetic with the domain-randomized generator; FAMILY train (default) "
                             "or heldout draws view, contrast, light, noise, glint size and blur from "
                             "disjoint ranges")
    parser.add_argument("--seed", default=0, type=int,
                        help="seed of --synthetic and of --validate's sampling")
    parser.add_argument("--workers", default=default_workers(), type=int,
                        help="processes (default: all cores)")
    parser.add_argument("--splits", nargs="+", default=["train", "validation"], help="splits to process")
    parser.add_argument("--shard-size", default=100, type=int, help="samples per parquet shard")
    parser.add_argument("--size", nargs="+", default=["400", "640"], metavar="H W | native",
                        help="frame size of the output (multiples of 16 for training); 'native' keeps the "
                             "frames' own size (--source folder)")
    parser.add_argument("--letterbox", action="store_true",
                        help="fit OpenEDS frames of another size into --size (default: skip them); "
                             "folder datasets are always letterboxed")
    parser.add_argument("--keep-empty", action="store_true", help="keep frames without pupil as negatives")
    folder = parser.add_argument_group("--source folder")
    folder.add_argument("--pupil-class", type=pupil_class, default=None, metavar="K",
                        help="which class is the pupil: masks, the pixel value K of class-index maps "
                             "(default: binary 0/255 or 0/1; OpenEDS: 3); YOLO, the class index "
                             "(default: the class named --label in data.yaml, else 0); COCO, a category "
                             "id or name (default: the category named --label, else the only one)")
    folder.add_argument("--label", default="pupil",
                        help="the pupil's name in a CVAT labelmap.txt, a YOLO data.yaml or the COCO "
                             "categories")
    folder.add_argument("--val-ratio", default=0.10, type=float, help="validation share of a new split")
    folder.add_argument("--min-val-pos", default=10, type=int,
                        help="at least this many images with a pupil in a new validation split")
    return parser


def pupil_class(text: str) -> int | str:
    """--pupil-class: an integer (a pixel value, class index or category id), else a COCO or YOLO
    class name."""
    try:
        return int(text)
    except ValueError:
        return text.strip()


def check_args(args) -> None:
    """Normalize args.size and refuse option combinations that cannot work."""
    args.size = parse_frame_size(args.size)
    if args.source == "openeds" and isinstance(args.pupil_class, str):
        raise UserError(f"--pupil-class for OpenEDS is a label value (an integer), not '{args.pupil_class}'")
    if args.source == "folder":
        unknown = sorted(set(args.splits) - set(folder_source.SPLIT_FILES))
        if unknown:
            raise UserError(f"a folder dataset has the splits train and validation, not {', '.join(unknown)}")
        if args.synthetic is not None:
            raise UserError("--synthetic generates OpenEDS-layout data; it does not go with --source folder")
        if not 0 < args.val_ratio < 1:
            raise UserError(f"--val-ratio must be between 0 and 1, got {args.val_ratio}")
    elif args.size == "native":
        raise UserError("--size native is for --source folder; OpenEDS frames are 400x640")
    if args.randomized is not None and args.synthetic is None:
        raise UserError("--randomized chooses the generator of --synthetic N; give --synthetic too")


def prepare_raw(args) -> Path:
    """Make sure raw data is in args.raw_dir: synthetic, already there, or downloaded."""
    if args.source == "folder":
        return args.raw_dir  # the user's own folder; discover_folder says what is wrong with it
    if args.synthetic is not None:
        marker = args.raw_dir / "synthetic.json"
        wanted = {"n": args.synthetic, "seed": args.seed, "splits": args.splits, "size": list(args.size)}
        if args.randomized is not None:  # absent for the default generator: its older markers stay valid
            wanted["randomized"] = args.randomized
        if not marker.exists() or json.loads(marker.read_text()) != wanted:
            print(f"generating {args.synthetic} {synthetic_kind(args)} samples in {args.raw_dir}")
            generate_raw_dataset(args.raw_dir, args.synthetic, seed=args.seed, splits=tuple(args.splits),
                                 height=args.size[0], width=args.size[1], progress=True,
                                 family=args.randomized)
            atomic_write_json(marker, wanted)
        return args.raw_dir
    if args.skip_download:
        if not args.raw_dir.is_dir():
            raise UserError(f"--skip-download given but {args.raw_dir} does not exist; set --raw-dir")
        return args.raw_dir
    return raw_sources.download_openeds(args.raw_dir)


def openeds_inputs(args) -> tuple[dict, SampleOptions]:
    dirs = raw_sources.find_split_dirs(args.raw_dir, args.splits)
    samples = {split: raw_sources.list_raw_samples(path, split) for split, path in dirs.items()}
    options = SampleOptions(height=args.size[0], width=args.size[1], letterbox=args.letterbox,
                            keep_empty=args.keep_empty,
                            pupil_class=3 if args.pupil_class is None else args.pupil_class)
    return samples, options


def folder_inputs(args) -> tuple[dict, SampleOptions]:
    dataset = folder_source.discover_folder(args.raw_dir, args.label, args.pupil_class)
    positives = folder_source.find_positives(dataset)
    splits = folder_source.make_or_load_splits(args.raw_dir, dataset.samples, positives, args.val_ratio,
                                               args.min_val_pos, args.seed)
    print(folder_source.describe_splits(dataset, splits, positives))
    samples = {split: splits[split] for split in args.splits}
    native = args.size == "native"
    height, width = folder_source.native_frame_size(dataset.samples) if native else args.size
    options = SampleOptions(height=height, width=width, letterbox=not native, pupil_class=1,
                            keep_empty=args.keep_empty, mask_format=dataset.mask_format, native_size=native)
    return samples, options


def synthetic_kind(args) -> str:
    return "synthetic" if args.randomized is None else f"synthetic randomized-{args.randomized}"


def source_name(args) -> str:
    if args.source == "folder":
        return f"folder:{args.raw_dir.resolve().name}"
    return synthetic_kind(args) if args.synthetic is not None else f"kaggle:{raw_sources.KAGGLE_DATASET}"


def hub_repo(args) -> str:
    return args.hf_repo or DEFAULT_HF_REPO


def run_validation(args, samples) -> None:
    """Validate --hf-repo when given, else --output-dir when it holds shards, else the default repo."""
    if args.hf_repo is None and any((args.output_dir / DATA_DIR).glob("*.parquet")):
        return check_against_raw(args, args.output_dir, samples, str(args.output_dir))
    if args.hf_repo is None:
        print(f"{args.output_dir} holds no shards; validating {hub_repo(args)} instead")
    with tempfile.TemporaryDirectory(prefix="validate-") as tmp:
        print(f"downloading {hub_repo(args)} to validate it")
        folder = hub.download_dataset(hub_repo(args), tmp, args.splits)
        check_against_raw(args, folder, samples, f"{hub_repo(args)} (Hub)")


def check_against_raw(args, target: Path, samples, name: str) -> None:
    # options come from the manifest (or, without one, the image column's size): rows are
    # recomputed the way they were made, not with this run's --size
    report = validate_dataset(target, samples, count=args.validate_samples, seed=args.seed)
    print(f"validated {name} against {args.raw_dir} (float tolerance {FLOAT_TOLERANCE:g})")
    print(report.render())
    if not report.ok:
        raise UserError("validation failed: the dataset does not match its raw data")


@report_errors
def main(args) -> None:
    check_args(args)
    token = None if (args.no_push or args.validate) else hub.require_hf_token()
    if args.source == "openeds" and args.synthetic is None and not args.skip_download:
        raw_sources.require_kaggle_credentials()
    prepare_raw(args)
    samples, options = (folder_inputs if args.source == "folder" else openeds_inputs)(args)
    if args.validate:
        return run_validation(args, samples)
    manifest, stats = build_dataset(samples, args.output_dir, options, args.workers, args.shard_size,
                                    source_name(args))
    for split, counts in manifest["splits"].items():
        print(f"{split}: {counts['rows']} rows in {counts['shards']} shards, {counts['skipped']} skipped")
    print(f"{stats['processed']} shards written, {stats['done']} already complete")
    if stats["samples"]:
        rate = stats["samples"] / stats["seconds"]
        # a worker per shard at most: fewer shards than --workers leave the rest unstarted
        print(f"throughput: {rate:.1f} samples/s ({rate / stats['workers']:.1f} per worker, "
              f"{stats['workers']} workers)")
    if token:
        url = hub.push_dataset(args.output_dir, hub_repo(args), token)
        print(f"pushed to {hub_repo(args)}: {url}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
