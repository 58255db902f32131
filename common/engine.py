"""The one training engine: runtime options, the optimizer step, train/eval epochs and ``fit``.

Every training script (local, Modal, Colab) calls ``fit(args, spec)``; nothing else calls
``backward()``.

Runtime (``setup_runtime``) is resolved once:
    CUDA   channels_last, torch.compile(mode="max-autotune") (``--no-compile`` turns it off),
           autocast fp16 + GradScaler (``--no-amp``), cudnn.benchmark, TF32 matmul/cuDNN,
           pinned host memory with non_blocking copies;
    CPU    the same code path without those parts; ``--compile`` is opt-in, AMP is off.

Host syncs: metrics and loss sums accumulate on the device in preallocated tensors; the batch
loop never calls ``.item()``. The one deliberate sync is at the end of each epoch, where one small
transfer feeds the summary line, logging and the choice of the best checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm  # widgets in a notebook, text elsewhere

from common.augment import augment_batch
from common.data import to_device
from common.distributed import all_reduce_, init_distributed, shutdown, wrap_for_ddp
from common.errors import ConfigurationError, NonFiniteLossError, TrainingInterrupted
from common.metrics import accumulator_dtype
from common.pictures import picture_due, save_predictions
from common.specs import TrainSpec


# ----------------------------------------------------------------------------- runtime
def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device; unavailable -> exit code 2."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigurationError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"device '{name}' requested but CUDA is not available (torch {torch.__version__}); "
                "use --device cpu or --device auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"device '{name}' requested but MPS is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigurationError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return device


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: bool
    compile: bool
    channels_last: bool
    pin_memory: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """fp16 autocast on CUDA when AMP is on; a no-op context elsewhere."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.float16)

    def describe(self) -> str:
        ranks = f" rank={self.rank}/{self.world_size}" if self.world_size > 1 else ""
        return (f"device={self.device} amp={self.amp} compile={self.compile} "
                f"channels_last={self.channels_last} pin_memory={self.pin_memory}{ranks}")


def setup_runtime(args) -> Runtime:
    """Resolve device-dependent options once; CUDA-only features stay behind the device check."""
    device, rank, world_size = init_distributed(resolve_device(args.device))  # cuda:LOCAL_RANK under torchrun
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.amp and not cuda and rank == 0:
        print(f"warning: --amp needs CUDA (GradScaler + fp16); training in float32 on {device}")
    amp = cuda if args.amp is None else (args.amp and cuda)
    compile_model = cuda if args.compile is None else args.compile
    return Runtime(device=device, amp=amp, compile=compile_model, channels_last=cuda, pin_memory=cuda,
                   rank=rank, world_size=world_size)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG, as plain values a weights_only checkpoint can hold."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def prepare_model(model: torch.nn.Module, runtime: Runtime) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Move to the device (channels_last on CUDA); returns (module to train, module to evaluate).

    Training goes through DDP under torchrun; evaluation uses the plain module, because a DDP
    forward starts collectives that ranks with fewer validation batches would never join. Both
    are compiled if asked. ``model`` itself stays the plain module that checkpoints save.
    """
    memory_format = torch.channels_last if runtime.channels_last else torch.preserve_format
    model.to(runtime.device, memory_format=memory_format)
    train = wrap_for_ddp(model, runtime.device)
    if not runtime.compile:
        return train, model
    mode = "max-autotune" if runtime.device.type == "cuda" else None
    compiled = torch.compile(train, mode=mode)
    return compiled, (compiled if train is model else torch.compile(model, mode=mode))


# ----------------------------------------------------------------------------- optimizer step
class OptimizerStep:
    """One optimizer step: scale -> backward -> unscale -> clip -> step -> update (cf. timm NativeScaler).

    The forward pass runs under ``runtime.autocast()`` in the caller; on CPU the scaler is disabled
    and every scaler call is a pass-through.
    """

    def __init__(self, runtime: Runtime, clip_grad: float | None = None):
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp)
        self.clip_grad = clip_grad

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(parameters, self.clip_grad, foreach=True)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)


# ----------------------------------------------------------------------------- epochs
def augment_generator(seed: int, epoch: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """Augmentation randomness depends only on (seed, epoch, rank): a resumed run replays it exactly,
    and each DDP rank draws its own (rank 0 draws what a single process would)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch + 104_729 * rank)


