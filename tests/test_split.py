"""The exact split against the unsplit computation, on the float64 reference (NumPy as xp)."""
import numpy as np
import pytest

import gdn
from gdn import reference as R
from gdn.inputs import make_inputs
from gdn.planner import split_pieces
from gdn.split import split_prefill


def _ref_pieces(q, k, v, g, beta, *, plan, initial_state, scale, use_qk_l2norm):
    return R.chunked(q, k, v, g, beta, plan=plan, initial_state=initial_state, scale=scale,
                     use_qk_l2norm=use_qk_l2norm)


@pytest.mark.parametrize("gates", ["qwen", "none", "strong"])
@pytest.mark.parametrize("piece_chunks", [1, 2])
def test_split_equals_unsplit(gates, piece_chunks):
    # documents start inside pieces, an empty sequence in the middle, a partial last chunk;
    # gates="none": no decay at all, where an approximate (warm-up) split would fail
    x = make_inputs([300, 0, 130, 1, 64], h=1, hv=2, k=8, v=6, gates=gates, initial_state=True,
                    seed=7, pad_tokens=20)
    p = gdn.plan(x.cu_seqlens, num_tokens=x.q.shape[1])
    sp = split_pieces(x.cu_seqlens, piece_chunks)
    assert sp.max_pieces > 1
    o, f = split_prefill(np, _ref_pieces, *x.arrays, plan=p, split=sp,
                         initial_state=x.initial_state.astype(np.float64), scale=0.35,
                         use_qk_l2norm=False)
    o_ref, f_ref = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state,
                               scale=0.35)
    assert np.abs(o_ref).max() > 1e-2
    # o is cast to v.dtype (fp32 here): fp32 rounding only; a missing correction is ~1e-2
    assert np.abs(o - o_ref).max() < 1e-6 and np.abs(f - f_ref).max() < 1e-9
    assert np.all(o[0, p.num_tokens:] == 0)


def test_wrong_combination_is_caught():
    # a split that forgets the start-state correction must fail the comparison above
    x = make_inputs([300], h=1, hv=1, k=8, v=8, gates="none", seed=1)
    p = gdn.plan(x.cu_seqlens)
    sp = split_pieces(x.cu_seqlens, 1)
    o_bad, _ = R.chunked(*x.arrays, plan=gdn.plan(sp.piece_cu_seqlens))
    o_ref, _ = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens)
    assert np.abs(o_bad - o_ref).max() > 1e-3


@pytest.mark.parametrize("backend, impl", [("jax", "xla"), ("triton", None)])
def test_split_through_a_backend_matches_the_unsplit_call(backend, impl):
    from gdn.api import validate
    from gdn.arrays import convert
    from gdn.split import run_split

    pytest.importorskip("torch" if backend == "triton" else "jax")
    x = make_inputs([200, 0, 70, 3], h=1, hv=2, k=16, v=16, gates="none", initial_state=True,
                    seed=11)
    arrs = [convert(a, backend, "float32") for a in x.arrays]
    h0 = convert(x.initial_state, backend, "float32")
    _, args = validate(*arrs, cu_seqlens=x.cu_seqlens, initial_state=h0, backend=backend, impl=impl)
    o_s, f_s = run_split(backend, args, piece_chunks=1)
    o_u, f_u = gdn.prefill(*arrs, cu_seqlens=x.cu_seqlens, initial_state=h0, backend=backend, impl=impl)
    assert R.rms_ratio(o_s, o_u) < 1e-5 and R.rms_ratio(f_s, f_u) < 1e-5
    o_ref, _ = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state)
    assert R.rms_ratio(o_s, o_ref) < 1e-4


def test_split_falls_back_to_two_calls_when_v_plus_k_columns_are_unsupported():
    x = make_inputs([300, 7], h=1, hv=2, k=8, v=6, gates="qwen", initial_state=True, seed=2)
    calls = []

    def narrow(q, k, v, g, beta, **kw):
        calls.append(v.shape[-1])
        if v.shape[-1] > 8:
            raise NotImplementedError("V + K too wide")
        return _ref_pieces(q, k, v, g, beta, **kw)

    p = gdn.plan(x.cu_seqlens)
    o, f = split_prefill(np, narrow, *x.arrays, plan=p, split=split_pieces(x.cu_seqlens, 1),
                         initial_state=x.initial_state.astype(np.float64), scale=0.35,
                         use_qk_l2norm=False)
    o_ref, f_ref = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state,
                               scale=0.35)
    assert calls == [14, 6, 8]
    assert np.abs(o - o_ref).max() < 1e-6 and np.abs(f - f_ref).max() < 1e-9


def test_prefill_split_option():
    jnp = pytest.importorskip("jax.numpy")
    x = make_inputs([300, 0, 40], h=1, hv=2, k=16, v=16, initial_state=True, seed=5)
    a = [jnp.asarray(t) for t in x.arrays]
    h0 = jnp.asarray(x.initial_state)
    o_u, f_u = gdn.prefill(*a, cu_seqlens=x.cu_seqlens, initial_state=h0, impl="xla")
    o_s, f_s = gdn.prefill(*a, cu_seqlens=x.cu_seqlens, initial_state=h0, impl="xla", split=2)
    assert R.rms_ratio(o_s, o_u) < 1e-5 and R.rms_ratio(f_s, f_u) < 1e-5
    o_p, _ = gdn.prefill(*a, cu_seqlens=x.cu_seqlens, initial_state=h0, impl="xla", split=True)
    assert R.rms_ratio(o_p, o_u) < 1e-5  # the policy keeps this small batch unsplit
    with pytest.raises(ValueError, match="split must be"):
        gdn.prefill(*a, cu_seqlens=x.cu_seqlens, impl="xla", split=-3)
