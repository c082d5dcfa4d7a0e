"""The exact split against the unsplit computation, on the float64 reference (NumPy as xp)."""
import types

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


def _two_pass_numpy(x, sp, scale, mutate=None):
    """The two-pass split (gdn.jax_backend.mosaic_gpu.split) written with the float64 reference as
    both passes, the path's scan (scan_starts) and two_pass_tables as its only plan: what the
    kernels compute, without them."""
    import jax
    import jax.numpy as jnp

    from gdn.jax_backend.mosaic_gpu.split import scan_starts
    from gdn.split import two_pass_tables

    n = len(x.cu_seqlens) - 1
    p_pad, n_pad = sp.num_pieces + 3, n + 2  # padding rows must be harmless
    tb = two_pass_tables(sp, n_pad, p_pad)
    if mutate is not None:
        mutate(tb)
    q, k, v, g, beta = x.arrays
    dk, dv = k.shape[-1], v.shape[-1]
    hv = v.shape[2]
    pcu = np.concatenate([sp.piece_cu_seqlens, np.full(p_pad - sp.num_pieces, sp.piece_cu_seqlens[-1])])
    pplan = gdn.plan(pcu, num_tokens=q.shape[1])
    h0 = np.zeros((n_pad, hv, dk, dv))
    h0[:n] = x.initial_state
    # pass 1: [E | M] of every piece; E from h0[h0_row], M from I (mode 2) or 0 (mode 1)
    start1 = np.zeros((p_pad, hv, dk, dv + dk))
    start1[..., :dv] = np.where((tb["h0_row"] >= 0)[:, None, None, None], h0[np.maximum(tb["h0_row"], 0)], 0)
    start1[..., dv:] = np.where((tb["mode"] == 2)[:, None, None, None], np.eye(dk), 0)
    v_aug = np.concatenate([v, np.zeros(v.shape[:-1] + (dk,))], -1)
    _, em = R.chunked(q, k, v_aug, g, beta, plan=pplan, initial_state=start1, scale=scale)
    em = np.where((tb["mode"] > 0)[:, None, None, None], em, np.nan)  # mode 0: no meaning
    e_map, m_map = em[..., :dv], em[..., dv:]
    # the scan: the path's own (jax, in float64 here), on the padded tables
    with jax.enable_x64(True):
        start = np.asarray(scan_starts(jnp.asarray(e_map), jnp.asarray(m_map), jnp.asarray(tb["by_step"]),
                                       jnp.asarray(start1[..., :dv])))
    assert start.dtype == np.float64
    o, fin = R.chunked(q, k, v, g, beta, plan=pplan, initial_state=start, scale=scale)
    last = tb["last_piece"]
    final = np.where((last >= 0)[:, None, None, None], fin[np.maximum(last, 0)], h0)
    return o, final[:n]


@pytest.mark.parametrize("gates", ["qwen", "none"])
@pytest.mark.parametrize("piece_chunks", [1, 2])
def test_two_pass_tables_give_the_unsplit_result(gates, piece_chunks):
    # a first piece that is also the last (130 at 2 chunks), an empty sequence, pieces of 1 token
    x = make_inputs([300, 0, 130, 1, 64], h=1, hv=2, k=8, v=6, gates=gates, initial_state=True,
                    seed=9, pad_tokens=20)
    sp = split_pieces(x.cu_seqlens, piece_chunks)
    o, f = _two_pass_numpy(x, sp, 0.35)
    o_ref, f_ref = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state, scale=0.35)
    assert np.abs(o_ref).max() > 1e-2
    assert np.abs(o - o_ref).max() < 1e-9 and np.abs(f - f_ref).max() < 1e-9


def _swap_steps(tb):
    tb["by_step"][[1, 2]] = tb["by_step"][[2, 1]]


def _later_as_first(tb):
    tb["mode"][np.flatnonzero(tb["mode"] == 2)[0]] = 1


def _drop_h0(tb):
    tb["h0_row"][:] = -1