def loss_accumulator(task, device: torch.device) -> torch.Tensor:
    """Zeroed per-term loss sums (terms,): float64 (not on MPS), so sums of float32 losses are
    exact in any order, which makes one process and N DDP ranks report the same means."""
    return torch.zeros(len(task.loss_terms), dtype=accumulator_dtype(device), device=device)


def progress(loader, desc: str, runtime: Runtime):
    """Iterate ``loader`` with a progress display on rank 0 (a bar, or plain lines in a log file)."""
    from common.progress import progress as shown

    return shown(loader, desc, unit="batch", leave=False) if runtime.is_main else iter(loader)


class NonFiniteWatch:
    """Counts steps whose loss is NaN or inf, with the first and last such step, on the device.

    ``update`` is torch ops only (no host sync); the counts travel with the epoch's one transfer.
    ``values`` = [bad steps, first bad step, last bad step] (steps 1-based; first = inf when none).
    """

    def __init__(self, device: torch.device):
        self.values = torch.tensor([0.0, math.inf, 0.0], device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = (~torch.isfinite(loss.detach().float())).float()  # 0-dim, stays on the device
        self.values[0] += bad
        self.values[1] = torch.minimum(self.values[1], torch.where(bad > 0, float(step), math.inf))
        self.values[2] = torch.maximum(self.values[2], bad * step)

    @staticmethod
    def check(counts: list[float], prefix: str, epoch: int, steps: int) -> None:
        bad, first, last = counts
        if bad:
            raise NonFiniteLossError(
                f"{prefix} loss was NaN or inf in epoch {epoch + 1} at steps {int(first)}-{int(last)} of "
                f"{steps} ({int(bad)} steps); training stopped and the last checkpoint still holds the "
                "last good epoch; lower --lr or check the data (precompute.py --validate)")


def _finish_epoch(task, loss_sums: torch.Tensor, batches: int, prefix: str, watch: NonFiniteWatch,
                  epoch: int) -> dict[str, float]:
    """The epoch's one host sync: loss means, non-finite step counts and metrics as python floats,
    over all DDP ranks (sums of losses, batches and bad steps; the first and last bad step)."""
    health = watch.values
    bad_steps = health[:1].to(loss_sums.dtype)
    sums = all_reduce_(torch.cat([loss_sums, loss_sums.new_tensor([batches]), bad_steps]))  # (terms + 2,)
    bounds = all_reduce_(torch.stack([-health[1], health[2]]), "max")  # (-first bad step, last bad step)
    all_reduce_(task.metrics.totals)
    synced = torch.cat([sums, bounds.to(sums.dtype)]).tolist()  # host sync (once per epoch, deliberate)
    terms, steps = len(task.loss_terms), synced[len(task.loss_terms)]
    means = [total / max(steps, 1) for total in synced[:terms]]
    counts = [synced[terms + 1], -synced[terms + 2], synced[terms + 3]]  # bad steps, first, last
    NonFiniteWatch.check(counts, prefix, epoch, int(steps))
    values = {f"{prefix}_{name}": value for name, value in zip(task.loss_terms, means)}
    values.update({f"{prefix}_{name}": value for name, value in task.compute_metrics().items()})
    return values


def train_one_epoch(model, loader, task, optimizer, stepper: OptimizerStep, runtime: Runtime,
                    epoch: int, seed: int, augment: bool = True) -> dict[str, float]:
    model.train()
    task.metrics.reset()
    loss_sums = loss_accumulator(task, runtime.device)
    generator = augment_generator(seed, epoch, runtime.device, runtime.rank)
    loader.sampler.set_epoch(epoch)
    watch = NonFiniteWatch(runtime.device)
    for step, batch in enumerate(progress(loader, f"epoch {epoch + 1} train", runtime), 1):
        batch = to_device(batch, runtime.device, runtime.channels_last)
        if augment:
            batch = augment_batch(batch, generator)
        with runtime.autocast():
            outputs = model(batch["image"])
        losses = task.loss(outputs, batch, epoch)
        stepper(losses["loss"], optimizer, model.parameters())
        watch.update(losses["loss"], step)
        loss_sums += torch.stack([losses[name].detach() for name in task.loss_terms]).to(loss_sums.dtype)
        task.update_metrics(outputs, batch)
    return _finish_epoch(task, loss_sums, len(loader), "train", watch, epoch)


@torch.no_grad()
def evaluate(model, loader, task, runtime: Runtime, epoch: int) -> dict[str, float]:
    model.eval()
    task.metrics.reset()
    loss_sums = loss_accumulator(task, runtime.device)
    watch = NonFiniteWatch(runtime.device)
    for step, batch in enumerate(progress(loader, f"epoch {epoch + 1} valid", runtime), 1):
        batch = to_device(batch, runtime.device, runtime.channels_last)
        with runtime.autocast():
            outputs = model(batch["image"])
        losses = task.loss(outputs, batch, epoch)
        watch.update(losses["loss"], step)
        loss_sums += torch.stack([losses[name].detach() for name in task.loss_terms]).to(loss_sums.dtype)
        task.update_metrics(outputs, batch)
    return _finish_epoch(task, loss_sums, len(loader), "valid", watch, epoch)


# ----------------------------------------------------------------------------- fit
@dataclass
class TrainState:
    """Everything ``fit`` carries from epoch to epoch; saved in every checkpoint's extras."""

    epoch: int = 0                   # epochs completed
    best_metric: float = -math.inf
    best_epoch: int = 0
    history: list = None
    data_fingerprint: str | None = None  # shard fingerprint of the dataset it trained on

    def __post_init__(self):
        self.history = self.history or []


def build_training(args, spec: TrainSpec, runtime: Runtime, image_size):
    """Model, task, optimizer, scheduler and step helper, seeded for reproducibility."""
    from common.models import build_model
    from common.tasks import TASKS

    seed_everything(args.seed)
    model = build_model(spec.model_name)
    task = TASKS[model.task](args.epochs, image_size, runtime.device)
    model.to(runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: cosine_factor(epoch, args.epochs))
    stepper = OptimizerStep(runtime, clip_grad=args.clip_grad)
    return model, task, optimizer, scheduler, stepper


def cosine_factor(epoch: int, epochs: int, floor: float = 0.01) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based): cosine from 1 down to ``floor``."""
    progress = min(epoch / max(epochs - 1, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resume_training(path, model, optimizer, scheduler, stepper, image_size=None,
                    fingerprint: str | None = None) -> TrainState:
    """Restore model/optimizer/scheduler/scaler, counters, history and RNG from a checkpoint.

    A checkpoint of another model or another frame size is refused with one line; a dataset whose
    shard fingerprint differs from the one the checkpoint trained on gets a warning.
    """
    from common.checkpoint import check_resumable, load_checkpoint, restore_training_state

    checkpoint = load_checkpoint(path)
    check_resumable(checkpoint, path, getattr(model, "model_name", None), image_size)
    epoch, best = restore_training_state(checkpoint, model, optimizer, scheduler, stepper)
    extras = checkpoint.get("train_state", {})
    before = extras.get("data_fingerprint")
    if before and fingerprint and before != fingerprint:
        print(f"warning: the dataset changed since {path} was saved (shard fingerprint {before}, now "
              f"{fingerprint}); the resumed run will not match an uninterrupted one", file=sys.stderr)
    if "rng" in checkpoint:
        set_rng_state(checkpoint["rng"])
    print(f"resumed from {path} after epoch {epoch} (best {best})")
    return TrainState(epoch=epoch, best_metric=-math.inf if best is None else best,
                      best_epoch=extras.get("best_epoch", 0), history=extras.get("history", []),
                      data_fingerprint=fingerprint)


def save_training_checkpoint(path, model, optimizer, scheduler, stepper, state: TrainState, args,
                             image_size) -> None:
    from common.checkpoint import save_checkpoint

    train_state = {"best_epoch": state.best_epoch, "history": state.history,
                   "data_fingerprint": state.data_fingerprint}
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=stepper,
                    epoch=state.epoch, best_metric=state.best_metric, args=args, input_size=image_size,
                    extra={"rng": rng_state(), "train_state": train_state})


def metric_label(name: str) -> str:
    """How a metric key is printed: ``iou`` is the mIoU (mean of background and pupil IoU)."""
    return "miou" if name == "iou" else name


def summary_line(row: dict, best_metric: str, improved: bool) -> str:
    """One line per epoch: losses, mIoU and pupil IoU, the task's pixel errors, lr and time."""
    parts = [f"epoch {row['epoch']:>3}/{row['epochs']}",
             f"train_loss {row['train_loss']:.4f}", f"valid_loss {row['valid_loss']:.4f}",
             f"train_miou {row['train_iou']:.4f}", f"valid_miou {row['valid_iou']:.4f}",
             f"valid_pupil_iou {row['valid_pupil_iou']:.4f}"]
    parts += [f"{k} {row[k]:.2f}" for k in ("valid_center_error_px", "valid_radius_error_px") if k in row]
    parts += [f"{k} {row[k]:.0f}" for k in ("train_negatives", "valid_negatives") if row.get(k)]
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    if improved:
        parts.append(f"* new best valid_{metric_label(best_metric)}")
    return " | ".join(parts)


