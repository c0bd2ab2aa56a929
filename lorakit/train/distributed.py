"""Several processes with torch.distributed, launched by torchrun (no home-made launcher).

`torchrun --nproc_per_node=N -m lorakit train ...` sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; `init` reads them. Each global batch is split across the ranks
(`shard`); DDP all-reduces the gradients of the trainable parameters only: the frozen base is listed
in DDP's ignore set, so it is neither broadcast at start nor gradient-synchronised (every rank loads
the same base from disk). Rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Context:
    """This process's place: rank among world processes, its device, and how many run on this machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # init created the process group, so close destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init(device: str = "auto") -> Context:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); a plain Context without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Context(rank=rank, world=world, local_rank=local_rank,
                   local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), device=dev, owns_group=owns)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random stream after init: a 63-bit hash of (seed, rank), so ranks and seeds
    never share a stream, and none equals the init seed itself."""
    return random.Random(f"lorakit:{seed}:rank{rank}").getrandbits(63)


def seed_rank_stream(seed: int, ctx: Context) -> None:
    """Give this rank its own python/torch (CPU and CUDA) random stream. Call it after the model and adapter
    init, which must be identical on every rank (same seed): from here on the draws are dropout, LoRA's
    dropout-mask seeds included, and rank k's rows must not get rank 0's masks (correlated noise that one
    process over the same global batch never has). Rank 0 (and a single process) keeps the stream it has,
    so single-process runs draw exactly what they drew before ranks had their own streams."""
    if ctx.rank == 0:
        return
    s = rank_seed(seed, ctx.rank)
    random.seed(s)
    torch.manual_seed(s)  # seeds every CUDA device too


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """DDP over the trainable parameters only; the model itself when running alone.

    Frozen parameters and all buffers go in DDP's ignore set: no start-up broadcast, no all-reduce.
    (DDP's reducer already skips parameters with requires_grad=False; the ignore set makes it explicit
    and also saves broadcasting the base at start-up.)
    """
    if not ctx.distributed:
        return model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen + [n for n, _ in model.named_buffers()])
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def synced_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters a DDP-wrapped model all-reduces (empty when not wrapped)."""
    if not isinstance(model, DistributedDataParallel):
        return []
    return [n for n, p in model.module.named_parameters() if p.requires_grad and n not in model.parameters_to_ignore]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard(batch: list[int], ctx: Context) -> list[int]:
    """This rank's share of a global batch: every world-th example, starting at its rank."""
    return batch[ctx.rank::ctx.world]


def all_sum(values: list[float], ctx: Context) -> list[float]:
    """Element-wise sum over ranks (float64 on CPU for gloo, the device's for nccl)."""
    if not ctx.distributed:
        return list(values)
    dev = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def gather(obj, ctx: Context) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def close(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["Context", "all_sum", "barrier", "close", "gather", "init", "rank_seed", "seed_rank_stream", "shard",
           "synced_parameters", "unwrap", "wrap"]
