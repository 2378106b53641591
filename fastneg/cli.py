"""The `fastneg` command. Each verb lives beside the code it drives, in a module with a
`register(subparsers)` function; this file only lists them."""
from __future__ import annotations

import argparse
import importlib
import sys

from fastneg.data.files import UnreadableFiles

VERB_MODULES = [
    "fastneg.data.cli",        # make-data
    "fastneg.data.convert",    # convert
    "fastneg.data.index",      # index
    "fastneg.data.subset",     # make-subset
    "fastneg.eval.cli",        # eval
    "fastneg.export",          # export
    "fastneg.texture.cli",     # build-bank
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastneg",
        description="fastneg: MoCo-v2 with non-semantic negatives at the speed of the GPU.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileExistsError, FileNotFoundError, PermissionError, NotADirectoryError,
            ValueError, UnreadableFiles) as e:
        # Expected user errors: one clear line, no traceback.
        print(f"fastneg {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
