"""The benchmark harness (gdn.bench, gdn.roofline): the CPU smoke run end to end, and the counts
and parsers it rests on."""
from __future__ import annotations

import json

import numpy as np
import pytest

import gdn
from gdn import bench, roofline


def test_flop_and_byte_counts_match_design_md():
    # DESIGN.md §5: ~183k FLOP per token per v head, 24.8 KB per token, 4 MiB state per sequence
    assert roofline.flops_per_token_head(128, 128) == pytest.approx(182955, abs=1)
    assert roofline.nominal_flops(1, 1, 128, 128) == 4 * 128 * 128
    assert roofline.bytes_moved(1, 0, 16, 32, 128, 128) == 24832
    assert roofline.bytes_moved(0, 1, 16, 32, 128, 128) == 4 * 2**20
    c = roofline.cost(32768, 1, 16, 32, 128, 128)
    assert c.flops == pytest.approx(190e9, rel=0.02) and c.bytes == pytest.approx(0.82e9, rel=0.01)
    assert c.floor_ms == pytest.approx(0.24, abs=0.005) and c.bound == "compute"
    # many sequences: the states make it memory-bound
    assert roofline.cost(8192, 2048, 16, 32, 128, 128).bound == "memory"
    assert roofline.bytes_moved(1, 0, 16, 32, 128, 128, "float32") == 2 * 24832 - 256


def test_roofline_device_models():
    """The floor of an H100 run uses the H100's bandwidth (the H200's chip, HBM3): 1x32768 at
    16/32, compute-bound on the H200 (0.243 ms), is memory-bound there (0.273 ms); many sequences
    are memory-bound on both, 4.8 / 3.35 times longer on the H100."""
    assert roofline.device_for("NVIDIA H100 80GB HBM3") is roofline.H100
    assert roofline.device_for("NVIDIA H200") is roofline.H200 and roofline.device_for(None) is roofline.H200
    assert roofline.H100.bytes_per_s == pytest.approx(3.0e12, rel=0.01)
    one = [roofline.cost(32768, 1, 16, 32, 128, 128, device=d) for d in (roofline.H200, roofline.H100)]
    assert one[0].bound == "compute" and one[1].bound == "memory"
    assert one[1].floor_ms == pytest.approx(one[1].bytes / roofline.H100.bytes_per_s * 1e3)
    assert one[1].floor_ms == pytest.approx(0.273, abs=0.002) and one[0].floor_ms == pytest.approx(0.243, abs=0.002)
    many = [roofline.cost(8192, 2048, 16, 32, 128, 128, device=d).floor_ms for d in (roofline.H200, roofline.H100)]
    assert many[1] == pytest.approx(many[0] * 4.8 / 3.35, rel=1e-6)


def test_layouts():
    assert bench.layout_lens("4x8192") == (8192,) * 4
    assert bench.layout_lens("2048x4") == (2048,) * 4 and bench.layout_lens("16384x2") == (16384,) * 2
    assert bench.layout_lens("128x256") == (256,) * 128
    assert bench.layout_lens("28672+4096") == (28672, 4096)
    mix = bench.layout_lens("mix")
    assert sum(mix) == 32768 and min(mix) >= 1 and 10 <= len(mix) <= 200
    assert mix == bench.serving_mix()  # deterministic
    assert {sum(bench.layout_lens(n)) for n in bench.LAYOUTS} == {32768, 8192}


