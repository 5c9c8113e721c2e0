"""Probe a testbed training run without touching evaluation seeds: greedy accuracy on suites drawn from a
training-range seed, and the accuracy of the run's own auxiliary patch classifier per task on the patches of an
object, letter or bar (what the vision tower has learned to put on the image tokens).

    python scripts/testbed_probe.py runs/testbed-cpu                 # a run folder (its checkpoint.pt)
    python scripts/testbed_probe.py runs/testbed-cpu --n 60 --suites vqa,ocr,chart,caption
    python scripts/testbed_probe.py src/vlmspec/testbed/weights --suites "" --position-order 500

`--position-order N` asks where the language model reads an object's position: the position questions among
the first N vqa samples are answered three times, with the image tokens in raster order, with the order of the
patch rows reversed and with the order inside each row reversed (the tokens' content unchanged). For objects off
the middle row (column), it reports how often the answer's row (column) is the object's, and how often the
mirrored one: an answer that follows the mirror when the order is reversed was read from the token's place in
the sequence, not from its content.

`--residual-probe N` asks how far the answer has got inside the language model: over the position and color
questions among the first N vqa samples, a linear classifier per layer is fitted on the residual stream at the
last prompt token (70 % of the questions) and scored on the rest (30 %); printed per layer, embeddings first.

`--patch-probe N` asks whether the facts stay on the image tokens inside the language model: over the object
patches of the first N vqa samples' images, a linear classifier of the object's color and one of its shape per
decoder layer's input (the embeddings first), fitted on 70 % of the patches and scored on the rest; with the rms
of image and of text tokens there.

`--focus-mass N` asks whether the language model looks at the object a question names: over the color, shape,
count and position questions among the first N vqa samples, the attention mass that the naming word's last token
(`name`) and the last prompt token (`answer`) put on the patches of the named objects (`data.question_focus`),
per layer for the head that puts most there on average, next to the named patches' share of the prompt (what
uniform attention gives); and, over the questions whose scene also shows other objects, the share of that head's
mass on objects that goes to the named ones, next to the named ones' share of the object patches
(`objects_share`: what a head that finds objects but not the named one gives).

docs/testbed.md ("How the shipped model was made", "Measured") quotes this script's output. A finished model
folder without a checkpoint gets no auxiliary-head part.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmspec.testbed import render
from vlmspec.testbed.data import EVAL_SEED_START, make_sample, write_suite
from vlmspec.testbed.evaluate import evaluate_records, generate, load, prompt_inputs, read_suite
from vlmspec.testbed.model import ArchConfig
from vlmspec.testbed.train import (CHECKPOINT, encode, export_checkpoint, image_features, make_aux_head,
                                   vision_batch)

PROBE_SEED = EVAL_SEED_START - 10  # a training-range seed, never used by the training streams' own draws


@torch.no_grad()
def aux_accuracy(model, state: dict, batches: int = 8) -> dict[str, float]:
    """Per task: the run's aux head's accuracy on labelled patches (for kind and center: non-background only)."""
    head = make_aux_head(ArchConfig(**state["arch"]))
    head.load_state_dict(state["aux_head"])
    right: dict[str, float] = {}
    seen: dict[str, float] = {}
    for b in range(batches):
        batch = vision_batch(PROBE_SEED, b, 16, state["train"]["mix"])
        logits = head(image_features(model, batch["pixel_values"]).float())
        for task, task_logits in zip(render.AUX_TASKS, logits.split(list(render.AUX_TASKS.values()), dim=-1)):
            labels = batch["aux"][task]
            mask = labels > 0 if task in ("kind", "center") else labels >= 0
            right[task] = right.get(task, 0) + float((task_logits.argmax(-1)[mask] == labels[mask]).sum())
            seen[task] = seen.get(task, 0) + float(mask.sum())
    return {task: round(right[task] / seen[task], 3) for task in right if seen[task]}


@torch.no_grad()
def position_order(model, processor, n: int) -> dict[str, dict[str, float]]:
    """Row and column of the answers to position questions under three orders of the image tokens (see above)."""
    side = render.GRID
    orders = {"raster": list(range(side * side)),
              "rows reversed": [(side - 1 - i // side) * side + i % side for i in range(side * side)],
              "columns reversed": [(i // side) * side + side - 1 - i % side for i in range(side * side)]}
    samples = [s for s in (make_sample("vqa", PROBE_SEED, i) for i in range(n)) if s.category == "position"]
    where = {p: divmod(i, 3) for i, p in enumerate(render.POSITIONS)}  # name -> (row, column) on the 3 x 3 grid
    chosen: list[int] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, out: out[:, chosen])
    report = {}
    try:
        for name, order in orders.items():
            chosen[:] = order
            counts = dict.fromkeys(("exact", "rows", "row", "row mirrored", "columns", "column", "column mirrored"), 0)
            for s in samples:
                answer, _ = generate(model, processor, [r.image for r in s.images], s.messages(), max_new_tokens=8)
                got, truth = where.get(answer.strip().lower().rstrip(".")), where[s.answer]
                counts["exact"] += got == truth
                for axis, key in ((0, "row"), (1, "column")):
                    if truth[axis] != 1:  # the middle row/column is its own mirror
                        counts[key + "s"] += 1
                        counts[key] += got is not None and got[axis] == truth[axis]
                        counts[key + " mirrored"] += got is not None and got[axis] == 2 - truth[axis]
            report[name] = {"questions": len(samples), "exact": round(counts["exact"] / len(samples), 2),
                            **{k: round(counts[k] / counts[k.split()[0] + "s"], 2)
                               for k in ("row", "row mirrored", "column", "column mirrored")}}
    finally:
        hook.remove()
    return report


@torch.no_grad()
def residual_probe(model, processor, n: int) -> dict[str, dict]:
    """Held-out accuracy, per layer, of a linear classifier of the answer of position and color questions from
    the residual stream at the last prompt token (see above)."""
    states: dict[str, list] = {"position": [], "color": []}
    answers: dict[str, list] = {"position": [], "color": []}
    for s in (make_sample("vqa", PROBE_SEED, i) for i in range(n)):
        if s.category in states:
            inputs = prompt_inputs(model, processor, [r.image for r in s.images], s.messages())
            hidden = model(**inputs, output_hidden_states=True).hidden_states
            states[s.category].append(torch.stack([h[0, -1].float() for h in hidden]))  # [layers + 1, width]
            answers[s.category].append(s.answer)
    report = {}
    for category, rows in states.items():
        x_all, names = torch.stack(rows), sorted(set(answers[category]))
        y = torch.tensor([names.index(a) for a in answers[category]])
        cut = int(0.7 * len(y))
        report[category] = {"questions": len(y), "held_out": len(y) - cut, "classes": len(names),
                            "accuracy_by_layer": [linear_probe(x_all[:, layer], y) for layer in range(x_all.shape[1])]}
    return report


def linear_probe(x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy on the last 30 % of rows of a linear classifier of y from x fitted on the first 70 %."""
    cut = int(0.7 * len(y))
    x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-6)
    with torch.enable_grad():
        weight = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
        bias = torch.zeros(int(y.max()) + 1, requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=0.01)
        for _ in range(300):
            opt.zero_grad()
            loss = F.cross_entropy(x[:cut] @ weight + bias, y[:cut]) + 1e-3 * weight.pow(2).sum()
            loss.backward()
            opt.step()
    return round(float(((x[cut:] @ weight + bias).argmax(1) == y[cut:]).float().mean()), 2)


