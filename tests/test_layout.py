"""Layouts: the keys each query reads equal the pattern's definition, built in closed form."""

import pytest
import torch

from kernels import make_layout

# (kind, kwargs) cases, small enough for brute force; N values include ones that are not
# multiples of the block or of the stride.
CASES = [
    ("all", {}),
    ("local", {"window": 20}),
    ("local", {"window": 16}),
    ("local", {"window": 1}),
    ("strided", {"stride": 7}),
    ("strided", {"stride": 16}),
    ("strided", {"stride": 40}),
    ("fixed", {"stride": 24, "summary": 4}),
    ("fixed", {"stride": 8, "summary": 2}),
    ("fixed", {"stride": 32, "summary": 16}),
    ("fixed", {"stride": 24, "summary": 4, "distinct_summaries": True}),
    ("fixed", {"stride": 16, "summary": 8, "distinct_summaries": True}),
]


def brute_force(kind, n, head, window=None, stride=None, summary=None, distinct_summaries=False):
    """[N, N] mask straight from the index sets of the paper (Python sets, no shared code)."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if kind == "all":
            keys = set(range(i + 1))
        elif kind == "local":
            keys = set(range(max(0, i - window), i + 1))
        elif kind == "strided":
            keys = {j for j in range(i + 1) if (i - j) % stride == 0}
        else:
            sub = head % (stride // summary) if distinct_summaries else 0
            cols = set(range(stride - (sub + 1) * summary, stride - sub * summary))
            keys = {j for j in range(i + 1) if j // stride == i // stride or j % stride in cols}
        mask[i, sorted(keys)] = True
    return mask


def listed_pairs(table, h):
    return {(r, int(c)) for r in range(table.count.shape[1]) for c in table.row(h, r)}


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{'-'.join(map(str, v.values()))}" for k, v in CASES])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("n", [64, 77, 130])
def test_layout_reads_exactly_the_pattern(kind, kw, block, n):
    heads = 3
    layout = make_layout(kind, n, block, heads=heads, **kw)
    for h in range(heads):
        assert torch.equal(layout.dense_mask(h), brute_force(kind, n, h, **kw)), f"head {h}"


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{'-'.join(map(str, v.values()))}" for k, v in CASES])
@pytest.mark.parametrize("block", [16, 32])
def test_full_blocks_need_no_mask_and_no_block_is_wasted(kind, kw, block):
    n, heads = 100, 2
    layout = make_layout(kind, n, block, heads=heads, **kw)
    b = layout.block
    for h in range(layout.table_heads):
        for table, full in ((layout.kv_full, True), (layout.kv_partial, False)):
            for qb, kb in listed_pairs(table, h):
                i, vq = layout.original_index(qb * b + torch.arange(b))
                j, vk = layout.original_index(kb * b + torch.arange(b))
                allowed = layout.allowed(i[:, None], j[None, :], h)
                valid = vq[:, None] & vk[None, :]
                assert allowed[valid].any(), f"block ({qb}, {kb}) listed but reads nothing"
                if full:
                    assert allowed[valid].all(), f"block ({qb}, {kb}) marked full but needs a mask"
        # the backward's transposed lists hold the same pairs
        for kv, qt in ((layout.kv_full, layout.q_full), (layout.kv_partial, layout.q_partial)):
            assert listed_pairs(kv, h) == {(qb, kb) for kb, qb in listed_pairs(qt, h)}


def test_heads_share_tables_unless_summaries_are_distinct():
    assert make_layout("fixed", 256, 16, heads=4, stride=32, summary=8).table_heads == 1
    lay = make_layout("fixed", 256, 16, heads=4, stride=32, summary=8, distinct_summaries=True)
    assert lay.table_heads == 4
    assert [lay.summary_range(h) for h in range(4)] == [(24, 32), (16, 24), (8, 16), (0, 8)]
    assert lay.kv_full.count.shape == (4, lay.num_blocks)


def test_large_layout_is_built_in_closed_form():
    """N = 65,536: the tables grow with the listed blocks, nothing is N x N."""
    n = 65536
    for kind, kw in [("local", {"window": 256}), ("strided", {"stride": 256}),
                     ("fixed", {"stride": 256, "summary": 32})]:
        layout = make_layout(kind, n, 64, heads=8, **kw)
        listed = int(layout.blocks_per_head()[0])
        entries = sum(t.index.numel() for t in (layout.kv_full, layout.kv_partial, layout.q_full, layout.q_partial))
        assert entries == 2 * listed, kind  # each listed block once in kv and once in q tables
        assert layout.density() < 0.2


def test_strided_layout_is_truly_block_sparse():
    """In the transposed order one 64x64 image's strided half is ~1/R of dense, not ~50%."""
    layout = make_layout("strided", 12288, 64, stride=192)
    assert layout.density() < 0.01
    assert int(layout.kv_partial.count.sum()) == layout.num_blocks  # only diagonal blocks need masks


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (("dilated", 64, 16), {}, "kind must be one of"),
        (("all", 64, 48), {}, "block must be one of"),
        (("all", 0, 16), {}, "seq_len must be an integer >= 1"),
        (("all", 64, 16), {"heads": 0}, "heads must be an integer >= 1"),
        (("local", 64, 16), {}, "needs window="),
        (("local", 64, 16), {"window": 8, "stride": 8}, "stride= is not used by kind='local'"),
        (("strided", 64, 16), {}, "needs stride="),
        (("strided", 64, 16), {"stride": 8, "window": 8}, "window= is not used by kind='strided'"),
        (("strided", 64, 16), {"stride": 0}, "stride must be an integer >= 1"),
        (("fixed", 64, 16), {"stride": 8}, "needs summary="),
        (("fixed", 64, 16), {"stride": 8, "summary": 9}, "summary must be <= stride"),
        (("all", 64, 16), {"distinct_summaries": True}, "only meaningful for kind='fixed'"),
        (("local", 64.0, 16), {"window": 8}, "seq_len must be an integer"),
    ],
)
def test_bad_layout_arguments_are_refused(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_layout(*args, **kwargs)
