"""kestrel.decoding.build_tree / static_tree / dynamic_tree against plain-Python facts about the trees."""

import math

import pytest
import torch

from kestrel.decoding import build_tree, dynamic_tree, static_tree
from kestrel.reference.tree import ancestor_bits, ancestor_lists
from kestrel.reference.tree_verify import children_lists


def random_parents(sizes, T, generator):
    """A batch of random trees of the given used sizes, padded to T with -2."""
    rows = []
    for size in sizes:
        row = [-1] + [int(torch.randint(0, i, (1,), generator=generator)) for i in range(1, size)]
        rows.append(row + [-2] * (T - size))
    return torch.tensor(rows, dtype=torch.int32)


def check_against_reference(parents, tree):
    B, T = parents.shape
    assert torch.equal(tree.ancestor_bits, ancestor_bits(parents))
    assert tree.ancestor_bits.dtype == torch.int32 and tree.ancestor_bits.shape == (B, T, (T + 31) // 32)
    max_depth = 0
    for b, row in enumerate(parents.tolist()):
        paths = ancestor_lists(row)
        children = children_lists(row)
        leaves = [i for i, path in enumerate(paths) if path is not None and not children[i]]
        assert tree.num_leaves[b] == len(leaves)
        for i, path in enumerate(paths):
            assert tree.depth[b, i] == (len(path) - 1 if path else 0)
            assert tree.first_child[b, i] == (children[i][0] if children[i] else -1)
            if path is not None and row[i] >= 0:
                siblings = children[row[i]]
                later = siblings[siblings.index(i) + 1 :]
                assert tree.next_sibling[b, i] == (later[0] if later else -1)
            else:
                assert tree.next_sibling[b, i] == -1
            if path:
                max_depth = max(max_depth, len(path) - 1)
        for rank in range(tree.leaf_paths.shape[1]):
            expected = paths[leaves[rank]] if rank < len(leaves) else []
            width = tree.leaf_paths.shape[2]
            assert tree.leaf_paths[b, rank].tolist() == expected + [-1] * (width - len(expected))
    assert tree.max_depth == max_depth
    for name in ("parents", "depth", "first_child", "next_sibling", "leaf_paths", "num_leaves"):
        assert getattr(tree, name).dtype == torch.int32, name


@pytest.mark.parametrize("T", [1, 2, 7, 8, 9, 31, 32, 33, 63, 64, 65])
def test_build_tree_random(T):
    g = torch.Generator().manual_seed(T)
    sizes = [T, max(1, T // 2), max(1, T - 1)]
    parents = random_parents(sizes, T, g)
    tree = build_tree(parents)
    check_against_reference(parents, tree)
    lens = torch.tensor([5, 0, 17], dtype=torch.int32)
    assert torch.equal(tree.positions(lens), lens[:, None].long() + tree.depth.long())


@pytest.mark.parametrize("shape", ["chain", "star", "binary"])
def test_build_tree_shapes(shape):
    T = 40
    if shape == "chain":
        row = [-1] + list(range(T - 1))
    elif shape == "star":
        row = [-1] + [0] * (T - 1)
    else:
        row = [-1] + [(i - 1) // 2 for i in range(1, T)]
    parents = torch.tensor([row, row[:20] + [-2] * 20])
    tree = build_tree(parents)
    check_against_reference(parents.int(), tree)
    expected_depth = {"chain": T - 1, "star": 1, "binary": int(math.log2(T))}[shape]
    assert tree.max_depth == expected_depth


def test_build_tree_given_sizes_and_errors():
    parents = torch.tensor([[-1, 0, 0, 1]])
    tree = build_tree(parents, max_depth=3, num_leaves=3)
    assert tree.leaf_paths.shape == (1, 3, 4)
    assert tree.leaf_paths[0].tolist() == [[0, 2, -1, -1], [0, 1, 3, -1], [-1, -1, -1, -1]]
    with pytest.raises(ValueError, match=r"build_tree: parents must be \(B, T\)"):
        build_tree(torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="build_tree: parents must be an integer tensor"):
        build_tree(torch.tensor([[-1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"max_depth must be an int in \[0, T - 1\] = \[0, 3\], got 4"):
        build_tree(parents, max_depth=4)


def test_build_tree_meta_and_compile():
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, -2]], dtype=torch.int32)
    expected = build_tree(parents)
    compiled = torch.compile(lambda p: build_tree(p, max_depth=2, num_leaves=3), fullgraph=True)
    got = compiled(parents)
    for name in ("depth", "ancestor_bits", "first_child", "next_sibling", "leaf_paths", "num_leaves"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


MEDUSA_CHOICES = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 2), (2, 0), (0, 0, 1)]


def test_static_tree():
    tree = static_tree(MEDUSA_CHOICES)
    # ordered by depth then lexicographically
    assert tree.choices[:3] == [(0,), (1,), (2,)] and tree.choices[-2:] == [(0, 0, 0), (0, 0, 1)]
    node_of = {(): 0, **{c: i + 1 for i, c in enumerate(tree.choices)}}
    for choice, node in node_of.items():
        if choice:
            assert tree.parents[node] == node_of[choice[:-1]]
            assert tree.head[node] == len(choice) - 1 and tree.rank[node] == choice[-1]
    assert tree.max_depth == 3 and tree.num_nodes == len(MEDUSA_CHOICES) + 1
    buffers = tree.buffers(3)
    check_against_reference(tree.parents[None].expand(3, -1).contiguous(), buffers)
    assert buffers.num_leaves[0] == tree.num_leaves
    head_tokens = torch.arange(2 * 4 * 3).reshape(2, 4, 3) + 100
    cand = tree.candidates(torch.tensor([7, 8]), head_tokens)
    assert cand[:, 0].tolist() == [7, 8]
    for choice, node in node_of.items():
        if choice:
            assert torch.equal(cand[:, node], head_tokens[:, len(choice) - 1, choice[-1]])


def test_static_tree_errors():
    with pytest.raises(ValueError, match=r"choice \(1, 0\) has no parent \(1,\)"):
        static_tree([(0,), (1, 0)])
    with pytest.raises(ValueError, match="non-empty tuple of ranks >= 0, got"):
        static_tree([(0,), (-1,)])
    with pytest.raises(ValueError, match="duplicate"):
        static_tree([(0,), (0,)])
    tree = static_tree([(0,), (0, 3)])
    with pytest.raises(ValueError, match="needs 2 heads and top-4"):
        tree.candidates(torch.tensor([1]), torch.zeros(1, 2, 3, dtype=torch.long))


def dynamic_tree_reference(root, logprobs, tokens, max_nodes, topk):
    """The same beam expansion with Python lists: (parents, candidates) of one sequence."""
    K, k = len(logprobs), len(logprobs[0])
    per_head = []
    for h in range(K):
        ranks = sorted(range(k), key=lambda r: (-logprobs[h][r], r))[:topk] if topk < k else list(range(k))
        per_head.append([(min(logprobs[h][r], 0.0), tokens[h][r]) for r in ranks])
    nodes = [(lp, -1, tok) for lp, tok in per_head[0]]  # (score, parent generated index, token)
    frontier = list(range(len(nodes)))
    for h in range(1, K):
        level = []
        for f in frontier:
            for lp, tok in per_head[h]:
                level.append((nodes[f][0] + lp, f, tok))
        start = len(nodes)
        nodes += level
        ranked = sorted(range(len(level)), key=lambda i: (-level[i][0], i))[:topk]
        frontier = [start + i for i in ranked]
    kept = sorted(sorted(range(len(nodes)), key=lambda i: (-nodes[i][0], i))[: max_nodes - 1])
    index = {g: i + 1 for i, g in enumerate(kept)}
    parents = [-1] + [0 if nodes[g][1] < 0 else index[nodes[g][1]] for g in kept]
    return parents, [root] + [nodes[g][2] for g in kept]


@pytest.mark.parametrize("K,k,topk,max_nodes", [(1, 4, 4, 3), (3, 4, 3, 12), (4, 5, 4, 26), (2, 3, 3, 13)])
def test_dynamic_tree(K, k, topk, max_nodes):
    g = torch.Generator().manual_seed(K * 100 + max_nodes)
    B, V = 3, 50
    logits = torch.randn(B, K, V, generator=g)
    logits[0, :, :] = torch.round(logits[0] * 2) / 2  # ties in the scores
    top = torch.log_softmax(logits.double(), -1).float().topk(k, dim=-1)
    root = torch.tensor([3, 4, 5])
    parents, cand = dynamic_tree(root, top.values, top.indices, max_nodes, topk=topk)
    assert parents.shape == (B, max_nodes) and parents.dtype == torch.int32 and cand.dtype == torch.int64
    for b in range(B):
        ref_parents, ref_cand = dynamic_tree_reference(
            int(root[b]), top.values[b].tolist(), top.indices[b].tolist(), max_nodes, topk
        )
        assert parents[b].tolist() == ref_parents
        assert cand[b].tolist() == ref_cand
    tree = build_tree(parents, max_depth=min(K, max_nodes - 1), num_leaves=max_nodes - 1)
    check_against_reference(parents, build_tree(parents))
    assert int(tree.depth.max()) <= K


def test_dynamic_tree_errors():
    lp, tok = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"max_nodes must be an int in \[2, 1 \+ 12\]"):
        dynamic_tree(torch.tensor([1]), lp, tok, 14)
    with pytest.raises(ValueError, match=r"topk must be an int in \[1, 3\], got 4"):
        dynamic_tree(torch.tensor([1]), lp, tok, 4, topk=4)
    with pytest.raises(ValueError, match=r"root_tokens must be \(1,\)"):
        dynamic_tree(torch.tensor([1, 2]), lp, tok, 4)


def test_static_tree_candidate_index_built_once():
    """candidates() gathers with an index built once per (device, topk): no host-to-device copy per step."""
    tree = static_tree(MEDUSA_CHOICES)
    assert tree.max_rank == 2
    head_tokens = torch.arange(2 * 3 * 3).reshape(2, 3, 3)
    first = tree.candidates(torch.tensor([7, 8]), head_tokens)
    index = tree.flat_index(3, "cpu")
    assert tree.flat_index(3, torch.device("cpu")) is index
    assert torch.equal(tree.candidates(torch.tensor([7, 8]), head_tokens), first)
    assert tree.flat_index(3, "cpu") is index and tree.flat_index(4, "cpu") is not index


@pytest.mark.parametrize(
    "parents, where",
    [
        ([[-1, 5, 0]], r"parents\[0, 1\] = 5"),  # outside the tree: was an out-of-bounds gather (a crash on a GPU)
        ([[-1, 2, 1]], r"parents\[0, 1\] = 2"),  # a cycle / a later parent: was accepted with wrong depths
        ([[0, 0, 0]], r"parents\[0, 0\] = 0"),  # no root: was accepted
        ([[-1, 0, -2, 2]], r"parents\[0, 3\] = 2"),  # the child of a padding node
        ([[-1, 0, 1], [-1, -3, 0]], r"parents\[1, 1\] = -3"),
    ],
)
def test_build_tree_checks_parents_on_the_cpu(parents, where):
    with pytest.raises(
        ValueError,
        match=r"build_tree: " + where + " is not a valid parent: node 0 must be the "
        r"root \(-1\), node i > 0 padding \(-2\) or a child of a used node",
    ):
        build_tree(torch.tensor(parents))


def test_build_tree_empty_batch_and_int_arguments():
    """B = 0 read the max of empty depths; bools were taken as sizes."""
    tree = build_tree(torch.zeros(0, 4, dtype=torch.int32))
    assert tree.max_depth == 0 and tree.leaf_paths.shape == (0, 1, 1) and tree.ancestor_bits.shape == (0, 4, 1)
    assert build_tree(torch.zeros(0, 4, dtype=torch.int32), max_depth=2, num_leaves=3).leaf_paths.shape == (0, 3, 3)
    for label in ("max_depth", "num_leaves"):
        with pytest.raises(TypeError, match=f"build_tree: {label} must be None or an int, got bool True"):
            build_tree(torch.tensor([[-1, 0, 0]]), **{label: True})


def test_static_and_dynamic_tree_integer_arguments():
    numpy = pytest.importorskip("numpy")
    assert static_tree([(numpy.int64(0),), (1,)]).max_rank == 1  # NumPy ints are ints
    with pytest.raises(ValueError, match="each choice must be a non-empty tuple of ranks >= 0, got 'ab'"):
        static_tree([(0,), "ab"])
    logprobs, tokens = -torch.rand(1, 2, 3), torch.randint(0, 9, (1, 2, 3))
    with pytest.raises(ValueError, match=r"dynamic_tree: topk must be an int in \[1, 3\], got True"):
        dynamic_tree(torch.tensor([1]), logprobs, tokens, 4, topk=True)
    with pytest.raises(ValueError, match=r"max_nodes must be an int in \[2, 1 \+ 12\] \(K=2, topk=3\), got True"):
        dynamic_tree(torch.tensor([1]), logprobs, tokens, True)
    with pytest.raises(ValueError, match=r"head_logprobs must have at least one head and one token per head"):
        dynamic_tree(torch.tensor([1]), logprobs[:, :0], tokens[:, :0], 2)
