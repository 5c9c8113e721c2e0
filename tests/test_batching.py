"""The batched engine (continuous batching): every request's output in a mixed batch equals its output alone and
the target's own `model.generate` (greedy) or plain decoding with the same seed (sampled), for every family × every
drafter type × chain and dynamic trees; the sampled distribution at batch > 1 is the target's; cancelling one
request leaves the others unchanged; requests join mid-flight.

Mixed batches: different prompt lengths, 0/1/2 images, different budgets and stop strings, `max_batch` below the
number of requests so that rows finish early and waiting requests join the running batch.
Near ties follow DESIGN (a flip is excused only under a top-2 margin of 1e-4; more than 5% excused cases fail):
a batched forward may round differently from a one-row forward."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter

import pytest
import torch

from vlmspec import Engine, Generator, RequestCancelled, Target, TreeConfig, available_drafters, build_drafter
from vlmspec.budget import TreeBudget
from vlmspec.testing import FAMILIES, compare_greedy, random_image, save_tiny_model
from vlmspec.verify import Sampler, SamplingConfig, target_probs

TREES = [TreeConfig("chain", depth=3), TreeConfig("dynamic", depth=3, topk=3, total_tokens=8)]
WORDS = "the cat sat on a red mat what color is it describe image two blue circles count top left".split()
MAX_EXCUSED = 0.05


def make_requests(family: str, seed: int) -> list[dict]:
    """Six requests: prompts of 1–9 words, 0/1/2 images (none for a text-only target), budgets 3–14; two of them
    sampled with a seed (one with top-p, one with top-k)."""
    rng = random.Random(seed)
    requests = []
    for index in range(6):
        images = [] if family == "llama" else [random_image(rng) for _ in range(index % 3)]
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
        prompt = " ".join(["<image>"] * len(images) + [words]) if index % 2 else words
        requests.append({"images": images, "prompt": prompt, "max_new_tokens": [14, 3, 9, 12, 5, 10][index]})
    requests[2].update(temperature=0.8, top_p=0.9, seed=seed)
    requests[5].update(temperature=1.0, top_k=20, seed=seed + 1)
    return requests


def sampler_of(kwargs: dict) -> Sampler | None:
    """The sampler of a sampled request (None: greedy), for `compare_greedy`'s margin."""
    if not kwargs.get("temperature"):
        return None
    return Sampler(SamplingConfig(kwargs["temperature"], kwargs.get("top_p", 1.0), kwargs.get("top_k", 0)),
                   kwargs["seed"])


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_setup(request, tmp_path_factory):
    family = request.param
    directory = save_tiny_model(tmp_path_factory.mktemp(family), family, lm_head_scale=8.0, attention_scale=4.0)
    target = Target.from_pretrained(directory, dtype=torch.float32)
    requests = make_requests(family, seed=len(family))
    references = []
    for kwargs in requests:
        inputs = target.encode(kwargs["images"], prompt=kwargs["prompt"])
        if sampler_of(kwargs) is not None:                       # plain decoding with the same seed
            references.append((inputs, Generator(target).generate(**kwargs).token_ids))
            continue
        with torch.no_grad():
            out = target.model.generate(**inputs, do_sample=False, max_new_tokens=kwargs["max_new_tokens"])
        references.append((inputs, out[0, inputs["input_ids"].shape[1]:].tolist()))
    # a stop string for request 3, taken from the middle of its plain answer (stop strings end a row early)
    text = Generator(target).generate(**requests[3]).text
    stop = text[len(text) // 2:][:2]
    if stop.strip():
        requests[3]["stop"] = [stop]
        references[3] = (references[3][0], Generator(target).generate(**requests[3]).token_ids)
    return family, directory, target, requests, references


def drafters_of(target: Target, directory) -> dict[str, object]:
    return {name: build_drafter(name, target, model=str(directory)) if name == "draft-model"
            else build_drafter(name, target, seed=1) for name in available_drafters()}


def test_mixed_batch_equals_alone_and_model_generate(family_setup):
    family, directory, target, requests, references = family_setup
    outcomes, failures = Counter(), []
    for (name, drafter), tree in itertools.product(drafters_of(target, directory).items(), TREES):
        generator = Generator(target, drafter, tree)
        batch = generator.generate_batch(requests, max_batch=4)
        for index, (kwargs, result, (inputs, reference)) in enumerate(zip(requests, batch, references)):
            alone = generator.generate(**kwargs)
            for what, other in (("alone", alone.token_ids), ("generate", reference)):
                outcome = compare_greedy(target.model, inputs, result.token_ids, other, sampler=sampler_of(kwargs))
                outcomes[outcome] += 1
                if outcome == "different":
                    failures.append((family, name, tree.kind, index, what, result.token_ids, other))
            assert result.stats.new_tokens == len(result.token_ids) <= kwargs["max_new_tokens"]
    assert not failures, failures[:3]
    assert outcomes["near-tie"] <= MAX_EXCUSED * sum(outcomes.values()), outcomes


def test_short_answer_rule_changes_no_output(family_setup):
    """With the rule for answers about to end on (after two- and three-token answers, a row's first two steps verify
    the root alone and the drafter catches up at the third) and rows that leave before any row has drafted, batched and
    single outputs still equal `model.generate` (seeded rows: plain decoding), for every drafter type."""
    family, directory, target, requests, references = family_setup
    failures = []
    for name, drafter in drafters_of(target, directory).items():
        generator = Generator(target, drafter, TreeConfig("dynamic", depth=3, topk=2, total_tokens=6))
        short_answers(generator.budget)
        short = {**requests[0], "max_new_tokens": 2}              # leaves before any row has drafted
        batch = generator.generate_batch([short] + requests, max_batch=3)[1:]
        short_answers(generator.budget)                        # long answers above changed it
        alone = generator.generate(**requests[0])
        assert alone.stats.tree_nodes_per_step[:2] == [1, 1] and not any(alone.stats.draft_forwards_per_step[:2])
        if name != "prompt-lookup":                               # (which finds nothing to propose here)
            assert max(alone.stats.tree_nodes_per_step) > 1       # it drafts from the third step on
        for index, (kwargs, result, (inputs, reference)) in enumerate(zip(requests + requests[:1], batch + [alone],
                                                                          references + references[:1])):
            if compare_greedy(target.model, inputs, result.token_ids, reference,
                              sampler=sampler_of(kwargs)) == "different":
                failures.append((family, name, index, result.token_ids, reference))
    assert not failures, failures[:3]


class LateDrafting(TreeBudget):
    """A budget that always runs the configured tree at batch > 1 and lets a row draft only from its third token on,
    whatever the timings: rows that have not drafted yet share steps with rows that draft."""

    def choose(self, batch: int) -> int:
        return 0

    def continues(self, emitted: int, first: bool = False) -> bool:
        return emitted >= 3


def test_draft_cache_rows_stay_in_step_with_their_states(family_setup):
    """After every step, each feature drafter's cache row holds exactly its state's committed entries, also for rows
    that did not draft while a batch-mate did (its draft levels pad every row): a stale row end would put the next
    catch-up's entries where the mask and the keep do not look (CI once caught it as a mask of the wrong width)."""
    family, directory, target, requests, references = family_setup
    tree = TreeConfig("dynamic", depth=3, topk=2, total_tokens=6)
    for name, drafter in drafters_of(target, directory).items():
        if not hasattr(drafter, "decoder"):                       # prompt-lookup, draft-model: no shared draft cache
            continue
        engine = Engine(target, drafter, tree, max_batch=3, budget=LateDrafting(tree))
        handles = [engine.submit_inputs(inputs, kwargs["max_new_tokens"], SamplingConfig(), stop=kwargs.get("stop", ()))
                   for kwargs, (inputs, _) in zip(requests, references)]
        while engine.step():
            states = engine.draft_batch.states
            assert [state.cache.ends[state.row] for state in states] == [state.length for state in states], name
        for kwargs, handle, (inputs, reference) in zip(requests, handles, references):
            if sampler_of(kwargs) is None:
                assert compare_greedy(target.model, inputs, handle.result().token_ids, reference) != "different"


def short_answers(budget) -> None:
    """Recent answers of two and three tokens: a row skips drafting at its first two steps (`TreeBudget.continues`)
    and drafts from the third, catching up on the prompt and two steps of verified tokens at once."""
    for _ in range(4):
        budget.finished(2)
        budget.finished(3)


def test_rows_join_mid_flight_and_batch_grows(family_setup):
    family, directory, target, requests, references = family_setup
    engine = Engine(target, build_drafter("eagle", target, seed=1), TreeConfig("chain", depth=3), max_batch=8)
    first = [engine.submit(**requests[0]), engine.submit(**requests[3])]
    engine.step()
    engine.step()
    later = [engine.submit(**kwargs) for kwargs in requests[1:3]]
    assert engine.num_waiting == 2
    results = engine.run(first + later)
    sizes = [size for handle in first for size in handle.stats.batch_size_per_step]
    assert max(sizes) >= 3, sizes                              # the late requests ran beside the early ones
    for result, index in zip(results, [0, 3, 1, 2]):
        inputs, reference = references[index]
        assert compare_greedy(target.model, inputs, result.token_ids, reference) != "different"
    assert engine.state.rows == 0 and engine.num_running == 0


def test_cancel_frees_the_row_and_leaves_others_unchanged(family_setup):
    family, directory, target, requests, _ = family_setup
    generator = Generator(target, build_drafter("eagle", target, seed=1), TreeConfig("dynamic", depth=3, topk=2,
                                                                                       total_tokens=5))
    engine = generator.engine(max_batch=4)
    handles = [engine.submit(**kwargs) for kwargs in requests[:4]]
    victim = handles[0]
    engine.step()
    engine.cancel(victim)
    engine.step()
    assert victim.done and engine.state.rows == len(engine.running) and victim not in engine.running
    with pytest.raises(RequestCancelled):
        victim.result()
    for handle, kwargs in zip(handles[1:], requests[1:4]):
        assert handle.result().token_ids == generator.generate(**kwargs).token_ids


def test_sampled_distribution_at_batch_sixteen(tmp_path):
    """Three tokens sampled with top_k=3 (27 outcomes) by 480 seeded requests run 16 at a time, drafted by a
    related but different small model (it agrees only sometimes, so both acceptance and rejection happen): the
    empirical joint distribution is the target's, by total variation."""
    target = Target.from_pretrained(save_tiny_model(tmp_path / "t", "llama", lm_head_scale=3.0), dtype=torch.float32)
    draft_dir = save_tiny_model(tmp_path / "d", "llama", lm_head_scale=1.5, tokenizer=target.tokenizer)
    drafter = build_drafter("draft-model", target, model=str(draft_dir))
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    inputs = target.encode(prompt="the cat sat")
    exact = exact_joint(target, inputs, sampling, length=3)
    samples = 480
    requests = [{"prompt": "the cat sat", "max_new_tokens": 3, "temperature": 1.0, "top_k": 3, "seed": seed}
                for seed in range(samples)]
    results = Generator(target, drafter, TreeConfig("dynamic", depth=2, topk=2, total_tokens=4)).generate_batch(
        requests, max_batch=16)
    counts = Counter(tuple(result.token_ids) for result in results)
    assert set(counts) <= set(exact), set(counts) - set(exact)
    tv = 0.5 * sum(abs(counts[key] / samples - p) for key, p in exact.items())
    # E[TV] <= 0.5 * sum sqrt(p / n) <= 0.5 * sqrt(27 / 480) ≈ 0.12; a biased sampler sits far above 0.18
    assert tv < 0.18, tv
    accepted = sum(sum(r.stats.accepted_per_step) for r in results)
    drafted = sum(len(r.stats.accepted_per_step) for r in results)
    assert 0 < accepted < 2 * drafted, (accepted, drafted)     # drafts were accepted and rejected


@torch.no_grad()
def exact_joint(target: Target, inputs: dict, sampling: SamplingConfig, length: int) -> dict[tuple[int, ...], float]:
    """The target's exact distribution of its first `length` sampled tokens (support enumerated)."""
    joint = {(): 1.0}
    for _ in range(length):
        extended = {}
        for prefix, p in joint.items():
            if prefix and prefix[-1] in target.eos_token_ids:         # the answer ended
                extended[prefix] = p
                continue
            kwargs = dict(inputs)
            kwargs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([prefix], dtype=torch.long)], dim=1)
            kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
            probs = target_probs(target.model(**kwargs).logits[0, -1].double(), sampling)
            for token in torch.nonzero(probs).flatten().tolist():
                extended[prefix + (token,)] = p * float(probs[token])
        joint = extended
    return joint


