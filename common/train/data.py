"""Training data: where a dataset comes from, and how its rows become batches on the device.

Sources (chosen by ``resolve_source``):
    --demo             the embedded synthetic dataset, generated once through the real precompute
                       pipeline into ``<data-dir>/demo-<n>-<seed>-<H>x<W>`` and reused afterwards
                       (``--demo-randomized FAMILY``: the domain-randomized generator, in
                       ``<data-dir>/demo-randomized-<family>-<n>-<seed>-<H>x<W>``);
    --dataset PATH     a local dataset folder: a precompute output (data/{split}-*.parquet) or the
                       original's layout (data/{split}/shard_NNNNN.parquet);
    --hf-repo REPO     a Hub dataset, downloaded once into ``<data-dir>/hub`` and then read from that
                       cache, with no network, also under HF_HUB_OFFLINE=1.

How stored columns are read (flat lists, 4-class labels, missing targets, the preprocessed flag) is
decided once per dataset by ``common.train.layout.detect_layout``. Rows are read in batches straight from
Arrow (per-row access and ``with_format("numpy")`` are slow and upcast uint8), on DataLoader worker
processes. Each batch is a dict of CPU tensors, with the targets the task asks for:
    image (B, H, W) uint8, label (B, H, W) uint8 0/1, spatial_weights (B, H, W) float32,
    dist_map (B, 2, H, W) float32, ellipse (B, 4) float32 (cx, cy, rx, ry)
``to_device`` moves it (non_blocking from pinned memory) and turns the image into the model input.

Device-resident path (``--data-on-device``, ``DeviceBatches``): the split is converted once by the
same ``ArrowBatches`` code and held on the device (uint8 frames, fp16 maps on CUDA); batches are
``index_select``s in the same sampler order, so both paths yield the same batches for a seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from datasets import DatasetDict, load_dataset
from huggingface_hub import snapshot_download

from common.errors import UserError
from common.prep.build_dataset import SampleOptions, build_dataset
from common.prep.hub import describe_hub_error
from common.prep.openeds_source import find_split_dirs, list_raw_samples
from common.prep.preprocess import (
    INPUT_SCALE,
    binarize_pupil,
    distance_maps,
    enhance_frame,
    preprocessing_params,
    pupil_ellipse,
    spatial_weights,
)
from common.prep.synthetic import generate_raw_dataset
from common.schema import DATA_DIR, MANIFEST_NAME
from common.specs import DEFAULT_SIZE, DEMO_SAMPLES, DEMO_SEED, SIZE_MULTIPLE
from common.train.layout import ELLIPSE_COLUMNS, DatasetLayout, detect_layout, read_frames

TRAIN_SPLIT, VALID_SPLIT = "train", "validation"


# ----------------------------------------------------------------------------- sources
def ensure_demo_dataset(data_dir: Path, samples: int = DEMO_SAMPLES, seed: int = DEMO_SEED,
                        size: tuple[int, int] = DEFAULT_SIZE, randomized: str | None = None) -> Path:
    """Generate + precompute the synthetic demo dataset once; later calls reuse it.

    ``randomized`` None uses the default generator, in ``<data_dir>/demo-<n>-<seed>-<H>x<W>``;
    a family ("train", "heldout") the domain-randomized one, in
    ``<data_dir>/demo-randomized-<family>-<n>-<seed>-<H>x<W>``.
    """
    mode = "" if randomized is None else f"randomized-{randomized}-"
    root = data_dir / f"demo-{mode}{samples}-{seed}-{size[0]}x{size[1]}"
    out = root / "precomputed"
    built_with = _manifest_preprocessing(out)
    if built_with == preprocessing_params():
        return out
    if built_with is None:
        print(f"building the synthetic {mode}demo dataset ({samples} samples) in {root}; this happens once")
    else:  # a cache from an earlier preprocessing convention would train on other targets
        print(f"the demo dataset in {root} was built with other preprocessing parameters; rebuilding it")
    splits = [TRAIN_SPLIT, VALID_SPLIT]
    generate_raw_dataset(root / "raw", samples, seed=seed, splits=tuple(splits), fractions=(0.8, 0.2),
                         height=size[0], width=size[1], progress=True, family=randomized)
    dirs = find_split_dirs(root / "raw", splits)
    raw = {split: list_raw_samples(path, split) for split, path in dirs.items()}
    options = SampleOptions(height=size[0], width=size[1])
    build_dataset(raw, out, options, workers=os.cpu_count() or 1, shard_size=100,
                  source=f"synthetic {mode}demo")
    return out


def _manifest_preprocessing(folder: Path) -> dict | None:
    """The preprocessing parameters a dataset folder's manifest records (None: no readable manifest)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("options", {}).get("preprocessing", {})


