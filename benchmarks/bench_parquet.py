"""Parquet options for precompute shards: write time, file size and read time of one 400x640 shard.

Builds one shard of synthetic samples in memory, then writes and reads it back with each
combination of compression, dictionary encoding and byte-stream-split encoding of the float maps
and content-defined chunking (CDC), repeating each measurement and reporting the median. Writing
is also timed in CPU seconds, which a busy machine disturbs less than wall time. Reading is
``pq.read_table`` followed by the numpy conversion the training loader does.

Example:
    python benchmarks/bench_parquet.py --samples 32 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from datasets import config as datasets_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.prep import shards  # noqa: E402
from common.prep.build_dataset import SampleOptions, load_row  # noqa: E402
from common.prep.openeds_source import find_split_dirs, list_raw_samples  # noqa: E402
from common.prep.preprocess import SkipSample  # noqa: E402
from common.prep.synthetic import generate_raw_dataset  # noqa: E402
from common.schema import dataset_features  # noqa: E402

# (label, compression, level, dictionary on the float maps, byte-stream-split float maps, CDC)
CHOICES = (
    ("snappy, dictionaries, CDC (datasets' to_parquet)", "snappy", None, True, False, True),
    ("snappy, dictionaries", "snappy", None, True, False, False),
    ("snappy, no dictionary on float maps", "snappy", None, False, False, False),
    ("none, no dictionary on float maps", "none", None, False, False, False),
    ("zstd 1, no dictionary on float maps", "zstd", 1, False, False, False),
    ("zstd 3, no dictionary on float maps", "zstd", 3, False, False, False),
    ("none, byte-stream-split float maps", "none", None, False, True, False),
    ("snappy, byte-stream-split float maps", "snappy", None, False, True, False),
    ("zstd 1, byte-stream-split float maps", "zstd", 1, False, True, False),
    ("zstd 3, byte-stream-split float maps", "zstd", 3, False, True, False),
    ("zstd 3, byte-stream-split float maps, CDC", "zstd", 3, False, True, True),
)

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default=32, type=int, help="raw samples in the shard")
    parser.add_argument("--repeats", default=3, type=int, help="measurements per choice")
    return parser


def build_table(samples: int):
    raw = Path(tempfile.mkdtemp(prefix="bench-raw-"))
    try:
        generate_raw_dataset(raw, samples, seed=0, splits=("train",), fractions=(1.0,))
        items = list_raw_samples(find_split_dirs(raw, ["train"])["train"], "train")
        buffer = shards.ShardBuffer(dataset_features(), len(items))
        for sample in items:
            try:
                buffer.add(load_row(sample, SampleOptions())[0])
            except SkipSample:
                pass
        return buffer.table()
    finally:
        shutil.rmtree(raw)


def options_for(schema, compression, level, float_dictionary, split_floats, cdc) -> dict:
    options = shards.parquet_options(schema)
    options["use_content_defined_chunking"] = datasets_config.DEFAULT_CDC_OPTIONS if cdc else False
    floats = shards.float_map_leaves(schema)
    options.update(compression=compression, compression_level=level)
    options["use_dictionary"] = [leaf for leaf in shards.leaf_paths(schema)
                                 if float_dictionary or leaf not in floats]
    options["column_encoding"] = {leaf: "BYTE_STREAM_SPLIT" for leaf in floats} if split_floats else None
    return options


def measure(table, path: Path, options: dict) -> tuple[float, float, float, int]:
    start, cpu = time.perf_counter(), time.process_time()
    shards.write_parquet(table, path, options)
    written, cpu = time.perf_counter(), time.process_time() - cpu
    read = pq.read_table(path)
    for name in ("image", "label", "spatial_weights", "dist_map"):  # the training loader's fast route
        column = read.column(name).combine_chunks().storage
        while hasattr(column, "flatten"):
            column = column.flatten()
        column.to_numpy()
    return written - start, cpu, time.perf_counter() - written, os.path.getsize(path)


def main(args) -> None:
    table = build_table(args.samples)
    folder = Path(tempfile.mkdtemp(prefix="bench-parquet-"))
    print(f"\none shard of {table.num_rows} rows at 400x640 ({table.nbytes / 1e6:.0f} MB in Arrow), "
          f"median of {args.repeats} runs\n")
    print("| parquet options | write s | write CPU s | read s | MB |")
    print("|---|---:|---:|---:|---:|")
    try:
        for label, *choice in CHOICES:
            options = options_for(table.schema, *choice)
            runs = [measure(table, folder / "shard.parquet", options) for _ in range(args.repeats)]
            write, cpu, read = (statistics.median(r[i] for r in runs) for i in (0, 1, 2))
            print(f"| {label} | {write:.2f} | {cpu:.2f} | {read:.2f} | {runs[-1][3] / 1e6:.1f} |")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
