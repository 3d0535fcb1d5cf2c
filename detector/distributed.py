"""Multi-GPU (or multi-process CPU) data parallelism for the training engine, from torchrun's env vars.

``torchrun --nproc_per_node=N -m detector train CONFIG`` starts N copies of the same run. Each
computes the same deterministic ``epoch_batches`` and trains its share (``shard``); gradients are
averaged by DistributedDataParallel; rank 0 alone writes the run folder (logs, TensorBoard,
checkpoints, metrics) and evaluates. Decisions that must agree (stop, skip a non-finite batch,
early stop) are taken together. Without ``WORLD_SIZE`` > 1 every function is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device_name: str) -> bool:
    """Join the process group torchrun describes; True when this call started it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or enabled():
        return False
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=dt.timedelta(minutes=30))
    if not is_main():
        logging.getLogger("detector").setLevel(logging.WARNING)  # one copy of the log: rank 0's
    log.info("distributed: %d processes (%s)", world_size(), dist.get_backend())
    return True


def cleanup() -> None:
    if enabled():
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """Each process drives the GPU of its local rank."""
    if enabled() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def shard(batches: list[list[int]]) -> list[list[int]]:
    """This rank's batches: every world_size-th, padded by repeating the first ones so that all
    ranks take the same number of steps (as DistributedSampler pads)."""
    n = world_size()
    if n == 1:
        return batches
    total = -(-len(batches) // n) * n
    padded = batches + batches[: total - len(batches)]
    return padded[rank() :: n]


def barrier() -> None:
    if enabled():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, indexed by rank, on every rank; None when not distributed."""
    if not enabled():
        return None
    objects: list[Any] = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


def first_reason(reason: str | None) -> str | None:
    """A stop reason any rank has, on every rank (signals and deadlines arrive unevenly)."""
    if not enabled():
        return reason
    reasons: list[str | None] = [None] * world_size()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r), None)


def any_true(flag: bool, device: torch.device) -> bool:
    if not enabled():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def reduce_epoch(
    losses: dict[str, float], seen: int, device: torch.device
) -> tuple[dict[str, float], int]:
    """Mean losses over ranks, images seen summed over ranks."""
    if not enabled():
        return losses, seen
    keys = sorted(losses)
    tensor = torch.tensor(
        [losses[k] for k in keys] + [float(seen)], dtype=torch.float64, device=device
    )
    dist.all_reduce(tensor)
    values = tensor.tolist()
    return {k: v / world_size() for k, v in zip(keys, values, strict=False)}, int(values[-1])


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``module`` when distributed (only its trainable parameters
    are synced; built per epoch so the unfreeze phase's new parameters are included)."""
    if not enabled() or not any(p.requires_grad for p in module.parameters()):
        return module
    ddp = nn.parallel.DistributedDataParallel
    # Frozen BatchNorm: no buffer changes to share at each forward (the argument was renamed).
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(
        module, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
    )


def no_sync(module: nn.Module, accumulating: bool):
    """Skip the gradient all-reduce inside an accumulation window (DDP's no_sync)."""
    if accumulating and isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()
