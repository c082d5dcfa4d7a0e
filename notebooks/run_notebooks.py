"""Execute the gdn notebooks headless (nbclient), optionally writing the outputs back.

    python notebooks/run_notebooks.py                 # execute all, report times, write nothing
    python notebooks/run_notebooks.py --write         # execute all and save them with outputs
    python notebooks/run_notebooks.py --write 03      # only notebooks whose name contains "03"

The kernel is this interpreter (jupyter_client maps the "python3" kernel's ``python`` to
``sys.executable``) with PYTHONPATH set to the repository, so nothing is registered globally.
With --write, the first markdown cell's line starting with "**Outputs:**" is set to where and
when the outputs were made.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RUN_INFO = "**Outputs:**"


def notebook_paths(select: list[str] | None = None) -> list[str]:
    paths = sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]_*.ipynb")))
    if select:
        paths = [p for p in paths if any(s in os.path.basename(p) for s in select)]
    return paths


def kernel_env(size: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    if size:
        env["GDN_NOTEBOOK_SIZE"] = size
    return env


def where() -> str:
    try:
        import torch

        if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return f"{torch.cuda.get_device_name()} (GPU)"
    except Exception:
        pass
    return f"CPU ({os.cpu_count()} cores; Triton and Pallas kernels in interpret mode)"


def stamp(nb, seconds: float) -> None:
    """Write where/when into the first markdown cell's '**Outputs:**' line."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            if line.startswith(RUN_INFO):
                lines[i] = (f"{RUN_INFO} executed top to bottom on {where()}, "
                            f"{datetime.date.today().isoformat()}, in {seconds:.0f} s.")
        cell.source = "\n".join(lines)
        return


def execute(path: str, timeout: int = 900, size: str | None = None, write: bool = False) -> float:
    """Run one notebook top to bottom; raise on the first failing cell. Returns seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": HERE}})
    t0 = time.perf_counter()
    client.execute(env=kernel_env(size))
    seconds = time.perf_counter() - t0
    if write:
        stamp(nb, seconds)
        nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("select", nargs="*", help="substrings of notebook names (default: all)")
    ap.add_argument("--write", action="store_true", help="save the notebooks with their outputs")
    ap.add_argument("--size", choices=("cpu", "gpu"), help="override the notebooks' SIZE")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    a = ap.parse_args(argv)
    for p in notebook_paths(a.select):
        s = execute(p, a.timeout, a.size, a.write)
        print(f"{os.path.basename(p)}: {s:.1f} s{' (written)' if a.write else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
