import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gdn
from gdn.planner import SENTINEL, bucket, padded_sizes


def test_design_example():
    p = gdn.plan([0, 100, 164, 165])
    assert p.chunk_indices[: p.num_chunks].tolist() == [[0, 0], [0, 1], [1, 0], [2, 0]]
    assert p.chunk_offsets[: p.num_seqs + 1].tolist() == [0, 2, 3, 4]
    assert (p.num_seqs, p.num_chunks, p.num_tokens) == (3, 4, 165)


def test_empty_sequence_in_the_middle_keeps_its_true_id():
    # vLLM's eq(0).cumsum trick would give seq ids 0, 1 here; the true ids are 0, 2 (FLA #909).
    p = gdn.plan([0, 70, 70, 75])
    assert p.chunk_indices[: p.num_chunks].tolist() == [[0, 0], [0, 1], [2, 0]]
    assert p.chunk_offsets[:4].tolist() == [0, 2, 2, 3]
    assert (p.num_seqs, p.nonempty_seqs) == (3, 2)


def _check_invariants(cu, p, bt):
    cu = np.asarray(cu)
    lens = np.diff(cu)
    nc = -(-lens // bt)
    n, nt = lens.size, int(nc.sum())
    assert (p.num_seqs, p.num_chunks, p.num_tokens) == (n, nt, int(cu[-1]))
    for a in (p.cu_seqlens, p.chunk_indices, p.chunk_offsets):
        assert a.dtype == np.int32 and not a.flags.writeable
    assert p.chunk_indices.shape == (p.padded_chunks, 2)
    assert p.chunk_offsets.shape == (p.padded_seqs + 1,) == p.cu_seqlens.shape
    assert p.padded_seqs >= n and p.padded_chunks >= nt and p.padded_tokens >= cu[-1]
    co = p.chunk_offsets
    assert co[0] == 0 and np.all(np.diff(co[: n + 1]) == nc) and np.all(co[n:] == nt)
    for s in range(n):
        for c in range(nc[s]):
            assert tuple(p.chunk_indices[co[s] + c]) == (s, c)
    assert np.all(p.chunk_indices[nt:] == SENTINEL)
    assert np.array_equal(p.cu_seqlens[: n + 1], cu) and np.all(p.cu_seqlens[n:] == cu[-1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=0, max_size=40), st.sampled_from([16, 32, 64, 128]))
def test_invariants(lens, bt):
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    _check_invariants(cu, gdn.plan(cu, chunk_size=bt), bt)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**7), st.integers(1, 256))
def test_bucket_properties(n, floor):
    b = bucket(n, floor)
    assert b >= n and b >= floor
    assert bucket(b, floor) == b  # idempotent: a padded size is its own bucket
    assert bucket(n + 1, floor) >= b  # monotone
    if n > floor:
        assert b - n < n / 8 + 1  # bounded waste: below 1/8 of the real size


def test_seq_bucket_range():
    """Exactly the sequence counts that pad to N_pad (what a kernel traced with a device plan may
    assume about N); None for a row count no batch pads to."""
    from gdn.planner import seq_bucket_range

    for n_pad in range(0, 300):
        counts = [n for n in range(0, 400) if padded_sizes(64, n, 8)[1] == n_pad]
        if counts:
            assert seq_bucket_range(n_pad) == (min(counts), max(counts)), n_pad
        else:
            assert seq_bucket_range(n_pad) is None, n_pad
    assert seq_bucket_range(1) == (0, 1) and seq_bucket_range(2) == (2, 2) and seq_bucket_range(8) == (3, 8) and seq_bucket_range(128) == (121, 128)


def test_padded_sizes_whole_chunks():
    for t in (0, 1, 63, 64, 65, 1000, 32768, 300_001):
        tp, _, _ = padded_sizes(t, 1, 1)
        assert tp >= t and tp % 64 == 0


def test_same_bucket_for_nearby_batches():
    a = gdn.plan([0, 1000, 1500, 3000])
    b = gdn.plan([0, 990, 1500, 2990])
    assert (a.padded_seqs, a.padded_chunks, a.padded_tokens) == \
           (b.padded_seqs, b.padded_chunks, b.padded_tokens)


def test_num_tokens_sets_padded_tokens():
    p = gdn.plan([0, 10, 20], num_tokens=50)
    assert p.padded_tokens == 50 and p.num_tokens == 20


def test_host_inputs_of_every_kind():
    torch = pytest.importorskip("torch")
    ref = gdn.plan([0, 3, 70])
    for cu in ([0, 3, 70], np.array([0, 3, 70], np.int32), np.array([0, 3, 70], np.uint64),
               torch.tensor([0, 3, 70])):
        p = gdn.plan(cu)
        assert np.array_equal(p.chunk_indices, ref.chunk_indices)


@pytest.mark.parametrize("cu, exc, words", [
    ([[0, 1], [2, 3]], ValueError, "1-D"),
    ([0.0, 1.5], TypeError, "integers"),
    ([0, 5.0], TypeError, "integers"),
    (["0", "1"], TypeError, "integers"),
    ([True, False], TypeError, "integers"),
    ([1, 5], ValueError, "start at 0"),
    ([0, 5, 3], ValueError, "non-decreasing"),
    ([], ValueError, "at least one"),
])
def test_errors(cu, exc, words):
    with pytest.raises(exc, match=words):
        gdn.plan(cu)