@pytest.mark.parametrize("mutate", [_swap_steps, _later_as_first, _drop_h0])
def test_two_pass_simulation_catches_wrong_tables(mutate):
    """The check above can fail: a scan in the wrong order, a later piece's map not computed, the
    initial states dropped each move the result far from the truth (gates without decay: with
    Qwen's, a state 64 tokens old may have decayed below any tolerance)."""
    x = make_inputs([300, 0, 130, 1, 64], h=1, hv=2, k=8, v=6, gates="none", initial_state=True, seed=9)
    sp = split_pieces(x.cu_seqlens, 1)
    with np.errstate(invalid="ignore"):
        o, f = _two_pass_numpy(x, sp, 0.35, mutate)
    o_ref, f_ref = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state, scale=0.35)
    assert not (np.abs(o - o_ref).max() < 1e-3 and np.abs(f - f_ref).max() < 1e-3)


def test_split_tables_traced_equal_host():
    """split_tables under jax.jit from a traced cu (a device plan: static bounds from its bucket)
    gives the host split's pieces and tables on random layouts (empty sequences, partial chunks,
    padding rows), its padding beyond the host's rows empty pieces / -1."""
    import jax
    import jax.numpy as jnp

    from gdn.split import split_tables, two_pass_tables

    rng = np.random.default_rng(3)
    for trial in range(60):
        n = int(rng.integers(1, 7))
        lens = rng.integers(0, 700, n) * (rng.random(n) < 0.8)
        cu = np.concatenate([[0], np.cumsum(lens)])
        pc = int(rng.choice([1, 2, 3, 8]))
        p = gdn.plan(cu)
        sp = split_pieces(cu, pc)
        step = pc * 64
        pieces_pad = int(cu[-1]) // step + p.padded_seqs + 3  # bounds a traced plan can know
        steps = -(-int(cu[-1]) // step) + 1
        cols = p.padded_seqs
        fn = jax.jit(lambda c: split_tables(jnp, c, pc, chunk_size=64, pieces_pad=pieces_pad,
                                            steps=steps, cols=cols))
        dev = {key: np.asarray(a) for key, a in fn(p.to_jax().cu_seqlens).items()}
        host = two_pass_tables(sp, p.padded_seqs, pieces_pad)
        np_ = split_tables(np, p.cu_seqlens, pc, chunk_size=64, pieces_pad=pieces_pad, steps=steps, cols=cols)
        k = sp.num_pieces
        for key in ("mode", "h0_row", "last_piece"):
            np.testing.assert_array_equal(dev[key], host[key], err_msg=f"{key} {lens} {pc}")
        a, b = dev["by_step"], host["by_step"]  # (the host rounds its bounds up to powers of two)
        r, c = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        np.testing.assert_array_equal(a[:r, :c], b[:r, :c])
        for x in (a, b):
            assert (x[r:] == -1).all() and (x[:, c:] == -1).all()
        np.testing.assert_array_equal(dev["piece_cu_seqlens"][:k + 1], sp.piece_cu_seqlens)
        assert (dev["piece_cu_seqlens"][k:] == cu[-1]).all()
        for key in dev:
            np.testing.assert_array_equal(dev[key], np_[key])


def test_two_pass_tables_layout():
    from gdn.split import two_pass_tables

    sp = split_pieces(np.array([0, 300, 300, 430, 494]), 2)  # pieces 128, 128, 44 | 128, 2 | 64
    tb = two_pass_tables(sp, 8, 8)
    assert tb["mode"].tolist() == [1, 2, 0, 1, 0, 0, 0, 0]
    assert tb["h0_row"].tolist() == [0, -1, -1, 2, -1, 3, -1, -1]
    # 3 pieces at most -> 4 steps; sequences 0 and 2 have several pieces -> 2 columns (powers of two)
    assert tb["by_step"].shape == (4, 2)
    assert tb["by_step"][:, 0].tolist() == [0, 1, 2, -1] and tb["by_step"][:, 1].tolist() == [3, 4, -1, -1]
    assert tb["last_piece"].tolist() == [2, -1, 4, 5, -1, -1, -1, -1]
    assert all(a.dtype == np.int32 for a in tb.values())
    with pytest.raises(ValueError, match="do not fit"):
        two_pass_tables(sp, 8, 5)


def test_makespan():
    from gdn.planner import makespan

    assert makespan([], 4) == 0 and makespan([0, 0], 4) == 0
    assert makespan([5, 3, 2], 4) == 5  # one wave
    assert makespan([4] * 9, 4) == 12  # equal lengths: waves x length
    # one long CTA among short ones: not a wave per short one (a waves model says 4 x 10)
    assert makespan([10] + [1] * 12, 4) == 10
    assert makespan([3, 3, 2, 2, 2], 2) == 7  # longest first, each on the slot that frees first
    big = [7] * 1000 + [50]
    assert 1000 * 7 / 8 <= makespan(big, 8) <= 1000 * 7 / 8 + 50 + 7


def test_makespan_is_the_list_schedule():
    """The grouped computation equals list scheduling one CTA at a time (longest first, each to the
    least loaded slot), on random lengths with repeats, long outliers and empty CTAs."""
    import heapq

    from gdn.planner import makespan

    def one_at_a_time(tiles, slots):
        load = [0] * slots
        for x in sorted((int(t) for t in tiles if t > 0), reverse=True):
            heapq.heapreplace(load, load[0] + x)
        return float(max(load))

    rng = np.random.default_rng(7)
    for trial in range(600):
        slots = int(rng.integers(1, 30))
        n = int(rng.integers(0, 16 * slots - 2))
        tiles = [rng.integers(0, 40, n), rng.choice([1, 3, 8, 64], n), rng.choice([5, 7, 32], n)][trial % 3]
        tiles = np.concatenate([tiles, rng.integers(100, 600, int(rng.integers(0, 3)))])
        assert makespan(tiles, slots) == one_at_a_time(tiles, slots), (trial, slots)


def test_two_pass_policy():
    from gdn.planner import makespan, two_pass_policy

    def loop_us(chunks, sms=132, hv=32):  # one CTA per sequence and head, a tile per us
        return makespan(np.repeat(chunks, hv), sms)

    def map_us(first, later, hv=32, slots=264):
        return makespan(np.concatenate([np.repeat(first, 2 * hv), np.repeat(later, 4 * hv)]), slots) * 0.5

    kw = dict(loop_us=loop_us, map_us=map_us, scan_step_us=5.0)
    c = two_pass_policy([32768], **kw)
    assert c is not None and c < 512  # one long sequence: 32 CTAs on 132 SMs, worth splitting
    assert two_pass_policy([256] * 128, **kw) is None  # the GPU is full already
    assert two_pass_policy([8192] * 8, **kw) is None
    assert two_pass_policy([3000] + [300] * 60, **kw) is None  # full too: the long one is not the limit
    assert two_pass_policy([], **kw) is None and two_pass_policy([0, 0], **kw) is None
    assert two_pass_policy([100], **kw) is None  # 2 chunks: no candidate shorter than the sequence
    # a costlier pass 1 never makes the pieces smaller
    slow = two_pass_policy([32768], **dict(kw, map_us=lambda f, l: 4 * map_us(f, l)))
    assert slow is None or slow >= c
    # the policy sees what each pass gets: pieces of c chunks, first pieces apart from later ones
    seen = []
    two_pass_policy([300, 0, 130], loop_us=lambda ch: seen.append(("loop", sorted(ch.tolist()))) or 1e9,
                    map_us=lambda f, l: seen.append(("map", f.tolist(), l.tolist())) or 0.0, scan_step_us=0.0,
                    candidates=(2,))
    assert seen == [("loop", [3, 5]), ("map", [2, 2], [2]), ("loop", [1, 1, 2, 2, 2])]


@pytest.mark.parametrize("map_tile_us", [0.8, 1.93])
def test_mosaic_policy_keeps_batches_unsplit(monkeypatch, map_tile_us):
    """On the H200 model (132 SMs) the batch layouts of the performance table stay unsplit at
    every head count, whatever pass 1 costs per tile: their loop fills the GPU already."""
    pytest.importorskip("jax")
    import gdn.jax_backend.mosaic_gpu.split as S
    from gdn.bench import layout_lens

    monkeypatch.setattr(S, "MAP_TILE_US", map_tile_us)
    for hv in (16, 32, 48, 64):
        for name in ("4x8192", "8x4096", "128x256", "mix", "2048x4", "1024x8"):
            assert S.pick_piece_chunks(layout_lens(name), hv, 128, 128, 132) is None, (name, hv)
    c = S.pick_piece_chunks([32768], 16, 128, 128, 132)
    assert c is not None  # 32 narrow CTAs: split
    # model_us (printed by the GPU check) is what the policy compared
    assert 1.1 * sum(S.model_us([32768], c, 16, 128, 128, 132).values()) < \
        S.model_us([32768], None, 16, 128, 128, 132)["unsplit"]


def test_prefill_split_routes_mosaic_to_two_passes(monkeypatch):
    jnp = pytest.importorskip("jax.numpy")
    import gdn.jax_backend.mosaic_gpu.split as S

    seen = {}

    def fake(args, split, **kw):
        seen["pieces"] = split.piece_cu_seqlens.tolist()
        return "two_pass", None

    monkeypatch.setattr(S, "run_split", fake)
    x = make_inputs([300, 0, 40], h=1, hv=2, k=64, v=64, seed=5)
    a = [jnp.asarray(t, jnp.bfloat16 if i < 3 else jnp.float32) for i, t in enumerate(x.arrays)]
    assert gdn.prefill(*a, cu_seqlens=x.cu_seqlens, impl="mosaic_gpu", split=2)[0] == "two_pass"
    assert seen["pieces"] == [0, 128, 256, 300, 340]


def test_prefill_default_asks_the_mosaic_split_model(monkeypatch):
    """split=None (the default) asks the two-pass model on mosaic_gpu with a host plan: at 4 v heads
    one 32K prompt is split (the layout the H200 timed at 3.5x unsplit); split=False, a batch of
    equal rows, another backend / impl, or a traced plan whose bucket can fill the SMs stay
    unsplit."""
    jnp = pytest.importorskip("jax.numpy")
    import jax

    import gdn.jax_backend.mosaic_gpu as M
    import gdn.jax_backend.mosaic_gpu.split as S
    from gdn import api
    from gdn.split import auto_split_applies

    monkeypatch.setenv("GDN_MOSAIC_INTERPRET", "1")  # the path counts as runnable here (nothing runs)
    calls = []
    monkeypatch.setattr(S, "run_split", lambda args, split, **kw: (calls.append("split"), None)[::-1])
    monkeypatch.setattr(M, "run", lambda args, *a, **kw: (calls.append("unsplit"), None)[::-1])
    # the backend's own availability check is cached from earlier tests: split=False's call stops here
    real = api.load_backend("jax")
    monkeypatch.setattr(api, "load_backend", lambda backend: types.SimpleNamespace(
        IMPLS=real.IMPLS, run=lambda args: (calls.append("unsplit"), None)[::-1]))
    t = 32768
    zeros = [jnp.zeros((1, t, 2, 128), jnp.bfloat16), jnp.zeros((1, t, 2, 128), jnp.bfloat16),
             jnp.zeros((1, t, 4, 128), jnp.bfloat16), jnp.zeros((1, t, 4), jnp.float32),
             jnp.zeros((1, t, 4), jnp.float32)]
    cu = [0, t]
    gdn.prefill(*zeros, cu_seqlens=cu, impl="mosaic_gpu")
    gdn.prefill(*zeros, cu_seqlens=cu, impl="mosaic_gpu", split=False)
    assert calls == ["split", "unsplit"]
    assert S.pick_piece_chunks([t], 4, 128, 128, 132)  # what the default asked
    _, args = api.validate(*zeros, cu_seqlens=cu, backend="jax", impl="mosaic_gpu")
    assert auto_split_applies("jax", args)
    assert not auto_split_applies("triton", args)
    for impl in ("xla", "pallas_triton"):
        assert not auto_split_applies("jax", api.validate(*zeros, cu_seqlens=cu, backend="jax", impl=impl)[1])
    # 40 sequences x 4 v heads x 2 value tiles fill the SMs: the model (milliseconds of host time
    # for many sequences) is not asked
    many = [0] + [t // 40 * (i + 1) for i in range(40)]
    assert not auto_split_applies("jax", api.validate(*[z[:, : many[-1]] for z in zeros], cu_seqlens=many,
                                                      backend="jax", impl="mosaic_gpu")[1])
    assert auto_split_applies("jax", api.validate(*[z[:, : many[16]] for z in zeros], cu_seqlens=many[:17],
                                                  backend="jax", impl="mosaic_gpu")[1])
    two_rows = [z.reshape((2, t // 2) + z.shape[2:]) for z in zeros]
    assert not auto_split_applies("jax", api.validate(*two_rows, backend="jax", impl="mosaic_gpu")[1])

    # a plan traced under jit: the largest count of its bucket decides (0..1 here; 17..20 below)
    seen = []
    for c in (cu, many[:21]):
        jax.jit(lambda plan: seen.append(auto_split_applies("jax", api.validate(
            *[z[:, : c[-1]] for z in zeros], plan=plan, backend="jax", impl="mosaic_gpu")[1])))(gdn.plan(c).to_jax())
    assert seen == [True, False]


def test_mosaic_two_pass_options_are_checked():
    """The two-pass split's tuning options are refused by name before anything is traced."""
    jnp = pytest.importorskip("jax.numpy")
    from gdn import api
    from gdn.jax_backend.mosaic_gpu.split import run_split

    x = make_inputs([300, 40], h=1, hv=2, k=64, v=64, seed=5)
    a = [jnp.asarray(t, jnp.bfloat16 if i < 3 else jnp.float32) for i, t in enumerate(x.arrays)]
    _, args = api.validate(*a, cu_seqlens=x.cu_seqlens, backend="jax")
    sp = split_pieces(x.cu_seqlens, 2)
    with pytest.raises(ValueError, match="stages1"):
        run_split(args, sp, interpret=True, stages1=5)
    with pytest.raises(TypeError, match="loop_direct_io"):
        run_split(args, sp, interpret=True, loop_direct_io="yes")
    with pytest.raises(TypeError, match="loop_overlap"):
        run_split(args, sp, interpret=True, loop_overlap=1)


def _torch_inputs(x, dtype):
    torch = pytest.importorskip("torch")
    from gdn.inputs import round_to_dtype

    tdt = getattr(torch, dtype)
    qkv = [round_to_dtype(a, dtype) for a in (x.q, x.k, x.v)]
    arrs = [torch.tensor(np.asarray(a, np.float32)).to(tdt) for a in qkv]
    arrs += [torch.tensor(x.g), torch.tensor(x.beta)]
    h0 = None if x.initial_state is None else torch.tensor(x.initial_state)
    return qkv, arrs, h0


@pytest.mark.parametrize("gates", ["qwen", "none"])
def test_triton_two_pass_split(gates):
    """The triton backend's two passes (gdn/triton_backend/split.py): documents starting inside
    pieces, an empty sequence, a piece of 1 token, padding tokens, an initial state; gates without
    decay (where a warm-up split fails): within the float64 bar, and within twice it of the unsplit
    chain, the final states too."""
    from gdn.tolerances import vs_f64

    x = make_inputs([300, 0, 129, 64, 5], h=1, hv=2, k=64, v=64, gates=gates, initial_state=True,
                    pad_tokens=20, seed=13)
    qkv, arrs, h0 = _torch_inputs(x, "bfloat16")
    kw = dict(cu_seqlens=x.cu_seqlens, initial_state=h0, backend="triton")
    o_u, f_u = gdn.prefill(*arrs, **kw)
    o_s, f_s = gdn.prefill(*arrs, split=2, **kw)
    ro, rf = R.recurrent(*qkv, x.g, x.beta, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state)
    t = int(x.cu_seqlens[-1])
    o_s64 = o_s.float().numpy().astype(np.float64)
    assert R.rms_ratio(o_s64[:, :t], ro[:, :t]) < vs_f64("bfloat16")
    assert R.rms_ratio(f_s.numpy().astype(np.float64), rf) < vs_f64("bfloat16")
    assert np.all(o_s64[:, t:] == 0)
    assert R.rms_ratio(o_s64, o_u.float().numpy()) < 2 * vs_f64("bfloat16")
    assert f_s.shape == f_u.shape and np.array_equal(f_s[1].numpy(), h0[1].numpy())  # empty: its h0


def test_triton_maps_kernel_against_float64():
    """Pass 1 alone (the state kernel's MAPS mode): a first piece's E from its sequence's initial
    state, a later piece's E from 0 and M from the identity, against the float64 chunked
    reference run with K extra value columns; the rows mode 0 skips are not compared."""
    torch = pytest.importorskip("torch")
    from gdn.split import two_pass_tables
    from gdn.tolerances import vs_f64
    from gdn.triton_backend._common import device_plan, packed
    from gdn.triton_backend.state import launch_maps
    from gdn.triton_backend.wu import launch_prepare

    x = make_inputs([300, 130, 40], h=1, hv=2, k=64, v=32, gates="qwen", initial_state=True, seed=14)
    sp = split_pieces(x.cu_seqlens, 2)
    qkv, arrs, _ = _torch_inputs(x, "bfloat16")
    tb = two_pass_tables(sp, 3, sp.num_pieces)
    assert set(tb["mode"].tolist()) == {0, 1, 2}
    pplan = gdn.plan(sp.piece_cu_seqlens, num_tokens=x.q.shape[1])
    pp = device_plan(pplan, torch.device("cpu"))
    _, k, v, g, beta = (packed(a, 2 if i < 3 else 1) for i, a in enumerate(arrs))
    gc, _, w, u, k_rstd = launch_prepare(k, v, g, beta, pp, False, False)
    first = sp.piece_index == 0
    h0p = np.zeros((sp.num_pieces, 2, 64, 32), np.float32)
    h0p[first] = x.initial_state[sp.piece_seq[first]]
    em = launch_maps(k, w, u, gc, pp, torch.as_tensor(tb["mode"]), torch.as_tensor(h0p), k_rstd).numpy()
    start = np.zeros((sp.num_pieces, 2, 64, 32 + 64))
    start[..., :32] = h0p
    start[..., 32:] = np.where((tb["mode"] == 2)[:, None, None, None], np.eye(64), 0)
    v_aug = np.concatenate([qkv[2], np.zeros(qkv[2].shape[:-1] + (64,))], -1)
    _, ref = R.chunked(qkv[0], qkv[1], v_aug, x.g, x.beta, plan=pplan, initial_state=start)
    bar = vs_f64("bfloat16")
    for p_, mode in enumerate(tb["mode"][: sp.num_pieces]):
        if mode >= 1:
            assert R.rms_ratio(em[p_, ..., :32], ref[p_, ..., :32]) < bar, p_
        if mode == 2:
            assert R.rms_ratio(em[p_, ..., 32:], ref[p_, ..., 32:]) < bar, p_


def test_triton_scan_kernel_matches_a_plain_loop():
    """The Triton backend's scan kernel (gdn/triton_backend/scan.py, interpreter) on views of one
    [E | M] tensor as pass 1 leaves them: each later piece starts where the one before ended; first
    pieces keep their start; the maps pass 1 never computes (NaN) are not read; K, V off the tiles."""
    torch = pytest.importorskip("torch")
    from gdn.split import two_pass_tables
    from gdn.triton_backend.scan import scan_starts

    sp = split_pieces([0, 500, 500, 520, 900, 1030], 2)  # 4, 0, 1, 3 and 2 pieces
    tb = two_pass_tables(sp, 5, sp.num_pieces)
    by_step = tb["by_step"][:, tb["by_step"][0] >= 0]
    rng = np.random.default_rng(0)
    hv, k, v = 2, 24, 40
    em = torch.tensor(rng.normal(size=(sp.num_pieces, hv, k, v + k)), dtype=torch.float32)
    em[..., v:] /= k ** 0.5
    em[torch.as_tensor(tb["mode"] == 0)] = float("nan")
    em[torch.as_tensor(tb["mode"] == 1), ..., v:] = float("nan")
    h = torch.tensor(rng.normal(size=(sp.num_pieces, hv, k, v)), dtype=torch.float32)
    got = scan_starts(em[..., :v], em[..., v:], torch.as_tensor(by_step), h.clone(), sms=132)
    want = h.double().clone()
    e, m = em[..., :v].double(), em[..., v:].double()
    for p_ in range(1, sp.num_pieces):
        if sp.piece_seq[p_] == sp.piece_seq[p_ - 1]:  # S_start(p) = M(p-1) S_start(p-1) + E(p-1),
            carried = torch.matmul(m[p_ - 1], want[p_ - 1]) if sp.piece_index[p_ - 1] else 0.0
            want[p_] = carried + e[p_ - 1]  # a first piece's E holds its initial state, its M is 0
    assert torch.isfinite(got).all()
    later = torch.as_tensor(sp.piece_index > 0)
    assert (got[later] - h[later]).abs().max() > 0.1
    assert torch.allclose(got.double(), want, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="m_map"):
        scan_starts(em[..., :v], em[..., v:-1], torch.as_tensor(by_step), h.clone(), sms=132)


def test_triton_split_policy():
    """The state pass's model splits a long prompt only where few v heads leave SMs idle (the
    chain's other stages do the same work either way); batches stay unsplit at any head count."""
    from gdn.bench import serving_mix
    from gdn.triton_backend.split import pick_piece_chunks

    for hv in (4, 8, 16, 32, 48, 64):
        for lens in ([8192] * 4, [256] * 128, list(serving_mix())):
            assert pick_piece_chunks(lens, hv, 128, 128, sms=132) is None, (hv, len(lens))
    assert pick_piece_chunks([32768], 4, 128, 128, sms=132)
    assert pick_piece_chunks([32768], 32, 128, 128, sms=132) is None  # 128 programs already fill it


def test_triton_split_leaves_inputs_alone_and_refuses_a_batch():
    """The triton split writes nothing the caller passed (the initial state included) and refuses a
    [B, T] batch by name (the pieces are cut on the packed token axis)."""
    x = make_inputs([200, 0, 70], h=1, hv=2, k=32, v=32, initial_state=True, seed=15)
    _, arrs, h0 = _torch_inputs(x, "bfloat16")
    before = [a.clone() for a in arrs] + [h0.clone()]
    gdn.prefill(*arrs, cu_seqlens=x.cu_seqlens, initial_state=h0, backend="triton", split=1)
    assert all(a.equal(b) for a, b in zip(arrs + [h0], before))
    batch = [a.reshape(2, 135, *a.shape[2:]) for a in arrs[:5]]  # the 270 tokens as [2, 135]
    with pytest.raises(ValueError, match="split"):
        gdn.prefill(*batch, backend="triton", split=1)


SCAN_FEW = [0, 500, 500, 520, 900, 1030]  # 4, 0, 1, 3 and 2 pieces of 128 tokens
SCAN_MANY = [0, 1100, 1200, 2200, 2400, 2700, 3200, 3330, 3330, 3500]  # 9, 1, 8, 2, 3, 4, 2, 0 and 2 pieces


@pytest.mark.parametrize("kdim,vdim,transposed,cu", [
    (24, 40, False, SCAN_FEW), (64, 64, False, SCAN_FEW), (24, 40, True, SCAN_FEW), (40, 24, True, SCAN_MANY)])
def test_pallas_scan_kernel_matches_a_plain_loop(kdim, vdim, transposed, cu, monkeypatch):
    """The scan's Pallas-Triton kernels (interpreter): each later piece starts from the one
    before it through that piece's map; first pieces and sequences of one piece keep start0; the
    last pieces' maps and first pieces' (never computed by pass 1: NaN here) are not read; dims
    off the tile widths; 0 to 9 pieces a sequence."""
    import jax
    import jax.numpy as jnp

    from gdn.jax_backend.mosaic_gpu.split import scan_starts as xla_scan
    from gdn.jax_backend.pallas_triton import scan as scan_mod
    from gdn.jax_backend.pallas_triton.scan import scan_starts
    from gdn.split import two_pass_tables

    monkeypatch.setitem(scan_mod.TILES, "transposed", transposed)
    sp = split_pieces(cu, 2)
    p_pad = sp.num_pieces + 2
    tb = two_pass_tables(sp, len(cu), p_pad)
    assert tb["by_step"].shape[0] == (16 if cu is SCAN_MANY else 4)
    assert tb["by_step"].shape[1] > 3  # a padding column of the power-of-two rows
    rng = np.random.default_rng(3)
    hv = 3
    e = rng.normal(size=(p_pad, hv, kdim, vdim)).astype(np.float32)
    m = (rng.normal(size=(p_pad, hv, kdim, kdim)) / np.sqrt(kdim)).astype(np.float32)
    start0 = rng.normal(size=(p_pad, hv, kdim, vdim)).astype(np.float32)
    e[tb["mode"] == 0] = np.nan
    m[tb["mode"] != 2] = np.nan
    want = start0.astype(np.float64).copy()
    for p_ in range(1, sp.num_pieces):
        if sp.piece_seq[p_] == sp.piece_seq[p_ - 1]:
            carried = 0.0  # a first piece's E holds its initial state, its M is 0
            if sp.piece_index[p_ - 1]:
                carried = np.einsum("hij,hjv->hiv", m[p_ - 1].astype(np.float64), want[p_ - 1])
            want[p_] = carried + e[p_ - 1]
    got = np.asarray(scan_starts(jnp.asarray(e), jnp.asarray(m), jnp.asarray(tb["by_step"]),
                                 jnp.asarray(start0), interpret=True))
    assert np.isfinite(got).all()
    scanned = (sp.piece_index > 0)
    assert np.abs(got[: sp.num_pieces][scanned] - start0[: sp.num_pieces][scanned]).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    ref = np.asarray(xla_scan(jnp.asarray(np.nan_to_num(e)), jnp.asarray(np.nan_to_num(m)),
                              jnp.asarray(tb["by_step"]), jnp.asarray(start0)))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="m_map"):
        scan_starts(jnp.asarray(e), jnp.asarray(m[..., :-1]), jnp.asarray(tb["by_step"]), jnp.asarray(start0))
    del jax


def test_mosaic_split_host_pieces_memoized_on_the_plan_and_never_a_tracer():
    """The mosaic_gpu split's piece plan and tables of a host plan are built and copied to the
    device once per plan and piece size (each eager call paid ~2.3 ms of host time for them on an
    H100); under jit they stay NumPy constants and nothing traced is memoized."""
    import jax

    from gdn.jax_backend.mosaic_gpu.split import host_pieces
    from gdn.planner import plan as make_plan
    from gdn.split import two_pass_tables

    cu = np.array([0, 3000, 3000, 4100], np.int32)
    p = make_plan(cu, num_tokens=4160)
    sp16, sp8 = split_pieces(cu, 16), split_pieces(cu, 8)
    seen = {}

    @jax.jit
    def traced(x):
        seen["traced"] = host_pieces(p, sp16, 4160)
        return x

    traced(1.0)
    host_plan, call_plan, tables = seen["traced"]
    assert call_plan.is_host and all(isinstance(a, np.ndarray) for a in tables.values())
    first = host_pieces(p, sp16, 4160)
    assert first[0] is host_plan  # the host part is shared with the traced call
    leaves = [first[1].cu_seqlens, *first[2].values()]
    assert all(isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) for a in leaves)
    again = host_pieces(p, sp16, 4160)
    assert again[1] is first[1] and again[2] is first[2]  # no new copies
    np.testing.assert_array_equal(np.asarray(first[1].cu_seqlens), sp16.piece_cu_seqlens.tolist()
                                  + [4100] * (first[0].padded_seqs + 1 - sp16.num_pieces - 1))
    other = host_pieces(p, sp8, 4160)
    assert other[0].padded_seqs >= sp8.num_pieces and other[2] is not first[2]
    np.testing.assert_array_equal(np.asarray(other[2]["by_step"]),
                                  two_pass_tables(sp8, p.padded_seqs, other[0].padded_seqs)["by_step"])


def test_pallas_scan_kernel_rejects_an_unknown_precision(monkeypatch):
    """The scan's sweep key ``precision`` names one of its algorithms, or fails clearly."""
    import jax.numpy as jnp

    from gdn.jax_backend.pallas_triton import scan as scan_mod

    monkeypatch.setitem(scan_mod.TILES, "precision", "fp8")
    em, start0 = jnp.zeros((4, 1, 16, 48)), jnp.zeros((4, 1, 16, 32))
    with pytest.raises(ValueError, match="precision 'fp8'"):
        scan_mod.scan_starts_packed(em, jnp.zeros((2, 1), jnp.int32), start0, interpret=True)


def test_pallas_scan_kernel_compiles_for_h200(tmp_path, abstract_h200, pallas_triton_ttir):
    """The scan kernel at the Qwen3.5 head dims (16 pieces of one sequence, 4 v heads) lowers for
    an abstract H200 and Triton compiles it for sm_90 within its SMEM (the interpreter never
    compiles it: a scalar jnp.where of two constants, for one, runs there and does not lower here
    in jax 0.11.2)."""
    import jax
    import jax.numpy as jnp

    from conftest import compile_ttir_sm90
    from gdn.jax_backend import common
    from gdn.jax_backend.pallas_triton import scan as scan_mod

    sds = jax.ShapeDtypeStruct
    em, start0 = sds((16, 4, 128, 256), jnp.float32), sds((16, 4, 128, 128), jnp.float32)
    with abstract_h200(), common.pallas_triton_warnings():
        text = jax.jit(scan_mod.scan_starts_packed).trace(em, sds((16, 1), jnp.int32), start0).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "gdn_split_scan" in text and len(pallas_triton_ttir) == 1
    meta = scan_mod.scan_tiles(1, 4, 128, 132)
    kern = compile_ttir_sm90(pallas_triton_ttir[0], tmp_path / "scan.ttir", meta["num_warps"], meta["num_stages"])
    assert kern.asm["cubin"] and kern.metadata.shared <= 227 * 1024
