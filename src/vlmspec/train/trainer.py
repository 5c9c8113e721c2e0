"""`vlmspec train`: train a drafter on collected data.

AdamW with linear warmup (then cosine decay to 10% when the step count is known), gradient clipping, bf16 autocast
on CPU (optional), a progress bar with the loss and the per-depth draft accuracy, a JSONL log, and periodic atomic
checkpoints (`trainer_state.pt`: weights, optimizer, scheduler, torch RNG, step, data position). Rerunning the
same command on the same `--out` resumes from the last checkpoint and reaches the same weights as an uninterrupted
run. The output folder is itself a drafter checkpoint (`model.safetensors` + `config.json`, see `save_drafter`).

Several processes (`torchrun --nproc-per-node N`, see `train/distributed.py` and `train/parallel.py`): every rank
draws the same global batch of `batch_size` samples from the same `BatchStream` and trains on its slice of
`batch_size / N` samples, under DDP (default) or FSDP; the loss is the global batch's. Rank 0 alone logs, shows the
progress bar and writes checkpoints, in the one-process format. Guarantee on resume: the data order (which samples
form the global batch of each step) depends only on the seed and the step, never on N, and a checkpoint holds every
rank's RNG state; so resuming on the same N reaches the same weights as an uninterrupted run, and resuming on
another N trains on the same batches and reaches them up to float rounding (sums split differently), except that
the random loss options (`feature_noise`, `sampled_token`) draw their noise per rank, so their draws differ.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from vlmspec.drafters.base import Drafter, build_drafter, load_drafter, save_drafter
from vlmspec.hardware import warn_if_emulated_bf16
from vlmspec.target import Target
from vlmspec.train import distributed, parallel
from vlmspec.train.data import BatchStream, CollectedData, Curriculum, hash_seed
from vlmspec.train.losses import LossConfig
from vlmspec.tree import TreeConfig

STATE_FILE = "trainer_state.pt"
SUMMARY_STEPS = 50


@dataclass
class TrainConfig:
    drafter_type: str
    steps: int | None = None                 # total optimizer steps (None: until `minutes`)
    minutes: float | None = None             # wall-clock budget of this run
    seed: int = 0
    lr: float = 3e-4
    batch_size: int = 4
    warmup: int | None = None                # None: min(100, steps // 10)
    weight_decay: float = 0.0
    clip: float = 1.0
    bf16: bool = True                        # bf16 autocast on CPU (fp32 weights and optimizer)
    checkpoint_every: int = 100
    loss: str = ""                           # `key=value,…` over the drafter's default LossConfig
    curriculum: str = ""                     # `text-first:STEPS,ramp:STEPS`
    drafter_options: dict[str, Any] = field(default_factory=dict)
    tree: str | None = None                  # recommended tree written with the checkpoint
    init: str | None = None                  # start from this trained drafter (a folder or testbed:<type>)
    fsdp: bool = False                       # several processes: shard the drafter (FSDP) instead of DDP
    stop_at: int | None = None               # end this run after that step (the schedule still counts `steps`)

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("give --steps or --minutes")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        for name in ("lr", "clip"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("--batch-size and --checkpoint-every must be >= 1")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"--stop-at must be >= 1, got {self.stop_at}")
        Curriculum.parse(self.curriculum)
        if self.tree:
            TreeConfig.parse(self.tree)

    def run_identity(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one (not the time budget, nor how it is spread)."""
        identity = dataclasses.asdict(self)
        for name in ("minutes", "checkpoint_every", "fsdp", "stop_at"):
            identity.pop(name)
        return identity


def lr_factor(step: int, warmup: int, total: int | None) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if total is None or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def start_from(config: TrainConfig, target: Target) -> Drafter:
    """The trained drafter `config.init` (its own options), checked to be of `config.drafter_type`: continued
    training, e.g. after the target was fine-tuned, starts from it instead of a random initialization."""
    if config.drafter_options:
        raise ValueError("--drafter-option cannot be combined with --init: the drafter's options come from --init")
    with warnings.catch_warnings():  # a target changed since the drafter was trained is why one continues
        warnings.filterwarnings("ignore", message=".*fingerprint mismatch")
        drafter = load_drafter(config.init, target)
    if drafter.drafter_type != config.drafter_type:
        raise ValueError(f"--init {config.init}: drafter type {drafter.drafter_type}, not {config.drafter_type}")
    return drafter


