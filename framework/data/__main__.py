"""``python -m framework.data prepare ...``: the same as ``expertrain data prepare ...`` without the CLI."""

from __future__ import annotations

import sys

from framework.data.prepare import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "prepare":
        print(
            "usage: python -m framework.data prepare --input FILES --output PREFIX [--tokenizer DIR]",
            file=sys.stderr,
        )
        raise SystemExit(2)
    raise SystemExit(main(args[1:]))
