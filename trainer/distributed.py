"""Data-parallel training over processes started by torchrun (`torchrun --nproc-per-node N hsae train ...`).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` joins the process
group (NCCL when training on CUDA, gloo on CPU). Without those variables, or with WORLD_SIZE=1, nothing here
does anything and training runs as one process.

How the ranks stay one model: every rank reads its own slice of each global batch
(`trainer.data.batch_stream`); gradients are summed over ranks (each rank's loss weighted by its share of the
batch's rows); whatever the models compute from data outside the gradient (the data initialisation, the
tree's re-assignments, the MoE's expert inits) is computed on rank 0 and broadcast, parameters, buffers and
RNG state together; the dead-latent counts are summed over ranks every step. Adam then takes the same step
on identical inputs everywhere, so the parameters stay identical without being broadcast each step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def env_world() -> World:
    """The rank and world size torchrun gave this process (0 and 1 without torchrun)."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def init_from_env(device: str = "auto") -> tuple[World, bool]:
    """Joins torchrun's process group unless this process already has one; `device` is the training device
    flag: NCCL when it resolves to CUDA, gloo otherwise. Returns (the world, whether this call joined it: the
    caller then leaves it with `close`)."""
    world = env_world()
    if not world.parallel:
        return world, False
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size()), False
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" then means this rank's GPU
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size()), True


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if current().parallel:
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not current().parallel:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others); [obj] without torchrun. Over NCCL
    the objects travel through this rank's current CUDA device, which `init_from_env` sets."""
    world = current()
    if not world.parallel:
        return [obj]
    box: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(obj, box, dst=0)
    return box


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Every parameter and buffer of `module` (already on the training device) from rank 0."""
    if not current().parallel:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def broadcast_rng() -> None:
    """Rank 0's torch RNG state (CPU, and this rank's CUDA device) on every rank: the tree's perturbation
    draws must be the same everywhere."""
    if not current().parallel:
        return
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    state = broadcast_object(state)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_gather_counts(count: torch.Tensor) -> list[int]:
    """Each rank's value of a scalar integer tensor, in rank order (one small collective, one host sync)."""
    world = current()
    t = count.reshape(1).to(_comm_device(), torch.long)
    out = [torch.zeros_like(t) for _ in range(world.size)]
    dist.all_gather(out, t)
    return [int(v) for v in torch.cat(out).tolist()]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a tensor that lives on the training device."""
    if current().parallel:
        if tensor.device != _comm_device():
            moved = tensor.to(_comm_device())
            dist.all_reduce(moved)
            tensor.copy_(moved)
        else:
            dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sums the gradients over ranks in one flat buffer; a parameter without a gradient on this rank counts
    as zero, and keeps `grad = None` only if it has none on any rank (Adam skips it, as one process would)."""
    if not current().parallel or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1).to(grads[0].dtype) for g in grads] + [has])
    all_reduce_sum_(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    for p, h in zip(params, flat[offset:].tolist()):
        if h == 0:
            p.grad = None
