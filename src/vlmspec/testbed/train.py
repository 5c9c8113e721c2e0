"""Train the testbed VLM from scratch on CPU: deterministic for a seed and step count, resumable.

Recipe (see docs/testbed.md): plain next-token loss on answers, plus two training-only terms that keep the
model from going image-blind; neither is saved, the result is a standard `LlavaForConditionalGeneration`:

- an image-scale penalty, (log rms(projected image tokens) - log rms(text embeddings))^2, so image tokens stay
  on the scale of text tokens instead of drowning them;
- a throwaway per-patch classifier on the projector output, trained on the generator's patch labels
  (`render.AUX_TASKS`: what each patch shows, each object's centre, and the facts the questions ask about the
  object a patch belongs to: its cell, its count, its word, its bar value), standing in for vision pretraining.

Optionally (`attend_weight` > 0) a third: where a question names the objects it is about (`data.question_focus`),
one position of the question turn is taught, in a few heads of one decoder layer, to attend to those objects'
image tokens: -log of the attention mass on them. `attend_at` picks the position: "name", the last token of the
last word naming them, or "answer", the position that predicts the answer's first token. The lookup "which
patches does the question mean" is what the language model otherwise has to discover on its own.

And optionally (`deep_aux_weight` > 0) a second throwaway patch classifier on the language model's own residual
stream at the image tokens, at the input of decoder layer `deep_aux_layer`, trained on the same labels: the
facts must still be on the image tokens where the lookup happens (from scratch, the first decoder layer can write
over them; docs/testbed.md "Measured").

Batches are right-padded with no attention mask (causal attention never lets a real token see the padding
after it) and grouped by length within pools of `POOL` batches.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.models.llama.modeling_llama import rotate_half

from vlmspec.hardware import warn_if_emulated_bf16
from vlmspec.testbed import SHIPPED_DIR, render
from vlmspec.testbed.data import EVAL_SEED_START, Sample, question_focus, training_sample
from vlmspec.testbed.model import IMAGE_TOKEN, ArchConfig, build_model, build_processor, corpus, train_tokenizer

CHECKPOINT = "checkpoint.pt"
POOL = 16  # batches per length-grouping pool
VISION_STREAM_OFFSET = 100_000_000  # vision pretraining reads the training stream from this index on
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 150
    weight_decay: float = 0.01
    aux_weight: float = 0.5
    scale_weight: float = 1.0
    checkpoint_every: int = 100
    threads: int = 2
    mix: str = "short"  # data.MIXES key
    per_answer_loss: bool = True  # mean per sequence then over sequences; False: mean over all answer tokens
    followups: int = 0  # extra question turns per one-image sample (data.training_sample)
    count_followups: str = "all"  # which count questions those turns may ask (data.image_questions)
    vision_steps: int = 0  # vision pretraining steps (vision tower, projector, aux head on labelled images) first
    vision_batch_size: int = 64  # training samples per vision step (their images)
    vision_lr: float = 2e-3
    shuffle_image_tokens: float = 0.0  # main phase: chance that an image's tokens reach the LM in a random order
    mirror_image_tokens: float = 0.0  # main phase: chance, per axis, that an image's token grid is fed reversed
    attend_weight: float = 0.0  # weight of the attention-focus loss (0: off)
    attend_layer: int = 4  # decoder layer whose first `attend_heads` heads it supervises
    attend_heads: int = 1
    attend_at: str = "name"  # the supervised query: "name" (the naming word's last token) or "answer" (see above)
    deep_aux_weight: float = 0.0  # weight of the patch loss on the LM's image-token states (0: off)
    deep_aux_layer: int = 8  # ... at the input of this decoder layer
    bf16: bool = True  # bf16 autocast (fp32 weights and optimizer); False: fp32, for devices that emulate bf16


# TrainConfig fields a resumed run must keep: they decide which samples the steps read.
RESUME_FIXED = ("batch_size", "mix", "followups", "count_followups", "vision_batch_size")


def pixels(image) -> np.ndarray:
    """Raw RGB bytes [H, W, 3] uint8 of an IMAGE_SIZE-square image; `normalize` finishes the job."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def normalize(raw: torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float32, what CLIPImageProcessor gives for IMAGE_SIZE-square images."""
    x = raw.float() / 255.0
    x = (x - torch.from_numpy(CLIP_MEAN).to(x.device)) / torch.from_numpy(CLIP_STD).to(x.device)
    return x.permute(0, 3, 1, 2).contiguous()


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 outside the answer
    pixels: list[np.ndarray]  # [H, W, 3] uint8 per image, in order of appearance
    aux: dict[str, list[np.ndarray]]  # AUX_TASKS name -> [GRID * GRID] labels per image (-100: not applicable)
    # per question about named objects of a one-image sample: (position predicting the answer's first token,
    # position of the last token naming them, position of the first image token, [GRID * GRID] bool: the patches
    # of those objects)
    focus: list[tuple[int, int, int, np.ndarray]]


