"""Fully sharded data parallel (FSDP2 `fully_shard`) for the large encoders, with checkpoints in the DDP layout.

Each transformer block of the encoder and of the decoder is one FSDP unit: its parameters are gathered just
before it runs and freed after, so a rank holds 1/world of the weights, gradients and AdamW moments plus one
block at a time. The root unit holds the rest (patch embedding, tokens, norms, decoder projections). With bf16
the blocks gather and compute in bf16 and reduce gradients in fp32; the root stays fp32, so the images, HOG
scores and reconstruction targets keep full precision (autocast still runs its matmuls in bf16).

A checkpoint written from a sharded run has exactly the layout a single-process or DDP run writes:
`full_state` gathers `model.state_dict()` and `optimizer.state_dict()` (integer parameter ids, in the order of
the optimiser's groups) onto rank 0's CPU, and `load_optimizer_state` takes that layout back into a sharded
optimiser. So `rspretrain export`, a DDP resume and an FSDP resume read any checkpoint alike.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from rspretrain.checkpoint import CheckpointError
from rspretrain.model import PretrainModel


def shard_model(model: PretrainModel, *, bf16: bool) -> PretrainModel:
    """Shard `model` in place over the default process group: one unit per block, the root for the rest."""
    # The root returns PretrainOutput, whose index tensors are views; they carry no gradient, so the hook
    # FSDP warns about is not needed on them.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    blocks = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    for block in [*model.encoder.blocks, *model.decoder.blocks]:
        fully_shard(block, mp_policy=blocks or MixedPrecisionPolicy())
    fully_shard(model)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Accumulation: skip the reduce-scatter on all but the last micro-batch (FSDP's answer to DDP's no_sync)."""
    model.set_requires_gradient_sync(sync)  # type: ignore[operator]


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor result (the gradient norm of sharded parameters) as the plain tensor every rank agrees on."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimiser state) in the unsharded layout, on rank 0's CPU; empty dicts on other ranks.

    A collective: every rank must call it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, _by_index(optim_state)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an unsharded `optimizer.state_dict()` (every rank passes the whole of it) into a sharded optimiser."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]  # id -> name
    if len(order) != sum(len(g["params"]) for g in state["param_groups"]):
        raise CheckpointError("the checkpoint's optimiser holds another number of parameters than this model")
    by_name: dict[str, Any] = {
        "state": {order[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=by_name, options=StateDictOptions(full_state_dict=True)
    )


def _by_index(state: dict[str, Any]) -> dict[str, Any]:
    """{"state": {name: ...}, "param_groups": [{"params": [name, ...]}]} -> integer ids, as Optimizer.state_dict()."""
    if not state:
        return {}
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        params = []
        for name in group["params"]:
            ids[name] = len(ids)
            params.append(ids[name])
        groups.append({**group, "params": params})
    return {"state": {ids[name]: value for name, value in state["state"].items()}, "param_groups": groups}
