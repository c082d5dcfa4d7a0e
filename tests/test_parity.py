"""The parity suite (gdn.parity): the quick cases on every implementation present, and the suite
itself, checked on fake implementations: a correct one passes every row, and each broken one
(a classic kernel bug planted on purpose) fails exactly the row meant to catch it."""
from __future__ import annotations

import functools
import json
import sys
import types

import numpy as np
import pytest

import gdn
from gdn import parity, reference
from gdn.api import BACKENDS
from gdn.parity_cases import FULL, QUICK

# ---------------------------------------------------------------------------------------------
# the real implementations: quick cases x every available implementation
# ---------------------------------------------------------------------------------------------
AVAILABLE = [i for i in gdn.implementations() if i.available]
IDS = [f"{i.backend}:{i.impl}" for i in AVAILABLE]


@functools.cache
def _prepared(name: str) -> parity.Prepared:
    return parity.prepare(next(c for c in QUICK if c.name == name), whole=True)


@functools.cache
def _result(name: str, label: str):
    im = AVAILABLE[IDS.index(label)]
    return parity.run_impl(_prepared(name), im, quick=True, all_cases=False, log=lambda s: None)


def _assert_rows_ok(rows):
    bad = [r for r in rows if r.failed]
    assert not bad, "\n".join(f"{r.impl} {r.against}: o {r.o_err} state {r.state_err} "
                              f"stages {r.stages} {r.detail}" for r in bad)


@pytest.mark.skipif(not AVAILABLE, reason="no gdn implementation is available yet")
@pytest.mark.parametrize("label", IDS or ["none"])
@pytest.mark.parametrize("name", [c.name for c in QUICK])
def test_quick_case(name, label):
    rows, out = _result(name, label)
    if rows[0].status == "skip":
        pytest.skip(rows[0].detail)
    if rows[0].status == "unsupported":
        pytest.skip(f"{label} does not support {name}: {rows[0].detail}")
    _assert_rows_ok(rows)
    assert out is not None and np.abs(out.o).max() > 0  # it computed something


@pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs two implementations")
@pytest.mark.parametrize("name", [c.name for c in QUICK if c.core])
def test_implementations_agree(name):
    outs = {label: _result(name, label)[1] for label in IDS}
    outs = {k: v for k, v in outs.items() if v is not None}
    if len(outs) < 2:
        pytest.skip("fewer than two implementations ran this case")
    _assert_rows_ok(parity.compare_impls(_prepared(name), outs))


# ---------------------------------------------------------------------------------------------
# the suite itself, on fake implementations built on the float64 reference
# ---------------------------------------------------------------------------------------------
def _fake_run(bug: str | None):
    """A backend run() computing gdn.reference.chunked (float64) and returning it in the
    contract's dtypes, with one planted bug."""
    import jax.numpy as jnp

    calls = {"n": 0}

    def run(args, return_stages=False):
        calls["n"] += 1
        p = args.plan
        q, k, v, g, beta = (reference.to_numpy64(a)
                            for a in (args.q, args.k, args.v, args.g, args.beta))
        h0 = reference.to_numpy64(args.initial_state)
        if bug == "ignores_h0":
            h0 = None
        if bug == "order_dependent" and h0 is not None:
            h0 = h0 * (1 + 0.1 * np.arange(h0.shape[0]))[:, None, None, None]
        b, t = q.shape[:2]
        flat = [a.reshape((1, b * t) + a.shape[2:]) for a in (q, k, v, g, beta)]
        if bug == "leaks_next_token":  # token i also sees token i + 1: not causal
            flat[2] = flat[2] + 0.5 * np.roll(flat[2], -1, axis=1)
        o, f, st = reference.chunked(*flat, plan=p, initial_state=h0, scale=args.scale,
                                     use_qk_l2norm=args.use_qk_l2norm, stages=True)
        o = o.reshape(b, t, *o.shape[2:])
        if bug == "garbage_past_end":
            o[:, :] = np.where(np.arange(b * t).reshape(b, t)[..., None, None] >= p.num_tokens, 1.0, o)
        if bug == "noisy":  # a different rounding on every call: not deterministic
            o = o * (1 + 1e-3 * np.random.default_rng(calls["n"]).standard_normal(o.shape))
        if bug == "off_by_1pct":
            o = o * 1.01
        dt = args.q.dtype
        stages = {"gc": jnp.asarray(st["gc"], jnp.float32), "Ai": jnp.asarray(st["Ai"], jnp.float32),
                  **{s: jnp.asarray(st[s] * (1.1 if bug == "bad_w" and s == "w" else 1), dt)
                     for s in ("w", "u", "h", "v_new")}}
        out = (jnp.asarray(o, dt), jnp.asarray(f, jnp.bfloat16 if bug == "bf16_state" else jnp.float32))
        return out + (stages,) if return_stages else out

    return run


