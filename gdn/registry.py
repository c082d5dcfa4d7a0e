"""Which backends and implementations exist on this machine (imports them lazily)."""
from __future__ import annotations

import dataclasses

from .api import BACKENDS, load_backend

__all__ = ["Implementation", "implementations"]


@dataclasses.dataclass(frozen=True)
class Implementation:
    backend: str
    impl: str
    available: bool
    reason: str  # why not available ("" when it is)


def implementations() -> list[Implementation]:
    """Every (backend, impl) gdn knows, with whether it can run here and why not.

    A backend module exposes ``IMPLS`` (its implementation names, best first) and
    ``impl_status()`` -> {impl: None if usable here, else the reason}.
    """
    out = []
    for name in BACKENDS:
        try:
            mod = load_backend(name)
        except NotImplementedError as e:
            out.append(Implementation(name, "-", False, str(e)))
            continue
        status = mod.impl_status()
        if not status:
            out.append(Implementation(name, "-", False, "no implementation built yet"))
        for impl, why in status.items():
            out.append(Implementation(name, impl, why is None, why or ""))
    return out
