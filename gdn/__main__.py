"""``python -m gdn {demo,parity,bench}``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"demo": "gdn.demo", "parity": "gdn.parity", "bench": "gdn.bench"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m gdn {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(COMMANDS[argv[0]])
    except ModuleNotFoundError as e:
        print(f"gdn {argv[0]}: not available yet ({e})", file=sys.stderr)
        return 2
    return mod.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
