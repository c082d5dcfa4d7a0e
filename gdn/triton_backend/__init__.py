"""The triton backend of gdn (not built yet: see its issue)."""
from __future__ import annotations

IMPLS: tuple[str, ...] = ()


def impl_status() -> dict[str, str | None]:
    return {}


def run(args):
    raise NotImplementedError("the triton backend is not built yet")