def encode(sample: Sample, tokenizer, n_image_tokens: int) -> Encoded:
    """Each turn's prompt through the chat template (images expanded), then " answer" + eos as the supervised
    part; follow-up turns continue the conversation with the template's own text between answers."""
    messages, rendered = sample.messages(), ""
    input_ids, labels, focus = [], [], []
    kinds = sample.images[0].label_grid("kind").reshape(-1) if len(sample.images) == 1 else None
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for question, answer in [(sample.question, sample.answer), *sample.followups]:
        if rendered:
            messages = [*messages, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if not text.startswith(rendered):
            raise ValueError("the chat template does not extend a conversation by appending to it")
        piece = text[len(rendered):].replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens)
        encoded = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        prompt_ids = encoded["input_ids"]
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        classes, end = question_focus(question)
        patches = np.isin(kinds, list(classes)) if kinds is not None else None
        if patches is not None and patches.any():
            last_char = piece.rindex(question) + end - 1
            name = next(i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a <= last_char < b)
            focus.append((len(input_ids) + len(prompt_ids) - 1, len(input_ids) + name,
                          (input_ids + prompt_ids).index(image_id), patches))
        input_ids += prompt_ids + answer_ids
        labels += [-100] * len(prompt_ids) + answer_ids
        messages = [*messages, {"role": "assistant", "content": answer}]
        rendered = text + " " + answer + tokenizer.eos_token
    aux = {task: [r.label_grid(task).reshape(-1) for r in sample.images] for task in render.AUX_TASKS}
    return Encoded(input_ids, labels, [pixels(r.image) for r in sample.images], aux, focus)


_WORKER: dict = {}


def _init_worker(seed: int, tokenizer, n_image: int, stream: dict) -> None:
    _WORKER.update(seed=seed, tokenizer=tokenizer, n_image=n_image, stream=stream)


def _encode_index(index: int) -> Encoded:
    sample = training_sample(_WORKER["seed"], index, **_WORKER["stream"])
    return encode(sample, _WORKER["tokenizer"], _WORKER["n_image"])


class Batches:
    """Builds length-grouped batches for any step from the deterministic training stream.

    The batch at step t comes from pool t // POOL (POOL * batch_size consecutive stream samples, sorted by
    length and cut into batches), slot t % POOL of a seeded shuffle of the pool's batches. `stream` holds
    `data.training_sample`'s options (mix, followups, count_followups).
    """

    def __init__(self, seed: int, batch_size: int, tokenizer, n_image_tokens: int, workers: int = 0, **stream):
        self.seed, self.batch_size, self.tokenizer, self.n_image = seed, batch_size, tokenizer, n_image_tokens
        self.stream = {"mix": "short", **stream}
        self._pool_id, self._pool = None, None
        self._procs, self._next = None, None
        if workers > 0:
            import multiprocessing as mp

            self._procs = mp.get_context("fork").Pool(workers, _init_worker,
                                                       (seed, tokenizer, n_image_tokens, self.stream))

    def _indices(self, pool: int) -> range:
        start = pool * POOL * self.batch_size
        return range(start, start + POOL * self.batch_size)

    def _load_pool(self, pool: int) -> list[Encoded]:
        if self._procs is not None:
            pending = self._next if self._next is not None and self._next[0] == pool else None
            items = pending[1].get() if pending else self._procs.map(_encode_index, self._indices(pool), chunksize=8)
            self._next = (pool + 1, self._procs.map_async(_encode_index, self._indices(pool + 1), chunksize=8))
        else:
            items = [encode(training_sample(self.seed, i, **self.stream), self.tokenizer, self.n_image)
                     for i in self._indices(pool)]
        return sorted(items, key=lambda e: len(e.input_ids))  # stable: ties keep stream order

    def get(self, step: int) -> dict:
        pool, slot = divmod(step, POOL)
        if pool != self._pool_id:
            self._pool_id, self._pool = pool, self._load_pool(pool)
        order = list(range(POOL))
        random.Random(f"pool:{self.seed}:{pool}").shuffle(order)
        b = order[slot]
        return collate(self._pool[b * self.batch_size:(b + 1) * self.batch_size], self.tokenizer.pad_token_id)

    def close(self) -> None:
        if self._procs is not None:
            self._procs.close()
            self._procs = None


