"""Where and how a run computes: device, CUDA-only options, processes, seeding, model placement.

Resolved once per run by ``setup_runtime``:
    CUDA   channels_last, torch.compile(mode="max-autotune") (``--no-compile`` turns it off),
           autocast fp16 + GradScaler (``--no-amp``), cudnn.benchmark, TF32 matmul/cuDNN,
           pinned host memory with non_blocking copies;
    CPU    the same code path without those parts; ``--compile`` is opt-in, AMP is off.
Under torchrun each process is one rank (``common.train.distributed``).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from common.device import resolve_device
from common.train.distributed import init_distributed, wrap_for_ddp


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


def prepare_model(model: torch.nn.Module, runtime: Runtime,
                  average: torch.nn.Module | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Move to the device (channels_last on CUDA); returns (module to train, module to evaluate).

    Training goes through DDP under torchrun; evaluation uses the plain module, because a DDP
    forward starts collectives that ranks with fewer validation batches would never join. Both
    are compiled if asked. ``model`` itself stays the plain module that checkpoints save.
    ``average`` (the weights' moving average, ``common.train.ema``), when given, is placed the
    same way and is the module to evaluate.
    """
    memory_format = torch.channels_last if runtime.channels_last else torch.preserve_format
    model.to(runtime.device, memory_format=memory_format)
    if average is not None:
        average.to(runtime.device, memory_format=memory_format)
    train = wrap_for_ddp(model, runtime.device)
    scored = model if average is None else average
    if not runtime.compile:
        return train, scored
    mode = "max-autotune" if runtime.device.type == "cuda" else None
    compiled = torch.compile(train, mode=mode)
    return compiled, (compiled if train is scored else torch.compile(scored, mode=mode))