def _epoch_row(epoch: int, args, train: dict, valid: dict, task, optimizer, seconds: float) -> dict:
    row = {"epoch": epoch + 1, "epochs": args.epochs, **train, **valid,
           "lr": optimizer.param_groups[0]["lr"], "seconds": seconds}
    row.update(task.epoch_extras(epoch))
    # The loss terms under the names MLflow dashboards expect (ce_loss, dice_loss, ...).
    row.update({f"{name}_loss": train[f"train_{name}"] for name in task.loss_terms if name != "loss"})
    return row


def _save_epoch_files(out_dir, spec: TrainSpec, model, optimizer, scheduler, stepper, state, args,
                      image_size, row: dict, improved: bool) -> list:
    """last (every epoch, for --resume), best and per-epoch checkpoints; returns new artifact paths."""
    save = lambda path: save_training_checkpoint(  # noqa: E731
        path, model, optimizer, scheduler, stepper, state, args, image_size)
    save(out_dir / spec.last_name)
    saved = []
    if improved:
        save(out_dir / spec.best_name)
        saved.append(out_dir / spec.best_name)
    if spec.wants_epoch_checkpoint(state.epoch, args.epochs, improved):
        path = out_dir / spec.epoch_name(state.epoch, row["valid_iou"])
        save(path)
        saved.append(path)
    return saved


