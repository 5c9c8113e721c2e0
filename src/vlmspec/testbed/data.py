"""Deterministic procedural data for the testbed: benchmark suites and the training mixture.

Sample `i` of suite `name` under seed `s` is drawn from `random.Random(f"{name}:{s}:{i}")`, so any sample can be
regenerated alone. Seed ranges are disjoint by contract:

- training uses seeds in `[0, EVAL_SEED_START)` (`train.build(seed=…)` draws its stream from `seed`);
- evaluation uses seeds `>= EVAL_SEED_START` (`SUITE_DEFAULTS` and `write_suite` for benchmarks).

Suites (default n, default seed): see `SUITE_DEFAULTS`. Short answers are the bare answer (exact match is
meaningful); `describe` and the `story` part of `text_chat` are long and varied (T=1 samples differ).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from vlmspec.testbed import render
from vlmspec.testbed.render import COLORS, OCR_WORDS, SHAPES, Obj, Rendered

EVAL_SEED_START = 1_000_000
SUITES = ("caption", "describe", "vqa", "ocr", "chart", "multi_image", "text_chat")
# name -> (default n, default seed); all default seeds are evaluation seeds.
SUITE_DEFAULTS: dict[str, tuple[int, int]] = {
    "caption": (50, 1_000_001),
    "describe": (20, 1_000_002),
    "vqa": (100, 1_000_003),
    "ocr": (50, 1_000_004),
    "chart": (50, 1_000_005),
    "multi_image": (30, 1_000_006),
    "text_chat": (40, 1_000_007),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class Sample:
    category: str
    question: str  # user text; images come first in the user turn
    answer: str
    images: list[Rendered] = field(default_factory=list)
    followups: list[tuple[str, str]] = field(default_factory=list)  # training only: more (question, answer) turns

    def messages(self) -> list[dict]:
        """The first user turn (what suites hold and models answer)."""
        content = [{"type": "image"} for _ in self.images] + [{"type": "text", "text": self.question}]
        return [{"role": "user", "content": content}]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _scene_objects(rng: random.Random, k: int) -> list[Obj]:
    """k objects in distinct cells with distinct (color, shape)."""
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], k)
    cells = rng.sample(range(9), k)
    return [Obj(c, s, cell, rng.choice(("small", "large"))) for (c, s), cell in zip(kinds, cells)]


COUNT_QUESTIONS = ("How many {c} {s} are there?", "Count the {c} {s}.")
POSITION_QUESTIONS = ("Where is the {n}?", "Where is the {n} in the image?")


COUNT_FOLLOWUPS = ("all", "multiple")


def image_questions(image: Rendered, rng: random.Random, skip: str = "",
                    counts: str = "all") -> list[tuple[str, str]]:
    """Every short question one scene or chart answers unambiguously, as (question, answer) pairs; a question
    that any phrasing of equals `skip` is left out. `counts="multiple"` asks the count only of kinds the scene
    holds more than once (most scenes hold one of each kind, so "all" makes most count answers `1`)."""
    if counts not in COUNT_FOLLOWUPS:
        raise ValueError(f"counts must be one of {', '.join(COUNT_FOLLOWUPS)}, got {counts!r}")
    kinds = [(o.color, o.shape) for o in image.objects]
    shapes, colors = [o.shape for o in image.objects], [o.color for o in image.objects]
    least = 2 if counts == "multiple" else 1
    asked = [([q.format(c=c, s=_plural(s, 2)) for q in COUNT_QUESTIONS], str(kinds.count((c, s))))
             for c, s in dict.fromkeys(kinds) if kinds.count((c, s)) >= least]
    for o in image.objects:
        if kinds.count((o.color, o.shape)) == 1:
            asked.append(([q.format(n=o.name) for q in POSITION_QUESTIONS], o.position))
        if shapes.count(o.shape) == 1:
            asked.append(([f"What color is the {o.shape}?"], o.color))
        if colors.count(o.color) == 1:
            asked.append(([f"What shape is the {o.color} object?"], o.shape))
    asked += [([f"What is the value of the {c} bar?"], str(v)) for c, v in image.bars]
    values = [v for _, v in image.bars]
    if values and values.count(max(values)) == 1:
        asked.append((["Which bar is the tallest?"], image.bars[values.index(max(values))][0]))
    return [(rng.choice(phrasings), answer) for phrasings, answer in asked if skip not in phrasings]


def question_focus(question: str) -> tuple[set[int], int]:
    """The patch classes (`render` kind labels) of what a question about a scene or chart is about, every object
    of the one color and/or the one shape it names (a chart bar is drawn as a square), and the index in
    `question` just past the last word that names them. Empty and 0 when it names no color or shape, or several."""
    colors, shapes, end = set(), set(), 0
    for word in re.finditer(r"[a-z]+", question.lower()):
        name, shape = word.group(), word.group().removesuffix("s")
        if name in COLORS:
            colors.add(name)
        elif shape in SHAPES:
            shapes.add(shape)
        else:
            continue
        end = word.end()
    if len(colors) > 1 or len(shapes) > 1 or not (colors or shapes):
        return set(), 0
    return {render.object_class(c, s) for c in (colors or COLORS) for s in (shapes or SHAPES)}, end


def gen_vqa(rng: random.Random) -> Sample:
    kind = rng.choice(("color", "shape", "position", "count"))
    if kind == "count":
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        n = rng.randint(1, 5)
        cells = rng.sample(range(9), n + rng.randint(0, min(2, 9 - n)))
        objs = [Obj(color, shape, c, "small") for c in cells[:n]]
        for c in cells[n:]:  # distractors of another kind
            dc, ds = rng.choice([(c2, s2) for c2 in COLORS for s2 in SHAPES if (c2, s2) != (color, shape)])
            objs.append(Obj(dc, ds, c, "small"))
        q = rng.choice(COUNT_QUESTIONS)
        return Sample("count", q.format(c=color, s=_plural(shape, 2)), str(n), [render.render_scene(objs, rng)])
    objs = _scene_objects(rng, rng.randint(1, 3))
    if kind == "color":
        target = rng.choice(objs)
        objs = [o for o in objs if o is target or o.shape != target.shape]
        return Sample("color", f"What color is the {target.shape}?", target.color, [render.render_scene(objs, rng)])
    if kind == "shape":
        target = rng.choice(objs)
        objs = [o for o in objs if o is target or o.color != target.color]
        return Sample("shape", f"What shape is the {target.color} object?", target.shape,
                      [render.render_scene(objs, rng)])
    target = rng.choice(objs)
    q = rng.choice(POSITION_QUESTIONS)
    return Sample("position", q.format(n=target.name), target.position, [render.render_scene(objs, rng)])


def gen_ocr(rng: random.Random) -> Sample:
    word = rng.choice(OCR_WORDS)
    q = rng.choice(("What word is written in the image?", "Read the text in the image."))
    return Sample("ocr", q, word, [render.render_word(word, rng)])


def gen_chart(rng: random.Random) -> Sample:
    colors = rng.sample(list(COLORS), rng.randint(3, 4))
    values = [rng.randint(1, 7) for _ in colors]
    image = render.render_chart(list(zip(colors, values)), rng)
    if rng.random() < 0.7:
        i = rng.randrange(len(colors))
        return Sample("chart_value", f"What is the value of the {colors[i]} bar?", str(values[i]), [image])
    top = max(values)
    if values.count(top) > 1:  # make the tallest unique
        i = values.index(top)
        values[i] = min(7, top + 1) if top < 7 else top
        for j in range(len(values)):
            if j != i and values[j] == values[i]:
                values[j] -= 1
        image = render.render_chart(list(zip(colors, values)), rng)
    return Sample("chart_max", "Which bar is the tallest?", colors[values.index(max(values))], [image])


def gen_caption(rng: random.Random) -> Sample:
    color, shape, n = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.randint(1, 5)
    size = rng.choice(("small", "large"))
    objs = [Obj(color, shape, c, size) for c in rng.sample(range(9), n)]
    count = _article(color) if n == 1 else NUMBER_WORDS[n]
    q = rng.choice(("Write a short caption for the image.", "Caption this image."))
    return Sample("caption", q, f"{count} {color} {_plural(shape, n)}", [render.render_scene(objs, rng)])


def describe_objects(objs: list[Obj], rng: random.Random) -> str:
    """A long description naming every object, varied in phrasing, order and detail."""
    n = len(objs)
    intro = rng.choice((
        f"The image shows {NUMBER_WORDS[n]} shapes on a plain background.",
        f"There are {NUMBER_WORDS[n]} objects in this picture.",
        f"This picture contains {NUMBER_WORDS[n]} simple shapes.",
        "The image is a simple drawing of a few colored shapes.",
        "Here is what I can see in the image.",
    ))
    sentences = [intro]
    order = list(objs)
    rng.shuffle(order)
    for i, o in enumerate(order):
        size = f"{o.size} " if rng.random() < 0.6 else ""
        a, where, what = _article(size or o.name), o.position, f"{size}{o.name}"
        templates = [
            f"In the {where} there is {a} {what}.",
            f"{a.capitalize()} {what} sits in the {where}.",
            f"The {where} holds {a} {what}.",
            f"You can see {a} {what} in the {where}.",
            f"There is {a} {what} in the {where} of the image.",
        ]
        if i > 0:
            templates += [f"Next to it, in the {where}, is {a} {what}.", f"Also, {a} {what} is in the {where}."]
        sentences.append(rng.choice(templates))
    extras = [
        "The background is plain and empty.",
        "Nothing else is visible.",
        "All of the shapes are drawn with flat colors.",
        f"The {max(objs, key=lambda o: (o.size == 'large', o.name)).name} is the most visible shape.",
        "The shapes do not overlap.",
    ]
    sentences += rng.sample(extras, rng.randint(0, 2))
    return " ".join(sentences)


def gen_describe(rng: random.Random) -> Sample:
    objs = _scene_objects(rng, rng.randint(2, 4))
    q = rng.choice(("Describe the image in detail.", "Give a detailed description of this image.",
                    "What is in this picture? Describe everything."))
    return Sample("describe", q, describe_objects(objs, rng), [render.render_scene(objs, rng)])


def gen_multi_image(rng: random.Random) -> Sample:
    objs = _scene_objects(rng, rng.randint(2, 3))
    background = rng.choice(render.BACKGROUNDS)
    change = rng.choice(("color", "added", "removed"))
    after = list(objs)
    used = {(o.color, o.shape) for o in objs}
    if change == "color":
        i = rng.randrange(len(objs))
        new = rng.choice([c for c in COLORS if (c, objs[i].shape) not in used])
        after[i] = Obj(new, objs[i].shape, objs[i].cell, objs[i].size)
        answer = f"the {objs[i].name} turned {new}"
    elif change == "added":
        kind = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in used])
        cell = rng.choice([c for c in range(9) if c not in {o.cell for o in objs}])
        after.append(Obj(kind[0], kind[1], cell, rng.choice(("small", "large"))))
        answer = f"{_article(kind[0])} {kind[0]} {kind[1]} appeared"
    else:
        i = rng.randrange(len(objs))
        answer = f"the {after.pop(i).name} disappeared"
    first = render.render_scene(objs, rng, background)
    second = render.render_scene(after, rng, background)
    q = rng.choice(("What changed between the two images?", "What is different in the second image?"))
    return Sample(f"change_{change}", q, answer, [first, second])


_ANIMALS = ("cat", "dog", "fox", "bird", "frog", "bear", "rabbit", "mouse")
_NAMES = ("Tom", "Ana", "Sam", "Lily", "Max", "Mia", "Ben", "Zoe")
_PLACES = ("the forest", "a small town", "the river", "a big garden", "the hills", "an old house")
_THINGS = ("a red ball", "a shiny key", "a lost hat", "a little boat", "a blue kite", "a warm blanket")


def story(rng: random.Random, animal: str) -> str:
    """A short story from a small grammar."""
    name = rng.choice(_NAMES)
    place, thing = rng.choice(_PLACES), rng.choice(_THINGS)
    opening = rng.choice((f"Once upon a time, a {animal} named {name} lived in {place}.",
                          f"There was a {animal} called {name} who lived in {place}.",
                          f"In {place}, there lived a little {animal} named {name}."))
    middle = rng.sample((f"One day, {name} found {thing}.",
                         f"{name} liked to walk every morning.",
                         f"{name} had a good friend, a {rng.choice(_ANIMALS)}.",
                         "It was a cold and windy day.",
                         f"{name} wanted to see the sea."), rng.randint(2, 3))
    ending = rng.choice((f"In the end, {name} went home happy.",
                         f"From that day on, {name} was never sad again.",
                         f"{name} smiled and fell asleep.",
                         "And they all lived happily ever after."))
    return " ".join([opening, *middle, ending])


def gen_text_chat(rng: random.Random) -> Sample:
    kind = rng.choice(("arithmetic", "sort", "reverse", "story"))
    if kind == "arithmetic":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice("+-*") if max(a, b) <= 9 else rng.choice("+-")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Sample("arithmetic", f"What is {a} {op} {b}?", str(value))
    if kind in ("sort", "reverse"):
        nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
        listed = ", ".join(map(str, nums))
        if kind == "sort":
            return Sample("sort", f"Sort these numbers from smallest to largest: {listed}.",
                          ", ".join(map(str, sorted(nums))))
        return Sample("reverse", f"Reverse this list: {listed}.", ", ".join(map(str, nums[::-1])))
    animal = rng.choice(_ANIMALS)
    q = rng.choice((f"Tell me a short story about a {animal}.", f"Write a short story about a {animal}."))
    return Sample("story", q, story(rng, animal))


GENERATORS = {
    "caption": gen_caption, "describe": gen_describe, "vqa": gen_vqa, "ocr": gen_ocr,
    "chart": gen_chart, "multi_image": gen_multi_image, "text_chat": gen_text_chat,
}


def _check(name: str, n: int | None = None) -> None:
    if name not in GENERATORS:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


def make_sample(name: str, seed: int, index: int) -> Sample:
    """Sample `index` of suite `name` under `seed`; independent of every other sample."""
    _check(name)
    return GENERATORS[name](random.Random(f"{name}:{seed}:{index}"))


def write_suite(name: str, n: int, seed: int, out: Path) -> Path:
    """Write `out/suite.jsonl` (DESIGN suite format, `messages` prompts) and its PNG images; return the path.

    Benchmarks should use evaluation seeds (>= `EVAL_SEED_START`); training never draws from them.
    """
    _check(name, n)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        sample = make_sample(name, seed, i)
        sample_id = f"{name}-{seed}-{i:05d}"
        paths = []
        for j, rendered in enumerate(sample.images):
            rel = f"images/{sample_id}-{j}.png"
            rendered.image.save(out / rel)
            paths.append(rel)
        record = {"id": sample_id, "category": sample.category, "images": paths,
                  "messages": sample.messages(), "reference": sample.answer}
        lines.append(json.dumps(record))
    path = out / "suite.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def cache_dir() -> Path:
    root = os.environ.get("VLMSPEC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlmspec")
    return Path(root) / "suites"


def default_suite(name: str) -> Path:
    """The suite `name` with its documented default n and seed, generated once into the cache; its jsonl path."""
    _check(name)
    n, seed = SUITE_DEFAULTS[name]
    folder = cache_dir() / f"{name}-n{n}-s{seed}"
    path = folder / "suite.jsonl"
    if not path.exists():
        write_suite(name, n, seed, folder)
    return path


# Training mixtures: suite -> weight. vqa and ocr carry the accuracy targets, so they get the most.
# BASE_MIX also defines the tokenizer corpus, so every stage of a run shares one tokenizer.
BASE_MIX: dict[str, float] = {
    "vqa": 0.32, "ocr": 0.18, "chart": 0.10, "caption": 0.08,
    "describe": 0.12, "multi_image": 0.08, "text_chat": 0.12,
}
SHORT_MIX: dict[str, float] = {
    "vqa": 0.34, "ocr": 0.20, "chart": 0.12, "caption": 0.08,
    "describe": 0.08, "multi_image": 0.08, "text_chat": 0.10,
}
FOCUS_MIX: dict[str, float] = {
    "vqa": 0.42, "ocr": 0.28, "chart": 0.08, "caption": 0.06,
    "describe": 0.05, "multi_image": 0.04, "text_chat": 0.07,
}
MIXES = {"base": BASE_MIX, "short": SHORT_MIX, "focus": FOCUS_MIX}


def training_sample(seed: int, index: int, mix: str = "base", followups: int = 0,
                    count_followups: str = "all") -> Sample:
    """Sample `index` of the training stream for a training seed (must be < EVAL_SEED_START).

    `followups` > 0 adds up to that many more short questions about a one-image sample's scene or chart as
    further chat turns: more supervised answers per encoded image; `count_followups` picks which count
    questions they may be (`image_questions`' `counts`). The first turn does not depend on either.
    """
    if not 0 <= seed < EVAL_SEED_START:
        raise ValueError(f"training seeds are in [0, {EVAL_SEED_START}); got {seed}")
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; choose from {', '.join(MIXES)}")
    rng = random.Random(f"train:{seed}:{index}")
    weights = MIXES[mix]
    name = rng.choices(list(weights), weights=list(weights.values()))[0]
    sample = GENERATORS[name](rng)
    if followups > 0 and len(sample.images) == 1:
        extra = image_questions(sample.images[0], rng, skip=sample.question, counts=count_followups)
        sample.followups = rng.sample(extra, min(followups, len(extra)))
    return sample
