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

    # lengths: one sequence spans three of the four 128-token slices; an empty sequence; the last
    # slice holds only padding (an empty device slice)
    x = make_inputs([40, 300, 0, 5, 19], h=2, hv=4, k=16, v=16, gates="none", initial_state=True,
                    seed=3, pad_tokens=148)
    assert x.q.shape[1] == 512
    o1, f1 = run(x)
    o_ref, f_ref = R.recurrent(*x.arrays, cu_seqlens=x.cu_seqlens, initial_state=x.initial_state)
    for name, mesh, kw in [
        ("heads", Mesh(np.array(jax.devices()[:2]), ("tp",)), dict(head_axis="tp")),
        ("seq", Mesh(np.array(jax.devices()), ("sp",)), dict(seq_axis="sp")),
        ("both", Mesh(np.array(jax.devices()).reshape(2, 2), ("tp", "sp")),
         dict(head_axis="tp", seq_axis="sp")),
    ]:
        o, f = run(x, mesh=mesh, **kw)
        d_o = float(jnp.abs(o - o1).max()); d_f = float(jnp.abs(f - f1).max())
        e_o, e_f = R.rms_ratio(o, o_ref), R.rms_ratio(f, f_ref)
        print(name, d_o, d_f, e_o, e_f)
        assert d_o < 1e-4 and d_f < 1e-4, (name, d_o, d_f)
        assert e_o < 1e-4 and e_f < 1e-4, (name, e_o, e_f)
        assert float(jnp.abs(o[0, 364:]).max()) == 0.0
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