@torch.no_grad()
def patch_probe(model, processor, n: int) -> dict[str, list]:
    """Per decoder layer's input (the embeddings first): held-out accuracy of linear classifiers of the color and
    the shape of the object on an image token, and the rms of image and of text tokens (see above)."""
    states, kinds, scale = [], [], []
    for s in (make_sample("vqa", PROBE_SEED, i) for i in range(n)):
        inputs = prompt_inputs(model, processor, [r.image for r in s.images], s.messages())
        hidden = torch.stack(model(**inputs, output_hidden_states=True).hidden_states[:-1])[:, 0].float()
        image = inputs["input_ids"][0] == model.config.image_token_id
        labels = torch.from_numpy(s.images[0].label_grid("kind").reshape(-1))
        on_object = (labels > 0) & (labels <= render.N_OBJECT_CLASSES)
        states.append(hidden[:, image][:, on_object])  # [layers, object patches, width]
        kinds.append(labels[on_object] - 1)
        scale.append(torch.stack([hidden[:, image].pow(2).mean((1, 2)), hidden[:, ~image].pow(2).mean((1, 2))]))
    x, kind = torch.cat(states, 1), torch.cat(kinds)
    color, shape = kind // len(render.SHAPES), kind % len(render.SHAPES)
    rms = torch.stack(scale).mean(0).sqrt()
    return {"patches": len(kind), "color": [linear_probe(layer, color) for layer in x],
            "shape": [linear_probe(layer, shape) for layer in x],
            "image_rms": [round(float(v), 3) for v in rms[0]], "text_rms": [round(float(v), 3) for v in rms[1]]}