def train(target: Target, data_folders: Sequence[str | Path], out: str | Path, config: TrainConfig,
          progress: bool = True, on_step: Callable[[int, dict[str, float]], None] | None = None) -> Drafter:
    """Train (or resume training) a `config.drafter_type` drafter; write checkpoints and the final drafter to
    `out`. `on_step(step, metrics)` is called after each optimizer step (step counts from 1). Returns the drafter;
    `out/train_config.json` records the settings and `final_metrics` (means over the run's last steps).
    Inside a process group every rank calls this (see the module docstring); under FSDP, ranks other than 0 get
    back their shard of the drafter."""
    from tqdm.auto import tqdm

    out = Path(out)
    rank = distributed.current()
    if config.batch_size % rank.world:
        raise ValueError(f"--batch-size {config.batch_size} (the global batch) is not divisible by the "
                         f"{rank.world} processes")
    share = config.batch_size // rank.world                      # this rank's samples of each global batch
    target.model.requires_grad_(False)
    drafter = new_drafter(config, target)
    drafter = drafter.float().to(target.device).train()
    loss_config = LossConfig.parse(config.loss, drafter.default_loss_config())
    data = CollectedData(data_folders, drafter.feature_layers(), target)
    if config.init is None:
        drafter.prepare_training(data)                 # a resumed run then restores what this chose
    stream = BatchStream(data, config.batch_size, config.seed, Curriculum.parse(config.curriculum))
    model = parallel.wrap(drafter, loss_config, rank, config.fsdp)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup if config.warmup is not None else min(100, (config.steps or 1000) // 10)
    warmup = max(1, warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, config.steps))
    if config.bf16 and target.device.type == "cpu" and rank.main:
        warn_if_emulated_bf16("vlmspec train (--no-bf16 trains in fp32)")
    torch.manual_seed(config.seed + rank.rank)                  # rank 0 draws as one process does
    step = 0
    state_path = out / STATE_FILE
    if state_path.exists():
        step = load_state(state_path, config, model, drafter, optimizer, scheduler, stream)
    if rank.main:
        out.mkdir(parents=True, exist_ok=True)
        trim_log(out / "train_log.jsonl", step)
    started = time.monotonic()
    deadline = started + config.minutes * 60 if config.minutes else None
    limits = [limit for limit in (config.steps, config.stop_at) if limit is not None]
    last = min(limits) if limits else None                   # the step this run ends after (None: the clock)
    bar = tqdm(total=config.steps, initial=step, desc=f"train {config.drafter_type}",
               disable=not (progress and rank.main))
    log = (out / "train_log.jsonl").open("a") if rank.main else None
    recent: list[dict[str, float]] = []                     # this run's last steps, for the summary
    try:
        while (last is None or step < last) and not (deadline and distributed.any_rank(time.monotonic() >= deadline)):
            indices = stream.next_batch(step)                # the global batch: the same on every rank
            batch = data.batch(indices[rank.rank * share : (rank.rank + 1) * share], device=target.device)
            with torch.autocast(target.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                loss, metrics = model(batch)                 # this rank's share of the global batch's loss
            metrics = parallel.global_metrics(metrics, rank)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(parameters, config.clip))
            optimizer.step()
            scheduler.step()
            step += 1
            metrics["lr"] = scheduler.get_last_lr()[0]
            if log is not None:
                log.write(json.dumps({"step": step, "seconds": round(time.monotonic() - started, 2), **metrics}) + "\n")
            recent = (recent + [metrics])[-SUMMARY_STEPS:]
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k == "loss" or k.startswith("acc@")})
            if step % config.checkpoint_every == 0:
                save_state(state_path, config, step, model, drafter, optimizer, scheduler, stream)
            if on_step is not None:
                on_step(step, metrics)
    finally:
        if log is not None:
            log.close()
        bar.close()
    weights = save_state(state_path, config, step, model, drafter, optimizer, scheduler, stream)
    if parallel.is_fsdp(model) and weights is not None:     # rank 0: a whole drafter to save and return
        drafter = new_drafter(config, target)
        drafter.load_state_dict(weights)
    drafter.eval()
    if rank.main:
        tree = TreeConfig.parse(config.tree) if config.tree else TreeConfig()
        save_drafter(drafter, out, tree=tree)
        (out / "train_config.json").write_text(json.dumps({**dataclasses.asdict(config), "step": step,
                                                           "processes": rank.world,
                                                           "loss_config": dataclasses.asdict(loss_config),
                                                           "data": [str(f) for f in data_folders],
                                                           "seconds": round(time.monotonic() - started, 1),
                                                           "final_metrics": summarize(recent)}, indent=2) + "\n")
    distributed.barrier()                                    # the drafter is on disk when any rank returns
    return drafter


