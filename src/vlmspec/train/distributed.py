"""The process group `vlmspec collect` and `vlmspec train` run in when a launcher starts several processes.

`torchrun --nproc-per-node N` and `accelerate launch` both start N copies of the command with the env:// variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `process_group()` turns them into a torch.distributed
group (nccl on CUDA, gloo on CPU); without them nothing changes: one process, no group, the CPU as before. Library
code asks `current()` where it stands and never starts a group itself, so `collect` / `train` called from Python
inside an initialized group (e.g. a notebook under accelerate) split their work the same way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    """Where this process stands: its rank among `world` processes and the device its work goes to."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 writes the shared files (metadata, checkpoints, logs) and shows the progress bars."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """Started by a launcher with more than one process (the env:// variables are set)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_device() -> torch.device:
    """This process's GPU (LOCAL_RANK) when a launcher started several processes on a CUDA machine, else the CPU
    (a single process keeps today's behaviour: the CPU)."""
    if launched() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(backend: str | None = None) -> Iterator[Rank]:
    """Join the launcher's process group for the duration of a command (a no-op for one process). `backend`
    None: nccl on CUDA, gloo on the CPU; collection, which only exchanges a few small objects, asks for gloo."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    device = launch_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)        # nccl's collectives run on the current device
    dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def current() -> Rank:
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return Rank()
    return Rank(dist.get_rank(), dist.get_world_size(), launch_device())


def comm_device() -> torch.device:
    """Where tensors handed to collectives live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def target_placement(device_map: str | None) -> dict[str, Any]:
    """`Target.from_pretrained` options for `--device-map` (e.g. "auto": HF spreads the layers over the GPUs).
    With several processes on a node, each gets its own block of LOCAL_WORLD_SIZE-th of the GPUs (through
    `max_memory`, which names the devices HF may use), so two ranks never share a GPU."""
    if device_map is None:
        return {}
    if not launched() or not torch.cuda.is_available():
        return {"device_map": device_map}
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    per_process = torch.cuda.device_count() // processes
    if per_process < 1:
        raise ValueError(f"--device-map with {processes} processes on this node needs at least {processes} GPUs; "
                         f"it has {torch.cuda.device_count()}")
    first = int(os.environ.get("LOCAL_RANK", "0")) * per_process
    return {"device_map": device_map,
            "max_memory": {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in range(first, first + per_process)}}


def global_share(count: int) -> float:
    """count · world / (sum of every rank's count); 1 in one process. A process's mean over its `count` items,
    weighted by this, averages over the processes (as DDP and FSDP average gradients) to the mean over all items."""
    rank = current()
    if not rank.active:
        return 1.0
    total = torch.tensor([float(count)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(total)
    return count * rank.world / total.item() if total.item() > 0 else 1.0


def barrier() -> None:
    if current().active:
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` run once, on rank 0, its result (or its boundary error, as a ValueError) handed to every rank: for work
    that writes shared files (generated suites, the collection's metadata) and checks that must fail everywhere
    alike, with no rank left waiting."""
    rank = current()
    if not rank.active:
        return fn()
    box: list[Any] = [None]
    if rank.main:
        try:
            box[0] = ("ok", fn())
        except (ValueError, OSError) as error:
            box[0] = ("error", str(error))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ValueError(value)
    return value


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank (small picklable objects: RNG states)."""
    rank = current()
    if not rank.active:
        return [value]
    out: list[Any] = [None] * rank.world
    dist.all_gather_object(out, value)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: ranks must agree to stop (e.g. at a time budget)."""
    rank = current()
    if not rank.active:
        return flag
    tensor = torch.tensor([float(flag)], device=comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())
