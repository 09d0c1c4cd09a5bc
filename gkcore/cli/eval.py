"""``gkcore eval``: the arguments of a downstream evaluation and the printing of its metrics; the tasks are
:mod:`gkcore.engine.evaluate`."""
from __future__ import annotations

import json
import math
import sys

__all__ = ["register", "cmd_eval"]


def register(subparsers) -> None:
    from gkcore.engine.evaluate import TASKS

    e = subparsers.add_parser("eval", help="downstream evaluation of a checkpoint",
                              description="Evaluate a checkpoint on a downstream task with its standard metric.")
    e.add_argument("--task", required=True, choices=TASKS)
    e.add_argument("--checkpoint", required=True, help="model.safetensors or a pretrain checkpoint.pt")
    e.add_argument("--data", required=True, help="ADAPTER:PATH")
    e.add_argument("--split", default=None, help="dataset split where the adapter has splits (mimic: test)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--fractions", default="0.01,0.1,1", help="label fractions for linear-probe / fine-tune")
    e.add_argument("--epochs", type=int, default=3, help="fine-tune epochs")
    e.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    e.add_argument("--device", default="auto")
    e.add_argument("--backend", default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--num-threads", type=int, default=2)
    e.add_argument("--json", dest="json_out", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_eval)


def _print_metrics(d, indent=0):
    pad = " " * indent
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{pad}{k}:")
            _print_metrics(v, indent + 2)
        elif isinstance(v, float):
            print(f"{pad}{k}: {'nan' if math.isnan(v) else f'{v:.4f}'}")
        elif isinstance(v, list):
            print(f"{pad}{k}: [{len(v)} items]")
        else:
            print(f"{pad}{k}: {v}")


def cmd_eval(args) -> int:
    from gkcore.data import open_dataset

    from gkcore.engine.evaluate import load_model, run_task
    from gkcore.engine.launch import resolve_device

    device = str(resolve_device(args.device))
    try:
        fractions = tuple(float(x) for x in args.fractions.split(","))
    except ValueError:
        print(f"error: --fractions must be comma-separated numbers, got {args.fractions!r}", file=sys.stderr)
        return 2
    try:
        model = load_model(args.checkpoint, device=device, backend=args.backend)
        dataset = open_dataset(args.data, **({"split": args.split} if args.split else {}))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = run_task(args.task, model, dataset, batch_size=args.batch_size, device=device, fractions=fractions,
                   epochs=args.epochs, seed=args.seed, max_batches=args.max_batches, num_threads=args.num_threads)
    print(f"task {args.task} on {args.data} ({len(dataset)} samples)")
    if args.task in ("linear-probe", "fine-tune"):
        short = {f: {"macro_auroc": r["macro"], "n_classes": r["n_classes"]} for f, r in res.items()}
        _print_metrics(short)
    else:
        _print_metrics({k: v for k, v in res.items() if k != "per_class"})
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1, default=float)
    return 0