def hub_snapshot(repo_id: str, data_dir: Path) -> Path:
    """Local snapshot of a Hub dataset: downloaded on first use, then served from the cache.

    With HF_HUB_OFFLINE=1 huggingface_hub answers from the cache without any request.
    """
    try:
        path = snapshot_download(repo_id, repo_type="dataset", cache_dir=str(data_dir / "hub"),
                                 allow_patterns=[f"{DATA_DIR}/*.parquet", f"{DATA_DIR}/*/*.parquet", "*.json",
                                                 "README.md"])
    except (OSError, ValueError) as exc:  # HTTP errors, a missing repo, no network, a malformed repo id
        raise UserError(describe_hub_error(repo_id, exc, data_dir / "hub")) from None
    return Path(path)


def resolve_source(args) -> Path:
    """The local dataset folder that ``args`` asks for (building or downloading it if needed)."""
    data_dir = Path(args.data_dir).expanduser()
    if getattr(args, "demo", False):
        return ensure_demo_dataset(data_dir, args.demo_samples, DEMO_SEED, tuple(args.demo_size),
                                   getattr(args, "demo_randomized", None))
    if getattr(args, "dataset", None):
        path = Path(args.dataset).expanduser()
        if not _shards(path):
            raise UserError(f"{path} holds no parquet shards under {DATA_DIR}/; run precompute.py first")
        return path
    return hub_snapshot(args.hf_repo, data_dir)


def _shards(path: Path) -> list[Path]:
    """Every parquet file under data/: ours at the top, the original's in per-split folders."""
    return sorted((path / DATA_DIR).rglob("*.parquet"))


def source_fingerprint(path: Path) -> str:
    """Hash of a dataset folder's location and shard files (name, size, mtime).

    `datasets` keys its Arrow cache of a local folder by the folder's name and relative file
    patterns, so two different folders both called ``precomputed`` would share one cache entry.
    Keying our cache directory by this fingerprint keeps every source (and every rewrite) apart.
    """
    digest = hashlib.sha1(str(path.resolve()).encode())
    for shard in _shards(path):
        stat = shard.stat()
        name = shard.relative_to(path / DATA_DIR).as_posix()
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def split_files(path: Path) -> dict[str, list[str]]:
    """Parquet files per split: data/{split}-NNNNN-of-NNNNN.parquet (ours) or data/{split}/*.parquet."""
    files = {}
    for split in (TRAIN_SPLIT, VALID_SPLIT):
        ours = sorted((path / DATA_DIR).glob(f"{split}-*.parquet"))
        found = ours + sorted((path / DATA_DIR / split).glob("*.parquet"))
        if found:
            files[split] = [str(f) for f in found]
    return files


def load_splits(path: Path, data_dir: Path) -> DatasetDict:
    """Load train and validation splits of a dataset folder (Arrow cache under data_dir).

    A card whose YAML lists ``configs`` says where the splits are; without one the files are
    given explicitly, so a folder without a card loads the same whichever layout it has.
    """
    cache = str(data_dir / "datasets" / source_fingerprint(path))
    card = path / "README.md"
    _check_shards(path, footers_only=True)  # footers are a few KB: a truncated shard is named up front
    try:
        if card.is_file() and "configs:" in card.read_text(errors="replace"):
            dataset = load_dataset(str(path), cache_dir=cache)
        else:
            files = split_files(path)
            if not files:
                raise UserError(f"{path} has no {DATA_DIR}/{{split}}-*.parquet or "
                                f"{DATA_DIR}/{{split}}/*.parquet files")
            dataset = load_dataset("parquet", data_files=files, cache_dir=cache)
    except UserError:
        raise
    except Exception:  # datasets wraps Arrow's errors; find the shard that cannot be read
        _check_shards(path, footers_only=False)
        raise
    missing = [s for s in (TRAIN_SPLIT, VALID_SPLIT) if s not in dataset]
    if missing:
        raise UserError(f"dataset {path} has no {' or '.join(missing)} split (found {sorted(dataset)})")
    return dataset