def test_error_past_num_tokens_and_bad_chunk_size():
    with pytest.raises(ValueError, match="num_tokens"):
        gdn.plan([0, 10, 30], num_tokens=20)
    with pytest.raises(ValueError, match="chunk_size"):
        gdn.plan([0, 10], chunk_size=48)
    with pytest.raises(TypeError, match="chunk_size"):
        gdn.plan([0, 10], chunk_size=64.0)


def test_device_array_is_rejected_with_the_reason():
    jax = pytest.importorskip("jax")

    class FakeCuda:  # a torch-like tensor on a GPU, without needing one
        __module__ = "torch"
        device = type("D", (), {"type": "cuda", "__str__": lambda s: "cuda:0"})()

    with pytest.raises(ValueError, match="sync"):
        gdn.plan(FakeCuda())
    with pytest.raises(ValueError, match="sync"):
        jax.jit(lambda c: gdn.plan(c).chunk_offsets)(np.array([0, 4]))


def test_plan_is_immutable():
    p = gdn.plan([0, 10])
    with pytest.raises(Exception):
        p.num_seqs = 3
    with pytest.raises(ValueError):
        p.chunk_indices[0, 0] = 5


def test_planning_4096_sequences_is_fast():
    rng = np.random.default_rng(0)
    cu = np.concatenate([[0], np.cumsum(rng.integers(0, 1024, 4096))])
    gdn.plan(cu)
    t0 = time.perf_counter()
    for _ in range(50):
        gdn.plan(cu)
    per_call = (time.perf_counter() - t0) / 50
    # vectorized NumPy takes ~0.2 ms here; a Python loop over 4096 sequences and ~33k chunks
    # takes tens of ms. The generous bound only catches that blow-up on a loaded CI machine.
    assert per_call < 5e-3, per_call


def test_plan_is_a_jax_pytree_with_static_padded_sizes():
    jax = pytest.importorskip("jax")
    p = gdn.plan([0, 100, 164, 165])
    leaves, tree = jax.tree_util.tree_flatten(p)
    assert len(leaves) == 3
    q = gdn.plan([0, 90, 170, 171])
    assert jax.tree_util.tree_structure(q) == tree  # same bucket -> same treedef -> one compile
    traces = []

    @jax.jit
    def f(pl):
        traces.append(1)
        assert pl.num_seqs is None and pl.nonempty_seqs is None and pl.padded_seqs == p.padded_seqs
        return pl.chunk_offsets[-1]

    assert int(f(p)) == 4 and int(f(q)) == 5 and len(traces) == 1
    dp = p.to_jax()
    assert dp.num_seqs == 3 and dp.nonempty_seqs == 3 and p.to_jax() is dp  # memoized


def test_dominant_sequence_of_the_bucket_of_two():
    """Plan.dominant: in the bucket of two sequences, the index of one with at least DOMINANT_RATIO
    times the other's tokens, else None; it is static aux data of the pytree, so a long-and-short
    batch compiles apart from an even one, and two long-and-short batches share a compilation."""
    from gdn.planner import DOMINANT_RATIO, dominant_seq

    assert DOMINANT_RATIO == 3
    assert gdn.plan([0, 28672, 32768]).dominant == 0 and gdn.plan([0, 4096, 32768]).dominant == 1
    assert gdn.plan([0, 300, 400]).dominant == 0 and gdn.plan([0, 299, 400]).dominant is None  # 3:1 exactly
    assert gdn.plan([0, 16384, 32768]).dominant is None
    assert gdn.plan([0, 0, 64]).dominant == 1 and gdn.plan([0, 0, 0]).dominant is None
    assert gdn.plan([0, 100]).dominant is None            # the bucket of one
    assert gdn.plan([0, 1000, 1001, 1002]).dominant is None  # the bucket of 3..8
    assert dominant_seq([5, 1], 2) == 0 and dominant_seq([5, 1], 8) is None
    jax = pytest.importorskip("jax")
    traces = []

    @jax.jit
    def f(pl):
        traces.append(pl.dominant)
        return pl.cu_seqlens[-1]

    for cu in ([0, 28672, 32768], [0, 25000, 32700], [0, 16384, 32768], [0, 4096, 32768]):
        f(gdn.plan(cu, num_tokens=32768))
    assert traces == [0, None, 1]
    dp = gdn.plan([0, 4096, 32768]).to_jax()
    assert dp.dominant == 1 and jax.tree_util.tree_map(lambda x: x, dp).dominant == 1


def test_to_torch_cpu():
    torch = pytest.importorskip("torch")
    p = gdn.plan([0, 100, 164, 165])
    tp = p.to_torch("cpu")
    assert tp.chunk_indices.dtype == torch.int32 and tp.chunk_indices.shape == (p.padded_chunks, 2)
    assert p.to_torch("cpu") is tp
