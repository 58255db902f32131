"""One shard's rows, collected into numpy buffers and written as a parquet file.

``Dataset.from_dict`` converts every pixel through Python lists; here each column is one numpy
buffer per shard, wrapped by Arrow without a copy in the storage types the ``datasets`` features
declare (``Array2D``/``Array3D``: nested lists), so ``load_dataset`` reads the same schema,
``huggingface`` metadata included, as it would from ``Dataset.to_parquet``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.features import Array2D, Array3D, Features

# Parquet options, chosen by measurement (benchmarks/bench_parquet.py, one 30-row shard at 400x640):
# byte-stream-split encoding of the float maps with zstd writes in about half the time of datasets'
# default (snappy, dictionaries everywhere) and makes files 2.5x smaller that read twice as fast.
# Dictionaries only cost time on float maps (few values repeat); the uint8 frames keep theirs.
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3  # as fast as level 1 here, 12% smaller
FLOAT_MAP_ENCODING = "BYTE_STREAM_SPLIT"
# datasets writes content-defined chunks (pages cut where the content says, so that a shard with
# rows inserted deduplicates on the Hub). It nearly doubles the write time, and a rerun writes
# identical files anyway, so shards are written without it.
CDC_OPTIONS = False
# Row groups of at most 100 MB uncompressed, the size datasets' to_parquet aims for (its
# config.MAX_ROW_GROUP_SIZE, "100MB"). Its helper for this is absent from datasets 4.0.0, which
# Colab ships, so the arithmetic is here.
MAX_ROW_GROUP_BYTES = 100 * 10**6


class ShardBuffer:
    """Preallocated columns for up to ``capacity`` rows of ``features``; ``add`` copies one row in."""

    def __init__(self, features: Features, capacity: int):
        self.features = features
        self.rows = 0
        self.arrays = {name: np.empty((capacity, *feature.shape), feature.dtype)
                       for name, feature in features.items() if isinstance(feature, (Array2D, Array3D))}
        self.values = {name: [] for name in features if name not in self.arrays}

    def add(self, row: dict) -> None:
        for name, array in self.arrays.items():
            array[self.rows] = row[name]
        for name, values in self.values.items():
            values.append(row[name])
        self.rows += 1

    def table(self) -> pa.Table:
        """The rows added so far as an Arrow table with ``features.arrow_schema`` (no pixel is copied)."""
        schema = self.features.arrow_schema
        columns = []
        for field in schema:
            if field.name in self.arrays:
                columns.append(_nested_list_array(self.arrays[field.name][: self.rows], field.type))
            else:
                columns.append(pa.array(self.values[field.name], type=field.type))
        return pa.Table.from_arrays(columns, schema=schema)


def _nested_list_array(array: np.ndarray, extension_type: pa.ExtensionType) -> pa.ExtensionArray:
    """(N, *shape) numpy -> the extension type's list<list<...>> storage over the same memory."""
    storage = pa.array(array.reshape(-1))
    length = array.size
    for size in reversed(array.shape[1:]):  # innermost dimension first
        length //= size
        # offsets are int32 in the list type; the checked cast raises instead of wrapping around
        offsets = pa.array(np.arange(length + 1, dtype=np.int64) * size, type=pa.int32())
        storage = pa.ListArray.from_arrays(offsets, storage)
    return pa.ExtensionArray.from_storage(extension_type, storage)


def parquet_options(schema: pa.Schema) -> dict:
    """``pq.ParquetWriter`` keywords for our shards: compression, encodings and chunking."""
    floats = float_map_leaves(schema)
    return {"compression": COMPRESSION, "compression_level": COMPRESSION_LEVEL,
            "use_dictionary": [leaf for leaf in leaf_paths(schema) if leaf not in floats],
            "column_encoding": {leaf: FLOAT_MAP_ENCODING for leaf in floats} if FLOAT_MAP_ENCODING else None,
            "use_content_defined_chunking": CDC_OPTIONS, "write_page_index": True}


def leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet's names of the leaf columns (``image.list.element.list.element``), which options key on."""
    return [path for path, _ in _leaves(schema)]


def float_map_leaves(schema: pa.Schema) -> list[str]:
    """Leaves of the float array columns (``spatial_weights``, ``dist_map``)."""
    return [path for path, leaf in _leaves(schema)
            if path.endswith(".list.element") and pa.types.is_floating(leaf)]


def _leaves(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    leaves = []
    for field in schema:
        path, pa_type = field.name, field.type
        if isinstance(pa_type, pa.ExtensionType):
            pa_type = pa_type.storage_type
        while pa.types.is_list(pa_type):
            path, pa_type = f"{path}.list.element", pa_type.value_type
        leaves.append((path, pa_type))
    return leaves


def rows_per_group(num_rows: int, num_bytes: int) -> int:
    """Rows per parquet row group so that a group holds at most MAX_ROW_GROUP_BYTES of the table."""
    return max(1, num_rows * MAX_ROW_GROUP_BYTES // num_bytes) if num_bytes > 0 else 1


def write_parquet(table: pa.Table, path: str | os.PathLike, options: dict | None = None) -> None:
    """Write ``table`` with the row groups ``Dataset.to_parquet`` would use (about 100 MB each).

    A table without rows gets no row group at all, as from datasets: readers size their batches
    from the first row group, and one of zero rows makes ``load_dataset`` fail.
    """
    # A Python file object, not a path: a full disk then raises OSError(ENOSPC) from Python's own
    # write, which the atomic writer reports as one line (and which a test can inject).
    with open(path, "wb") as handle, \
            pq.ParquetWriter(handle, table.schema, **(options or parquet_options(table.schema))) as writer:
        if table.num_rows:
            writer.write_table(table, row_group_size=rows_per_group(table.num_rows, table.nbytes))
        if CDC_OPTIONS:  # what datasets records, so that a rewrite uses the same chunking
            writer.add_key_value_metadata({"content_defined_chunking": json.dumps(CDC_OPTIONS)})
