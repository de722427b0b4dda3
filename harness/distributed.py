"""Processes and parallelism: torchrun or Slurm environments, DDP or FSDP2, applied from outside the model.

The variant knows nothing of distribution; its `forward` is its loss, the method DDP's and FSDP2's hooks wrap.
`parallelize` optionally checkpoints activations and compiles each block, then applies DDP or FSDP2
(`fully_shard` per block, then the root). The blocks are the variant's own `blocks()` (aligner, backbone and
diffusion-head blocks), else the elements of every outermost `nn.ModuleList`.

State dicts are always full and keyed by the variant's own parameter names, whatever the strategy, so a
checkpoint written by 8 FSDP2 ranks loads into a single-process model (and back).
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from harness.config import DistConfig
from harness.errors import FluidbenchError


@dataclass
class DistInfo:
    """This process's place in the job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def environment() -> dict[str, Any]:
    """rank, world_size, local_rank, master_addr, master_port from torchrun's or Slurm's (srun) variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or anything that sets the env:// variables
        return dict(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                    local_rank=int(env.get("LOCAL_RANK", 0)),
                    master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)))
    # srun sets SLURM_STEP_NUM_TASKS for the step it launched; an sbatch script alone (one process) does not
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if "SLURM_PROCID" in env and tasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        return dict(rank=int(env["SLURM_PROCID"]), world_size=tasks, local_rank=int(env.get("SLURM_LOCALID", 0)),
                    master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
                    # one port per job, so two jobs sharing a node do not collide
                    master_port=int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
    return dict(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[003-005,007],cpu1" -> "gpu003")."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^\[,]+)(?:\[([^\],-]+))?", nodelist)
    return (m.group(1) + (m.group(2) or "")) if m else nodelist


def init_distributed() -> DistInfo:
    """Join the process group (gloo on CPU, nccl on CUDA) when launched with several processes."""
    env = environment()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env["local_rank"]) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if env["world_size"] > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env["master_addr"])
        os.environ.setdefault("MASTER_PORT", str(env["master_port"]))
        dist.init_process_group("nccl" if cuda else "gloo", rank=env["rank"], world_size=env["world_size"],
                                device_id=device if cuda else None)
    return DistInfo(env["rank"], env["world_size"], env["local_rank"], device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(global_batch: int, info: DistInfo, field: str = "train.batch_size") -> int:
    """The global batch stays fixed: each of the world_size processes takes global / world_size."""
    if global_batch % info.world_size:
        raise FluidbenchError(f"config {field}={global_batch} is not divisible by the world size "
                              f"{info.world_size}")
    return global_batch // info.world_size


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the model's own list (`model.blocks()`, each doing all its work inside `forward`),
    else the elements of every outermost ModuleList that hold parameters."""
    if callable(getattr(model, "blocks", None)):
        return list(model.blocks())
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(m for m in child if any(True for _ in m.parameters()))
            else:
                visit(child)

    visit(model)
    return found


def parallelize(variant: nn.Module, cfg: DistConfig, info: DistInfo) -> nn.Module:
    """The training module: the variant with activation checkpointing and compile per block (in place, so
    parameter names do not change), then DDP, or FSDP2 `fully_shard` per block and then the root."""
    units = blocks(variant)
    for block in units:
        if cfg.activation_checkpointing:
            from torch.distributed._composable import checkpoint
            checkpoint(block)
        if cfg.compile:
            block.compile()
    if info.world_size == 1:
        return variant
    if cfg.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for block in units:
            fully_shard(block)
        fully_shard(variant)
        return variant
    from torch.nn.parallel import DistributedDataParallel
    # find_unused_parameters: a step may leave a parameter out of the graph (the variant decides what it uses)
    return DistributedDataParallel(variant, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                   find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The variant inside a training module."""
    return getattr(model, "module", model)


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on the CPU, keyed like the bare variant (complete on rank 0; a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    # for a model already on the CPU (and not sharded) these are the live tensors themselves: copy them, so
    # that a later update (or swapping the EMA weights back out) does not change what was taken
    live = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return {k: v.detach().clone() if v.data_ptr() in live else v for k, v in state.items()}


def load_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (as model_state_dict gives) into a training module of any strategy."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_options())


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name, on the CPU (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options())


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a tensor over processes, in place; a no-op in one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
