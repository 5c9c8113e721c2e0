"""Evaluate a testbed model on its suites with plain `model.generate`.

Metrics:
- `accuracy`: normalized exact match (lower case, punctuation dropped, whitespace collapsed) against the
  reference, for the short-answer suites (`text_chat`: its non-story categories);
- `describe`: share of the reference's objects ("<color> <shape>") named in the answer (`precision`: share of
  the answer's named objects that are real);
- `blank_accuracy`: the same questions with every image replaced by a uniform gray one (the image-use control);
- `diversity`: distinct word bigrams / total word bigrams over five T=1 samples of one `describe` prompt;
- `entropy`: mean per-token entropy (nats) of the model's next-token distribution along its own T=1 answers.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch
from PIL import Image

from vlmspec.testbed import render
from vlmspec.testbed.data import SUITE_DEFAULTS, SUITES, write_suite

_PUNCT = re.compile(r"[^\w\s]")
OBJECT_RE = re.compile(r"\b(" + "|".join(render.COLORS) + r") (" + "|".join(render.SHAPES) + r")\b")
LONG_CATEGORIES = {"describe", "story"}


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def named_objects(text: str) -> set[str]:
    return {" ".join(m) for m in OBJECT_RE.findall(text.lower())}


def load(model_dir: Path, dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


def read_suite(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            record["images"] = [Image.open(Path(path).parent / p).convert("RGB") for p in record["images"]]
            records.append(record)
    return records


def prompt_inputs(model, processor, images: list, messages: list[dict]):
    """The model inputs of a chat with the generation prompt added, pixels in the model's dtype."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


@torch.inference_mode()
def generate(model, processor, images: list, messages: list[dict], max_new_tokens: int = 96,
             temperature: float = 0.0, seed: int | None = None) -> tuple[str, list[float]]:
    """Answer text and, for each generated token, the entropy (nats) of the distribution it was drawn from."""
    inputs = prompt_inputs(model, processor, images, messages)
    if seed is not None:
        torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample,
                         temperature=temperature if sample else None, top_k=0 if sample else None,
                         top_p=1.0 if sample else None, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    entropies = []
    for logits in out.logits[: len(new)]:
        logp = torch.log_softmax(logits[0].float() / (temperature if sample else 1.0), dim=-1)
        entropies.append(float(-(logp.exp() * logp).sum()))
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip(), entropies


def score(category: str, answer: str, reference: str) -> float:
    if category == "describe":
        truth = named_objects(reference)
        return len(named_objects(answer) & truth) / max(1, len(truth))
    return float(normalize(answer) == normalize(reference))


def evaluate_records(model, processor, records: list[dict], blank: bool = False) -> dict:
    """Greedy answers: mean score overall and per category, plus per-sample rows."""
    rows = []
    for r in records:
        images = [render.blank_image() for _ in r["images"]] if blank else r["images"]
        answer, _ = generate(model, processor, images, r["messages"],
                             max_new_tokens=160 if r["category"] in LONG_CATEGORIES else 24)
        row = {"id": r["id"], "category": r["category"], "answer": answer, "reference": r.get("reference")}
        if r["category"] != "story":
            row["score"] = score(r["category"], answer, r["reference"])
        if r["category"] == "describe":
            named = named_objects(answer)
            row["precision"] = len(named & named_objects(r["reference"])) / max(1, len(named))
        rows.append(row)
    scored = [x for x in rows if "score" in x]
    by_cat: dict[str, list[float]] = {}
    for x in scored:
        by_cat.setdefault(x["category"], []).append(x["score"])
    result = {"n": len(scored), "accuracy": sum(x["score"] for x in scored) / max(1, len(scored)),
              "by_category": {k: sum(v) / len(v) for k, v in sorted(by_cat.items())}, "rows": rows}
    precisions = [x["precision"] for x in rows if "precision" in x]
    if precisions:
        result["precision"] = sum(precisions) / len(precisions)
    return result


def sampled_stats(model, processor, records: list[dict], n_samples: int = 5, seed: int = 0) -> dict:
    """T=1: mean per-token entropy over one answer per record; diversity over n_samples of the first record."""
    entropies = []
    for i, r in enumerate(records):
        long = r["category"] in LONG_CATEGORIES
        _, ent = generate(model, processor, r["images"], r["messages"], max_new_tokens=160 if long else 24,
                          temperature=1.0, seed=seed + i)
        entropies.extend(ent)
    first = records[0]
    texts = [generate(model, processor, first["images"], first["messages"], max_new_tokens=160,
                      temperature=1.0, seed=seed + 1000 + k)[0] for k in range(n_samples)]
    return {"entropy": sum(entropies) / max(1, len(entropies)), "diversity": bigram_diversity(texts),
            "samples": texts}


def bigram_diversity(texts: list[str]) -> float:
    bigrams = []
    for t in texts:
        words = normalize(t).split()
        bigrams += list(zip(words, words[1:]))
    return len(set(bigrams)) / max(1, len(bigrams))


def evaluate(model_dir: Path, n: int | None = None, suites: tuple[str, ...] = SUITES,
             entropy_n: int = 10, blank: bool = True) -> dict:
    """Every suite at its default evaluation seed (n samples each, default: the suite's default n)."""
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for name in suites:
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    model, processor = load(Path(model_dir))
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in suites:
            default_n, seed = SUITE_DEFAULTS[name]
            records = read_suite(write_suite(name, n or default_n, seed, Path(tmp) / name))
            result = evaluate_records(model, processor, records)
            if blank and records[0]["images"]:
                result["blank_accuracy"] = evaluate_records(model, processor, records, blank=True)["accuracy"]
            stats = sampled_stats(model, processor, records[:entropy_n])
            result["entropy"] = stats["entropy"]
            if name == "describe":
                result["diversity"], result["samples"] = stats["diversity"], stats["samples"]
            report[name] = result
    return report


def summary_table(report: dict) -> str:
    lines = ["| suite | n | accuracy | blank-image accuracy | entropy (nats/token) | other |",
             "|---|---|---|---|---|---|"]
    for name, r in report.items():
        blank = f"{r['blank_accuracy']:.2f}" if "blank_accuracy" in r else "–"
        other = []
        if "precision" in r:
            other.append(f"precision {r['precision']:.2f}")
        if "diversity" in r:
            other.append(f"diversity {r['diversity']:.2f}")
        other += [f"{k} {v:.2f}" for k, v in r["by_category"].items() if len(r["by_category"]) > 1]
        lines.append(f"| {name} | {r['n']} | {r['accuracy']:.2f} | {blank} | {r['entropy']:.3f} | "
                     f"{', '.join(other) or '–'} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    rep = evaluate(Path(sys.argv[1]), n=int(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(summary_table(rep))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in rep.items()}, indent=1))
