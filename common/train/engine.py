"""The one training engine: the optimizer step, train/eval epochs and ``fit``.

Every training script (local, Modal, Colab) calls ``fit(args, spec)``; nothing else calls
``backward()``. ``fit`` reads top to bottom: setup (runtime, data, model), resume, the epoch loop
(train, validate, record, checkpoint) and the finish (curves, ONNX export, summary).

Host syncs: metrics and loss sums accumulate on the device in preallocated tensors; the batch
loop never calls ``.item()``. The one deliberate sync is at the end of each epoch, where one small
transfer feeds the summary line, logging and the choice of the best checkpoint. Validation also
fills a per-frame table (and, for segmentation, bit-packed predicted masks) on the device, read
back after the loop, where the pupil ellipses are fitted on the host.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm  # widgets in a notebook, text elsewhere

from common.checkpoint import (
    CheckpointError,
    TrainState,
    load_checkpoint,
    load_init_model,
    load_model,
    resume_training,
    save_training_checkpoint,
)
from common.cli import signals_as_interrupt
from common.errors import ConfigurationError, NonFiniteLossError, TrainingInterrupted
from common.files import remove_stale_temporaries
from common.infer.export import export_onnx, verify_onnx
from common.infer.pictures import picture_due, picture_rows, save_predictions
from common.models import build_model, count_parameters, model_task
from common.progress import progress as shown
from common.specs import TrainSpec
from common.train.augment import AugmentConfig, augment_batch, augment_config
from common.train.data import batch_rows, open_loaders, source_fingerprint, to_device
from common.train.distributed import all_reduce_, broadcast_buffers_, main_process_first, shutdown
from common.train.ema import ModelEma
from common.train.metrics import accumulator_dtype
from common.train.run_files import plot_curves, write_history, write_run_config
from common.train.runtime import Runtime, prepare_model, seed_everything, setup_runtime
from common.train.tasks import TASKS
from common.train.tracking import Tracker


# ----------------------------------------------------------------------------- optimizer step
class OptimizerStep:
    """One optimizer step: scale -> backward -> unscale -> clip -> step -> update (cf. timm NativeScaler),
    then the weights' moving average when there is one (``ema``, --ema).

    The forward pass runs under ``runtime.autocast()`` in the caller; on CPU the scaler is disabled
    and every scaler call is a pass-through.
    """

    def __init__(self, runtime: Runtime, clip_grad: float | None = None, ema: ModelEma | None = None):
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp)
        self.clip_grad = clip_grad
        self.ema = ema

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(parameters, self.clip_grad, foreach=True)
        self.scaler.step(optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()

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
    for tensor in task.metric_state():  # sums of counts and per-frame rows (zero where another rank's)
        all_reduce_(tensor)
    synced = torch.cat([sums, bounds.to(sums.dtype)]).tolist()  # host sync (once per epoch, deliberate)
    terms, steps = len(task.loss_terms), synced[len(task.loss_terms)]
    means = [total / max(steps, 1) for total in synced[:terms]]
    counts = [synced[terms + 1], -synced[terms + 2], synced[terms + 3]]  # bad steps, first, last
    NonFiniteWatch.check(counts, prefix, epoch, int(steps))
    values = {f"{prefix}_{name}": value for name, value in zip(task.loss_terms, means)}
    values.update({f"{prefix}_{name}": value for name, value in task.compute_metrics().items()})
    return values


def train_one_epoch(model, loader, task, optimizer, stepper: OptimizerStep, runtime: Runtime,
                    epoch: int, seed: int,
                    augment: AugmentConfig | None = AugmentConfig()) -> dict[str, float]:
    model.train()
    task.reset_metrics()
    loss_sums = loss_accumulator(task, runtime.device)
    generator = augment_generator(seed, epoch, runtime.device, runtime.rank)
    loader.sampler.set_epoch(epoch)
    watch = NonFiniteWatch(runtime.device)
    for step, batch in enumerate(progress(loader, f"epoch {epoch + 1} train", runtime), 1):
        batch = to_device(batch, runtime.device, runtime.channels_last)
        if augment is not None:
            batch = augment_batch(batch, generator, augment)
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
    task.reset_metrics(frames=len(loader.dataset))  # the whole split's rows, on every rank
    loss_sums = loss_accumulator(task, runtime.device)
    watch = NonFiniteWatch(runtime.device)
    rows = batch_rows(loader, runtime.device)
    for step, batch in enumerate(progress(loader, f"epoch {epoch + 1} valid", runtime), 1):
        batch = to_device(batch, runtime.device, runtime.channels_last)
        with runtime.autocast():
            outputs = model(batch["image"])
        losses = task.loss(outputs, batch, epoch)
        watch.update(losses["loss"], step)
        loss_sums += torch.stack([losses[name].detach() for name in task.loss_terms]).to(loss_sums.dtype)
        task.update_metrics(outputs, batch, rows[step - 1])
    return _finish_epoch(task, loss_sums, len(loader), "valid", watch, epoch)



# ----------------------------------------------------------------------------- fit
def fit(args, spec: TrainSpec, on_saved=None) -> dict:
    """Train ``spec``'s model as ``args`` say; returns the final summary (also printed).

    ``on_saved()``, when given, runs on rank 0 after each epoch's files and after the final export
    are written: the Modal job commits its output volume there, so a lost container costs one epoch.
    With ``--test-only`` it evaluates the ``--resume`` checkpoint on the validation split instead.
    """
    saved = on_saved or (lambda: None)
    # setup: where to compute, the data, the model and its optimizer
    runtime = setup_runtime(args)
    out_dir = output_dir(args, runtime)
    task_type = TASKS[model_task(spec.model_name)]
    targets = task_type.targets  # what the batches carry for this task
    with main_process_first():  # rank 0 builds or downloads the dataset; the others then read it
        loaders, source = open_loaders(args, targets, runtime.pin_memory, runtime.device, runtime.rank,
                                       runtime.world_size, valid_targets=task_type.eval_targets)
    size = loaders.image_size
    model, task, optimizer, scheduler, stepper = build_training(args, spec, runtime, size)
    ema = stepper.ema  # the weights' moving average (--ema) or None
    scored = model if ema is None else ema.module  # what validation, checkpoints and pictures use
    # resume: weights, optimizer, schedule, RNG and history of the last finished epoch
    state = starting_state(args, source, model, optimizer, scheduler, stepper, size)
    forward, evaluator = prepare_model(model, runtime, average=scored if ema else None)  # DDP, compile
    if runtime.is_main:
        describe_run(spec, model, runtime, loaders, source, targets)
    try:
        if args.test_only:
            return evaluate_only(args, evaluator, loaders.valid, task, runtime)
        with start_tracking(args, spec, runtime, out_dir, source, model) as tracker, signals_as_interrupt():
            files = EpochFiles(
                out_dir, spec, tracker, best_metric=task.best_metric, epochs=args.epochs,
                save=lambda name: save_training_checkpoint(out_dir / name, model, optimizer, scheduler,
                                                           stepper, state, args, size, ema=ema),
                picture=lambda path: save_prediction_picture(path, scored, loaders.valid.dataset,
                                                             task.name, runtime))
            for epoch in range(state.epoch, args.epochs):
                start = time.perf_counter()
                train = train_one_epoch(forward, loaders.train, task, optimizer, stepper, runtime, epoch,
                                        args.seed, augment=augment_config(args))
                broadcast_buffers_(scored)  # every rank scores the weights rank 0 saves
                valid = evaluate(evaluator, loaders.valid, task, runtime, epoch)
                row = epoch_row(epoch, args, train, valid, task, optimizer, time.perf_counter() - start)
                scheduler.step()
                improved = state.record(row, task.best_metric)  # the same on every rank: all-reduced metrics
                if runtime.is_main:  # rank 0 alone writes files and talks to MLflow
                    files.write(row, state, improved)
                    saved()
            # finish: curves and the ONNX export of the best checkpoint
            onnx_path = (finish_files(out_dir, spec, state, size, tracker, args.export)
                         if runtime.is_main else None)
            if runtime.is_main:
                saved()
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM; the tracker has recorded KILLED
        raise interrupted(exc, out_dir / spec.last_name) from None
    finally:
        shutdown()
    summary = run_summary(state, out_dir / spec.best_name, onnx_path)
    if runtime.is_main:
        print(final_line(summary, metric_label(task.best_metric)))
    return summary


def output_dir(args, runtime: Runtime) -> Path:
    """--output-dir, created; on rank 0 without the temporaries of a writer killed mid-file (a
    live writer's stay)."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if runtime.is_main:
        remove_stale_temporaries(out_dir)
    return out_dir


def starting_state(args, source, model, optimizer, scheduler, stepper, image_size) -> TrainState:
    """A new run's state, or --resume's: its weights, optimizer, schedule, RNG and history loaded."""
    state = TrainState(data_fingerprint=source_fingerprint(source))
    if not args.resume:
        return state
    return resume_training(args.resume, model, optimizer, scheduler, stepper, image_size,
                           state.data_fingerprint, ema=stepper.ema, evaluate_only=args.test_only)


def build_training(args, spec: TrainSpec, runtime: Runtime, image_size):
    """Model, task, optimizer, scheduler and step helper (with the weights' moving average when
    ``args.ema`` > 0), seeded for reproducibility."""
    seed_everything(args.seed)
    if getattr(args, "init", None):  # the file's architecture and weights; --resume may still follow
        model = load_init_model(args.init, model_task(spec.model_name))
        if runtime.is_main:
            print(f"initialized from {args.init}: '{model.model_name}' weights")
    else:
        model = build_model(spec.model_name)
    options = {"alpha_floor": args.alpha_floor} if model.task == "segmentation" else {}
    task = TASKS[model.task](args.epochs, image_size, runtime.device, **options)
    model.to(runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: cosine_factor(epoch, args.epochs))
    ema = ModelEma(model, args.ema) if args.ema else None
    stepper = OptimizerStep(runtime, clip_grad=args.clip_grad, ema=ema)
    return model, task, optimizer, scheduler, stepper


def cosine_factor(epoch: int, epochs: int, floor: float = 0.01) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based): cosine from 1 down to ``floor``."""
    progress = min(epoch / max(epochs - 1, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def describe_run(spec: TrainSpec, model, runtime: Runtime, loaders, source, targets) -> None:
    name = spec.model_type if model.model_name == spec.model_name else model.model_name  # --init's own
    print(f"{name}: {count_parameters(model):,} parameters | {runtime.describe()}")
    print(f"data {source}: {len(loaders.train.dataset)} train / {len(loaders.valid.dataset)} valid "
          f"frames of {loaders.image_size[0]}x{loaders.image_size[1]}")
    print(f"data layout: {loaders.layout.describe(targets)}")


def start_tracking(args, spec: TrainSpec, runtime: Runtime, out_dir: Path, source, model) -> Tracker:
    """args_<model>.json and the MLflow run, on rank 0; other ranks get a tracker that does nothing.

    Used as a context manager: the run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C).
    """
    if not runtime.is_main:
        return Tracker(None, spec.experiment)
    write_run_config(out_dir, args, runtime.describe(), spec.args_name)
    tracker = Tracker.from_env(spec.experiment, run_name=f"{spec.file_stem}-{out_dir.name}")
    tracker.start(params={**vars(args), "parameters": count_parameters(model), "dataset": str(source)},
                  tags={"model_type": spec.model_type, "architecture": spec.architecture})
    return tracker


def epoch_row(epoch: int, args, train: dict, valid: dict, task, optimizer, seconds: float) -> dict:
    """The epoch's line of metrics_<model>.json: both splits' losses and metrics, lr and time."""
    row = {"epoch": epoch + 1, "epochs": args.epochs, **train, **valid,
           "lr": optimizer.param_groups[0]["lr"], "seconds": seconds}
    row.update(task.epoch_extras(epoch))
    # The loss terms under the names MLflow dashboards expect (ce_loss, dice_loss, ...).
    row.update({f"{name}_loss": train[f"train_{name}"] for name in task.loss_terms if name != "loss"})
    return row


@dataclass
class EpochFiles:
    """What rank 0 writes after each epoch, in an order a kill cannot break: the best and epoch
    checkpoints, the MLflow entries, the picture and the metrics history first, ``last_*.pt``
    (for --resume) last. A run killed before ``last`` is in place resumes from the previous epoch
    and rewrites the others the same way."""

    out_dir: Path
    spec: TrainSpec
    tracker: Tracker
    save: Callable[[str], Path]  # a training checkpoint of the current state under a file name
    picture: Callable[[Path], Path]  # the fixed validation rows drawn to a file
    best_metric: str
    epochs: int

    def write(self, row: dict, state: TrainState, improved: bool) -> None:
        names = [self.spec.best_name] if improved else []
        if self.spec.wants_epoch_checkpoint(state.epoch, self.epochs, improved):
            names.append(self.spec.epoch_name(state.epoch, state.history[-1]["valid_iou"]))
        saved = [self.save(name) for name in names]
        report_epoch(self.tracker, row, self.best_metric, state, saved, self.out_dir / self.spec.best_name)
        if picture_due(row["epoch"], self.epochs):
            picture = self.picture(self.out_dir / self.spec.predictions_name(row["epoch"]))
            self.tracker.log_artifact(picture, artifact_path="predictions")
        write_history(self.out_dir, state.history, self.spec.metrics_name)
        self.save(self.spec.last_name)


def report_epoch(tracker: Tracker, row: dict, best_metric: str, state: TrainState, files: list[Path],
                 best_path: Path) -> None:
    """The summary line, the new best checkpoint's line, and the epoch's metrics and files in MLflow."""
    improved = state.best_epoch == row["epoch"]
    tqdm.write(summary_line(row, best_metric, improved))
    if improved:
        tqdm.write(f"  saved new best model {best_path} (valid_{metric_label(best_metric)} "
                   f"{state.best_metric:.4f})")
    tracker.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "epochs")}, step=row["epoch"])
    for path in files:
        tracker.log_artifact(path, artifact_path="checkpoints")


@torch.no_grad()
def save_prediction_picture(path, model: torch.nn.Module, dataset, task: str, runtime: Runtime) -> Path:
    """The fixed validation rows of ``dataset`` (an ``ArrowBatches``) through ``model``, drawn by
    ``pictures.save_predictions``. ``model`` is the plain module: a compiled one would recompile
    for this batch size. It runs in eval mode (BatchNorm running statistics, as in validation)."""
    rows = picture_rows(len(dataset))
    batch = dataset[rows]  # image (B, H, W) uint8, label (B, H, W) uint8, on the CPU
    moved = to_device({"image": batch["image"], "label": batch["label"]}, runtime.device,
                      runtime.channels_last)
    was_training = model.training
    model.eval()
    with runtime.autocast():
        outputs = model(moved["image"])  # (B, 1, H, W) in [-1, 1] -> (B, 2, H, W) or (B, 4)
    model.train(was_training)
    outputs = outputs.float().cpu().numpy()  # host sync: drawing happens on the CPU
    return save_predictions(path, batch["image"].numpy(), batch["label"].numpy(), outputs,
                            [f"#{row}" for row in rows], task)


def finish_files(out_dir: Path, spec: TrainSpec, state: TrainState, image_size, tracker: Tracker,
                 export: bool = True):
    """Training curves, the ONNX export of the best checkpoint (unless ``export`` is off: --no-export),
    and their upload; returns the ONNX path."""
    curves = plot_curves(out_dir, state.history, spec.curves_name) if state.history else None
    onnx_path = (export_best(out_dir / spec.best_name, out_dir / spec.onnx_name, image_size)
                 if export else None)
    for path in (curves, onnx_path, out_dir / f"{spec.metrics_name}.csv"):
        if path is not None:
            tracker.log_artifact(path)
    return onnx_path


def export_best(best: Path, destination: Path, image_size) -> Path | None:
    """Export the best checkpoint to ONNX and check it against PyTorch; returns the path or None."""
    if not best.exists():
        print("warning: no best checkpoint was saved (validation never produced a finite metric)")
        return None
    model = load_model(best, device="cpu")
    path = export_onnx(model, destination, input_size=tuple(image_size))
    diff = verify_onnx(model, path, batch=1, input_size=tuple(image_size))
    print(f"exported {path} ({path.stat().st_size / 1024:.0f} KB, max |onnx - torch| = {diff:.2e})")
    return path


def evaluate_only(args, evaluator, loader, task, runtime: Runtime) -> dict:
    """Validation metrics of the loaded weights, printed as one JSON line (all ranks agree)."""
    if not args.resume:
        raise ConfigurationError("--test-only evaluates a checkpoint: give it with --resume PATH")
    metrics = evaluate(evaluator, loader, task, runtime, epoch=0)
    if runtime.is_main:
        print(f"test-only {json.dumps(metrics)}")
    return metrics


def interrupted(exc: KeyboardInterrupt, last) -> TrainingInterrupted:
    """The one line for Ctrl-C / SIGTERM: which epoch ``last`` holds and how to resume from it."""
    signum = getattr(exc, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    try:
        epoch = load_checkpoint(last)["epoch"]
    except CheckpointError:
        return TrainingInterrupted(f"interrupted ({name}) before the first epoch finished; nothing to "
                                   "resume, start the run again", signum)
    return TrainingInterrupted(f"interrupted ({name}); {last} holds epoch {epoch}, the last completed one: "
                               f"run the same command with --resume {last} to continue", signum)


# ----------------------------------------------------------------------------- what is printed
def metric_label(name: str) -> str:
    """How a metric key is printed: ``iou`` is the mIoU (mean of background and pupil IoU)."""
    return "miou" if name == "iou" else name


def summary_line(row: dict, best_metric: str, improved: bool) -> str:
    """One line per epoch: losses, mIoU and pupil IoU (and its 10th percentile over frames), the
    pupil centre errors and detection rate at 5 px, the regressor's radius error, lr and time."""
    parts = [f"epoch {row['epoch']:>3}/{row['epochs']}",
             f"train_loss {row['train_loss']:.4f}", f"valid_loss {row['valid_loss']:.4f}",
             f"train_miou {row['train_iou']:.4f}", f"valid_miou {row['valid_iou']:.4f}",
             f"valid_pupil_iou {row['valid_pupil_iou']:.4f}"]
    parts += [f"{k} {row[k]:.4f}" for k in ("valid_pupil_iou_p10",) if k in row]
    pixels = ("valid_center_error_px", "valid_center_error_median_px", "valid_radius_error_px")
    parts += [f"{k} {row[k]:.2f}" for k in pixels if k in row]
    parts += [f"{k} {row[k]:.3f}" for k in ("valid_detection_rate_5px",) if k in row]
    parts += [f"{k} {row[k]:.0f}" for k in ("valid_missed", "train_negatives", "valid_negatives")
              if row.get(k)]
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    if improved:
        parts.append(f"* new best valid_{metric_label(best_metric)}")
    return " | ".join(parts)


def run_summary(state: TrainState, best_path: Path, onnx_path) -> dict:
    last = state.history[-1] if state.history else {}
    return {"final_valid_iou": last.get("valid_iou"), "final_valid_pupil_iou": last.get("valid_pupil_iou"),
            "best_valid_metric": state.best_metric, "best_epoch": state.best_epoch,
            "best_checkpoint": str(best_path), "onnx": str(onnx_path) if onnx_path else None}


def final_line(summary: dict, best_label: str) -> str:
    """The run's last line: final validation mIoU and pupil IoU, and the best epoch's metric."""
    def value(key):
        return "n/a" if summary[key] is None else f"{summary[key]:.4f}"

    return (f"final validation mIoU {value('final_valid_iou')}, pupil IoU {value('final_valid_pupil_iou')} "
            f"(best valid_{best_label} {summary['best_valid_metric']:.4f} at epoch {summary['best_epoch']})")
