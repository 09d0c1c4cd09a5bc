"""``gkcore data ...`` subcommands: ``gkcore data synth --out DIR --n N [--size S] [--seed K]``."""
from __future__ import annotations

import os
import sys
import time


def _synth(args) -> int:
    from gkcore.data.synth import generate

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"gkcore data synth: error: --out {args.out!r} is a file, not a folder", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        generate(args.out, args.n, size=args.size, seed=args.seed, progress=not args.no_progress,
                 workers=args.workers, fmt=args.format)
    except (TypeError, ValueError, OSError) as e:
        print(f"gkcore data synth: error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(f"wrote {args.n} images ({args.size} px) and metadata.jsonl to {args.out} in {dt:.1f} s")
    return 0


def register(subparsers) -> None:
    """Add ``data`` (with its ``synth`` subcommand) to the ``gkcore`` command line."""
    p = subparsers.add_parser("data", help="data tools: synthetic chest X-rays",
                              description="Data tools. `gkcore data synth` writes synthetic chest X-rays with "
                                          "reports, entity labels, region and finding boxes.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    s = sub.add_parser("synth", help="write N synthetic chest X-rays (PNG + metadata.jsonl)",
                       description="Write N synthetic PA chest X-rays (PNG or JPEG), their reports, entity labels, "
                                   "29 anatomical region boxes and finding boxes (metadata.jsonl) to DIR. "
                                   "Deterministic for a seed; image i depends only on (seed, i).")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--n", type=int, required=True, metavar="N", help="number of images")
    s.add_argument("--size", type=int, default=256, metavar="S", help="image side in pixels (default 256; 224-1024 "
                                                                       "intended, 64-2048 accepted)")
    s.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default 0)")
    s.add_argument("--workers", type=int, default=1, metavar="W",
                   help="processes drawing images in parallel (default 1; the output does not depend on it)")
    s.add_argument("--format", choices=("png", "jpg"), default="png", help="image format (default png)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