def _check_shards(path: Path, footers_only: bool) -> None:
    """UserError naming the first shard pyarrow cannot read (its footer, or all of it), with what to do."""
    read = pq.read_metadata if footers_only else pq.read_table
    for shard in _shards(path):
        try:
            read(shard)
        except Exception as exc:  # ArrowInvalid, OSError, ...: each means the file is unusable
            reason = (str(exc).strip().splitlines() or [""])[0].rsplit("': ", 1)[-1][:160]
            raise UserError(f"cannot read shard {shard} ({reason}): it is truncated or corrupt; check it "
                            f"with `precompute.py --validate --output-dir {path}` or rerun precompute.py "
                            "to rewrite it") from None


# ----------------------------------------------------------------------------- batches
ALL_TARGETS = ("spatial_weights", "dist_map", "ellipse")


class ArrowBatches(torch.utils.data.Dataset):
    """Indexed by a list of row indices; returns that batch as a dict of CPU tensors.

    ``layout`` (``common.train.layout.detect_layout``, decided once per dataset) says how to read the
    stored columns; ``targets`` names the targets the task needs besides image and label. A target
    the layout does not store is computed from the mask with the shared preprocessing functions.
    """

    def __init__(self, split, layout: DatasetLayout | None = None, targets: tuple[str, ...] = ALL_TARGETS):
        self.split = split
        self.layout = layout or detect_layout(split)
        self.targets = tuple(targets)
        # Made once: with_format copies the dataset and its table (~9 ms, the same at every frame size)
        self._rows = split.with_format("arrow")

    @property
    def preprocessed(self) -> bool:
        return self.layout.preprocessed

    @property
    def image_size(self) -> tuple[int, int]:
        return self.layout.image_size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        table = self._rows[list(indices)]
        image = read_frames(table, "image", self.layout)  # (B, H, W) uint8
        label = read_frames(table, "label", self.layout).astype(np.uint8, copy=False)  # (B, H, W)
        if not self.layout.preprocessed:
            image = np.stack([enhance_frame(frame) for frame in image])
        if self.layout.four_class:
            label = binarize_pupil(label)
        batch = {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}
        for name in self.targets:
            batch[name] = torch.from_numpy(self._target(table, name, label))
        return batch

    def _target(self, table, name: str, label: np.ndarray) -> np.ndarray:
        """Target ``name`` for the batch: stored, or computed from the 0/1 masks ``label`` (B, H, W)."""
        if name == "ellipse":  # (B, 4) float32 cx, cy, rx, ry
            if self.layout.has_ellipse:
                columns = [table.column(c).to_numpy().astype(np.float32) for c in ELLIPSE_COLUMNS]
                return np.stack(columns, axis=1)
            return np.array([pupil_ellipse(mask).as_tuple()[:4] for mask in label], dtype=np.float32)
        if name in self.layout.stored_targets:
            return read_frames(table, name, self.layout).astype(np.float32, copy=False)
        compute = spatial_weights if name == "spatial_weights" else distance_maps
        return np.stack([compute(mask) for mask in label])