def collate(items: list[Encoded], pad_id: int) -> dict:
    length = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    for i, e in enumerate(items):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    out = {"input_ids": ids, "labels": labels, "pixel_values": None, "aux": None, "focus": None}
    firsts = np.cumsum([0] + [len(e.pixels) for e in items])  # index of each item's first image in the batch
    entries = [(i, *entry[:3], firsts[i], entry[3]) for i, e in enumerate(items) for entry in e.focus]
    if entries:
        row, answer, name, start, image, patches = zip(*entries)
        out["focus"] = {"row": torch.tensor(row), "answer": torch.tensor(answer), "name": torch.tensor(name),
                        "start": torch.tensor(start), "image": torch.tensor(np.array(image)),
                        "patches": torch.from_numpy(np.stack(patches))}
    if any(e.pixels for e in items):
        out["pixel_values"] = torch.from_numpy(np.stack([p for e in items for p in e.pixels]))  # uint8 [N, H, W, 3]
        out["aux"] = {task: torch.from_numpy(np.stack([p for e in items for p in e.aux[task]]))
                      for task in render.AUX_TASKS}  # [N, GRID * GRID] each
    return out


def to_device(batch: dict, device: str) -> dict:
    """Move a collated batch to `device` and normalize its raw uint8 pixels there."""
    nested = {k: batch[k] for k in ("aux", "focus")}
    batch = {k: v.to(device) if v is not None else None for k, v in batch.items() if k not in nested}
    batch.update({k: {n: t.to(device) for n, t in v.items()} if v is not None else None for k, v in nested.items()})
    if batch["pixel_values"] is not None:
        batch["pixel_values"] = normalize(batch["pixel_values"])
    return batch