def _export_best(out_dir, spec: TrainSpec, image_size, runtime: Runtime):
    """Export the best checkpoint to ONNX and check it against PyTorch; returns the path or None."""
    from common.checkpoint import load_model
    from common.export import export_onnx, verify_onnx

    best = out_dir / spec.best_name
    if not best.exists():
        print("warning: no best checkpoint was saved (validation never produced a finite metric)")
        return None
    model = load_model(best, device="cpu")
    path = export_onnx(model, out_dir / spec.onnx_name, input_size=tuple(image_size))
    diff = verify_onnx(model, path, batch=1, input_size=tuple(image_size))
    print(f"exported {path} ({path.stat().st_size / 1024:.0f} KB, max |onnx - torch| = {diff:.2e})")
    return path


@dataclass
class Session:
    """The objects one training run works with, built once by ``fit``."""

    args: object
    spec: TrainSpec
    runtime: Runtime
    out_dir: object
    loaders: object
    model: torch.nn.Module      # the plain module (checkpoints, export)
    forward: torch.nn.Module    # what the training loop calls (DDP under torchrun, compiled on CUDA)
    evaluator: torch.nn.Module  # what validation calls (never DDP)
    task: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    stepper: OptimizerStep
    tracker: object


def run_epoch(s: Session, state: TrainState, epoch: int) -> dict:
    """Train + validate one epoch and step the schedule; rank 0 then saves and logs. Returns the row."""

    start = time.perf_counter()
    train = train_one_epoch(s.forward, s.loaders.train, s.task, s.optimizer, s.stepper, s.runtime,
                            epoch, s.args.seed, augment=not s.args.no_augment)
    valid = evaluate(s.evaluator, s.loaders.valid, s.task, s.runtime, epoch)
    row = _epoch_row(epoch, s.args, train, valid, s.task, s.optimizer, time.perf_counter() - start)
    s.scheduler.step()
    metric = row[f"valid_{s.task.best_metric}"]  # the same on every rank: metrics are all-reduced
    improved = math.isfinite(metric) and metric > state.best_metric
    state.epoch, state.history = epoch + 1, state.history + [row]
    if improved:
        state.best_metric, state.best_epoch = metric, epoch + 1
    if s.runtime.is_main:
        _record_epoch(s, state, epoch, row, improved)
    return row


