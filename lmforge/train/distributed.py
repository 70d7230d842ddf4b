"""Data-parallel training (P6): one entry point for 1 process, DDP and FSDP under torchrun.

``torchrun --nproc_per_node=N -m lmforge pretrain ...`` starts N copies of the same
program; each reads RANK / WORLD_SIZE / LOCAL_RANK from the environment and joins a
process group (gloo on CPU, NCCL on CUDA). Every process takes a different slice of
each global batch (see data.py), then:

- DDP (distributed data parallel) keeps a full copy of the model, optimizer and
  gradients on every process and all-reduces (averages) the gradients after backward,
  so every copy takes the same step.
- FSDP (fully sharded data parallel, ZeRO-3 style) keeps only 1/N of every parameter,
  gradient and optimizer state on each process. Before a block runs, its parameters
  are all-gathered; after its backward, the gradients are reduce-scattered, so each
  process ends with the averaged gradient of its own shard and updates only that shard.
  Memory per process falls roughly by N, at the price of more communication.

Tensor parallelism (splitting each matrix across devices) and pipeline parallelism
(splitting the layers into stages fed with micro-batches) are explained in the
handbook; they pay off only with fast interconnects and models too large for FSDP
alone, and are not implemented here.

Whatever the mode, checkpoints hold full (unsharded) states gathered with
`torch.distributed.checkpoint.state_dict`, so they load in any mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Runtime:
    """Where this process stands: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(mode: str, device: str = "auto") -> Runtime:
    """Join the process group when started by torchrun; choose the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    from lmforge.model.loading import pick_device

    dev = pick_device(device)  # auto: cuda, mps or cpu; a bad name is a one-line error
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        if mode == "none":
            from lmforge.errors import LmforgeError

            raise LmforgeError("train.distributed is 'none' but the program runs on several processes")
        mode = "ddp" if mode == "auto" else mode
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    else:
        mode = "none"
    return Runtime(rank, world, local_rank, dev, mode)


class TrainingObjective(nn.Module):
    """The model and its loss as one module: ``objective(ids, labels) -> loss``.

    DDP and FSDP act when their wrapped module is *called*: DDP prepares its gradient
    buckets in forward, FSDP all-gathers a unit's parameters in a hook before its forward.
    The loss may use the model's parts directly (the fused head + cross-entropy reads
    ``lm_head.weight``), so the loss itself must run inside the wrapped call.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean"):
        from lmforge.train.loss import causal_lm_loss

        return causal_lm_loss(self.model, input_ids, labels, reduction=reduction)


PREFIX = "model."


def wrap_model(model: nn.Module, runtime: Runtime, objective: nn.Module | None = None) -> nn.Module:
    """The objective the loop calls: plain, inside a DDP wrapper, or sharded in place (FSDP).

    ``objective`` (default ``TrainingObjective(model)``) must hold ``model`` as its ``model``
    attribute, so checkpoint names stay ``model.*`` whatever the loss."""
    objective = TrainingObjective(model) if objective is None else objective
    if runtime.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(objective, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if runtime.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:  # one all-gather unit per block keeps peak memory to ~one block
            fully_shard(block)
        fully_shard(objective)  # the rest: embeddings, final norm, (tied) head
    return objective


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The objective inside a DDP wrapper (FSDP shards in place: nothing to unwrap)."""
    from torch.nn.parallel import DistributedDataParallel

    return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped


def full_model_state(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """Every model parameter, unsharded, on the CPU, by the model's own names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(unwrap(wrapped), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(PREFIX): v for k, v in state.items()}


def full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state, unsharded, keyed by the model's parameter names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(unwrap(wrapped), optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _renamed(osd, lambda name: name.removeprefix(PREFIX)) if osd else osd


def _renamed(osd: dict, rename) -> dict:
    """An optimizer state dict whose parameter names (state keys, groups' params) pass through ``rename``."""
    return {"state": {rename(k): v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [rename(p) for p in g["params"]]} for g in osd["param_groups"]]}


def load_full_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optimizer_state: dict | None) -> None:
    """Load full states (as saved) into the plain, DDP or FSDP objective and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    objective = unwrap(wrapped)
    set_model_state_dict(objective, {PREFIX + k: v for k, v in model_state.items()}, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(objective, optimizer, _renamed(optimizer_state, lambda name: PREFIX + name),
                                 options=options)


def mean_across(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The average of a scalar over all processes (the loss every process should report)."""
    return sum_across(value, runtime) / runtime.world_size if runtime.distributed else value


def sum_across(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The sum of a tensor over all processes (``value`` itself is left as it is)."""
    if runtime.distributed:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
