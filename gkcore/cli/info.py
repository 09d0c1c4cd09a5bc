"""``gkcore info``: versions, devices, what is built, and every op's backends with their reasons."""
from __future__ import annotations

import sys

import platform
import torch


def collect() -> dict:
    from gkcore import __version__, _ext
    from gkcore.ops import _triton
    from gkcore.ops.registry import BACKEND_ORDER, all_ops

    info = {
        "gkcore": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton.triton_version(),
        "triton_interpreter": _triton.interpreter_on(),
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "ext_loaded": _ext.has_cpu(),
        "ext_error": _ext.ext_error(),
        "ext_cuda_built": _ext.has_cuda_build(),
        "ext_cuda_archs": _ext.cuda_archs(),
        "ext_openmp": bool(_ext.ext().has_openmp()) if _ext.has_cpu() else False,
        "ops": {},
    }
    for op in all_ops():
        row = {}
        for name in BACKEND_ORDER:
            b = op.backends.get(name)
            if b is None:
                row[name] = {"status": "none", "reason": "not implemented for this op"}
                continue
            why = b.unavailable_reason()
            devs = list(b.devices) + [f"{d} (explicit)" for d in b.explicit_only_devices]
            row[name] = {"status": "unavailable" if why else "available", "reason": why or "",
                         "note": getattr(b, "note", "") or "",
                         "devices": devs, "dtypes": [str(d).replace("torch.", "") for d in b.dtypes]}
        info["ops"][op.name] = row
    return info


def format_info(info: dict) -> str:
    from gkcore.ops.registry import BACKEND_ORDER

    lines = [
        f"gkcore {info['gkcore']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})  "
        f"triton {info['triton'] or 'not installed'}" + ("  [TRITON_INTERPRET=1]" if info["triton_interpreter"] else ""),
        "devices: " + (", ".join(info["devices"]) if info["devices"] else "CPU only (no CUDA device)"),
    ]
    if info["ext_loaded"]:
        cuda = (f"CUDA part built for sm_{info['ext_cuda_archs'].replace(',', ', sm_')}" if info["ext_cuda_built"]
                else "CUDA part NOT built (nvcc missing at build time or GKCORE_CUDA=OFF)")
        lines.append(f"gkcore._C: loaded; CPU part built ({'OpenMP' if info['ext_openmp'] else 'no OpenMP'}); {cuda}")
    else:
        lines.append(f"gkcore._C: NOT available: {info['ext_error']} (the reference backend still serves)")
    lines.append("")
    w = max([len(k) for k in info["ops"]] + [4])
    lines.append(f"{'op':{w}s}  " + "  ".join(f"{n:11s}" for n in BACKEND_ORDER))
    notes = []
    for op, row in info["ops"].items():
        cells = []
        for n in BACKEND_ORDER:
            st = row[n]["status"]
            cells.append({"available": "yes", "unavailable": "no", "none": "-"}[st])
            if st == "unavailable":
                notes.append(f"  {op}/{n}: {row[n]['reason']}")
            elif st == "available" and row[n].get("note"):
                notes.append(f"  {op}/{n}: {row[n]['note']}")
        lines.append(f"{op:{w}s}  " + "  ".join(f"{c:11s}" for c in cells))
    lines.append("(yes: can run here; no: implemented but cannot run here; -: no such backend)")
    if notes:
        lines.append("notes (why not, and what an available backend really runs):")
        lines.extend(notes)
    return "\n".join(lines)


def run(args) -> int:
    import json

    info = collect()
    if getattr(args, "model", None):
        from gkcore.models import parameter_table

        from gkcore.models.config import list_presets

        if args.model not in list_presets():
            print(f"error: --model {args.model!r} is not a preset; available: {', '.join(list_presets())}",
                  file=sys.stderr)
            return 2
        rows = parameter_table(args.model)  # built on the meta device: no memory, no weights read
        info["model"] = {"name": args.model, "parameters": {k: int(v) for k, v in rows}}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(format_info(info))
    if "model" in info:
        print(f"\nmodel {args.model}: parameters per component")
        for k, v in info["model"]["parameters"].items():
            print(f"  {k:32s} {v:>14,d}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, what is built, and each op's backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--model", default=None, help="also print the parameter count per component of a preset")
    p.set_defaults(func=run)
