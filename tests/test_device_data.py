"""The device-resident data path: the same batches and metrics as the DataLoader path, its dtypes,
the memory-budget decision and per-rank shards."""

import json
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from common.train import data as data_module
from common.train.augment import augment_batch
from common.train.data import (
    ALL_TARGETS,
    DEVICE_DATA_CAP,
    DeviceBatches,
    EpochBatchSampler,
    device_data_decision,
    split_bytes,
    stored_dtype,
    to_device,
)
from common.train.engine import augment_generator
from tests.helpers import demo_flags, train

CPU = torch.device("cpu")
GIB = 2**30
SIZE = (64, 96)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A 16-frame 64x96 demo dataset (12 train / 3 validation rows), built once by the real pipeline."""
    data_dir = tmp_path_factory.mktemp("demo")
    source = data_module.ensure_demo_dataset(data_dir, 16, 0, SIZE)
    return data_module.load_splits(source, data_dir)


def loaders(dataset, on: bool, batch_size: int = 4, **kwargs):
    args = Namespace(batch_size=batch_size, seed=3, num_workers=0, data_on_device="on" if on else "off")
    return data_module.make_loaders(dataset, args, pin_memory=False, device=CPU, **kwargs)


def epoch_batches(loader, epoch: int, augment: bool) -> list[dict]:
    """Every batch of one epoch as the engine sees it: moved, and augmented for training."""
    loader.sampler.set_epoch(epoch)
    generator = augment_generator(3, epoch, CPU)
    moved = [to_device(batch, CPU) for batch in loader]
    return [augment_batch(batch, generator) for batch in moved] if augment else moved


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for left, right in zip(a, b):
        assert left.keys() == right.keys()
        for key in left:
            assert left[key].dtype == right[key].dtype, key
            assert torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("epoch", [0, 1])
def test_same_batches_and_augmentations_as_the_dataloader(demo, epoch):
    device, dataloader = loaders(demo, on=True), loaders(demo, on=False)
    assert isinstance(device.train, DeviceBatches) and not isinstance(dataloader.train, DeviceBatches)
    assert len(device.train) == len(dataloader.train) == 3  # 12 rows, batch 4
    for split, augment in (("train", True), ("valid", False)):
        assert_same_batches(epoch_batches(getattr(device, split), epoch, augment),
                            epoch_batches(getattr(dataloader, split), epoch, augment))


def test_epochs_differ_and_validation_keeps_every_row(demo):
    device = loaders(demo, on=True)
    first, second = epoch_batches(device.train, 0, False), epoch_batches(device.train, 1, False)
    assert not torch.equal(first[0]["image"], second[0]["image"])
    valid = epoch_batches(device.valid, 0, False)
    assert sum(len(batch["image"]) for batch in valid) == len(demo["validation"]) == 3


def test_held_dtypes_on_the_device_and_after_to_device(demo):
    device = loaders(demo, on=True).train
    held = {name: value.dtype for name, value in device.tensors.items()}
    assert held == {"image": torch.uint8, "label": torch.uint8, "spatial_weights": torch.float32,
                    "dist_map": torch.float32, "ellipse": torch.float32}
    assert device.tensors["image"].shape == (12, *SIZE) and device.tensors["dist_map"].shape == (12, 2, *SIZE)
    cuda = torch.device("cuda")
    assert [stored_dtype(n, cuda) for n in ALL_TARGETS] == [torch.float16, torch.float16, torch.float32]
    assert stored_dtype("image", cuda) == stored_dtype("label", cuda) == torch.uint8
    half = {"image": torch.zeros(2, *SIZE, dtype=torch.uint8),
            "label": torch.ones(2, *SIZE, dtype=torch.uint8),
            "dist_map": torch.zeros(2, 2, *SIZE, dtype=torch.float16)}
    moved = to_device(half, CPU)  # as a CUDA-resident batch arrives: fp16 maps become float32
    assert moved["dist_map"].dtype == torch.float32 and moved["label"].dtype == torch.int64
    assert moved["image"].shape == (2, 1, *SIZE) and moved["image"].dtype == torch.float32


def test_split_bytes_counts_uint8_frames_and_fp16_maps_on_cuda():
    # 400x640 = 256,000 px: image + label 2 B, spatial_weights 2 B, dist_map 2 x 2 B, ellipse 16 B.
    assert split_bytes(4700, (400, 640), ALL_TARGETS, torch.device("cuda")) == 4700 * (256_000 * 8 + 16)
    assert split_bytes(4700, (400, 640), ALL_TARGETS, CPU) == 4700 * (256_000 * 14 + 16)
    assert split_bytes(10, (400, 640), ("ellipse",), CPU) == 10 * (256_000 * 2 + 16)


def test_memory_budget_decision():
    # budget = min(0.5 x free, 32 GiB)
    assert device_data_decision("auto", "cuda", 7 * GIB, 16 * GIB)[0] is True
    assert device_data_decision("auto", "cuda", 9 * GIB, 16 * GIB)[0] is False
    assert device_data_decision("auto", "cuda", 33 * GIB, 140 * GIB)[0] is False  # the cap, not half of 140
    assert device_data_decision("auto", "cuda", 31 * GIB, 140 * GIB)[0] is True
    assert device_data_decision("off", "cuda", 1, 16 * GIB)[0] is False
    on, line = device_data_decision("on", "cuda", 7 * GIB, 16 * GIB)
    assert on and "splits 7.00 GiB, budget 8.00 GiB" in line and "free 16.00 GiB" in line
    with pytest.raises(UserError, match="do not fit on the GPU.*splits 9.00 GiB, budget 8.00 GiB"):
        device_data_decision("on", "cuda", 9 * GIB, 16 * GIB)
    assert device_data_decision("auto", "cpu", 1, None)[0] is False
    assert device_data_decision("on", "cpu", 100 * GIB, None)[0] is True
    assert DEVICE_DATA_CAP == 32 * GIB


def test_single_process_order_is_randperm_of_seed_and_epoch():
    sampler = EpochBatchSampler(10, 3, shuffle=True, seed=2, drop_last=True)
    sampler.set_epoch(5)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(2 * 100_003 + 5)).tolist()
    assert list(sampler) == [order[0:3], order[3:6], order[6:9]] and len(sampler) == 3
    assert len(EpochBatchSampler(10, 3, shuffle=False)) == 4
    assert len(EpochBatchSampler(2, 3, shuffle=True, drop_last=True)) == 1  # a lone short batch stays


@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_hold_disjoint_fixed_shards(shuffle):
    world = 3
    samplers = [EpochBatchSampler(14, 2, shuffle, seed=1, drop_last=shuffle, rank=r, world_size=world)
                for r in range(world)]
    shards = [set(s.shard().tolist()) for s in samplers]
    assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1:])
    assert len(set.union(*shards)) == (12 if shuffle else 14)  # training shares out equal shards
    for sampler, shard in zip(samplers, shards):
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            rows = [i for batch in sampler for i in batch]
            assert set(rows) <= shard and len(list(sampler)) == len(sampler)
    if shuffle:
        assert len({len(s) for s in samplers}) == 1  # every rank takes the same number of steps


def test_a_rank_holds_only_its_shard_and_yields_the_sampler_batches(demo):
    split = demo["train"]
    for rank in range(2):
        device = loaders(demo, on=True, batch_size=2, rank=rank, world_size=2).train
        sampler = EpochBatchSampler(len(split), 2, True, seed=3, drop_last=True, rank=rank, world_size=2)
        assert device.tensors["image"].shape[0] == len(sampler.shard()) == 6  # 12 rows -> 2 x 6
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            device.sampler.set_epoch(epoch)
            expected = [device.dataset[batch] for batch in sampler]
            assert_same_batches(list(device), expected)


def run(out_dir: Path, data_dir: Path, choice: str) -> subprocess.CompletedProcess:
    return train("tiny", out_dir, data_dir, "--epochs", "2", "--device", "cpu", "--data-on-device", choice,
                 demo=demo_flags(16, *SIZE))


@pytest.mark.slow
def test_training_metrics_are_identical_on_and_off_the_device(tmp_path):
    on, off = run(tmp_path / "on", tmp_path, "on"), run(tmp_path / "off", tmp_path, "off")
    assert "data on device: on (on, cpu; splits" in on.stdout
    assert "data on device: off (off, cpu; splits" in off.stdout
    rows = [json.loads((tmp_path / name / "metrics_efficientvit_tiny_model.json").read_text())
            for name in ("on", "off")]
    assert len(rows[0]) == len(rows[1]) == 2
    for left, right in zip(*rows):
        left.pop("seconds"), right.pop("seconds")
        assert left == right
