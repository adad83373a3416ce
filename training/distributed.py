"""Processes: one, or many under torchrun (DDP: gloo on a CPU, NCCL on a GPU; or FSDP's fully_shard)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TrainingError


@dataclass
class Dist:
    """This process's place among the run's processes, and the device it trains on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def all_gather_object(self, obj: object) -> list:
        """Every process's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str) -> Dist:
    """Join torchrun's process group (if started by torchrun) and pick the device: --device auto/cpu/cuda."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, dev)


def close_distributed(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def cpu_threads(threads: int | None, d: Dist) -> int:
    """Threads per process: ``threads`` (--threads), else this machine's cores shared among its processes;
    set for torch when training on a CPU."""
    threads = threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", d.world)))
    if d.device.type == "cpu":
        torch.set_num_threads(threads)
    return threads


def wrap_model(model: torch.nn.Module, fsdp: bool, d: Dist) -> torch.nn.Module:
    """The model as the training steps call it: sharded in place by FSDP (each block, then the whole),
    wrapped in DDP when there are several processes, else itself."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def gradient_sync(net: torch.nn.Module, fsdp: bool, d: Dist, sync: bool):
    """Context for one micro-batch's backward pass: gradients are synchronised across processes only when
    ``sync`` (the step's last micro-batch)."""
    if fsdp:
        net.set_requires_gradient_sync(sync)
    elif d.world > 1 and not sync:
        return net.no_sync()
    return contextlib.nullcontext()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (possibly FSDP-sharded) parameter."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter; a collective under FSDP."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
