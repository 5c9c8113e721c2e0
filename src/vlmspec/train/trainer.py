"""`vlmspec train`: train a drafter on collected data.

AdamW with linear warmup (then cosine decay to 10% when the step count is known), gradient clipping, bf16 autocast
on CPU (optional), a progress bar with the loss and the per-depth draft accuracy, a JSONL log, and periodic atomic
checkpoints (`trainer_state.pt`: weights, optimizer, scheduler, torch RNG, step, data position). Rerunning the
same command on the same `--out` resumes from the last checkpoint and reaches the same weights as an uninterrupted
run. The output folder is itself a drafter checkpoint (`model.safetensors` + `config.json`, see `save_drafter`).
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
from vlmspec.train.data import BatchStream, CollectedData, Curriculum
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
        Curriculum.parse(self.curriculum)
        if self.tree:
            TreeConfig.parse(self.tree)

    def run_identity(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one (not the time budget)."""
        identity = dataclasses.asdict(self)
        identity.pop("minutes")
        identity.pop("checkpoint_every")
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
    `out/train_config.json` records the settings and `final_metrics` (means over the run's last steps)."""
    from tqdm.auto import tqdm

    out = Path(out)
    target.model.requires_grad_(False)
    if config.init is None:
        drafter = build_drafter(config.drafter_type, target, seed=config.seed, **config.drafter_options)
    else:
        drafter = start_from(config, target)
    if not drafter.trainable:
        raise ValueError(f"drafter type {config.drafter_type!r} has no trainable weights")
    drafter = drafter.float().train()
    loss_config = LossConfig.parse(config.loss, drafter.default_loss_config())
    data = CollectedData(data_folders, drafter.feature_layers(), target)
    if config.init is None:
        drafter.prepare_training(data)                 # a resumed run then restores what this chose
    stream = BatchStream(data, config.batch_size, config.seed, Curriculum.parse(config.curriculum))
    parameters = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup if config.warmup is not None else min(100, (config.steps or 1000) // 10)
    warmup = max(1, warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, config.steps))
    if config.bf16:
        warn_if_emulated_bf16("vlmspec train (--no-bf16 trains in fp32)")
    torch.manual_seed(config.seed)
    step = 0
    state_path = out / STATE_FILE
    if state_path.exists():
        step = load_state(state_path, config, drafter, optimizer, scheduler, stream)
    out.mkdir(parents=True, exist_ok=True)
    trim_log(out / "train_log.jsonl", step)
    started = time.monotonic()
    deadline = started + config.minutes * 60 if config.minutes else None
    bar = tqdm(total=config.steps, initial=step, desc=f"train {config.drafter_type}", disable=not progress)
    log = (out / "train_log.jsonl").open("a")
    recent: list[dict[str, float]] = []                     # this run's last steps, for the summary
    try:
        while (config.steps is None or step < config.steps) and (deadline is None or time.monotonic() < deadline):
            batch = data.batch(stream.next_batch(step))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss, metrics = drafter.training_loss(batch, loss_config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(parameters, config.clip))
            optimizer.step()
            scheduler.step()
            step += 1
            metrics["lr"] = scheduler.get_last_lr()[0]
            log.write(json.dumps({"step": step, "seconds": round(time.monotonic() - started, 2), **metrics}) + "\n")
            recent = (recent + [metrics])[-SUMMARY_STEPS:]
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k == "loss" or k.startswith("acc@")})
            if step % config.checkpoint_every == 0:
                save_state(state_path, config, step, drafter, optimizer, scheduler, stream)
            if on_step is not None:
                on_step(step, metrics)
    finally:
        log.close()
        bar.close()
    save_state(state_path, config, step, drafter, optimizer, scheduler, stream)
    drafter.eval()
    tree = TreeConfig.parse(config.tree) if config.tree else TreeConfig()
    save_drafter(drafter, out, tree=tree)
    (out / "train_config.json").write_text(json.dumps({**dataclasses.asdict(config), "step": step,
                                                       "loss_config": dataclasses.asdict(loss_config),
                                                       "data": [str(f) for f in data_folders],
                                                       "seconds": round(time.monotonic() - started, 1),
                                                       "final_metrics": summarize(recent)}, indent=2) + "\n")
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


def save_state(path: Path, config: TrainConfig, step: int, drafter: Drafter, optimizer, scheduler,
               stream: BatchStream) -> None:
    """Atomic checkpoint: write a temporary file, then rename it over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"identity": config.run_identity(), "step": step, "model": drafter.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "data": stream.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, config: TrainConfig, drafter: Drafter, optimizer, scheduler,
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
    drafter.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    stream.load_state_dict(state["data"])
    return int(state["step"])
