"""gdn.prefill validation: every bad argument is named, before any backend runs."""
import subprocess
import sys

import numpy as np
import pytest

import gdn
from gdn.api import validate


def _arrays(b=1, t=16, h=2, hv=4, k=8, v=8):
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return dict(q=f(b, t, h, k), k=f(b, t, h, k), v=f(b, t, hv, v), g=-np.abs(f(b, t, hv)),
                beta=np.abs(f(b, t, hv)))


def _bad(**changes):
    a = _arrays()
    kw = {}
    for key, val in changes.items():
        (a if key in a else kw)[key] = val
    return a, kw


A = _arrays()
BAD = [
    (dict(q=A["q"][0]), ValueError, "q must have rank 4"),
    (dict(k=A["k"][:, :, :1]), ValueError, "k must have q's shape"),
    (dict(v=A["v"][:, :8]), ValueError, "v must be"),
    (dict(v=np.zeros((1, 16, 3, 8), np.float32)), ValueError, "multiple of the q/k heads"),
    (dict(q=np.zeros((1, 16, 2, 300), np.float32), k=np.zeros((1, 16, 2, 300), np.float32)),
     ValueError, r"K\) must be in \[1, 256\]"),
    (dict(v=np.zeros((1, 16, 4, 257), np.float32)), ValueError, r"V\) must be in"),
    (dict(g=A["g"][..., :2]), ValueError, "g must be"),
    (dict(beta=A["beta"][:, :3]), ValueError, "beta must be"),
    (dict(q=A["q"].astype(np.float64), k=A["k"].astype(np.float64), v=A["v"].astype(np.float64)),
     TypeError, "bfloat16, float16 or float32"),
    (dict(v=A["v"].astype(np.float16)), TypeError, "share one dtype"),
    (dict(g=A["g"].astype(np.int32)), TypeError, "g must be a floating"),
    (dict(q=[[1.0]]), TypeError, "q must be an array"),
    (dict(cu_seqlens=[0, 5, 3]), ValueError, "non-decreasing"),
    (dict(cu_seqlens=[0, 5, 30]), ValueError, "num_tokens"),
    (dict(cu_seqlens=[1, 16]), ValueError, "start at 0"),
    (dict(cu_seqlens=[0, 16], plan=gdn.plan([0, 16])), ValueError, "not both"),
    (dict(plan="plan"), TypeError, "gdn.Plan"),
    (dict(plan=gdn.plan([0, 40])), ValueError, "plan was built for 40 tokens"),
    (dict(initial_state=np.zeros((3, 4, 8, 8), np.float32)), ValueError, "initial_state must be"),
    (dict(initial_state=np.zeros((1, 4, 8, 9), np.float32)), ValueError, "initial_state must be"),
    (dict(initial_state=np.zeros((1, 4, 8, 8), np.int32)), TypeError, "initial_state must be a floating"),
    (dict(scale="x"), TypeError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(use_qk_l2norm=1), TypeError, "use_qk_l2norm"),
    (dict(output_final_state=None), TypeError, "output_final_state"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(impl=3), TypeError, "impl"),
]


@pytest.mark.parametrize("changes, exc, words", BAD, ids=[w for _, _, w in BAD])
def test_bad_argument_is_named(changes, exc, words):
    a, kw = _bad(**changes)
    before = {n: np.array(x, copy=True) for n, x in a.items() if isinstance(x, np.ndarray)}
    with pytest.raises(exc, match=words):
        validate(**a, **kw)
    for n, x in before.items():  # the caller's arrays are untouched, passing or failing
        assert np.array_equal(a[n], x)


def test_varlen_needs_batch_one():
    a = _arrays(b=2)
    with pytest.raises(ValueError, match="B == 1"):
        validate(**a, cu_seqlens=[0, 8, 16])


def test_torch_arrays_for_the_jax_backend_are_rejected():
    torch = pytest.importorskip("torch")
    a = {n: torch.from_numpy(x) for n, x in _arrays().items()}
    with pytest.raises(TypeError, match="takes jax arrays"):
        validate(**a, backend="jax")
    b = _arrays()
    with pytest.raises(TypeError, match="takes torch arrays"):
        validate(**b, backend="triton")
    b["k"] = torch.from_numpy(b["k"])
    with pytest.raises(TypeError, match="one framework"):
        validate(**b)


def test_good_arguments_normalize():
    a = _arrays(b=3)
    backend, args = validate(**a, backend="jax")
    assert backend == "jax" and args.plan.num_seqs == 3 and args.scale == 8 ** -0.5
    assert args.plan.cu_seqlens[:4].tolist() == [0, 16, 32, 48] and args.dims == (2, 4, 8, 8)
    _, args = validate(**_arrays(), cu_seqlens=[0, 5, 5, 16], scale=2,
                       initial_state=np.zeros((3, 4, 8, 8)))
    assert args.plan.num_seqs == 3 and args.scale == 2.0


def test_import_gdn_needs_numpy_only():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('jax', 'jaxlib', 'torch', 'triton'):\n"
        "            raise ModuleNotFoundError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import gdn\n"
        "p = gdn.plan([0, 100, 164, 165])\n"
        "assert p.num_chunks == 4\n"
        "from gdn import reference\n"
        "import numpy as np\n"
        "impls = gdn.implementations()\n"
        "assert all(not i.available for i in impls), impls\n"
        "try:\n"
        "    gdn.prefill(*[np.zeros(s, np.float32) for s in [(1,4,1,8),(1,4,1,8),(1,4,1,8),(1,4,1),(1,4,1)]])\n"
        "except NotImplementedError as e:\n"
        "    print('ok', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "jax" not in sys.modules.get("gdn.planner").__dict__
