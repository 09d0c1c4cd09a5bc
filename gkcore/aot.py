"""Ahead-of-time compile of every Triton kernel in ``gkcore.kernels`` for sm_90a and sm_80.

``python -m gkcore.aot [--arch 90 80] [--json FILE]`` compiles each entry of each kernels module's
``AOT_SPECS`` without a GPU, prints registers, spills and shared memory, and exits 1 if any kernel
spills registers or needs more shared memory than the target has. Must run without
``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit`` functions).
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from typing import List


def iter_specs():
    import gkcore.kernels as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        m = importlib.import_module(f"gkcore.kernels.{mod.name}")
        for spec in getattr(m, "AOT_SPECS", []):
            yield mod.name, spec


def main(argv: List[str] = None) -> int:
    from gkcore.ops._triton import interpreter_on
    from gkcore.testing import SHARED_MEMORY_LIMIT, aot_compile

    p = argparse.ArgumentParser(prog="python -m gkcore.aot", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--module", default=None, help="only this kernels module")
    a = p.parse_args(argv)
    if interpreter_on():
        print("unset TRITON_INTERPRET: the AOT compile needs real triton.jit functions", file=sys.stderr)
        return 2
    rows, failures = [], []
    for modname, spec in iter_specs():
        if a.module and modname != a.module:
            continue
        for arch in a.arch:
            try:
                r = aot_compile(spec, arch)
            except Exception as e:  # report every failing kernel, not just the first
                failures.append(f"{modname}:{spec.get('name')} sm_{arch}: compile failed: {e}")
                continue
            row = dict(module=modname, name=r.name, arch=arch, registers=r.registers, spill_stores=r.spill_stores,
                       spill_loads=r.spill_loads, shared=r.shared, num_warps=r.num_warps)
            rows.append(row)
            print(f"{modname:22s} {r.name:44s} sm_{arch}{'a' if arch == 90 else ' '} regs {r.registers:4d} "
                  f"spills {r.spills:5d} B  smem {r.shared:7d} B")
            if r.spills:
                failures.append(f"{modname}:{r.name} sm_{arch}: {r.spills} bytes of register spills")
            if r.shared > SHARED_MEMORY_LIMIT[arch]:
                failures.append(f"{modname}:{r.name} sm_{arch}: {r.shared} B shared memory > limit "
                                f"{SHARED_MEMORY_LIMIT[arch]} B")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"kernels": rows, "failures": failures}, fh, indent=1)
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    print(f"{len(rows)} kernel builds, {len(failures)} failures")
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