def test_engine_thread_streams_async_stops_cleanly_and_survives_a_failed_step(tmp_path, monkeypatch):
    target = Target.from_pretrained(save_tiny_model(tmp_path / "t", "llama", lm_head_scale=8.0), dtype=torch.float32)
    drafter, tree = build_drafter("eagle", target, seed=1), TreeConfig("chain", depth=2)
    alone = Generator(target, drafter, tree).generate(prompt="the cat sat", max_new_tokens=8)
    engine = Engine(target, drafter, tree, max_batch=4).start()
    try:
        async def read(handle):
            return [item async for item in handle.astream()]

        pieces = asyncio.run(read(engine.submit(prompt="the cat sat", max_new_tokens=8)))
        assert pieces[-1].token_ids == alone.token_ids and "".join(pieces[:-1]) == alone.text

        def boom():
            raise RuntimeError("boom")

        monkeypatch.setattr(engine, "_decode_step", boom)
        with pytest.raises(RuntimeError, match="boom"):
            engine.submit(prompt="the cat sat", max_new_tokens=8).result()
        monkeypatch.undo()
        assert engine.submit(prompt="the cat sat", max_new_tokens=8).result().token_ids == alone.token_ids
        waiting = [engine.submit(prompt="the cat sat", max_new_tokens=40) for _ in range(6)]
    finally:
        engine.stop()
    assert not engine.running_in_thread and engine.num_running == 0
    assert all(handle.done for handle in waiting)
    with pytest.raises(RuntimeError, match="stopping"):
        engine.submit(prompt="the cat sat")


