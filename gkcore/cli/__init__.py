"""``gkcore`` command line: each subcommand module contributes ``register(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: Subcommand modules, in help order. A module that is not part of this install is left out.
COMMAND_MODULES = (
    "gkcore.cli.train",  # pretrain, demo
    "gkcore.cli.eval",   # eval
    "gkcore.cli.data",   # data synth
    "gkcore.cli.bench",  # bench
    "gkcore.cli.info",   # info
)


def build_parser() -> argparse.ArgumentParser:
    from gkcore import __version__

    p = argparse.ArgumentParser(prog="gkcore", description="GK-MVLP kernels, models and training for chest X-rays")
    p.add_argument("--version", action="version", version=f"gkcore {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            # the module (or its package) is not part of this install: leave the command out;
            # a missing dependency inside an existing module is a real error
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                continue
            raise
        mod.register(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