BUGS = ["ignores_h0", "order_dependent", "leaks_next_token", "garbage_past_end", "noisy",
        "off_by_1pct", "bad_w", "bf16_state"]


@pytest.fixture
def fakes(monkeypatch):
    """Replace gdn's backends by one fake backend whose impls are 'exact' and one per bug."""
    mod = types.ModuleType("gdn_fake_backend")
    impls = {"exact": _fake_run(None), **{b: _fake_run(b) for b in BUGS}}
    mod.IMPLS = tuple(impls)
    mod.impl_status = lambda: {k: None for k in impls}
    mod.run = lambda args, return_stages=False: impls[args.impl](args, return_stages)
    monkeypatch.setitem(sys.modules, "gdn_fake_backend", mod)
    for name in list(BACKENDS):
        monkeypatch.delitem(BACKENDS, name)
    monkeypatch.setitem(BACKENDS, "fake", "gdn_fake_backend")
    return {i.impl: i for i in gdn.implementations()}


CORE = [c for c in QUICK if c.core]


def _suite(impls, cases=CORE):
    return parity.run_suite(list(cases), impls, quick=True, all_cases=True, use_fla=False,
                            log=lambda s: None)


def test_correct_fake_passes_every_quick_case_and_check(fakes):
    rows = _suite([fakes["exact"]], QUICK)
    _assert_rows_ok(rows)
    kinds = {r.against for r in rows if r.status == "pass"}
    assert kinds == {"f64", "determinism", "chain", "permute", "pad", "causal", "split"}
    stage_rows = [r for r in rows if r.against == "f64"]
    assert all(set(r.stages) == set(parity.STAGES) for r in stage_rows)
    assert all(r.o_err < 5e-3 for r in stage_rows)
    # the same sequences packed otherwise are computed identically: bitwise equal
    assert all("bitwise equal" in r.detail for r in rows if r.against in ("permute", "pad"))


@pytest.mark.parametrize("bug, caught_by", [
    ("ignores_h0", {"f64", "chain", "split"}),  # the split's later pieces start from a given state
    ("order_dependent", {"f64", "permute"}),
    ("leaks_next_token", {"f64", "causal"}),
    ("garbage_past_end", {"f64", "pad"}),
    ("noisy", {"determinism"}),
    ("off_by_1pct", {"f64"}),
    ("bad_w", {"f64"}),
    ("bf16_state", {"f64"}),
])
def test_each_planted_bug_is_caught(fakes, bug, caught_by):
    rows = _suite([fakes[bug]])
    failed = {r.against for r in rows if r.failed}
    assert caught_by <= failed, (bug, failed, [(r.case, r.against, r.detail) for r in rows])
    if bug == "bad_w":
        r = next(r for r in rows if r.failed)
        assert "w over bar" in r.detail and r.o_err < 5e-3  # the stage, not the output, is off
    if bug == "bf16_state":
        assert any("final dtype bfloat16" in r.detail for r in rows)


