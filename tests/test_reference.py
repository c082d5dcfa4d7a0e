import numpy as np
import pytest

import gdn
from gdn import reference as R
from gdn.inputs import make_inputs
from gdn.tolerances import REFERENCE_SELF

CASES = [
    dict(lens=[100, 0, 1, 63, 64, 65, 130], h=1, hv=3),            # G = 3, empty and short seqs
    dict(lens=[70, 5], h=2, hv=4, initial_state=True),            # G = 2, initial state
    dict(lens=[200], h=2, hv=2, gates="strong"),                   # state wiped every token
    dict(lens=[150, 3], h=1, hv=2, gates="none", initial_state=True),
    dict(lens=[129, 40], h=2, hv=2, beta="high", l2norm_qk=False),
]


@pytest.mark.parametrize("case", CASES)
def test_chunked_equals_token_loop(case):
    case = dict(case)
    l2 = not case.get("l2norm_qk", True)
    x = make_inputs(case.pop("lens"), k=12, v=10, seed=3, **case)
    kw = dict(cu_seqlens=x.cu_seqlens, initial_state=x.initial_state, use_qk_l2norm=l2, scale=0.3)
    o1, f1 = R.recurrent(*x.arrays, **kw)
    o2, f2, st = R.chunked(*x.arrays, stages=True, **kw)
    assert np.abs(o1).max() > 1e-3  # non-trivial output
    assert np.abs(o1 - o2).max() < REFERENCE_SELF and np.abs(f1 - f2).max() < REFERENCE_SELF
    assert set(st) == {"gc", "Ai", "w", "u", "h", "v_new"}


def test_empty_sequence_final_state_is_initial_state():
    x = make_inputs([5, 0, 7], initial_state=True, seed=1)
    _, f = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state)
    assert np.array_equal(f[1], x.initial_state[1].astype(np.float64))
    assert not np.allclose(f[0], x.initial_state[0])


def test_batch_layout_equals_packed():
    x = make_inputs([40, 40, 40], h=1, hv=2, k=8, v=8, seed=2)
    o_packed, f_packed = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens)
    batch = [a.reshape(3, 40, *a.shape[2:]) for a in x.arrays]
    o_b, f_b = R.chunked(*batch)
    assert np.abs(o_b.reshape(o_packed.shape) - o_packed).max() < REFERENCE_SELF
    assert np.abs(f_b - f_packed).max() < REFERENCE_SELF


def test_chunked_with_plan_and_padded_tokens_gives_zero_output_past_the_end():
    x = make_inputs([70, 20], seed=4, pad_tokens=38)
    p = gdn.plan(x.cu_seqlens, num_tokens=128)
    o, _ = R.chunked(*x.arrays, plan=p)
    o_loop, _ = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens)
    assert np.all(o[:, 90:] == 0) and np.abs(o - o_loop).max() < REFERENCE_SELF


def test_token_loop_matches_the_definition_for_one_token():
    # one token, zero state: S = k (beta v)^T, o = scale * S^T q = scale * beta (k.q) v
    x = make_inputs([1], h=1, hv=1, k=4, v=3, seed=5)
    o, f = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens, scale=0.7)
    q, k, v, b = x.q[0, 0, 0], x.k[0, 0, 0], x.v[0, 0, 0], x.beta[0, 0, 0]
    assert np.allclose(o[0, 0, 0], 0.7 * b * (k @ q) * v, rtol=1e-6)
    assert np.allclose(f[0, 0], np.outer(k, b * v), rtol=1e-6)


def test_rms_ratio():
    a = np.ones(10)
    assert R.rms_ratio(a, a) == 0 and R.rms_ratio(a * 1.01, a) == pytest.approx(0.01)
    assert R.rms_ratio(np.full(10, np.nan), a) == float("inf")