def test_row_cache_keeps_rows_in_place():
    """RowCache: rows write at their own ends, keep compacts a path in place, move_row packs the rows (also
    before anything was written)."""
    from vlmspec.target.cache import RowCache

    empty = RowCache(num_layers=1, rows=3)
    empty.move_row(2, 0)
    assert empty.ends == [0, 0]
    cache = RowCache(num_layers=2, rows=2)
    for layer in range(2):                                    # row 0 gets 3 entries, row 1 as well
        keys = torch.arange(2 * 3, dtype=torch.float32).view(2, 1, 3, 1).expand(2, 1, 3, 4) + 10 * layer
        out_keys, _ = cache.update(keys, keys, layer)
        assert out_keys.shape == (2, 1, 3, 4)
    assert cache.ends == [3, 3]
    cache.keep(0, 0, [0, 2])                                  # row 0 keeps entries 0 and 2
    assert cache.ends == [2, 3]
    assert cache.layers[1].keys[0, 0, :2, 0].tolist() == [10.0, 12.0]
    keys = torch.full((2, 1, 1, 4), 7.0)
    for layer in range(2):
        out_keys, _ = cache.update(keys, keys, layer)
    assert cache.ends == [3, 4] and out_keys.shape[2] == 4    # up to the longest row
    assert cache.layers[0].keys[0, 0, 2, 0] == 7.0 and cache.layers[0].keys[1, 0, 3, 0] == 7.0
    cache.move_row(1, 0)
    assert cache.ends == [4] and cache.layers[0].keys[0, 0, :4, 0].tolist() == [3.0, 4.0, 5.0, 7.0]
