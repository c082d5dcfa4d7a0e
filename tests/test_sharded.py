"""Multi-device prefill on CPU virtual devices (a subprocess: the device count is fixed at start)."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh
    import gdn
    from gdn import reference as R
    from gdn.inputs import make_inputs

    assert len(jax.devices()) == 4
    def run(x, **kw):
        a = [jnp.asarray(t) for t in x.arrays]
        h0 = None if x.initial_state is None else jnp.asarray(x.initial_state)
        return gdn.prefill(*a, cu_seqlens=x.cu_seqlens, initial_state=h0, backend="jax",
                           impl="xla", **kw)

    def cut_at_slices(x, n):
        # x's sequences cut at the n device slice boundaries, each later piece from a zero
        # state: what a combine that dropped the carries would compute
        cu = np.asarray(x.cu_seqlens)
        bounds = np.arange(1, n) * (x.q.shape[1] // n)
        cut = np.union1d(cu, bounds[bounds < cu[-1]])
        orig = np.searchsorted(cu, cut[:-1], side="right") - 1
        h0 = np.zeros((cut.size - 1,) + x.v.shape[2:3] + (x.q.shape[3], x.v.shape[3]), np.float32)
        if x.initial_state is not None:
            firsts = np.isin(cut[:-1], cu)
            h0[firsts] = x.initial_state[orig[firsts]]
        a = [jnp.asarray(t) for t in x.arrays]
        return gdn.prefill(*a, cu_seqlens=cut, initial_state=jnp.asarray(h0), backend="jax",
                           impl="xla")[0]

    mesh_tp = Mesh(np.array(jax.devices()[:2]), ("tp",))
    mesh_sp = Mesh(np.array(jax.devices()), ("sp",))
    mesh_2d = Mesh(np.array(jax.devices()).reshape(2, 2), ("tp", "sp"))
    cases = {
        # one sequence spans three of the four 128-token slices; an empty sequence; the last
        # slice holds only padding (an empty device slice)
        "A": make_inputs([40, 300, 0, 5, 19], h=2, hv=4, k=16, v=16, gates="none",
                         initial_state=True, seed=3, pad_tokens=148),
        # weak decay and small beta: the state survives a device's slice, so the carries matter;
        # a sequence starting on a slice boundary, two sequences crossing on different devices,
        # the last one ending on the last token, no h0
        "B": make_inputs([128, 200, 184, 0], h=2, hv=4, k=16, v=16, gates="none", beta="low",
                         seed=4),
        # one sequence over all four devices (three rounds, two devices pass the carry through)
        "C": make_inputs([512], h=2, hv=4, k=16, v=16, gates="none", beta="low",
                         initial_state=True, seed=5),
    }
    for cname, x in cases.items():
        assert x.q.shape[1] == 512
        o1, f1 = run(x)
        o_ref, f_ref = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens,
                                   initial_state=x.initial_state)
        if cname != "A":  # a combine that dropped the carries would fail the checks below
            miss = R.rms_ratio(cut_at_slices(x, 4), o1)
            print(cname, "without carries", miss)
            assert miss > 1e-2, (cname, miss)
        res = {}
        for name, mesh, kw in [
            ("heads", mesh_tp, dict(head_axis="tp")),
            ("seq", mesh_sp, dict(seq_axis="sp")),
            ("seq-ppermute", mesh_sp, dict(seq_axis="sp", seq_collective="ppermute")),
            ("both", mesh_2d, dict(head_axis="tp", seq_axis="sp")),
            ("both-ppermute", mesh_2d, dict(head_axis="tp", seq_axis="sp",
                                            seq_collective="ppermute")),
        ]:
            o, f = res[name] = run(x, mesh=mesh, **kw)
            d_o = float(jnp.abs(o - o1).max()); d_f = float(jnp.abs(f - f1).max())
            e_o, e_f = R.rms_ratio(o, o_ref), R.rms_ratio(f, f_ref)
            print(cname, name, d_o, d_f, e_o, e_f)
            assert d_o < 1e-4 and d_f < 1e-4, (cname, name, d_o, d_f)
            assert e_o < 1e-4 and e_f < 1e-4, (cname, name, e_o, e_f)
            assert float(jnp.abs(o[0, int(x.cu_seqlens[-1]):]).max(initial=0.0)) == 0.0
        for a, b in (("seq", "seq-ppermute"), ("both", "both-ppermute")):  # the two collectives
            d = max(float(jnp.abs(u - w).max()) for u, w in zip(res[a], res[b]))
            assert d < 1e-5, (cname, a, b, d)
    x = cases["A"]
    o1 = run(x)[0]
    o, f = run(x, mesh=mesh_sp, seq_axis="sp", seq_collective="ppermute",
               output_final_state=False)  # the chain without the final states' psum
    assert f is None and float(jnp.abs(o - o1).max()) < 1e-4
    try:
        run(x, mesh=mesh_sp, seq_axis="sp", seq_collective="psum")
    except ValueError as e:
        assert "seq_collective" in str(e)
    else:
        raise AssertionError("seq_collective='psum' accepted")
    try:
        run(x, mesh=Mesh(np.array(jax.devices()[:4]), ("tp",)), head_axis="tp")
    except ValueError as e:
        assert "must divide" in str(e)
    else:
        raise AssertionError("3 heads over 4 devices accepted")
    print("OK")
""")


def test_head_and_sequence_parallel_match_single_device():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