def _record_epoch(s: Session, state: TrainState, epoch: int, row: dict, improved: bool) -> None:
    """Checkpoints, the summary line, MLflow and the prediction picture of one epoch (rank 0)."""
    saved = _save_epoch_files(s.out_dir, s.spec, s.model, s.optimizer, s.scheduler, s.stepper, state,
                              s.args, s.loaders.image_size, row, improved)
    tqdm.write(summary_line(row, s.task.best_metric, improved))
    if improved:
        label = metric_label(s.task.best_metric)
        best = s.out_dir / s.spec.best_name
        tqdm.write(f"  saved new best model {best} (valid_{label} {state.best_metric:.4f})")
    s.tracker.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "epochs")}, step=epoch + 1)
    for path in saved:
        s.tracker.log_artifact(path, artifact_path="checkpoints")
    if picture_due(epoch + 1, s.args.epochs):
        # the plain module: a compiled one would recompile for the picture's batch size
        picture = save_predictions(s.out_dir / s.spec.predictions_name(epoch + 1), s.model,
                                   s.loaders.valid.dataset, s.task.name, s.runtime)
        s.tracker.log_artifact(picture, artifact_path="predictions")


def open_session(args, spec: TrainSpec) -> tuple[Session, TrainState]:
    """Resolve runtime and data, build (or resume) the model, start tracking (rank 0)."""
    from pathlib import Path

    from common.data import open_loaders, source_fingerprint
    from common.distributed import main_process_first
    from common.models import count_parameters, model_task
    from common.tasks import TASKS

    runtime = setup_runtime(args)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = TASKS[model_task(spec.model_name)].targets  # what the batches must carry for this task
    with main_process_first():
        loaders, source = open_loaders(args, targets, runtime.pin_memory, runtime.device, runtime.rank,
                                       runtime.world_size)
    model, task, optimizer, scheduler, stepper = build_training(args, spec, runtime, loaders.image_size)
    fingerprint = source_fingerprint(source)
    state = TrainState(data_fingerprint=fingerprint)
    if args.resume:
        state = resume_training(args.resume, model, optimizer, scheduler, stepper, loaders.image_size,
                                fingerprint)
    forward, evaluator = prepare_model(model, runtime)
    tracker = _start_tracking(args, spec, runtime, out_dir, source, count_parameters(model))
    if runtime.is_main:
        print(f"{spec.model_type}: {count_parameters(model):,} parameters | {runtime.describe()}")
        print(f"data {source}: {len(loaders.train.dataset)} train / {len(loaders.valid.dataset)} valid "
              f"frames of {loaders.image_size[0]}x{loaders.image_size[1]}")
        print(f"data layout: {loaders.layout.describe(targets)}")
    session = Session(args, spec, runtime, out_dir, loaders, model, forward, evaluator, task, optimizer,
                      scheduler, stepper, tracker)
    return session, state


def _start_tracking(args, spec: TrainSpec, runtime: Runtime, out_dir, source, parameters: int):
    """args.json and the MLflow run, on rank 0; other ranks get a tracker that does nothing."""
    from common.history import write_run_config
    from common.tracking import Tracker

    if not runtime.is_main or getattr(args, "test_only", False):
        return Tracker(None, spec.experiment)
    write_run_config(out_dir, args, runtime.describe(), spec.args_name)
    tracker = Tracker.from_env(spec.experiment, run_name=f"{spec.file_stem}-{out_dir.name}")
    tracker.start(params={**vars(args), "parameters": parameters, "dataset": str(source)},
                  tags={"model_type": spec.model_type, "architecture": spec.architecture})
    return tracker


