"""Multi-process training through ``torchrun`` and DistributedDataParallel.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous address); without them every
function here is a no-op, so one code path serves one process and many:

    torchrun --nproc_per_node=2 train_efficientvit_local.py --demo          # 2 CPU processes, gloo
    torchrun --nproc_per_node=8 train_efficientvit_local.py --device cuda    # 8 GPUs, NCCL

Each rank takes every world_size-th batch (``data.EpochBatchSampler``), gradients are averaged by
DDP, and the epoch's loss sums and metric counts are summed over ranks before anything is
printed or compared, so every rank sees the same metrics and takes the same decisions. Only rank
0 writes files and talks to MLflow.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from common.errors import ConfigurationError


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) for a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def init_distributed(device: torch.device) -> tuple[torch.device, int, int]:
    """Join the process group when started by torchrun; returns (this rank's device, rank, world).

    CUDA ranks use NCCL and GPU LOCAL_RANK; CPU ranks use gloo.
    """
    rank, local_rank, world_size = world_from_env()
    if world_size <= 1:
        return device, 0, 1
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigurationError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                                     "device(s): start at most that many processes per node")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigurationError(f"torchrun needs --device cuda (NCCL) or cpu (gloo), not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device, rank, world_size


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over all ranks in place with "sum" or "max" (a no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers_(module: torch.nn.Module) -> torch.nn.Module:
    """Give every rank rank 0's buffers (BatchNorm running statistics) in place; a no-op in one process.

    On the CPU each rank's BatchNorm keeps its own statistics (no SyncBatchNorm), and DDP broadcasts
    rank 0's buffers only before each training forward, so after an epoch the ranks' statistics
    differ by their last batch. Validation then scores on every rank the model rank 0 saves.
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
    return module


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (building, downloading or caching a dataset), then the others,
    which find its results in place instead of writing the same files at the same time."""
    rank = dist.get_rank() if is_distributed() else 0
    if rank != 0:
        dist.barrier()
    yield
    if rank == 0 and is_distributed():
        dist.barrier()


def wrap_for_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module the training loop calls under DDP; checkpoints keep using ``model`` itself.

    BatchNorm statistics are synchronized across GPUs (SyncBatchNorm needs CUDA: on CPU each
    rank keeps its own batch statistics). The conversion swaps submodules in place and keeps the
    same parameters and buffers, so the optimizer and the saved state dict are unaffected.
    """
    if not is_distributed():
        return model
    if device.type == "cuda":
        for name, child in list(model.named_children()):
            setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
