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
from vlmspec.verify import SamplingConfig, VerifyResult, target_probs, verify_greedy, verify_sampling, warp_logits

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
    result = verify_greedy(hand_tree(), argmax_logits(6, best))
    assert result.accepted.tolist() == [accepted]
    assert result.num_accepted.tolist() == [sum(a > 0 for a in accepted)]
    assert result.bonus.tolist() == [bonus]


def test_greedy_root_only():
    result = verify_greedy(Tree.root_only(torch.tensor([4, 5])), torch.eye(V)[[3, 8]][:, None])
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
    result = verify_greedy(Tree.stack(trees), batch)
    for b, (tree, logits) in enumerate(zip(trees, alone)):
        single = verify_greedy(tree, logits)
        assert result.accepted[b].tolist() == pad_path(single, result.accepted.shape[1])
        assert result.num_accepted[b] == single.num_accepted[0]
        assert result.bonus[b] == single.bonus[0]
    assert result.emitted(Tree.stack(trees), 0) == VerifyResult.emitted(verify_greedy(trees[0], alone[0]), trees[0], 0)


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
# A stub drafter and target over a vocabulary of 6: the root gets 3 children drawn without replacement from the
# draft (Gumbel-top-3), the first child gets one child. Nodes: 0 root, 1-3 root children in draw order, 4 under 1.
# With N samples, the empirical distribution's expected TV distance from the truth is
# 0.5 * sum_v sqrt(p_v (1 - p_v) / N) <= 0.5 * sqrt(SMALL_V / N) (Cauchy-Schwarz); TV moves by at most 1/N per
# sample, so (McDiarmid) exceeding that by t has probability <= exp(-2 N t^2). The bound 3 * 0.5 * sqrt(V / N)
# (t = 2x the expectation) fails by chance with probability <= exp(-4 V) < 1e-10 for V = 6; runs are seeded anyway.
SMALL_V = 6
NUM_SAMPLES = 20_000
GEN = torch.Generator().manual_seed(1234)
TARGET_ROOT = torch.tensor([2.0, 1.2, 0.8, 0.0, -0.5, -1.0])  # [V]
TARGET_NEXT = 1.5 * torch.randn(SMALL_V, SMALL_V, generator=GEN)  # [V, V] target logits after token x: row x
DRAFT_ROOT = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])  # [V] unlike the target on purpose
DRAFT_NEXT = torch.softmax(torch.randn(SMALL_V, SMALL_V, generator=GEN), -1)  # [V, V] draft after token x: row x
DRAFT_TOP = torch.tensor([0.3, 0.05, 0.25, 0.1, 0.2, 0.1])  # [V] a greedy drafter's root children: tokens 0, 2, 4


def tv_bound(n: int) -> float:
    return 3 * 0.5 * math.sqrt(SMALL_V / n)


def tv(samples: torch.Tensor, probs: torch.Tensor) -> float:
    empirical = torch.bincount(samples, minlength=SMALL_V).double() / len(samples)  # [V]
    return 0.5 * (empirical - probs.double()).abs().sum().item()


def sampled_trees(n: int, draft_root: torch.Tensor, gen: torch.Generator, deterministic: bool = False):
    """n stub trees [n, 5] and their target logits [n, 5, V]."""
    gumbel = -torch.log(-torch.log(torch.rand(n, SMALL_V, generator=gen)))  # [n, V]
    keys = draft_root.log() if deterministic else draft_root.log() + gumbel  # [n, V] or [V]
    first3 = keys.expand(n, SMALL_V).topk(3, dim=-1).indices  # [n, 3] draw order
    x1 = first3[:, 0]  # [n]
    x4 = torch.multinomial(DRAFT_NEXT[x1], 1, generator=gen)[:, 0]  # [n]
    tokens = torch.cat([torch.zeros(n, 1, dtype=torch.long), first3, x4[:, None]], dim=1)  # [n, 5]
    draft_probs = torch.zeros(n, 5, SMALL_V, dtype=torch.float64)  # [n, 5, V]
    draft_probs[:, 0] = draft_root
    draft_probs[:, 1] = DRAFT_NEXT[x1]
    tree = Tree(tokens, torch.tensor([-1, 0, 0, 0, 1]).expand(n, 5), torch.full((n,), 5),
                None if deterministic else draft_probs)
    target_logits = TARGET_NEXT[tokens]  # [n, 5, V]
    target_logits[:, 0] = TARGET_ROOT
    return tree, target_logits


