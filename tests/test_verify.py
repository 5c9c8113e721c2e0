import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlmspec.tree import Tree, TreeBuilder, TreeConfig
from vlmspec.verify import Sampler, SamplingConfig, VerifyResult, target_probs, verify, warp_logits

V = 32


def hand_tree() -> Tree:
    """tokens 10..15; 0 -> {1, 2}, 1 -> {3, 4}, 3 -> {5}."""
    return Tree(tokens=torch.tensor([[10, 11, 12, 13, 14, 15]]), parents=torch.tensor([[-1, 0, 0, 1, 1, 3]]),
                num_nodes=torch.tensor([6]))


def chain_tree() -> Tree:
    return Tree(tokens=torch.tensor([[20, 21, 22]]), parents=torch.tensor([[-1, 0, 1]]), num_nodes=torch.tensor([3]))


def argmax_logits(n: int, best: dict[int, int], seed: int = 0) -> torch.Tensor:
    """[1, n, V] random logits whose argmax at node i is best[i]."""
    logits = torch.randn(1, n, V, generator=torch.Generator().manual_seed(seed))  # [1, n, V]
    for node, token in best.items():
        logits[0, node, token] = 10.0
    return logits


@pytest.mark.parametrize(
    "best, accepted, bonus",
    [
        ({0: 11, 1: 13, 3: 15, 5: 7}, [0, 1, 3, 5], 7),  # all accepted, bonus after the full path
        ({0: 9}, [0, -1, -1, -1], 9),  # first rejected
        ({0: 12, 2: 5}, [0, 2, -1, -1], 5),  # accepted leaf at depth 1
        ({0: 11, 1: 13, 3: 2}, [0, 1, 3, -1], 2),  # rejected mid-path: bonus = argmax at node 3
        ({0: 11, 1: 14, 4: 3}, [0, 1, 4, -1], 3),  # second sibling accepted
    ],
)
def test_greedy_hand_built(best, accepted, bonus):
    result = verify(hand_tree(), argmax_logits(6, best))
    assert result.accepted.tolist() == [accepted]
    assert result.num_accepted.tolist() == [sum(a > 0 for a in accepted)]
    assert result.bonus.tolist() == [bonus]


def test_greedy_root_only():
    result = verify(Tree.root_only(torch.tensor([4, 5])), torch.eye(V)[[3, 8]][:, None])
    assert result.accepted.tolist() == [[0], [0]]
    assert result.num_accepted.tolist() == [0, 0]
    assert result.bonus.tolist() == [3, 8]


def pad_path(result: VerifyResult, width: int) -> list[int]:
    row = result.accepted[0].tolist()
    return row + [-1] * (width - len(row))


@pytest.mark.parametrize("case", range(4))
def test_greedy_batch_equals_each_alone(case):
    trees = [hand_tree(), chain_tree()]
    bests = [[{0: 11, 1: 14, 4: 3}, {0: 21, 1: 22, 2: 0}], [{0: 9}, {0: 21, 1: 5}],
             [{0: 11, 1: 13, 3: 15, 5: 7}, {0: 3}], [{}, {}]][case]
    alone = [argmax_logits(t.max_nodes, b, seed=case) for t, b in zip(trees, bests)]
    batch = torch.cat([alone[0], torch.cat([alone[1], torch.randn(1, 3, V)], dim=1)])  # [2, 6, V] padded
    result = verify(Tree.stack(trees), batch)
    for b, (tree, logits) in enumerate(zip(trees, alone)):
        single = verify(tree, logits)
        assert result.accepted[b].tolist() == pad_path(single, result.accepted.shape[1])
        assert result.num_accepted[b] == single.num_accepted[0]
        assert result.bonus[b] == single.bonus[0]
    assert result.emitted(Tree.stack(trees), 0) == VerifyResult.emitted(verify(trees[0], alone[0]), trees[0], 0)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.7, 10, 0.9), (1.3, 0, 0.5), (0.5, 1, 0.3), (2.0, 100, 0.99),
])
def test_warp_logits_matches_transformers(temperature, top_k, top_p):
    logits = 3 * torch.randn(8, 50, generator=torch.Generator().manual_seed(0))  # [8, 50]
    hf = LogitsProcessorList()
    if temperature != 1.0:
        hf.append(TemperatureLogitsWarper(temperature))
    if top_k:
        hf.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        hf.append(TopPLogitsWarper(top_p))
    expected = hf(torch.zeros(8, 1, dtype=torch.long), logits.clone())  # [8, 50]
    actual = warp_logits(logits, SamplingConfig(temperature, top_p, top_k))  # [8, 50]
    assert torch.equal(actual, expected)
    assert torch.equal(warp_logits(logits[:, None], SamplingConfig(temperature, top_p, top_k))[:, 0], expected)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                    dict(top_k=1.5)])