def new_drafter(config: TrainConfig, target: Target) -> Drafter:
    """A random `config.drafter_type` drafter (seeded), or the trained one `config.init`."""
    if config.init is None:
        drafter = build_drafter(config.drafter_type, target, seed=config.seed, **config.drafter_options)
    else:
        drafter = start_from(config, target)
    if not drafter.trainable:
        raise ValueError(f"drafter type {config.drafter_type!r} has no trainable weights")
    return drafter


def summarize(recent: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the last steps (`SUMMARY_STEPS`) of a run."""
    keys = sorted({key for metrics in recent for key in metrics})
    return {key: sum(m[key] for m in recent if key in m) / sum(key in m for m in recent) for key in keys}


def trim_log(path: Path, step: int) -> None:
    """Drop log lines after `step` (a resumed run rewrites the steps after its checkpoint)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def save_state(path: Path, config: TrainConfig, step: int, model, drafter: Drafter, optimizer, scheduler,
               stream: BatchStream) -> dict | None:
    """Atomic checkpoint by rank 0: write a temporary file, then rename it over the old one. Every rank calls it
    (FSDP gathers the weights, every rank hands in its RNG state). Returns the drafter's weights on rank 0."""
    rank = distributed.current()
    full = parallel.full_state(model, drafter, optimizer)
    rng = distributed.gather(rng_state(drafter))
    if not rank.main or full is None:
        return None
    weights, optimizer_state = full
    state = {"identity": config.run_identity(), "step": step, "model": weights, "optimizer": optimizer_state,
             "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "data": stream.state_dict()}
    if rank.active:
        state["rank_rng"] = rng
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return weights


def rng_state(drafter: Drafter) -> dict[str, torch.Tensor]:
    """This process's generators: the CPU's, and its GPU's when it trains on one."""
    device = next(drafter.parameters()).device
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def load_state(path: Path, config: TrainConfig, model, drafter: Drafter, optimizer, scheduler,
               stream: BatchStream) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001  (a corrupt file of any kind is a clear boundary error)
        raise ValueError(f"cannot read the training checkpoint {path}: {error}") from None
    identity = config.run_identity()
    if state.get("identity") != identity:
        previous = state.get("identity") or {}
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        raise ValueError(f"{path.parent} holds a training run with other settings ({', '.join(changed)}); "
                         "use a new --out folder to start a new run")
    parallel.load_full_state(model, drafter, optimizer, state["model"], state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    restore_rng(state, drafter, config.seed, int(state["step"]))
    return int(state["step"])


def restore_rng(state: dict, drafter: Drafter, seed: int, step: int) -> None:
    """This rank's generators from the checkpoint: its own where the run that wrote it had this rank, rank 0's
    from a one-process run; a rank the writing run lacked starts from a seed fixed by (seed, rank, step)."""
    rank = distributed.current().rank
    saved = state.get("rank_rng") or [{"cpu": state["torch_rng"]}]
    if rank >= len(saved):
        torch.manual_seed(hash_seed(seed, "rank", rank, step))
        return
    torch.set_rng_state(saved[rank]["cpu"])
    device = next(drafter.parameters()).device
    if device.type == "cuda" and "cuda" in saved[rank]:
        torch.cuda.set_rng_state(saved[rank]["cuda"], device)