def first_two_emitted(tree: Tree, result: VerifyResult):
    """First emitted token [n]; and the second [n] where the first was an accepted draft (else -1)."""
    batch = torch.arange(tree.batch_size)
    num = result.num_accepted
    first = torch.where(num >= 1, tree.tokens[batch, result.accepted[:, 1].clamp(min=0)], result.bonus)  # [n]
    second_node = result.accepted[:, 2] if result.accepted.shape[1] > 2 else torch.zeros_like(num)  # [n]
    second = torch.where(num >= 2, tree.tokens[batch, second_node.clamp(min=0)], result.bonus)  # [n]
    return first, torch.where(num >= 1, second, -1)


CONFIGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=3), SamplingConfig(1.0, top_p=0.8)]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_sampling_is_lossless(cfg, deterministic):
    gen = torch.Generator().manual_seed(0)
    tree, logits = sampled_trees(NUM_SAMPLES, DRAFT_TOP if deterministic else DRAFT_ROOT, gen, deterministic)
    result = verify_sampling(tree, logits, cfg, gen)
    first, second = first_two_emitted(tree, result)
    assert tv(first, target_probs(TARGET_ROOT, cfg)) < tv_bound(NUM_SAMPLES)
    # the second token, given that node 1 (which has a child) was accepted with token `a`
    node1_accepted = result.accepted[:, 1] == 1  # [n]
    a = tree.tokens[node1_accepted, 1].mode().values.item()
    rows = node1_accepted & (tree.tokens[:, 1] == a)  # [n]
    assert rows.sum() > 1000
    assert tv(second[rows], target_probs(TARGET_NEXT[a], cfg)) < tv_bound(int(rows.sum()))
    assert 0 < result.num_accepted.float().mean() < 2  # some accepted, some rejected


def wrong_verify_without_residual(tree: Tree, target_logits: torch.Tensor, cfg, gen) -> torch.Tensor:
    """A broken verifier: tries only the first child, and after rejecting it samples the bonus from p itself
    instead of the residual normalize(max(p - q, 0)). Returns the first emitted token [n]."""
    p = target_probs(target_logits[:, 0], cfg)  # [n, V]
    q = tree.draft_probs[:, 0]  # [n, V]
    x = tree.tokens[:, 1]  # [n]
    batch = torch.arange(len(x))
    accept = torch.rand(len(x), generator=gen, dtype=torch.float64) * q[batch, x] < p[batch, x]  # [n]
    return torch.where(accept, x, torch.multinomial(p, 1, generator=gen)[:, 0])


def test_distribution_test_can_fail():
    gen = torch.Generator().manual_seed(0)
    cfg = CONFIGS[0]
    tree, logits = sampled_trees(NUM_SAMPLES, DRAFT_ROOT, gen)
    assert tv(wrong_verify_without_residual(tree, logits, cfg, gen), target_probs(TARGET_ROOT, cfg)) > 3 * tv_bound(
        NUM_SAMPLES)


def test_draft_equal_to_target_is_always_accepted():
    cfg = SamplingConfig(temperature=0.7, top_k=4)
    gen = torch.Generator().manual_seed(0)
    tree, logits = sampled_trees(2000, target_probs(TARGET_ROOT, cfg), gen)
    result = verify_sampling(tree, logits, cfg, gen)
    assert (result.num_accepted >= 1).all()
    assert (result.accepted[:, 1] == 1).all()  # the first draw is accepted


def builder_trees(n: int, config: TreeConfig, gen: torch.Generator, leaves=()):
    """n trees sampled by TreeBuilder from the stub drafter (pruned, so of different shapes), stacked, and their
    target logits [n, N, V]: after the root TARGET_ROOT, after any other node with token x TARGET_NEXT[x]."""
    trees = []
    for _ in range(n):
        builder = TreeBuilder(config, 0, gen, sample=True, leaves=leaves)
        while frontier := builder.frontier():
            tokens = torch.tensor([builder.token(i) for i in frontier])  # [F]
            draft = torch.stack([DRAFT_ROOT if i == 0 else DRAFT_NEXT[x] for i, x in zip(frontier, tokens)])
            builder.expand(draft.log())  # [F, V]
        trees.append(builder.build())
    tree = Tree.stack(trees)
    target_logits = TARGET_NEXT[tree.tokens]  # [n, N, V]
    target_logits[:, 0] = TARGET_ROOT
    return tree, target_logits


def test_builder_trees_are_lossless():
    """End to end with TreeBuilder's dynamic sampled trees, whose kept siblings vary with the draws."""
    n, cfg = 3000, CONFIGS[2]
    gen = torch.Generator().manual_seed(0)
    tree, logits = builder_trees(n, TreeConfig("dynamic", depth=2, topk=3, total_tokens=4), gen)
    assert len(set(tree.num_nodes.tolist())) == 1 and len(set(map(tuple, tree.parents.tolist()))) > 1
    first, _ = first_two_emitted(tree, verify_sampling(tree, logits, cfg, gen))
    assert tv(first, target_probs(TARGET_ROOT, cfg)) < tv_bound(n)