def test_sampling_config_rejects(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


# --- distribution tests -----------------------------------------------------------------------------------------
# A stub drafter and target over a vocabulary of 6. With N samples, the empirical distribution's expected TV
# distance from the truth is 0.5 * sum_v sqrt(p_v (1 - p_v) / N) <= 0.5 * sqrt(SMALL_V / N) (Cauchy-Schwarz); TV
# moves by at most 1/N per sample, so (McDiarmid) exceeding that by t has probability <= exp(-2 N t^2). The bound
# 3 * 0.5 * sqrt(V / N) (t = 2x the expectation) fails by chance with probability <= exp(-4 V) < 1e-10 for V = 6;
# runs are seeded anyway.
SMALL_V = 6
NUM_SAMPLES = 20_000
GEN = torch.Generator().manual_seed(1234)
TARGET_ROOT = torch.tensor([2.0, 1.2, 0.8, 0.0, -0.5, -1.0])  # [V]
TARGET_NEXT = 1.5 * torch.randn(SMALL_V, SMALL_V, generator=GEN)  # [V, V] target logits after token x: row x
DRAFT_ROOT = torch.tensor([0.25, 0.1, 0.05, 0.2, 0.1, 0.3]).log()  # [V] unlike the target on purpose
DRAFT_NEXT = torch.randn(SMALL_V, SMALL_V, generator=GEN)  # [V, V] draft logits after token x: row x
CONFIGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=3), SamplingConfig(1.0, top_p=0.8)]


def tv_bound(n: int) -> float:
    return 3 * 0.5 * math.sqrt(SMALL_V / n)


def tv(samples: torch.Tensor, probs: torch.Tensor) -> float:
    empirical = torch.bincount(samples, minlength=SMALL_V).double() / len(samples)  # [V]
    return 0.5 * (empirical - probs.double()).abs().sum().item()


def stub_step(sampler: Sampler, config: TreeConfig, leaves=()) -> tuple[list[int], int]:
    """One speculative step of the stub at the start of an answer: the drafter builds its tree with the request's
    child scores, the target verifies it with its scores. Returns the emitted tokens and the accepted count."""
    builder = TreeBuilder(config, 0, leaves=leaves)
    while frontier := builder.frontier():
        logits = torch.stack([DRAFT_ROOT if n == 0 else DRAFT_NEXT[builder.token(n)] for n in frontier])  # [F, V]
        builder.expand(sampler.scores(logits, [builder.depth(frontier[0])] * len(frontier)))
    tree = builder.build()
    logits = TARGET_NEXT[tree.tokens[0]]  # [N, V]
    logits[0] = TARGET_ROOT
    result = verify(tree, sampler.scores(logits, tree.depths()[0].tolist())[None])
    return result.emitted(tree, 0), int(result.num_accepted[0])


def plain_tokens(sampler: Sampler, count: int = 2) -> list[int]:
    """The stub target decoding alone with the same sampler: one token per position."""
    tokens = [int(sampler.scores(TARGET_ROOT[None], [0])[0].argmax())]
    while len(tokens) < count:
        tokens.append(int(sampler.scores(TARGET_NEXT[tokens[-1]][None], [len(tokens)])[0].argmax()))
    return tokens