@torch.no_grad()
def focus_mass(model, processor, n: int) -> dict[str, dict]:
    """Per vqa category and query position (the naming word's last token, the last prompt token): attention mass
    on the named objects' patches (see above)."""
    model.set_attn_implementation("eager")
    masses: dict[str, list] = {}
    shares: dict[str, list] = {}
    for s in (make_sample("vqa", PROBE_SEED, i) for i in range(n)):
        answer_at, name_at, start, named = encode(s, processor.tokenizer, render.GRID * render.GRID).focus[0]
        inputs = prompt_inputs(model, processor, [r.image for r in s.images], s.messages())
        ids = inputs["input_ids"][0]
        if len(ids) != answer_at + 1:
            raise RuntimeError("the evaluation prompt and the training encoding disagree")
        attentions = model(**inputs, output_attentions=True).attentions  # per layer [1, heads, T, T]
        others = (s.images[0].label_grid("kind").reshape(-1) > 0) & ~named
        keys = [start + torch.from_numpy(np.flatnonzero(which)) for which in (named, others)]
        masses.setdefault(s.category, []).append(torch.stack([  # [name / answer, named / others, layers, heads]
            torch.stack([torch.stack([a[0, :, query, k].float().sum(-1) for a in attentions]) for k in keys])
            for query in (name_at, answer_at)]))
        shares.setdefault(s.category, []).append((named.sum() / len(ids), named.sum() / (named.sum() + others.sum())))
    model.set_attn_implementation("sdpa")
    report = {}
    for category, rows in masses.items():
        crowded = torch.tensor([share < 1 for _, share in shares[category]])
        report[category] = {"questions": len(rows), "uniform": round(float(np.mean([u for u, _ in shares[category]])), 3),
                            "with_others": int(crowded.sum()),
                            "objects_share": round(float(np.mean([o for _, o in shares[category] if o < 1])), 2)}
        for where, both in zip(("name", "answer"), torch.stack(rows).unbind(1)):  # [questions, 2, layers, heads]
            best = both[:, 0].mean(0).argmax(1)[None, :, None].expand(len(rows), -1, 1)  # per layer, its best head
            named, others = both[:, 0].gather(2, best)[..., 0], both[:, 1].gather(2, best)[..., 0]  # [questions, layers]
            picked = (named / (named + others).clamp(min=1e-9))[crowded].mean(0)
            report[category][where] = {"named": [round(float(m), 2) for m in named.mean(0)],
                                       "named_of_object_mass": [round(float(m), 2) for m in picked]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a testbed run folder (with checkpoint.pt) or a model folder")
    parser.add_argument("--n", type=int, default=40, help="samples per suite (default 40)")
    parser.add_argument("--suites", default="vqa,ocr,chart,caption", help="comma-separated suites")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--position-order", type=int, default=0, metavar="N",
                        help="also probe where positions are read from, on the first N vqa samples (see above)")
    parser.add_argument("--residual-probe", type=int, default=0, metavar="N",
                        help="also fit per-layer linear probes of the answer on the first N vqa samples (see above)")
    parser.add_argument("--patch-probe", type=int, default=0, metavar="N",
                        help="also probe color and shape on the image tokens per layer, over N vqa samples (see above)")
    parser.add_argument("--focus-mass", type=int, default=0, metavar="N",
                        help="also measure attention on the named objects over the first N vqa samples (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, state = args.run, None
        if (args.run / CHECKPOINT).is_file():
            state = torch.load(args.run / CHECKPOINT, weights_only=False, map_location="cpu")
            model_dir = export_checkpoint(args.run, Path(tmp) / "model")
            report["step"] = state["step"]
        model, processor = load(model_dir)
        for name in filter(None, args.suites.split(",")):
            records = read_suite(write_suite(name, args.n, PROBE_SEED, Path(tmp) / name))
            result = evaluate_records(model, processor, records)
            report[name] = {"accuracy": round(result["accuracy"], 3),
                            **{k: round(v, 2) for k, v in result["by_category"].items()}}
        if args.position_order:
            report["position_order"] = position_order(model, processor, args.position_order)
        if args.residual_probe:
            report["residual_probe"] = residual_probe(model, processor, args.residual_probe)
        if args.patch_probe:
            report["patch_probe"] = patch_probe(model.float(), processor, args.patch_probe)
        if args.focus_mass:
            report["focus_mass"] = focus_mass(model, processor, args.focus_mass)
        if state is not None:
            report["aux_accuracy"] = aux_accuracy(model.float(), state)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