def test_gpu_busy_ms_takes_the_union_of_stream_kernels():
    ev = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
        {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5000, "name": "host work"},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 100, "dur": 300, "name": "k1"},
        {"ph": "X", "pid": 2, "tid": 7, "ts": 350, "dur": 150, "name": "k2"},  # overlaps k1
        {"ph": "X", "pid": 2, "tid": 7, "ts": 1000, "dur": 500, "name": "k3"},
        {"ph": "X", "pid": 2, "tid": 8, "ts": 100, "dur": 1400, "name": "op: derived line"},
    ]
    # union: [100, 500] + [1000, 1500] = 900 us over 2 calls
    assert bench.gpu_busy_ms({"traceEvents": ev}, 2) == pytest.approx(0.45)
    assert bench.gpu_busy_ms({"traceEvents": ev[:1] + ev[4:5]}, 2) is None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--cpu-smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_cpu_smoke_writes_json_markdown_and_plot(smoke):
    out, rec = smoke
    rows = rec["rows"]
    runners = {r["runner"] for r in rows}
    gdn_impls = {f"gdn {i.backend}:{i.impl}" for i in gdn.implementations() if i.available}
    assert runners == {"reference f64"} | gdn_impls
    assert {r["layout"] for r in rows} == set(bench.SMOKE_LAYOUTS)
    assert len(rows) == len(runners) * len(bench.SMOKE_LAYOUTS)
    ref = [r for r in rows if r["key"] == "reference"]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in ref)
    for r in rows:
        assert r["status"] in ("ok", "error", "skip"), r
        assert r["tokens"] == 128 and r["floor_ms"] > 0 and r["gflop"] > 0
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["first_call_s"] >= 0 and r["host_us"] > 0
            assert r["tflops"] > 0 and r["tflops_nominal"] > 0 and 0 < r["floor_frac"] < 1
            assert r["speedup_vs_fla"] is None  # no FLA on a CPU
            if r["key"] != "reference":  # checked against the float64 reference row
                assert r["check_vs"] == "reference f64" and r["check_rms"] < 1e-2
        else:
            assert r["note"]
    assert rec["mode"] == "cpu-smoke" and any("CPU smoke" in n for n in rec["notes"])
    md = (out / "bench.md").read_text()
    assert "## H/HV = 1/2" in md and "## All rows" in md
    assert all(name in md for name in runners) and all(lay in md for lay in bench.SMOKE_LAYOUTS)
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_merge_runs_from_json(smoke, tmp_path):
    out, rec = smoke
    other = dict(rec, rows=[dict(r, heads="2/8", h=2, hv=8) for r in rec["rows"]])
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert bench.main(["--from-json", str(out / "bench.json"), str(tmp_path / "b.json"),
                       "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "bench.json").read_text())
    assert len(merged["rows"]) == 2 * len(rec["rows"])
    md = (tmp_path / "merged" / "bench.md").read_text()
    assert "## H/HV = 1/2" in md and "## H/HV = 2/8" in md


def test_filters_and_speedup_against_fla(tmp_path, monkeypatch):
    # only the reference runner, one layout: the filters reach the matrix
    assert bench.main(["--cpu-smoke", "--impl", "reference", "--layouts", "3+61+64",
                       "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["runner"], r["layout"]) for r in rows] == [("reference f64", "3+61+64")]
    # speedups and checks are computed against the FLA row of the same workload
    base = dict(heads="16/32", k=128, v=128, hv=32, tokens=1024, floor_ms=0.01, gflop=1.0,
                layout="x", status="ok", runner="r")
    o = np.ones((4, 2, 2), np.float32)
    rows = [dict(base, key="fla", runner="FLA", ms=2.0, _o=o),
            dict(base, key="triton:triton", ms=0.5, _o=o * 1.001),
            dict(base, key="jax:xla", ms=1.0, _o=-o)]
    bench._finish(rows)
    assert [r["speedup_vs_fla"] for r in rows] == [1.0, 4.0, 2.0]
    assert rows[1]["check_rms"] == pytest.approx(1e-3, rel=1e-3) and "_o" not in rows[1]
    assert "OUTPUT MISMATCH" in rows[2]["note"] and "check_rms" not in rows[0]
    assert rows[1]["tflops"] == pytest.approx(2.0)  # 1 GFLOP in 0.5 ms


def test_qk_l2norm_reaches_the_calls(tmp_path, monkeypatch):
    """--qk-l2norm: the gdn rows call prefill with use_qk_l2norm=True (its output still checked
    against the reference row: the inputs are unit rows already) and the record says so."""
    seen = []
    real = bench.prefill

    def spy(*a, **kw):
        seen.append(kw.get("use_qk_l2norm"))
        return real(*a, **kw)

    monkeypatch.setattr(bench, "prefill", spy)
    assert bench.main(["--cpu-smoke", "--qk-l2norm", "--impl", "reference", "--impl", "jax:xla",
                       "--layouts", "3+61+64", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "bench.json").read_text())
    assert seen and all(seen) and any("--qk-l2norm" in n for n in rec["notes"])
    row = next(r for r in rec["rows"] if r["key"] == "jax:xla")
    assert row["status"] == "ok" and row["check_rms"] < 1e-2


def test_gpu_timing_paths_run_with_jax_on_the_cpu():
    """The GPU-mode code (jitted loop timing, memory analysis, profiler cross-check, the xla
    size rule, checkpoints) exercised with jax on the CPU."""
    if not any(i.impl == "xla" and i.available for i in gdn.implementations()):
        pytest.skip("needs gdn's jax xla implementation")
    seen = []
    o = bench.Options(gpu=True, smoke=False, reps=1, host_reps=1, xla_max_tokens=100,
                      profile=True, profile_calls=2, checkpoint=lambda rows: seen.append(len(rows)))
    layouts = {"1x128": (128,), "3+61+64": (3, 61, 64), "2x32": (32, 32)}
    rows = bench.run_matrix([(1, 2, 32)], layouts, [bench.GdnRunner("jax", "xla")], o,
                            bench.Progress(3))
    assert [r["status"] for r in rows] == ["skip", "skip", "ok"] and seen == [1, 2, 3]
    assert "--xla-max-tokens" in rows[0]["note"]
    r = rows[2]
    assert r["timing"].startswith("jitted loop of") and r["ms"] > 0 and r["host_us"] > 0
    assert r["mem_mb"] is not None and r["mem_mb"] > 0
    assert r["profile"]["calls"] == 2 and r["profile"]["trace_gpu_busy_ms"] is None  # no GPU
    assert o.profile is False  # once per run


@pytest.mark.gpu
def test_bench_on_the_gpu_with_peers(tmp_path):
    assert bench.main(["--heads", "2/8", "--layouts", "1x8192,2048x4", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "bench.json").read_text())
    ok = [r for r in rec["rows"] if r["status"] == "ok"]
    assert ok and all(r["timing"] in ("do_bench median",) or r["timing"].startswith("jitted loop")
                      for r in ok)
    for r in ok:
        if r.get("check_rms") is not None and "ONE state per row" not in r["note"]:
            assert r["check_rms"] < 1e-2, r


@pytest.mark.parametrize("args, words", [
    (["--heads", "16-32"], "H/HV"), (["--heads", "3/8"], "multiple"),
    (["--layouts", "4by8192"], "a layout is")])
def test_bad_arguments_are_named(args, words, capsys):
    assert bench.main(["--cpu-smoke", "--out", "/nonexistent/never", *args]) == 2
    assert words in capsys.readouterr().err



def test_split_row_only_when_asked_for(monkeypatch):
    """``--impl jax:mosaic_gpu:split`` adds the split's row; never by default, nor by
    ``--impl jax:mosaic_gpu`` (it compiles every layout anew)."""
    import gdn.jax_backend.mosaic_gpu as M

    monkeypatch.setattr(M, "status", lambda: None)  # as on a Hopper GPU

    def keys(impl):
        opts = bench.Options(gpu=False, smoke=True, reps=1, host_reps=1, xla_max_tokens=1, profile=False,
                             no_peers=True, impl=impl)
        return [r.key for r in bench.runners(opts)[0]]

    assert "jax:mosaic_gpu" in keys(None) and "jax:mosaic_gpu:split" not in keys(None)
    assert keys(["jax:mosaic_gpu"]) == ["jax:mosaic_gpu"]
    assert keys(["jax:mosaic_gpu:split"]) == ["jax:mosaic_gpu:split"]
    if any(i.backend == "triton" and i.available for i in gdn.implementations()):
        assert keys(["triton:triton:split"]) == ["triton:triton:split"]
        assert "triton:triton:split" not in keys(None)


def test_host_plan_row(tmp_path, monkeypatch):
    """``--impl <jax impl>:host`` adds a row jitted with the host plan as a constant (what an eager
    caller's picks are): only when asked for, checked against the reference like the others, and
    its calls see a host plan (the plain row's a traced one)."""
    import gdn.jax_backend.mosaic_gpu as M

    monkeypatch.setattr(M, "status", lambda: None)  # as on a Hopper GPU

    def keys(impl):
        opts = bench.Options(gpu=False, smoke=True, reps=1, host_reps=1, xla_max_tokens=1, profile=False,
                             no_peers=True, impl=impl)
        return [r.key for r in bench.runners(opts)[0]]

    assert not any(k.endswith(":host") for k in keys(None))
    assert keys(["jax:mosaic_gpu:host"]) == ["jax:mosaic_gpu:host"]
    monkeypatch.undo()
    hosts = []
    real = bench.prefill

    def spy(*a, **kw):
        hosts.append(kw["plan"].is_host)
        return real(*a, **kw)

    monkeypatch.setattr(bench, "prefill", spy)
    assert bench.main(["--cpu-smoke", "--impl", "reference", "--impl", "jax:xla", "--impl", "jax:xla:host",
                       "--layouts", "3+61+64", "--out", str(tmp_path)]) == 0
    rows = {r["key"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    for key in ("jax:xla", "jax:xla:host"):
        assert rows[key]["status"] == "ok" and rows[key]["check_rms"] < 1e-2, rows[key]
    assert "host plan" in rows["jax:xla:host"]["note"] and True in hosts and False in hosts


def test_triton_split_row_matches_the_unsplit_row():
    """The triton backend's split row runs gdn.prefill(split=...) through its two passes (Triton's
    interpreter here) and agrees with its plain row."""
    if not any(i.backend == "triton" and i.available for i in gdn.implementations()):
        pytest.skip("needs the triton backend (TRITON_INTERPRET=1 on a CPU)")
    import gdn.triton_backend.split as TS

    calls = []
    orig = TS.run_split
    TS.run_split = lambda args, split: calls.append(split.num_pieces) or orig(args, split)
    try:
        o = bench.Options(gpu=False, smoke=True, reps=1, host_reps=1, xla_max_tokens=1, profile=False)
        rows = bench.run_matrix([(1, 2, 64)], {"1x200": (200,)},
                                [bench.GdnRunner("triton", "triton"), bench.SplitRunner("triton", "triton", 2)],
                                o, bench.Progress(2))
    finally:
        TS.run_split = orig
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert rows[1]["key"] == "triton:triton:split2" and "pieces of 2 chunks" in rows[1]["note"], rows[1]
    assert rows[1]["check_vs"] == rows[0]["runner"] and rows[1]["check_rms"] < 1e-2, rows[1]
    assert calls and set(calls) == {2}, calls


_SPLIT_ROW = """
import gdn.jax_backend.mosaic_gpu.split as S
from gdn import bench
calls = []
orig = S.run_split
S.run_split = lambda args, split, **kw: calls.append(split.num_pieces) or orig(args, split, **kw)
o = bench.Options(gpu=False, smoke=True, reps=1, host_reps=1, xla_max_tokens=1 << 20, profile=False)
rows = bench.run_matrix([(1, 2, 64)], {"1x200": (200,)},
                        [bench.GdnRunner("jax", "xla"), bench.SplitRunner("jax", "mosaic_gpu", 2)], o,
                        bench.Progress(2))
assert [r["status"] for r in rows] == ["ok", "ok"], rows
assert rows[1]["key"] == "jax:mosaic_gpu:split2" and "pieces of 2 chunks" in rows[1]["note"], rows[1]
assert rows[1]["check_vs"] == rows[0]["runner"] and rows[1]["check_rms"] < 1e-2, rows[1]
assert calls and set(calls) == {2}, calls  # 200 tokens in pieces of 128: two pieces, every call
print("split row ok", rows[1]["check_rms"])
"""


def test_split_row_runs_the_two_passes():
    """The split row's calls go through gdn.prefill(split=...) on the Mosaic kernels (the
    interpreter, in a subprocess with 4 CPU devices: see tests/test_mosaic_gpu.py) and match the
    unsplit xla row."""
    import os
    import subprocess
    import sys

    if not any(i.impl == "xla" and i.available for i in gdn.implementations()):
        pytest.skip("needs gdn's jax xla implementation")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", GDN_MOSAIC_INTERPRET="1", JAX_NUM_CPU_DEVICES="4",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _SPLIT_ROW], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0 and "split row ok" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