def test_sampler_draws_exact_samples():
    for cfg in CONFIGS:
        first = torch.tensor([int(Sampler(cfg, seed).scores(TARGET_ROOT[None], [0])[0].argmax())
                              for seed in range(NUM_SAMPLES // 2)])
        assert tv(first, target_probs(TARGET_ROOT, cfg)) < tv_bound(NUM_SAMPLES // 2), cfg


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("config, leaves", [
    (TreeConfig("dynamic", depth=2, topk=3, total_tokens=4), ()),
    (TreeConfig("dynamic", depth=3, topk=3, total_tokens=8, min_prob=0.12), {2}),   # cut at a stand-in EOS
    (TreeConfig("chain", depth=3), ()),
])
def test_speculative_sampling_is_the_target_sampling(cfg, config, leaves):
    """Whatever the tree, each seed's emitted tokens are exactly what the target alone samples with that seed, and
    so the first two follow the target's distribution; the drafts are both accepted and rejected."""
    n = 1500
    first, second, accepted = [], [], []
    for seed in range(n):
        emitted, num_accepted = stub_step(Sampler(cfg, seed), config, leaves)
        expected = plain_tokens(Sampler(cfg, seed), len(emitted))
        assert emitted == expected, seed
        first.append(emitted[0])
        second.append(expected[1] if len(expected) > 1 else plain_tokens(Sampler(cfg, seed))[1])
        accepted.append(num_accepted)
    first, second = torch.tensor(first), torch.tensor(second)
    assert tv(first, target_probs(TARGET_ROOT, cfg)) < tv_bound(n)
    for a in range(SMALL_V):
        rows = first == a
        if rows.sum() > 300:
            assert tv(second[rows], target_probs(TARGET_NEXT[a], cfg)) < tv_bound(int(rows.sum())), a
    assert 0 in accepted and max(accepted) >= 1


class OneNoiseSampler(Sampler):
    """A broken sampler: the same Gumbel noise at every position, so a token's noise is not independent of the
    tokens before it."""

    def noise(self, position, vocab, device):
        return super().noise(0, vocab, device)


def test_distribution_test_can_fail():
    cfg = CONFIGS[0]
    tokens = torch.tensor([plain_tokens(OneNoiseSampler(cfg, seed)) for seed in range(NUM_SAMPLES)])  # [n, 2]
    distances = [tv(tokens[tokens[:, 0] == a, 1], target_probs(TARGET_NEXT[a], cfg)) for a in range(3)]
    assert max(distances) > 3 * tv_bound(int((tokens[:, 0] == 2).sum()))


def test_sampler_repeats_with_seed_and_varies_by_position():
    cfg = CONFIGS[1]
    logits = TARGET_NEXT[:3]  # [3, V]
    a, b = Sampler(cfg, 7).scores(logits, [0, 1, 2]), Sampler(cfg, 7).scores(logits, [0, 1, 2])
    assert torch.equal(a, b)
    noise = [Sampler(cfg, 7).noise(n, 1000, torch.device("cpu")) for n in (0, 1)]
    assert not torch.equal(noise[0], noise[1])
    assert Sampler(cfg).seed != Sampler(cfg).seed                       # no seed: a random one
    greedy = Sampler(SamplingConfig(), 7)
    assert greedy.scores(logits, [0, 1, 2]) is logits


def test_draft_equal_to_target_is_always_accepted():
    """A drafter with the target's own logits, perturbed with the same noise, guesses every sample."""
    cfg = SamplingConfig(temperature=0.7, top_k=4)
    for seed in range(200):
        sampler = Sampler(cfg, seed)
        builder = TreeBuilder(TreeConfig("chain", depth=3), 0)
        while frontier := builder.frontier():
            logits = TARGET_ROOT if frontier[0] == 0 else TARGET_NEXT[builder.token(frontier[0])]
            builder.expand(sampler.scores(logits[None], [builder.depth(frontier[0])]))
        tree = builder.build()
        logits = TARGET_NEXT[tree.tokens[0]]
        logits[0] = TARGET_ROOT
        assert verify(tree, sampler.scores(logits, tree.depths()[0].tolist())[None]).num_accepted.item() == 3