def test_two_implementations_are_compared(fakes):
    case = next(c for c in QUICK if c.name == "fp32-K40-l2norm")
    rows = _suite([fakes["exact"], fakes["off_by_1pct"]], [case])
    pair = [r for r in rows if r.against == "impl"]
    assert len(pair) == 1 and pair[0].failed and pair[0].o_err == pytest.approx(0.01, rel=0.05)
    assert set(pair[0].stages) == set(parity.STAGES)
    rows = _suite([fakes["exact"], fakes["noisy"]], [next(c for c in QUICK if c.name == "K64")])
    assert [r.status for r in rows if r.against == "impl"] == ["pass"]


def test_interpret_mode_runs_the_core_subset(fakes):
    rows = parity.run_suite([c for c in QUICK if not c.core][:2], [fakes["exact"]], quick=True,
                            use_fla=False, log=lambda s: None)
    assert [r.status for r in rows] == ["skip", "skip"]


def test_cli(fakes, tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert parity.main(["--quick", "--impl", "fake:exact", "--case", "edges-G3", "--json",
                        str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["failures"] == 0 and rec["mode"] == "quick"
    assert {r["against"] for r in rec["rows"]} == {"f64", "determinism"}
    text = capsys.readouterr().out
    assert "edges-G3" in text and "fake:exact" in text
    assert parity.main(["--quick", "--impl", "fake:noisy", "--case", "edges-G3"]) == 1
    assert parity.main(["--impl", "nope:nothing"]) == 2
    assert parity.main(["--list"]) == 0
    assert parity.main(["--quick", "--case", "no-such-case", "--impl", "fake:exact"]) == 1


def test_cli_routes_through_python_m_gdn(fakes):
    from gdn.__main__ import main

    assert main(["parity", "--quick", "--impl", "fake:exact", "--case", "batch-2x96"]) == 0


def test_case_matrices_cover_the_brief():
    quick_core = [c for c in QUICK if c.core]
    lens = {n for c in quick_core for n in c.lens}
    assert {0, 1, 63, 64, 65} <= lens
    assert {c.hv // c.h for c in quick_core} >= {1, 2, 3}
    assert {c.dtype for c in quick_core} == {"bfloat16", "float16", "float32"}
    assert {c.k for c in quick_core} >= {32, 40}
    assert any(c.pad_tokens for c in quick_core) and any(c.batch for c in quick_core)
    assert {c.initial_state for c in quick_core} == {True, False}
    assert {c.use_qk_l2norm for c in quick_core} == {True, False}
    assert set().union(*(c.checks for c in quick_core)) == set(parity.CHECK_FUNCS)
    assert all(c.hv <= 4 and max(c.k, c.v) <= 64 and c.num_tokens <= 512 for c in QUICK)
    full = {c.name: c for c in FULL}
    assert {c.k for c in FULL} >= {64, 96, 128} and {c.hv // c.h for c in FULL} >= {1, 2, 3}
    assert len(full["thousands-of-docs"].lens) >= 1000 and max(full["long-1x16411"].lens) > 16384
    assert {c.gates for c in FULL} >= {"qwen", "strong", "none"}
    assert {c.beta for c in FULL} >= {"low", "high"}


def test_selection_keeps_whole_groups_and_the_longest_sequence():
    case = next(c for c in FULL if c.name == "thousands-of-docs")
    cu = np.concatenate([[0], np.cumsum(case.lens)])
    offsets = np.asarray(gdn.plan(cu).chunk_offsets)[: len(case.lens) + 1]
    sel = parity.selection(case, cu, offsets, whole=False)
    assert sel.heads.tolist() == [0, 1, 30, 31] and sel.qk_heads.tolist() == [0, 15]
    assert len(sel.seqs) <= 256 and int(np.argmax(case.lens)) in sel.seqs
    assert sel.tokens.size == sum(case.lens[s] for s in sel.seqs)
    assert sel.rows.size == sum(-(-case.lens[s] // 64) for s in sel.seqs)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen-4x1024", "edges"])
def test_full_size_case_on_the_gpu(name):
    case = next(c for c in FULL if c.name == name)
    impls = [i for i in AVAILABLE]
    rows = parity.run_suite([case], impls, quick=False, log=lambda s: None)
    _assert_rows_ok(rows)


def test_fla_comparison_rows(fakes, monkeypatch):
    """The FLA rows, with a stand-in for FLA (the float64 reference) on CPU tensors: the peer row,
    vLLM's absolute bar applied on a bf16 realistic-gates case, and its failures reported."""
    torch = pytest.importorskip("torch")
    seen = {}

    def prepare_chunk_indices(cu, chunk_size, cu_seqlens_cpu=None):
        seen["cpu"] = cu_seqlens_cpu
        return torch.tensor(gdn.plan(cu_seqlens_cpu.numpy()).chunk_indices)

    utils = types.ModuleType("fla.ops.utils")
    utils.prepare_chunk_indices = prepare_chunk_indices
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.utils", utils)

    def fake_fla(q, k, v, g, beta, *, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                 cu_seqlens=None, chunk_indices=None):
        assert output_final_state and cu_seqlens.dtype == torch.long and chunk_indices is not None
        o, f = reference.chunked(q, k, v, g, beta, cu_seqlens=cu_seqlens.numpy(),
                                 initial_state=initial_state,
                                 use_qk_l2norm=use_qk_l2norm_in_kernel)
        return torch.from_numpy(o).to(q.dtype), torch.from_numpy(f).float()

    case = next(c for c in QUICK if c.name == "edges-G3")
    prep = parity.prepare(case, whole=True)
    outs = {}
    for impl in ("exact", "off_by_1pct"):
        _, outs[f"fake:{impl}"] = parity.run_impl(prep, fakes[impl], all_cases=True,
                                                  log=lambda s: None)
    rows = parity._fla_rows(fake_fla, prep, outs, log=lambda s: None)
    assert [r.impl for r in rows] == ["FLA", "fake:exact ~ FLA", "fake:off_by_1pct ~ FLA"]
    assert rows[0].status == "peer" and "within the f64 bar" in rows[0].detail
    assert rows[1].status == "pass" and rows[1].o_err < 2e-3
    assert rows[2].status == "FAIL" and "o_mean" in rows[2].detail
    assert seen["cpu"].tolist() == prep.cu.tolist()
    # beta near 1 is not vLLM's realistic generator: the bar is shown, the f64 rows decide
    high = parity.prepare(next(c for c in QUICK if c.name == "beta-high"), whole=True)
    _, out = parity.run_impl(high, fakes["off_by_1pct"], all_cases=True, log=lambda s: None)
    rows = parity._fla_rows(fake_fla, high, {"fake:off_by_1pct": out}, log=lambda s: None)
    assert rows[1].status == "info" and "realistic gates and beta" in rows[1].detail


def test_fused_impl_without_stages_is_still_checked(fakes, monkeypatch):
    """An impl that raises NotImplementedError for return_stages (mosaic_gpu fuses the chunk
    loop) must still be compared on its outputs: a 1 % error fails, the exact one passes."""
    mod = sys.modules["gdn_fake_backend"]
    inner = mod.run

    def fused(args, return_stages=False):
        if return_stages:
            raise NotImplementedError("fused: no stage tensors")
        return inner(args, False)

    monkeypatch.setattr(mod, "run", fused)
    case = [c for c in CORE if c.stages][:1]
    assert case, "a core case asks for stages"
    good = [r for r in _suite([fakes["exact"]], case) if r.against == "f64"]
    bad = [r for r in _suite([fakes["off_by_1pct"]], case) if r.against == "f64"]
    assert good and all(r.status == "pass" for r in good), good
    assert bad and any(r.status == "FAIL" for r in bad), bad
