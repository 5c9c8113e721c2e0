"""A drafter training on several processes: DDP (default) or FSDP, the global loss of a split batch, and one
checkpoint format for every process count.

Wrapping. DDP and FSDP both hook a module's `forward`, while a drafter trains through `training_loss`, so the
wrapped module is `LossStep`, whose forward is that loss. DDP keeps a whole drafter per process and averages the
gradients (`find_unused_parameters`: text-only batches leave image parts of some drafters unused; a parameter
unused on every rank keeps no gradient, as in one process). FSDP (`--fsdp`, torch's `fully_shard`) splits the
weights, gradients and optimizer state across the processes. The whole drafter is one unit, gathered for the
loss: drafters reach into their layers' submodules outside the layers' forward (e.g. the speculators layout of
`eagle3` norms its inputs with the decoder layer's own input norm), which per-layer units would leave sharded, and
a drafter is one or a few layers, so per-layer units would save little. Parameters unused
on some ranks (image parts, on a text-only slice) are reduced as zero gradients; one unused on every rank (e.g. in
a text-only curriculum stage) thus gets a zero gradient where one process has none, and AdamW's momentum moves it
on where one process would leave it for that step.

Global loss. Every term of a drafter's loss is a mean over its trained pairs; `train.losses.step_loss` weights
each by this rank's share of the term's pairs in the global batch (`distributed.global_share`), so the gradients
DDP/FSDP average are those of one process on the whole global batch, up to float rounding.

Checkpoints. The state written is the one-process format (`drafter.state_dict()`, the optimizer's state keyed by
parameter index), full tensors gathered to rank 0 under FSDP, so a checkpoint resumes on any number of processes,
with or without FSDP.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlmspec.train import distributed
from vlmspec.train.distributed import Rank

PREFIX = "drafter."


class LossStep(nn.Module):
    """The drafter's training loss as a module's forward (what DDP and FSDP wrap)."""

    def __init__(self, drafter: nn.Module, loss_config):
        super().__init__()
        self.drafter = drafter
        self.loss_config = loss_config

    def forward(self, batch):
        return self.drafter.training_loss(batch, self.loss_config)


def wrap(drafter: nn.Module, loss_config, rank: Rank, fsdp: bool) -> nn.Module:
    """`LossStep(drafter)`, under DDP or FSDP when there are several processes."""
    step = LossStep(drafter, loss_config)
    if not rank.active:
        if fsdp:
            warnings.warn("--fsdp has nothing to shard in one process: training the whole drafter here",
                          stacklevel=2)
        return step
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(step)
        # A rank whose slice is text-only leaves the image parts of msd/vispec/flash without gradients; FSDP must
        # still reduce-scatter them (as zeros) or the ranks' collectives no longer match and training stalls.
        if hasattr(step, "set_reduce_scatter_unused_params"):         # torch >= 2.13
            step.set_reduce_scatter_unused_params(True)
        else:
            warnings.warn("this torch's FSDP cannot reduce parameters unused on some ranks: an image-aware drafter "
                          "stalls when one rank's slice has no image; use DDP (no --fsdp) or a newer torch",
                          stacklevel=2)
        return step
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(step, device_ids=[rank.device.index] if rank.device.type == "cuda" else None,
                                   find_unused_parameters=True)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def global_metrics(metrics: dict[str, float], rank: Rank) -> dict[str, float]:
    """The metrics of the global batch: `loss` the mean over ranks (each rank's loss is already its share of the
    global mean, see the module docstring), `pairs` the sum, the others (accuracies) pair-weighted means."""
    if not rank.active:
        return metrics
    keys = sorted(key for key in metrics if key not in ("loss", "pairs"))
    pairs = float(metrics.get("pairs", 1.0))
    values = [pairs, metrics["loss"]] + [pairs * metrics[key] for key in keys]
    totals = torch.tensor(values, dtype=torch.float64, device=distributed.comm_device())
    dist.all_reduce(totals)
    total_pairs, loss_sum, *weighted = totals.tolist()
    merged = {key: value / total_pairs if total_pairs > 0 else 0.0 for key, value in zip(keys, weighted)}
    merged["loss"] = loss_sum / rank.world
    if "pairs" in metrics:
        merged["pairs"] = total_pairs
    return merged


# ---------------------------------------------------------------------------------------------- checkpoint state
def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trained parameters in the optimizer's order, as `LossStep` names them."""
    step = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return [name for name, parameter in step.named_parameters() if parameter.requires_grad]


def full_state(model: nn.Module, drafter: nn.Module, optimizer) -> tuple[dict, dict] | None:
    """(drafter state dict, optimizer state dict) in the one-process format, on rank 0 (None on the others under
    FSDP, which gathers the full tensors to rank 0 only). Every rank must call it."""
    if not is_fsdp(model):
        return drafter.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not weights:                                                   # not rank 0
        return None
    index = {name: i for i, name in enumerate(trainable_names(model))}
    return ({name.removeprefix(PREFIX): tensor for name, tensor in weights.items()},
            {"state": {index[name]: value for name, value in optimizer_state["state"].items()},
             "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                              for group in optimizer_state["param_groups"]]})


def load_full_state(model: nn.Module, drafter: nn.Module, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Load the one-process format (`full_state`) into a wrapped or plain drafter and its optimizer."""
    if not is_fsdp(model):
        drafter.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    names = trainable_names(model)
    set_model_state_dict(model, {PREFIX + name: tensor for name, tensor in weights.items()}, options=options)
    fqn_state: dict[str, Any] = {
        "state": {names[int(i)]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                         for group in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, fqn_state, options=options)