def test_trees_cut_at_leaves_and_min_prob_are_lossless():
    """Nodes of token 2 (a stand-in EOS) and nodes ranked under min_prob get no children, so whether a node has
    children depends on its own token and draws: the first two emitted tokens still follow the target."""
    n, cfg = 6000, CONFIGS[0]
    gen = torch.Generator().manual_seed(3)
    tree, logits = builder_trees(n, TreeConfig("dynamic", depth=3, topk=3, total_tokens=8, min_prob=0.12), gen,
                                 leaves={2})
    assert len(set(tree.num_nodes.tolist())) > 1                       # the cuts change the tree's size
    first, second = first_two_emitted(tree, verify_sampling(tree, logits, cfg, gen))
    assert tv(first, target_probs(TARGET_ROOT, cfg)) < tv_bound(n)
    for a in range(SMALL_V):
        rows = (first == a) & (second >= 0)
        if rows.sum() > 500:
            assert tv(second[rows], target_probs(TARGET_NEXT[a], cfg)) < tv_bound(int(rows.sum())), a


def test_sampling_repeats_with_seed():
    tree, logits = sampled_trees(500, DRAFT_ROOT, torch.Generator().manual_seed(0))
    cfg = CONFIGS[1]
    results = [verify_sampling(tree, logits, cfg, torch.Generator().manual_seed(7)) for _ in range(2)]
    for name in ("accepted", "num_accepted", "bonus"):
        assert torch.equal(getattr(results[0], name), getattr(results[1], name))


def test_sampling_rejects_greedy_config():
    tree, logits = sampled_trees(2, DRAFT_ROOT, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="greedy"):
        verify_sampling(tree, logits, SamplingConfig(), torch.Generator())


@pytest.mark.parametrize("rule", ["earlier_draws", "own_token"])
def test_keeping_a_draw_by_its_own_token_is_biased(rule):
    """Why TreeBuilder ranks a sampled child by its earlier siblings only. The root draws x1, x2 from q; x1's
    child g is token 0; the tree keeps x1 and then either x2 or g. Deciding by x2's own cum log-prob
    (min(l1, l2) >= l1 + log q(g)), as ranking by plain cum would, makes the first emitted token miss the target
    by TV ~ 0.012; deciding from earlier draws only (here: q(x1) < 0.35) keeps verification exact."""
    n, vocab = 200_000, 4
    gen = torch.Generator().manual_seed(0)
    draft = torch.tensor([0.45, 0.3, 0.15, 0.1], dtype=torch.float64)  # [4]
    target = torch.tensor([0.05, 0.05, 0.45, 0.45])  # [4]
    gumbel = -torch.log(-torch.log(torch.rand(n, vocab, generator=gen, dtype=torch.float64)))  # [n, 4]
    x1, x2 = (draft.log() + gumbel).topk(2, dim=-1).indices.unbind(-1)  # [n], [n]
    l1, l2 = draft.log()[x1], draft.log()[x2]  # [n], [n]
    if rule == "own_token":
        keep_x2 = torch.minimum(l1, l2) >= l1 + math.log(0.97)  # [n]
    else:
        keep_x2 = l1 < math.log(0.35)  # [n]
    tokens = torch.stack([torch.zeros_like(x1), x1, torch.where(keep_x2, x2, 0)], dim=1)  # [n, 3]
    parents = torch.stack([torch.full_like(x1, -1), torch.zeros_like(x1), torch.where(keep_x2, 0, 1)], dim=1)
    draft_probs = torch.zeros(n, 3, vocab, dtype=torch.float64)  # [n, 3, 4]
    draft_probs[:, 0] = draft
    draft_probs[:, 1] = torch.tensor([0.97, 0.01, 0.01, 0.01])
    logits = torch.zeros(n, 3, vocab)  # [n, 3, 4] only the root's row matters for the first token
    logits[:, 0] = target.log()
    tree = Tree(tokens, parents, torch.full((n,), 3), draft_probs)
    first, _ = first_two_emitted(tree, verify_sampling(tree, logits, SamplingConfig(1.0), gen))
    empirical = torch.bincount(first, minlength=vocab).double() / n  # [4]
    distance = 0.5 * (empirical - target.double()).abs().sum().item()
    assert (distance < 3 * 0.5 * math.sqrt(vocab / n)) == (rule == "earlier_draws")
