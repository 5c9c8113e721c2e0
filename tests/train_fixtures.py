"""Shared fixtures of the training tests: a tiny LLaVA target, a small suite (images and text-only), its
collected data."""

from __future__ import annotations

import json
import random

import pytest
import torch

from vlmspec.target import Target
from vlmspec.testing import random_image, save_tiny_model
from vlmspec.train.collect import CollectConfig, collect
from vlmspec.bench.suites import read_suite

ANSWERS = ["the cat sat on the mat . one two three four", "a red square and a blue circle are in the image",
           "there are three green triangles at the top left", "hello world how are you . the answer is yes"]


def write_suite(folder, count: int = 8):
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        images = []
        if i % 4 != 3:                                       # a quarter text-only
            random_image(rng).save(folder / "images" / f"{i}.png")
            images = [f"images/{i}.png"]
        lines.append({"id": f"s{i}", "category": "vqa" if images else "text_chat", "images": images,
                      "prompt": "describe the image in detail" if images else "how are you",
                      "reference": ANSWERS[i % len(ANSWERS)]})
    path = folder / "suite.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(target, model dir, suite path, collected data dir with every hidden state)."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    model_dir = save_tiny_model(root / "model", "llava", lm_head_scale=8.0, attention_scale=4.0, layers=2)
    target = Target.from_pretrained(model_dir, dtype=torch.float32)
    suite = write_suite(root / "suite")
    data = collect(target, read_suite(suite), root / "data",
                   CollectConfig(layers=list(range(target.num_layers + 1)), shard_size=3), progress=False)
    return target, model_dir, suite, data
