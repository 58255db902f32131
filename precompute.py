"""Preprocess OpenEDS once into parquet shards and publish them on the HuggingFace Hub.

Pipeline per sample (common/preprocess.py): binarize -> skip empty masks -> gamma 0.8 ->
CLAHE 1.5/8x8 -> ellipse -> spatial weights -> distance maps. Runs on all cores, resumes where a
previous run stopped, and writes a manifest of counts, skipped samples, parameters and versions.

Examples:
    # the embedded synthetic dataset, kept local
    python precompute.py --synthetic 200 --no-push
    # the real dataset: download from Kaggle, preprocess, push to the Hub
    python precompute.py --hf-repo Conner/sddec25-01
    # already downloaded raw data; add the validation split to an existing output
    python precompute.py --skip-download --raw-dir ./openeds_raw --splits validation --no-push
    # recompute a sample of rows from raw and compare them with the stored dataset
    python precompute.py --validate --skip-download --raw-dir ./openeds_raw
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import hub, raw_sources
from common.cli import UserError, report_errors
from common.io import atomic_write_json
from common.pipeline import SampleOptions, build_dataset, default_workers
from common.schema import DATA_DIR
from common.validation import FLOAT_TOLERANCE, validate_dataset


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Preprocess OpenEDS into parquet shards", add_help=add_help)
    parser.add_argument("--hf-repo", default=hub.DEFAULT_HF_REPO, help="Hub dataset repo to push to / validate")
    parser.add_argument("--output-dir", default="./precompute_output", type=Path, help="where shards are written")
    parser.add_argument("--no-push", action="store_true", help="keep the output local")
    parser.add_argument("--validate", action="store_true",
                        help="recompute sampled rows of --output-dir (or, if empty, --hf-repo) from raw and compare")
    parser.add_argument("--validate-samples", default=20, type=int, help="rows per split checked by --validate")
    parser.add_argument("--skip-download", action="store_true", help="use the raw data already in --raw-dir")
    parser.add_argument("--raw-dir", default="./openeds_raw", type=Path, help="raw OpenEDS-layout data")
    parser.add_argument("--synthetic", type=int, metavar="N", help="generate N synthetic raw samples instead of downloading")
    parser.add_argument("--seed", default=0, type=int, help="seed of --synthetic and of --validate's sampling")
    parser.add_argument("--workers", default=default_workers(), type=int, help="processes (default: all cores)")
    parser.add_argument("--splits", nargs="+", default=["train", "validation"], help="splits to process")
    parser.add_argument("--shard-size", default=100, type=int, help="samples per parquet shard")
    parser.add_argument("--size", nargs=2, type=int, default=[400, 640], metavar=("H", "W"),
                        help="frame size of the output (multiples of 16 for training)")
    parser.add_argument("--letterbox", action="store_true",
                        help="fit frames of another size into --size (default: skip them)")
    parser.add_argument("--keep-empty", action="store_true", help="keep frames without pupil as negatives")
    return parser


def prepare_raw(args) -> Path:
    """Make sure raw data is in args.raw_dir: synthetic, already there, or downloaded."""
    if args.synthetic is not None:
        from common.synthetic import generate_raw_dataset

        marker = args.raw_dir / "synthetic.json"
        wanted = {"n": args.synthetic, "seed": args.seed, "splits": args.splits, "size": args.size}
        if not marker.exists() or json.loads(marker.read_text()) != wanted:
            print(f"generating {args.synthetic} synthetic samples in {args.raw_dir}")
            generate_raw_dataset(args.raw_dir, args.synthetic, seed=args.seed, splits=tuple(args.splits),
                                 height=args.size[0], width=args.size[1], progress=True)
            atomic_write_json(marker, wanted)
        return args.raw_dir
    if args.skip_download:
        if not args.raw_dir.is_dir():
            raise UserError(f"--skip-download given but {args.raw_dir} does not exist; set --raw-dir")
        return args.raw_dir
    return raw_sources.download_openeds(args.raw_dir)


def sample_options(args) -> SampleOptions:
    return SampleOptions(height=args.size[0], width=args.size[1], letterbox=args.letterbox,
                         keep_empty=args.keep_empty)


def raw_samples(args) -> dict:
    dirs = raw_sources.find_split_dirs(args.raw_dir, args.splits)
    return {split: raw_sources.list_raw_samples(path, split) for split, path in dirs.items()}


def run_validation(args, samples) -> None:
    target = args.output_dir
    if not any((target / DATA_DIR).glob("*.parquet")):
        target = Path(tempfile.mkdtemp(prefix="validate-"))
        print(f"{args.output_dir} holds no shards; downloading {args.hf_repo} to validate it")
        hub.download_dataset(args.hf_repo, target, args.splits)
    report = validate_dataset(target, samples, count=args.validate_samples, seed=args.seed)
    print(f"validated {target} against {args.raw_dir} (float tolerance {FLOAT_TOLERANCE:g})")
    print(report.render())
    if not report.ok:
        raise UserError("validation failed: the dataset does not match its raw data")


@report_errors
def main(args) -> None:
    token = None if (args.no_push or args.validate) else hub.require_hf_token()
    if args.synthetic is None and not args.skip_download:
        raw_sources.require_kaggle_credentials()
    prepare_raw(args)
    samples = raw_samples(args)
    if args.validate:
        return run_validation(args, samples)
    source = "synthetic" if args.synthetic is not None else f"kaggle:{raw_sources.KAGGLE_DATASET}"
    manifest, stats = build_dataset(samples, args.output_dir, sample_options(args), args.workers,
                                    args.shard_size, source)
    for split, counts in manifest["splits"].items():
        print(f"{split}: {counts['rows']} rows in {counts['shards']} shards, {counts['skipped']} skipped")
    print(f"{stats['processed']} shards written, {stats['done']} already complete")
    if stats["samples"]:
        rate = stats["samples"] / stats["seconds"]
        print(f"throughput: {rate:.1f} samples/s ({rate / args.workers:.1f} per worker)")
    if token:
        url = hub.push_dataset(args.output_dir, args.hf_repo, token)
        print(f"pushed to {args.hf_repo}: {url}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