class EpochBatchSampler(torch.utils.data.Sampler):
    """Yields lists of indices; the order depends only on (seed, epoch), so a resumed run replays it.

    Under DistributedDataParallel (``world_size`` > 1) rank r owns a fixed shard of the rows
    (``shard``), the same every epoch, and shuffles only within it, so a device-resident split holds
    that shard alone. Training shards are equal in size (the ``length % world_size`` remainder rows
    are left out) so that every rank takes the same number of steps; validation shards are whole
    batches of the single-process order, dealt out in turn, covering every row once. With one
    process the shard is every row and the order is ``randperm(length)``.
    """

    def __init__(self, length: int, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.length, self.batch_size, self.shuffle = length, batch_size, shuffle
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self) -> torch.Tensor:
        """(N_rank,) int64: the rows this rank yields, ascending."""
        if self.world_size == 1:
            return torch.arange(self.length)
        if not self.shuffle:
            # Whole batches dealt out in turn: every batch is the one a single process forms, so
            # the summed batch losses and metric counts equal the single-process ones exactly.
            batches = torch.arange(self.length).split(self.batch_size)[self.rank :: self.world_size]
            return torch.cat(batches) if batches else torch.zeros(0, dtype=torch.int64)
        # A fixed random split, so that no rank holds only the first subjects.
        generator = torch.Generator().manual_seed(self.seed * 100_003 - 1)
        rows = torch.randperm(self.length, generator=generator)
        return rows[: self._shared_rows()][self.rank :: self.world_size].sort().values

    def _shared_rows(self) -> int:
        """How many rows the ranks share out: all, or for training a multiple of world_size."""
        if self.world_size == 1 or not self.shuffle:
            return self.length
        return self.length // self.world_size * self.world_size

    def order(self) -> torch.Tensor:
        """(N_rank,) int64: this rank's rows in this epoch's order."""
        rows = self.shard()
        if not self.shuffle:
            return rows
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return rows[torch.randperm(len(rows), generator=generator)]

    def split(self, order: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``order`` (N,) cut into batches; drop_last drops a short last batch unless it is the only one.

        An empty ``order`` (a rank that holds none of a split smaller than one batch per rank) is no
        batch, where ``Tensor.split`` would give one empty batch."""
        batches = order.split(self.batch_size) if len(order) else ()
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        return batches

    def __iter__(self):
        return (batch.tolist() for batch in self.split(self.order()))

    def __len__(self) -> int:
        rows = len(self.shard())
        full, rest = divmod(rows, self.batch_size)
        return full + int(rest > 0 and not (self.drop_last and full > 0))


def batch_rows(loader, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(B,) int64 row indices in the split of each batch ``loader`` (a DataLoader over an
    ``EpochBatchSampler``, or ``DeviceBatches``) yields, in order, on ``device`` in one copy."""
    rows = loader.sampler.split(loader.sampler.order().to(device, non_blocking=True))
    if len(rows) != len(loader):
        raise RuntimeError(f"{len(loader)} batches but {len(rows)} row groups")  # a sampler changed
    return rows


# ----------------------------------------------------------------------------- device-resident data
MAP_KEYS = ("spatial_weights", "dist_map")
LOAD_ROWS = 256                 # rows converted per chunk while loading: bounds the host memory used
DEVICE_DATA_FRACTION = 0.5      # of free CUDA memory; the rest is for weights, activations, workspaces
DEVICE_DATA_CAP = 32 * 2**30    # bytes; never more than this, whatever the card


def stored_dtype(name: str, device: torch.device) -> torch.dtype:
    """How a column is held on the device: uint8 frames, fp16 maps on CUDA, float32 otherwise."""
    if name in ("image", "label"):
        return torch.uint8
    return torch.float16 if name in MAP_KEYS and device.type == "cuda" else torch.float32


def split_bytes(rows: int, image_size: tuple[int, int], targets: tuple[str, ...],
                device: torch.device) -> int:
    """Device bytes of ``rows`` frames of ``image_size`` with ``targets``, held as ``stored_dtype`` says."""
    pixels = image_size[0] * image_size[1]
    planes = {"image": 1, "label": 1, "spatial_weights": 1, "dist_map": 2}  # per frame, (H, W) each
    per_row = 4 * 4 if "ellipse" in targets else 0  # (4,) float32
    for name in ("image", "label", *[t for t in targets if t in MAP_KEYS]):
        per_row += planes[name] * pixels * stored_dtype(name, device).itemsize
    return rows * per_row


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def device_data_decision(choice: str, device_type: str, needed: int, free: int | None) -> tuple[bool, str]:
    """Whether to hold the splits on the device, and the line that says why.

    ``choice`` is --data-on-device; ``needed`` the bytes of this rank's splits; ``free`` the free
    CUDA memory (None off CUDA). The budget is min(DEVICE_DATA_FRACTION * free, DEVICE_DATA_CAP).
    auto is on for CUDA within the budget; on is always allowed off CUDA (the host is the device)
    and on CUDA must fit; off is off.
    """
    if device_type != "cuda":
        on = choice == "on"
        state = "on" if on else "off"
        return on, f"data on device: {state} ({choice}, {device_type}; splits {_bytes(needed)})"
    budget = min(int(DEVICE_DATA_FRACTION * free), DEVICE_DATA_CAP)
    fits = needed <= budget
    numbers = (f"splits {_bytes(needed)}, budget {_bytes(budget)} = min({DEVICE_DATA_FRACTION:g} x free "
               f"{_bytes(free)}, cap {_bytes(DEVICE_DATA_CAP)})")
    if choice == "on" and not fits:
        raise UserError(f"--data-on-device on: the splits do not fit on the GPU ({numbers}); "
                        "use --data-on-device off or auto")
    on = choice == "on" or (choice == "auto" and fits)
    return on, f"data on device: {'on' if on else 'off'} ({choice}; {numbers})"


def load_rows(dataset: ArrowBatches, rows: torch.Tensor, device: torch.device,
              num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Rows ``rows`` (N,) of ``dataset`` as tensors on ``device``: ArrowBatches' own conversion, so
    every layout rule applies as on the DataLoader path, LOAD_ROWS rows a chunk on worker processes."""
    chunks = [chunk.tolist() for chunk in rows.split(LOAD_ROWS)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=chunks, num_workers=num_workers)
    tensors, start = {}, 0
    for chunk in loader:
        if not tensors:  # (N, ...) per column, allocated once the first chunk shows the shapes
            tensors = {name: torch.empty((len(rows), *value.shape[1:]), dtype=stored_dtype(name, device),
                                         device=device) for name, value in chunk.items()}
        stop = start + len(chunk["image"])
        for name, value in chunk.items():
            tensors[name][start:stop].copy_(value)  # casts maps to fp16 on CUDA
        start = stop
    return tensors


class DeviceBatches:
    """A split held as tensors on the device, batched in the sampler's order (hlb-CIFAR10 style).

    Loaded once (``load_rows``), only the rows of this rank's shard. Each epoch the sampler's
    order, a CPU ``randperm`` so that both paths draw the same batches, goes to the device in one
    copy; every batch is then one ``index_select`` per column, with no DataLoader and no host sync.
    Offers what the engine uses of a DataLoader: ``sampler``, ``dataset``, ``len`` and iteration.
    """

    def __init__(self, dataset: ArrowBatches, sampler: EpochBatchSampler, device: torch.device,
                 num_workers: int = 0):
        self.dataset, self.sampler, self.device = dataset, sampler, torch.device(device)
        rows = sampler.shard()  # (N_rank,)
        self.tensors = load_rows(dataset, rows, self.device, num_workers)
        self.position = torch.full((len(dataset),), -1, dtype=torch.long)  # split row -> held row
        self.position[rows] = torch.arange(len(rows))

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        order = self.position[self.sampler.order()].to(self.device, non_blocking=True)  # (N_rank,)
        for rows in self.sampler.split(order):
            yield {name: value.index_select(0, rows) for name, value in self.tensors.items()}


@dataclass
class Loaders:
    train: torch.utils.data.DataLoader | DeviceBatches
    valid: torch.utils.data.DataLoader | DeviceBatches
    image_size: tuple[int, int]
    layout: DatasetLayout


def make_loader(split, layout: DatasetLayout, targets: tuple[str, ...], batch_size: int, shuffle: bool,
                seed: int, num_workers: int, pin_memory: bool, rank: int = 0, world_size: int = 1):
    dataset = ArrowBatches(split, layout, targets)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last=shuffle, rank=rank,
                                world_size=world_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


AUTO_WORKERS = 2  # --num-workers auto, for data that needs work at load time


def loader_workers(args, layout: DatasetLayout, targets: tuple[str, ...]) -> int:
    """--num-workers, or for ``auto`` (None): 0 when batches are only read from stored rows (handing
    a batch of float maps to another process costs more than reading it), else AUTO_WORKERS."""
    if getattr(args, "num_workers", None) is not None:
        return args.num_workers
    return AUTO_WORKERS if layout.computes_at_load(targets) else 0


def make_loaders(dataset: DatasetDict, args, pin_memory: bool, layout: DatasetLayout | None = None,
                 targets: tuple[str, ...] = ALL_TARGETS, device: torch.device | None = None,
                 rank: int = 0, world_size: int = 1, valid_targets: tuple[str, ...] | None = None) -> Loaders:
    """Train/validation loaders sharing one layout (detected here if not given).

    ``valid_targets`` (default ``targets``) are what validation batches carry, e.g. the ellipse of
    the per-frame metrics. With a ``device``, --data-on-device decides whether the splits are held
    there (``DeviceBatches``). Frames must be multiples of SIZE_MULTIPLE (the models' stride).
    """
    layout = layout or detect_layout(dataset, *_layout_flags(args))
    size = checked_size(layout)
    valid_targets = valid_targets or targets
    workers = loader_workers(args, layout, tuple(dict.fromkeys(targets + valid_targets)))
    shared = dict(layout=layout, batch_size=args.batch_size, seed=args.seed, num_workers=workers,
                  pin_memory=pin_memory, rank=rank, world_size=world_size)
    train = make_loader(dataset[TRAIN_SPLIT], targets=targets, shuffle=True, **shared)
    valid = make_loader(dataset[VALID_SPLIT], targets=valid_targets, shuffle=False, **shared)
    if device is not None and _data_on_device(args, device, (train, valid), size):
        train, valid = (DeviceBatches(loader.dataset, loader.sampler, device, workers)
                        for loader in (train, valid))
    return Loaders(train, valid, size, layout)


def checked_size(layout: DatasetLayout) -> tuple[int, int]:
    """The layout's frame size; a UserError unless both sides are multiples of SIZE_MULTIPLE."""
    size = layout.image_size
    if size[0] % SIZE_MULTIPLE or size[1] % SIZE_MULTIPLE:
        raise UserError(f"frames are {size[0]}x{size[1]}; the models need multiples of {SIZE_MULTIPLE} "
                        "(re-run precompute.py with --size H W --letterbox)")
    return size


def _data_on_device(args, device: torch.device, loaders, size) -> bool:
    """--data-on-device for this rank's shards of the splits; prints the decision and its numbers."""
    device = torch.device(device)
    needed = sum(split_bytes(len(loader.sampler.shard()), size, loader.dataset.targets, device)
                 for loader in loaders)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    on, line = device_data_decision(getattr(args, "data_on_device", "auto"), device.type, needed, free)
    print(line)
    return on


def open_loaders(args, targets: tuple[str, ...], pin_memory: bool, device: torch.device | None = None,
                 rank: int = 0, world_size: int = 1, valid_targets: tuple[str, ...] | None = None
                 ) -> tuple[Loaders, Path]:
    """The loaders ``args`` asks for, with the layout detected once for the dataset; and its folder."""
    dataset, layout, source = open_dataset(args)
    loaders = make_loaders(dataset, args, pin_memory, layout, targets, device, rank, world_size,
                           valid_targets)
    return loaders, source


def open_split(args, split: str, targets: tuple[str, ...]) -> tuple[torch.utils.data.DataLoader, Path]:
    """One split of the dataset ``args`` names, every row once in row order (``evaluate.py``);
    batches of ``args.batch_size`` on the CPU, as the validation loader reads them."""
    dataset, layout, source = open_dataset(args)
    checked_size(layout)
    loader = make_loader(dataset[split], layout, targets, args.batch_size, shuffle=False, seed=0,
                         num_workers=loader_workers(args, layout, targets), pin_memory=False)
    return loader, source


def open_dataset(args) -> tuple[DatasetDict, DatasetLayout, Path]:
    """The splits of the dataset ``args`` names (built or downloaded if needed), its layout and folder."""
    source = resolve_source(args)
    dataset = load_splits(source, Path(args.data_dir).expanduser())
    return dataset, detect_layout(dataset, *_layout_flags(args), source=source), source


# ----------------------------------------------------------------------------- frames as arrays
def named_source(name: str) -> dict:
    """A dataset named in one word (``export.py --calibrate``) as the training scripts' source flags:
    ``demo`` (the --demo dataset), an existing folder (--dataset), else a Hub repo id (--hf-repo)."""
    if name == "demo":
        return {"demo": True, "dataset": None}
    path = Path(name).expanduser()
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return {"demo": False, "dataset": str(path)}
    return {"demo": False, "dataset": None, "hf_repo": name}


def sample_rows(length: int, count: int, seed: int) -> list[int]:
    """``count`` distinct rows of ``length`` (all when fewer), drawn with ``seed``, in ascending order."""
    if count >= length:
        return list(range(length))
    return sorted(np.random.default_rng(seed).choice(length, size=count, replace=False).tolist())


def frame_chunks(dataset: ArrowBatches, rows, chunk: int = LOAD_ROWS):
    """Yield (frames (B, H, W) uint8 preprocessed, pupil masks (B, H, W) uint8 0/1) for ``rows`` of
    ``dataset``, ``chunk`` rows at a time, read through ArrowBatches (every layout rule applies)."""
    rows = list(rows)
    for start in range(0, len(rows), chunk):
        batch = dataset[rows[start : start + chunk]]
        yield batch["image"].numpy(), batch["label"].numpy()


def _layout_flags(args) -> tuple:
    """(--size, --preprocessed) of ``args``; parsers that predate them mean (None, "auto")."""
    return getattr(args, "size", None), getattr(args, "preprocessed", "auto")


def to_device(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool = False) -> dict:
    """Move a batch to ``device`` and build the model input (B, 1, H, W) float in [-1, 1].

    A device-resident batch is already there (``.to`` returns it as is); its fp16 maps become
    float32, so the engine sees the same dtypes from both paths.
    """
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    moved.update({k: moved[k].float() for k in MAP_KEYS if k in moved})
    image = moved["image"].unsqueeze(1).float().div_(INPUT_SCALE).sub_(1.0)  # as normalize_frame
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    moved["image"] = image
    moved["label"] = moved["label"].long()
    return moved