def fit(args, spec: TrainSpec, on_saved=None) -> dict:
    """Train ``spec``'s model as ``args`` say; returns the final summary (also printed).

    ``on_saved()``, when given, runs on rank 0 after each epoch's files and after the final export
    are written: the Modal job commits its output volume there, so a lost container costs one epoch.
    With ``--test-only`` it evaluates the ``--resume`` checkpoint on the validation split instead.
    """
    session, state = open_session(args, spec)
    try:
        if getattr(args, "test_only", False):
            return evaluate_only(session)
        return _train(session, state, on_saved or (lambda: None))
    finally:
        shutdown()


def _train(session: Session, state: TrainState, saved) -> dict:
    from common.cli import signals_as_interrupt
    from common.history import plot_curves, write_history

    main, spec = session.runtime.is_main, session.spec
    curves = onnx_path = None
    try:
        with signals_as_interrupt():
            for epoch in range(state.epoch, session.args.epochs):
                run_epoch(session, state, epoch)
                if main:
                    write_history(session.out_dir, state.history, spec.metrics_name)
                    saved()
            if main and state.history:
                curves = plot_curves(session.out_dir, state.history, spec.curves_name)
            if main:
                onnx_path = _export_best(session.out_dir, spec, session.loaders.image_size, session.runtime)
                saved()
    except KeyboardInterrupt as exc:
        session.tracker.finish("KILLED")
        raise interrupted(exc, session.out_dir / spec.last_name) from None
    except BaseException:
        session.tracker.finish("FAILED")
        raise
    for path in (curves, onnx_path, session.out_dir / f"{spec.metrics_name}.csv"):
        if main and path is not None and path.exists():
            session.tracker.log_artifact(path)
    session.tracker.finish("FINISHED")
    summary = _summary(session, state, onnx_path)
    if main:
        print(final_line(summary, metric_label(session.task.best_metric)))
    return summary


def _summary(session: Session, state: TrainState, onnx_path) -> dict:
    last = state.history[-1] if state.history else {}
    return {"final_valid_iou": last.get("valid_iou"), "final_valid_pupil_iou": last.get("valid_pupil_iou"),
            "best_valid_metric": state.best_metric, "best_epoch": state.best_epoch,
            "best_checkpoint": str(session.out_dir / session.spec.best_name),
            "onnx": str(onnx_path) if onnx_path else None}


def evaluate_only(session: Session) -> dict:
    """Validation metrics of the loaded weights, printed as one JSON line (all ranks agree)."""
    import json

    if not session.args.resume:
        raise ConfigurationError("--test-only evaluates a checkpoint: give it with --resume PATH")
    metrics = evaluate(session.evaluator, session.loaders.valid, session.task, session.runtime, epoch=0)
    if session.runtime.is_main:
        print(f"test-only {json.dumps(metrics)}")
    return metrics


def interrupted(exc: KeyboardInterrupt, last) -> TrainingInterrupted:
    """The one line for Ctrl-C / SIGTERM: which epoch ``last`` holds and how to resume from it."""
    import signal

    from common.checkpoint import CheckpointError, load_checkpoint

    signum = getattr(exc, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    try:
        epoch = load_checkpoint(last)["epoch"]
    except CheckpointError:
        return TrainingInterrupted(f"interrupted ({name}) before the first epoch finished; nothing to "
                                   "resume, start the run again", signum)
    return TrainingInterrupted(f"interrupted ({name}); {last} holds epoch {epoch}, the last completed one: "
                               f"run the same command with --resume {last} to continue", signum)


def final_line(summary: dict, best_label: str) -> str:
    """The run's last line: final validation mIoU and pupil IoU, and the best epoch's metric."""
    def value(key):
        return "n/a" if summary[key] is None else f"{summary[key]:.4f}"

    return (f"final validation mIoU {value('final_valid_iou')}, pupil IoU {value('final_valid_pupil_iou')} "
            f"(best valid_{best_label} {summary['best_valid_metric']:.4f} at epoch {summary['best_epoch']})")
