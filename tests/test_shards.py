"""Shards built from numpy buffers hold what ``Dataset.from_dict(...).to_parquet`` wrote: schema and rows."""

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from datasets.arrow_writer import get_writer_batch_size_from_data_size

from common.prep import preprocess
from common.prep.shards import ShardBuffer, rows_per_group, write_parquet
from common.schema import dataset_features

HEIGHT, WIDTH = 48, 80


def _rows(count: int) -> list[dict]:
    rows = []
    for index in range(count):
        label = np.zeros((HEIGHT, WIDTH), np.uint8)
        ellipse = preprocess.Ellipse(0.3 + 0.1 * index, 0.5, 0.08, 0.1, 0)
        label |= preprocess.draw_ellipse(ellipse, HEIGHT, WIDTH) * 3
        image = np.random.default_rng(index).integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
        row = preprocess.process_sample(image, label, (HEIGHT, WIDTH))
        rows.append({**row, "filename": f"sample_{index}.png"})
    return rows


@pytest.mark.parametrize("count", [0, 1, 3])
def test_shard_matches_what_datasets_writes(tmp_path, count):
    features = dataset_features(HEIGHT, WIDTH)
    rows = _rows(count)
    reference = tmp_path / "reference.parquet"
    datasets.disable_progress_bars()
    Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features).to_parquet(
        str(reference))
    buffer = ShardBuffer(features, capacity=count + 2)  # room left over, as when samples are skipped
    for row in rows:
        buffer.add(row)
    ours = tmp_path / "ours.parquet"
    write_parquet(buffer.table(), ours)

    assert pq.read_schema(ours).equals(pq.read_schema(reference), check_metadata=True)
    assert b"huggingface" in pq.read_schema(ours).metadata
    assert pq.read_table(ours).equals(pq.read_table(reference))
    assert pq.read_metadata(ours).num_row_groups == pq.read_metadata(reference).num_row_groups
    if count:  # load_dataset refuses a split without rows, whoever wrote it
        loaded = datasets.load_dataset("parquet", data_files={"train": str(ours)}, split="train")
        assert loaded.features == features and loaded.num_rows == count
        first = loaded.with_format("numpy")[0]
        np.testing.assert_array_equal(first["dist_map"], rows[0]["dist_map"])
        np.testing.assert_array_equal(first["image"], rows[0]["image"])



@pytest.mark.parametrize("rows, nbytes", [(1, 0), (0, 10), (30, 30 * 1_843_200), (5000, 9_216_000_000),
                                          (7, 10**9)])
def test_row_groups_are_sized_as_datasets_sizes_them(rows, nbytes):
    assert rows_per_group(rows, nbytes) == get_writer_batch_size_from_data_size(rows, nbytes)