def losses(model, aux_head, batch: dict, per_answer: bool = True, orders: torch.Tensor | None = None,
           attend: tuple[int, int, str] | None = None,
           deep: tuple[torch.nn.Module, int] | None = None) -> dict[str, torch.Tensor]:
    """Answer cross-entropy, per-patch auxiliary cross-entropy and the image-scale penalty. `orders`
    [n_images, 64], if given, is the order in which each image's tokens reach the language model. `attend`
    (layer, heads, "name" or "answer") adds the attention-focus loss of those heads at those positions when the
    batch has focus entries. `deep` (head, layer) adds that patch classifier's loss on the image tokens' states at
    the input of that decoder layer."""
    captured = {}

    def capture_attention_input(module, args, kwargs):
        captured["attention"] = (module, kwargs["hidden_states"], kwargs["position_embeddings"])

    def capture(module, inputs, output):
        captured["feats"] = output
        if orders is not None:
            return torch.gather(output, 1, orders.to(output.device)[..., None].expand_as(output))
        return None

    hooks = [model.model.multi_modal_projector.register_forward_hook(capture)]
    focus = batch.get("focus") if attend is not None else None
    if focus is not None:
        attention = model.model.language_model.layers[attend[0]].self_attn
        hooks.append(attention.register_forward_pre_hook(capture_attention_input, with_kwargs=True))
    try:
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], use_cache=False,
                    output_hidden_states=deep is not None)
    finally:
        for hook in hooks:
            hook.remove()
    logits = out.logits[:, :-1].float()  # [B, T-1, V]
    targets = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                 reduction="none").view(targets.shape)  # [B, T-1]
    mask = (targets != -100).float()
    # mean per answer, then over answers: a one-word answer weighs as much as a long description
    if per_answer:
        lm = ((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    else:
        lm = (token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    result = {"lm": lm}
    if batch["pixel_values"] is not None:
        result.update(image_losses(model, aux_head, captured["feats"], batch["aux"]))
        if deep is not None:
            states = out.hidden_states[deep[1]][batch["input_ids"] == model.config.image_token_id]
            labels = batch["aux"]
            if orders is not None:  # the token at image slot j shows patch orders[j]
                labels = {k: torch.gather(v, 1, orders.to(v.device)) for k, v in labels.items()}
            result["deep"] = patch_loss(deep[0], states.view(*labels["kind"].shape, -1), labels)
    if focus is not None:
        result["attend"] = attention_focus_loss(*captured["attention"], focus, attend[1], attend[2], orders)
    return result


def attention_focus_loss(attention, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                         focus: dict[str, torch.Tensor], heads: int, at: str = "name",
                         orders: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over focus entries and the first `heads` heads of -log(attention mass on the focus patches) at the
    `at` ("name" or "answer") query positions, for the attention module `attention` given its input `hidden`
    [B, T, D] and rotary (cos, sin): the same attention weights the model computes, recomputed for the supervised
    query positions only."""
    rows, query = focus["row"], focus[at]
    (batch, length, _), dim, device = hidden.shape, attention.head_dim, hidden.device
    cos, sin = (t.expand(batch, -1, -1).float() for t in position_embeddings)  # [B, T, dim]
    k = attention.k_proj(hidden).float().view(batch, length, -1, dim)  # once per sequence, not per question
    k = (k * cos[:, :, None] + rotate_half(k) * sin[:, :, None])[rows]  # [M, T, kv heads, dim]
    k = k.repeat_interleave(attention.num_key_value_groups, dim=2)[:, :, :heads]  # [M, T, heads, dim]
    q = attention.q_proj(hidden[rows, query]).float().view(len(rows), -1, dim)[:, :heads]  # [M, heads, dim]
    q = q * cos[rows, query, None] + rotate_half(q) * sin[rows, query, None]
    logits = torch.einsum("mhd,mthd->mht", q, k) * attention.scaling  # [M, heads, T]
    patches = focus["patches"]
    if orders is not None:  # the token at image slot j shows patch orders[j]
        patches = torch.gather(patches, 1, orders.to(patches.device)[focus["image"]])
    slots = focus["start"][:, None] + torch.arange(patches.shape[1], device=device)
    target = torch.zeros(len(rows), length, dtype=torch.bool, device=device).scatter(1, slots, patches)
    allowed = torch.arange(length, device=device) <= query[:, None]  # causal
    on_target = logits.masked_fill(~target[:, None], float("-inf")).logsumexp(-1)
    return (logits.masked_fill(~allowed[:, None], float("-inf")).logsumexp(-1) - on_target).mean()


def image_token_orders(n_images: int, side: int, seed: int, step: int, shuffle: float = 0.0,
                       mirror: float = 0.0) -> torch.Tensor | None:
    """Per image, the order its side x side tokens are fed in; a pure function of (seed, step), None when both
    chances are 0. With probability `shuffle` a random permutation, else the raster order; then, with
    probability `mirror` per axis, the grid's rows and/or each row's tokens reversed. Either way the place of
    an image token in the sequence no longer says where its patch is, so the language model must read positions
    from the token's content (the per-patch facts); mirroring keeps neighbouring patches neighbours."""
    if (shuffle <= 0 and mirror <= 0) or n_images == 0:
        return None
    n_tokens = side * side
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    shuffled = torch.rand(n_images, generator=gen) < shuffle
    orders = torch.stack([torch.randperm(n_tokens, generator=gen) if s else torch.arange(n_tokens) for s in shuffled])
    if mirror > 0:
        flips = torch.rand(n_images, 2, generator=gen) < mirror  # [image, (rows, columns)]
        grids = orders.view(n_images, side, side)
        grids = torch.where(flips[:, 0, None, None], grids.flip(1), grids)
        orders = torch.where(flips[:, 1, None, None], grids.flip(2), grids).reshape(n_images, n_tokens)
    return orders


def image_losses(model, aux_head, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-patch auxiliary cross-entropy (summed over tasks) and the image-scale penalty of projector outputs
    `feats` [n_images, 64, hidden]."""
    feats = feats.float()
    text_rms = model.get_input_embeddings().weight.float().pow(2).mean().sqrt().detach()
    image_rms = feats.pow(2).mean().sqrt()
    return {"aux": patch_loss(aux_head, feats, labels), "scale": (image_rms.log() - text_rms.log()) ** 2}


def patch_loss(head, states: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of a patch classifier on image-token states [n_images, 64, width], summed over the
    `render.AUX_TASKS` tasks that have labels."""
    task_logits = head(states.float()).split(list(render.AUX_TASKS.values()), dim=-1)  # [n_images, 64, classes]
    return sum(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[task].reshape(-1), ignore_index=-100)
               for task, logits in zip(render.AUX_TASKS, task_logits) if (labels[task] >= 0).any())


def vision_batch(seed: int, step: int, batch_size: int, mix: str) -> dict:
    """The images (with their patch labels) of `batch_size` training samples for vision-pretraining step `step`;
    drawn from the training stream far beyond where the main phase reads."""
    start = VISION_STREAM_OFFSET + step * batch_size
    rendered = [r for i in range(start, start + batch_size) for r in training_sample(seed, i, mix).images]
    return {"pixel_values": torch.from_numpy(np.stack([pixels(r.image) for r in rendered])),
            "aux": {task: torch.from_numpy(np.stack([r.label_grid(task).reshape(-1) for r in rendered]))
                    for task in render.AUX_TASKS}}


def image_features(model, raw_pixels: torch.Tensor) -> torch.Tensor:
    """Projector outputs [n_images, 64, hidden] of raw uint8 pixels [n_images, H, W, 3]: the image tokens the
    language model reads, computed by the image path alone."""
    config = model.config
    out = model.model.get_image_features(pixel_values=normalize(raw_pixels),
                                         vision_feature_layer=config.vision_feature_layer,
                                         vision_feature_select_strategy=config.vision_feature_select_strategy)
    return torch.stack(list(out.pooler_output))


def pretrain_vision_step(model, aux_head, batch: dict, device: str, scale_weight: float,
                         bf16: bool = True) -> dict[str, torch.Tensor]:
    """Losses of one vision-pretraining batch: the image path (vision tower, projector) and the aux head only."""
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        feats = image_features(model, batch["pixel_values"].to(device))
        parts = image_losses(model, aux_head, feats, {k: v.to(device) for k, v in batch["aux"].items()})
    parts["loss"] = parts["aux"] + scale_weight * parts["scale"]
    return parts


def make_aux_head(arch: ArchConfig) -> torch.nn.Module:
    """The throwaway per-patch classifier: projector output -> logits of every `render.AUX_TASKS` task.

    It normalizes its input first: the image-scale penalty holds image tokens at the text embeddings' small
    scale, where a bare linear head needs huge weights and learns slowly.
    """
    return torch.nn.Sequential(torch.nn.LayerNorm(arch.hidden_size, elementwise_affine=False),
                               torch.nn.Linear(arch.hidden_size, sum(render.AUX_TASKS.values())))


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10 % of it at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resolve_out(out: Path | None) -> Path:
    if out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"testbed-{stamp}"
    out = Path(out).resolve()
    shipped = SHIPPED_DIR.resolve()
    if out != shipped and (shipped in out.parents or out in shipped.parents):
        raise ValueError(f"refusing to write into or around the shipped weights {shipped}; name it exactly "
                         "as --out to replace them, or choose another folder")
    return out


def build(out: Path | None = None, seed: int = 0, steps: int | None = None, minutes: float | None = None,
          arch: ArchConfig | None = None, train: TrainConfig | None = None, progress: bool = True,
          stop_at: int | None = None, device: str = "cpu", workers: int = 0, init: Path | None = None) -> Path:
    """Train (or resume) the testbed model in `out`; return `out`, which then holds a loadable bf16 model.

    Deterministic for (seed, steps, arch, train config) on a given machine and thread count. `steps` counts the
    main phase; `train.vision_steps` of vision pretraining come first. `minutes` caps the wall time of this call:
    the run checkpoints and stops early, and a later call resumes it. `stop_at` stops after that many steps of
    both phases as a kill would (checkpoint written, no export); tests use it to check resuming.
    `device` (default cpu) and `workers` (data processes, default 0 = in-process) change speed, not the recipe;
    bf16 autocast runs on the device unless `train.bf16` is False. `init` starts from the weights of a saved
    testbed model (same architecture and tokenizer) instead of a random initialization.
    """
    if not 0 <= seed < EVAL_SEED_START:
        raise ValueError(f"training seed must be in [0, {EVAL_SEED_START}), got {seed}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    arch = arch or ArchConfig()
    cfg = train or TrainConfig()
    if steps is not None:
        cfg = TrainConfig(**{**asdict(cfg), "steps": steps})
    if cfg.attend_weight < 0 or cfg.attend_weight > 0 and (
            not 0 <= cfg.attend_layer < arch.num_layers or not 1 <= cfg.attend_heads <= arch.num_heads
            or cfg.attend_at not in ("name", "answer")):
        raise ValueError(f"attention focus: weight must be >= 0, layer in [0, {arch.num_layers}), heads in "
                         f"[1, {arch.num_heads}] and at 'name' or 'answer'; got {cfg.attend_weight}, "
                         f"{cfg.attend_layer}, {cfg.attend_heads}, {cfg.attend_at!r}")
    if cfg.deep_aux_weight < 0 or cfg.deep_aux_weight > 0 and not 1 <= cfg.deep_aux_layer < arch.num_layers:
        raise ValueError(f"deep patch loss: weight must be >= 0 and layer in [1, {arch.num_layers}); got "
                         f"{cfg.deep_aux_weight}, {cfg.deep_aux_layer}")
    out = _resolve_out(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    if cfg.bf16:
        warn_if_emulated_bf16("vlmspec testbed build (--no-bf16 trains in fp32)", device)
    started = time.monotonic()

    tokenizer = train_tokenizer(arch.vocab_size, corpus())
    processor = build_processor(tokenizer)
    processor.save_pretrained(out)  # a run folder with a checkpoint is always exportable
    torch.manual_seed(seed)
    model = build_model(arch, tokenizer)
    if init is not None:
        from transformers import LlavaForConditionalGeneration

        start = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        model.load_state_dict(start.state_dict())
    model = model.to(device)
    aux_head = make_aux_head(arch).to(device)
    deep_head = make_aux_head(arch).to(device) if cfg.deep_aux_weight > 0 else None
    params = list(model.parameters()) + list(aux_head.parameters())
    params += list(deep_head.parameters()) if deep_head is not None else []
    vision_params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
                     *aux_head.parameters()]

    def adamw(group: list, lr: float) -> torch.optim.AdamW:
        return torch.optim.AdamW([{"params": [p for p in group if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                                  {"params": [p for p in group if p.ndim < 2], "weight_decay": 0.0}],
                                 lr=lr, betas=(0.9, 0.98))

    optimizer, vision_optimizer = adamw(params, cfg.lr), adamw(vision_params, cfg.vision_lr)
    step = 0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False, map_location=device)
        if state["arch"] != asdict(arch) or state["seed"] != seed:
            raise ValueError(f"{ckpt_path} was written by another seed/architecture; use a new --out")
        if "vision_optimizer" not in state:
            raise ValueError(f"{ckpt_path} was written by an older recipe (no vision phase); use a new --out")
        if (state.get("deep_head") is None) != (deep_head is None):
            raise ValueError(f"{ckpt_path} was written {'without' if deep_head is not None else 'with'} the deep "
                             "patch loss; resume with the same --deep-aux-weight setting or use a new --out")
        stored = {**asdict(TrainConfig()), **state.get("train", {})}
        changed = [f"{k}={stored[k]!r}" for k in RESUME_FIXED if stored[k] != getattr(cfg, k)]
        if changed:
            raise ValueError(f"{ckpt_path} was written with other data settings ({', '.join(changed)}); resume with "
                             "the same settings or use a new --out")
        model.load_state_dict(state["model"])
        aux_head.load_state_dict(state["aux_head"])
        if deep_head is not None:
            deep_head.load_state_dict(state["deep_head"])
        optimizer.load_state_dict(state["optimizer"])
        vision_optimizer.load_state_dict(state["vision_optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        step = state["step"]
    n_image = processor.image_processor.crop_size["height"] // render.PATCH
    batches = Batches(seed, cfg.batch_size, tokenizer, n_image * n_image, workers, mix=cfg.mix,
                      followups=cfg.followups, count_followups=cfg.count_followups)

    def save_checkpoint() -> None:
        _atomic_save({"model": model.state_dict(), "aux_head": aux_head.state_dict(),
                      "deep_head": deep_head.state_dict() if deep_head is not None else None,
                      "optimizer": optimizer.state_dict(), "vision_optimizer": vision_optimizer.state_dict(),
                      "torch_rng": torch.get_rng_state(), "step": step,
                      "seed": seed, "arch": asdict(arch), "train": asdict(cfg)}, ckpt_path)

    model.train()
    total = cfg.vision_steps + cfg.steps  # vision pretraining first, then the main phase
    bar = tqdm(total=total, initial=step, disable=not progress, desc="testbed", dynamic_ncols=True)
    ema, t_last, s_last = None, time.monotonic(), step
    while step < total:
        if minutes is not None and time.monotonic() - started > minutes * 60:
            break
        if step < cfg.vision_steps:
            opt, trained = vision_optimizer, vision_params
            lr = lr_at(step, cfg.vision_lr, max(1, cfg.vision_steps // 10), cfg.vision_steps)
            parts = pretrain_vision_step(model, aux_head, vision_batch(seed, step, cfg.vision_batch_size, cfg.mix),
                                         device, cfg.scale_weight, cfg.bf16)
            loss = parts.pop("loss")
        else:
            opt, trained = optimizer, params
            lr = lr_at(step - cfg.vision_steps, cfg.lr, cfg.warmup, cfg.steps)
            batch = to_device(batches.get(step - cfg.vision_steps), device)
            n_images = 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]
            orders = image_token_orders(n_images, n_image, seed, step, cfg.shuffle_image_tokens,
                                        cfg.mirror_image_tokens)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
                parts = losses(model, aux_head, batch, cfg.per_answer_loss, orders,
                               (cfg.attend_layer, cfg.attend_heads, cfg.attend_at) if cfg.attend_weight > 0 else None,
                               (deep_head, cfg.deep_aux_layer) if deep_head is not None else None)
            loss = parts["lm"] + cfg.aux_weight * parts.get("aux", 0.0) + cfg.scale_weight * parts.get("scale", 0.0)
            loss = loss + cfg.attend_weight * parts.get("attend", 0.0) + cfg.deep_aux_weight * parts.get("deep", 0.0)
            lm = parts["lm"].item()
            ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step == total:
            now = time.monotonic()
            rate = (step - s_last) / max(1e-9, now - t_last)
            t_last, s_last = now, step
            shown = {k: f"{float(v.detach()):.3f}" for k, v in parts.items() if k != "lm"}
            if ema is not None:
                shown["lm"] = f"{ema:.3f}"
            bar.set_postfix(**shown, sps=f"{rate:.2f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == total:
            save_checkpoint()
        if stop_at is not None and step >= stop_at:
            bar.close()
            batches.close()
            save_checkpoint()
            return out
    bar.close()
    batches.close()
    save_checkpoint()
    export(model, processor, out)
    if step >= total and out == SHIPPED_DIR.resolve():
        ckpt_path.unlink(missing_ok=True)  # the package ships the model only
    return out


def export(model, processor, out: Path) -> None:
    """Save the plain Llava model in bf16 with its processor (atomically per file via a temp folder)."""
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(device="cpu", dtype=torch.bfloat16).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


def export_checkpoint(run: Path, out: Path) -> Path:
    """Export the latest checkpoint of a (possibly unfinished) run as a plain bf16 model folder."""
    from transformers import AutoProcessor

    run, out = Path(run), _resolve_out(Path(out))
    ckpt_path = run / CHECKPOINT
    if not ckpt_path.is_file():
        raise ValueError(f"no {CHECKPOINT} in {run}")
    state = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    processor = AutoProcessor.from_pretrained(run)
    model = build_model(ArchConfig(**state["arch"]), processor.tokenizer)
    model.load_state_dict(state["model"])
    out.mkdir(parents=True, exist_ok=True)
    export(model, processor, out)
    return out
