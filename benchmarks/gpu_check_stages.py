"""Stage workers of benchmarks/gpu_check.py: ``python benchmarks/gpu_check_stages.py STAGE[,STAGE...]
--records DIR --state FILE --deadlines T1[,T2...] [--smoke]`` runs the stages one after the other in one
process (the orchestrator groups consecutive worker stages: a process start with torch and CUDA costs
seconds).

Each stage appends one JSON line per finished case to ``DIR/<stage>.jsonl`` (so a stage killed at its
budget keeps what it did) and a ``stage_end`` line with its exit status and time when it ends; it reads and
updates the shared ``--state`` (device facts, the peaks file), and stops starting new cases once its
deadline (unix time) is near. Stages:

* ``env``: versions, device, driver, CPU and GPU peaks (perf_model's probes, about 2 s).
* ``parity_design``: the parity rule of docs/numerics.md (gkcore.testing.check_parity: error of the backend in dtype X <= 2x
  the reference's error in dtype X + a floor, against the reference in float64 on the CPU; forward and
  the gradients of every differentiable input; outputs poisoned) for every cuda and triton backend in
  float32, bfloat16 and float16 at the shapes of docs/performance.md (``--smoke``: tiny odd shapes on the CPU, Triton
  under the interpreter). A case whose float64 truth would not finish before the deadline (predicted
  from the CPU's measured float64 matrix rate) is skipped with that note.
* ``determinism``: each backend run twice on the same inputs, forward and gradients compared bitwise;
  sample_hard_negatives drawn twice from equally seeded generators (and never a positive).
* ``train_step``: one bf16-autocast AdamW step of ``gk_mvlp_base`` at batch 64 (``--smoke``: the base
  preset shrunk, batch 4, fp32 on the CPU), automatic backends ("fused") against ``backend="reference"``:
  steps/s and peak memory, random weights, a synthetic batch of the model's batch contract.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import perf_model  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Ctx:
    def __init__(self, args, stage: str, deadline: Optional[float]):
        self.stage = stage
        self.smoke = args.smoke
        self.record_path = os.path.join(args.records, f"{stage}.jsonl") if args.records else None
        self.state_path = args.state
        self.deadline = deadline or (time.time() + 1e9)
        self.state = {}
        if self.state_path and os.path.exists(self.state_path):
            with open(self.state_path) as fh:
                self.state = json.load(fh)
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not self.smoke else "cpu")

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, **rec) -> None:
        rec.setdefault("stage", self.stage)
        line = json.dumps(rec, default=_json_default)
        if self.record_path:
            with open(self.record_path, "a") as fh:
                fh.write(line + "\n")

    def save_state(self) -> None:
        if self.state_path:
            with open(self.state_path, "w") as fh:
                json.dump(self.state, fh, indent=1, default=_json_default)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    return str(o)


def _finite(x: Optional[float]):
    return x if (x is None or math.isfinite(x)) else str(x)


# --------------------------------------------------------------------------------------------- env
def _nvidia_smi() -> Dict[str, Any]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,"
                              "temperature.gpu,power.draw,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"nvidia-smi: {e}"}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[-300:]}
    keys = ["name", "driver", "memory_total", "clock_sm", "clock_mem", "temperature", "power", "compute_cap"]
    first = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    return dict(zip(keys, [v.strip() for v in first.split(",")]))


#: distributions the benchmarks use as peers or need (looked up, not imported: importing them takes seconds)
PACKAGES = ("open_clip_torch", "inf-cl", "liger-kernel", "cut-cross-entropy", "ftfy", "wcwidth", "xformers",
            "torchvision", "timm", "transformers", "nvidia-dali-cuda130", "pytest-xdist", "pytest-benchmark",
            "hypothesis", "scikit-build-core", "pybind11", "cmake", "ninja")


def package_versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def stage_env(ctx: Ctx) -> int:
    info: Dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "torch_threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = None
        info["triton_error"] = str(e)
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}", arch=f"{p.major}{p.minor}",
                    sm_count=p.multi_processor_count, memory_total_bytes=p.total_memory,
                    l2_bytes=getattr(p, "L2_cache_size", None))
        info["nvidia_smi"] = _nvidia_smi()
        info["driver"] = info["nvidia_smi"].get("driver")
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"
    info["packages"] = package_versions()
    try:
        import gkcore
        from gkcore import _ext

        info["gkcore"] = {"version": gkcore.__version__, "file": gkcore.__file__, "ext_error": _ext.ext_error(),
                          "cuda_build": _ext.has_cuda_build(), "cuda_archs": _ext.cuda_archs()}
    except Exception as e:
        info["gkcore"] = {"error": f"{type(e).__name__}: {e}"}
    ctx.record(kind="env", **info)
    ctx.state.update(env=info)
    ctx.save_state()  # the build needs the arch even if the probes below are cut

    peaks: Dict[str, Any] = {}
    t0 = time.perf_counter()
    cpu = perf_model.probe_cpu(budget_s=0.3 if ctx.smoke else 1.5)
    peaks["cpu"] = cpu.to_dict()
    if torch.cuda.is_available() and not ctx.smoke:
        measured = perf_model.probe_gpu()
        name = torch.cuda.get_device_name(0)
        table = perf_model.gpu_peaks(name)
        if table is None:
            table = perf_model.Peaks(name, {"bfloat16": measured["matmul_bf16"], "float16": measured["matmul_bf16"],
                                            "float32": measured["matmul_fp32"], "float64": measured["matmul_fp32"] / 2},
                                     measured["matmul_fp32"], measured["copy"], "unknown GPU: measured by this check")
        table.measured = measured
        peaks["cuda"] = table.to_dict()
    ctx.record(kind="peaks", probe_s=round(time.perf_counter() - t0, 3), **peaks)
    pf = os.path.join(os.path.dirname(ctx.state_path or tempfile.gettempdir()), "peaks.json")
    with open(pf, "w") as fh:
        json.dump(peaks, fh, indent=1)
    ctx.state.update(env=info, peaks=peaks, peaks_file=pf)
    ctx.save_state()
    return 0


# ------------------------------------------------------------------------------------------ cases
def _boxes(g, B, R):
    xy = torch.rand(B, R, 2, generator=g) * 0.7
    wh = torch.rand(B, R, 2, generator=g) * 0.3 + 0.05
    return torch.cat([xy, xy + wh], -1)


def _tol(op: str, dtype: torch.dtype):
    """(atol, rtol_floor) of tests/ for the op and dtype (the absolute floor of docs/numerics.md)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if op == "region_pool":
        return (1e-2, 0.0) if half else (1e-6, 0.0)
    if op == "region_attention":
        return (2e-2, 0.0) if half else (1e-5, 0.0)
    if op == "info_nce":
        return {torch.float32: (2e-5, 5e-7), torch.bfloat16: (2e-2, 0.0), torch.float16: (3e-3, 0.0)}[dtype]
    if op == "linear_cross_entropy":
        return (2e-2, 1e-2) if half else (1e-5, 1e-6)
    raise KeyError(op)


def case_region_pool(dev, dtype, shape, seed):
    from gkcore.functional import region_pool

    B, gh, gw, C, R, S = (shape[k] for k in ("B", "gh", "gw", "C", "R", "output_size"))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, gh * gw, C, generator=g).to(dev, dtype).requires_grad_(True)
    boxes = _boxes(g, B, R).to(dev)

    def make(be):
        return lambda t, b: region_pool(t, b, (gh, gw), output_size=S, backend=be)

    probe = {"tokens": tokens, "boxes": boxes, "grid": (gh, gw)}
    return make, [tokens, boxes], probe


def case_region_attention(dev, dtype, shape, seed):
    from gkcore.functional import region_attention

    B, H, P, R, gh, gw, d = (shape[k] for k in ("B", "heads", "P", "R", "gh", "gw", "head_dim"))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, P, d, generator=g).to(dev, dtype).requires_grad_(True)
    k = torch.randn(B, H, gh * gw, d, generator=g).to(dev, dtype).requires_grad_(True)
    v = torch.randn(B, H, gh * gw, d, generator=g).to(dev, dtype).requires_grad_(True)
    boxes = _boxes(g, B, R).to(dev)
    mask = torch.rand(B, R, generator=g) > 0.1

    def make(be):
        def f(q_, k_, v_, b_):
            return region_attention(q_, k_, v_, b_, (gh, gw), region_mask=mask.to(q_.device), attend_patches=True,
                                    backend=be)
        return f

    probe = {"q": q, "k": k, "v": v, "boxes": boxes, "grid": (gh, gw)}
    return make, [q, k, v, boxes], probe


def case_info_nce(dev, dtype, shape, seed):
    import torch.nn.functional as F

    from gkcore.functional import info_nce

    B, N, D, alpha = shape["B"], shape["N"], shape["D"], shape["alpha"]
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g), dim=1)
    k = F.normalize(torch.randn(N, D, generator=g), dim=1)
    k[:B] = F.normalize(k[:B] + q, dim=1)
    qm = F.normalize(q + 0.1 * torch.randn(B, D, generator=g), dim=1)
    q = q.to(dev, dtype).requires_grad_(True)
    k, qm = k.to(dev, dtype), qm.to(dev, dtype)
    temp = torch.tensor(0.07, device=dev).requires_grad_(True)

    def make(be):
        return lambda q_, k_, qm_, t_: info_nce(q_, k_, scale=1.0 / t_, soft_query=qm_, alpha=alpha, backend=be)

    probe = {"query": q, "keys": k, "soft_query": qm if alpha > 0 else None}
    return make, [q, k, qm, temp], probe


def case_linear_cross_entropy(dev, dtype, shape, seed):
    from gkcore.functional import linear_cross_entropy

    T, V, D = shape["T"], shape["V"], shape["D"]
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g).to(dev, dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) / math.sqrt(D)).to(dev, dtype).requires_grad_(True)
    b = (torch.randn(V, generator=g) * 0.1).to(dev, dtype).requires_grad_(True)
    y = torch.randint(0, V, (T,), generator=g)
    y[torch.rand(T, generator=g) < 0.25] = -100

    def make(be):
        return lambda h_, w_, b_: linear_cross_entropy(h_, w_, y.to(h_.device), b_, backend=be)

    probe = {"hidden": h, "weight": w, "targets": y.to(dev), "bias": b}
    return make, [h, w, b], probe


CASE_FNS = {"region_pool": case_region_pool, "region_attention": case_region_attention, "info_nce": case_info_nce,
            "linear_cross_entropy": case_linear_cross_entropy}


def design_cases(smoke: bool) -> List[Dict[str, Any]]:
    """(op, backends, shape, dtypes) at the shapes of docs/performance.md, or tiny odd ones in smoke mode; cheapest first."""
    if smoke:  # one case per op, the interpreter is slow; the cuda backend is recorded as skipped
        return [
            dict(op="info_nce", backends=["triton"], dtypes=["float32", "bfloat16"],
                 shape=dict(B=7, N=29, D=16, alpha=0.4)),
            dict(op="linear_cross_entropy", backends=["triton"], dtypes=["float32"],
                 shape=dict(T=9, V=97, D=16)),
            dict(op="region_attention", backends=["triton"], dtypes=["float32"],
                 shape=dict(B=1, heads=2, P=5, R=3, gh=3, gw=3, head_dim=16)),
            dict(op="region_pool", backends=["cuda", "triton"], dtypes=["float32"],
                 shape=dict(B=2, gh=3, gw=5, C=7, R=3, output_size=1)),
        ]
    # the float64 truths on the CPU are the cost (truth_flops): output 7 pools a quarter of the batch, and
    # linear_cross_entropy runs the full 8192 tokens in bf16 (the training dtype), 2048 in the others
    all3 = ["float32", "bfloat16", "float16"]
    return [
        dict(op="region_pool", backends=["cuda", "triton"], dtypes=all3,
             shape=dict(B=256, gh=14, gw=14, C=768, R=29, output_size=1)),
        dict(op="region_attention", backends=["triton"], dtypes=all3,
             shape=dict(B=256, heads=12, P=75, R=29, gh=14, gw=14, head_dim=64)),
        dict(op="region_pool", backends=["cuda", "triton"], dtypes=all3,
             shape=dict(B=64, gh=14, gw=14, C=768, R=29, output_size=7)),
        dict(op="info_nce", backends=["triton"], dtypes=all3, shape=dict(B=1024, N=1024 + 65536, D=256, alpha=0.4)),
        dict(op="info_nce", backends=["triton"], dtypes=["bfloat16"], shape=dict(B=1024, N=1024 + 65536, D=256, alpha=0.0)),
        dict(op="linear_cross_entropy", backends=["triton"], dtypes=["bfloat16"], shape=dict(T=8192, V=31090, D=768)),
        dict(op="linear_cross_entropy", backends=["triton"], dtypes=["float32", "float16"],
             shape=dict(T=2048, V=31090, D=768)),
    ]


#: in smoke mode parity_design runs these ops and determinism the others (each op once, on the interpreter)
SMOKE_PARITY_OPS = ("info_nce", "region_pool")


def truth_flops(op: str, shape: Dict[str, Any]) -> float:
    """FLOPs of the float64 reference (forward + backward) as the reference computes it: region_pool and
    region_attention build the dense (R S^2, N) pooling matrix; info_nce and linear_cross_entropy
    materialise the logits (the perf model's counts). check_parity runs the reference twice more (in
    the low dtype, on the device): not counted, that is fast."""
    N = shape.get("gh", 1) * shape.get("gw", 1)
    if op == "region_pool":
        S = shape["output_size"]
        return 2 * 2.0 * shape["B"] * shape["R"] * S * S * N * shape["C"]
    if op == "region_attention":
        B, H, P, R, d = (shape[k] for k in ("B", "heads", "P", "R", "head_dim"))
        return 3 * (2 * 2.0 * B * R * N * H * d + 4.0 * B * H * P * (R + N) * d)
    if op == "info_nce":
        return perf_model.info_nce("full", B=shape["B"], N=shape["N"], D=shape["D"], alpha=shape["alpha"]).flops
    if op == "linear_cross_entropy":
        return perf_model.linear_cross_entropy("full", T=shape["T"], V=shape["V"], D=shape["D"]).flops
    return 0.0


def _cpu_f64_rate(ctx: Ctx) -> float:
    try:
        return float(ctx.state["peaks"]["cpu"]["measured"]["matmul_fp64"])
    except (KeyError, TypeError):
        return 5e10


def _reasons(op_name: str, backend: str, probe: Dict[str, Any]) -> List[str]:
    from gkcore.ops.registry import get_op

    op = get_op(op_name)
    be = op.backends.get(backend)
    if be is None:
        return [f"{op_name} has no {backend} backend"]
    return be.not_supported_reasons(probe, explicit=True)


def _gc():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_seed(ctx: Ctx) -> int:
    """Fresh inputs on every GPU run (the seed is recorded); a fixed seed in smoke mode, so that CI runs
    draw the same inputs (as the ci hypothesis profile does)."""
    return 0 if ctx.smoke else int.from_bytes(os.urandom(3), "little")


def stage_parity_design(ctx: Ctx) -> int:
    from gkcore.testing import ParityError, check_parity

    rate = _cpu_f64_rate(ctx)
    failed = 0
    seed = run_seed(ctx)
    for spec in design_cases(ctx.smoke):
        op = spec["op"]
        if ctx.smoke and op not in SMOKE_PARITY_OPS:
            continue  # the interpreter is slow: the other ops are run by the determinism stage
        for dt_name in spec["dtypes"]:
            dtype = DTYPES[dt_name]
            for be in spec["backends"]:
                rec = dict(kind="parity", op=op, backend=be, dtype=dt_name, shape=spec["shape"], device=str(ctx.dev),
                           seed=seed)
                # the float64 truth is the slow part: about 3 passes over the reference's FLOPs at the CPU's rate
                pred = 3.0 * truth_flops(op, spec["shape"]) / rate
                rec["predicted_truth_s"] = round(pred, 2)
                if pred > ctx.left() - 2:
                    ctx.record(status="skipped", reason=f"budget: the float64 truth would take ~{pred:.0f} s, "
                                                        f"{ctx.left():.0f} s left", **rec)
                    continue
                t0 = time.perf_counter()
                try:
                    make, args, probe = CASE_FNS[op](ctx.dev, dtype, spec["shape"], seed)
                    why = _reasons(op, be, probe)
                    if why:
                        ctx.record(status="skipped", reason="; ".join(why), **rec)
                        continue
                    atol, rtol = _tol(op, dtype)
                    errs = check_parity(make(be), make("reference"), args, atol=atol, rtol_floor=rtol,
                                        name=f"{op} {be} {dt_name}")
                    ctx.record(status="pass", errors={k: _finite(v) for k, v in errs.items()}, atol=atol,
                               rtol_floor=rtol, wall_s=round(time.perf_counter() - t0, 3), **rec)
                except ParityError as e:
                    failed += 1
                    ctx.record(status="fail", error=str(e)[:3000], wall_s=round(time.perf_counter() - t0, 3), **rec)
                except Exception as e:
                    failed += 1
                    ctx.record(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                               traceback=traceback.format_exc()[-2000:], wall_s=round(time.perf_counter() - t0, 3),
                               **rec)
                finally:
                    _gc()
    return 1 if failed else 0


# ------------------------------------------------------------------------------------ determinism
def _run_twice(fn: Callable, args: List[Any], seed: int = 0):
    outs = []
    for _ in range(2):
        a = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in args]
        out = fn(*a)
        o = out[0] if isinstance(out, (tuple, list)) else out
        g = torch.Generator().manual_seed(seed)
        up = torch.randn(o.shape, generator=g).to(o.device, o.dtype)
        leaves = [x for x in a if isinstance(x, torch.Tensor) and x.requires_grad]
        grads = torch.autograd.grad(o, leaves, up, allow_unused=True) if leaves else []
        outs.append([o.detach()] + [gr for gr in grads if gr is not None])
    same = all(torch.equal(x, y) for x, y in zip(*outs))
    finite = all(bool(torch.isfinite(x.float()).all()) for x in outs[0])
    return same, finite, len(outs[0])


def stage_determinism(ctx: Ctx) -> int:
    failed = 0
    seed = run_seed(ctx)
    seen = set()
    for spec in design_cases(ctx.smoke):
        op = spec["op"]
        if ctx.smoke and op in SMOKE_PARITY_OPS:
            continue  # the interpreter is slow: each op runs in one of the two stages
        for dt_name in ("float32",) if ctx.smoke else ("bfloat16", "float32"):
            if dt_name not in spec["dtypes"]:
                continue
            for be in spec["backends"]:
                key = (op, be, dt_name, json.dumps(spec["shape"], sort_keys=True))
                if key in seen:
                    continue
                seen.add(key)
                rec = dict(kind="determinism", op=op, backend=be, dtype=dt_name, shape=spec["shape"],
                           device=str(ctx.dev), seed=seed)
                if ctx.left() < 3:
                    ctx.record(status="skipped", reason="budget spent", **rec)
                    continue
                t0 = time.perf_counter()
                try:
                    make, args, probe = CASE_FNS[op](ctx.dev, DTYPES[dt_name], spec["shape"], seed)
                    why = _reasons(op, be, probe)
                    if why:
                        ctx.record(status="skipped", reason="; ".join(why), **rec)
                        continue
                    same, finite, n = _run_twice(make(be), args)
                    ok = same and finite
                    failed += 0 if ok else 1
                    ctx.record(status="pass" if ok else "fail", bitwise_equal=same, finite=finite, tensors=n,
                               wall_s=round(time.perf_counter() - t0, 3), **rec)
                except Exception as e:
                    failed += 1
                    ctx.record(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                               traceback=traceback.format_exc()[-2000:], **rec)
                finally:
                    _gc()
    # ITM negatives: the same seed gives the same draws, and never a positive
    B, D = (16, 8) if ctx.smoke else (1024, 256)
    for be in ("triton",):
        rec = dict(kind="determinism", op="sample_hard_negatives", backend=be, dtype="float32",
                   shape=dict(B=B, D=D), device=str(ctx.dev), seed=seed)
        try:
            import torch.nn.functional as F

            from gkcore.functional import sample_hard_negatives

            g = torch.Generator().manual_seed(seed)
            v = F.normalize(torch.randn(B, D, generator=g), dim=1).to(ctx.dev)
            t = F.normalize(torch.randn(B, D, generator=g), dim=1).to(ctx.dev)
            why = _reasons("sample_hard_negatives", be, {"image_feat": v, "text_feat": t})
            if why:
                ctx.record(status="skipped", reason="; ".join(why), **rec)
                continue
            draws = []
            for _ in range(2):
                gen = torch.Generator(device=ctx.dev).manual_seed(seed)
                draws.append(sample_hard_negatives(v, t, 1.0 / 0.07, generator=gen, backend=be))
            same = all(torch.equal(a, b) for a, b in zip(*draws))
            r = torch.arange(B, device=ctx.dev)
            no_pos = bool((draws[0][0] != r).all() and (draws[0][1] != r).all())
            ok = same and no_pos
            failed += 0 if ok else 1
            ctx.record(status="pass" if ok else "fail", bitwise_equal=same, no_positive=no_pos, **rec)
        except Exception as e:
            failed += 1
            ctx.record(status="error", error=f"{type(e).__name__}: {e}"[:2000], **rec)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------- train step
def synthetic_tokenizer(folder: str):
    """A WordPiece tokenizer from a vocabulary written here (BERT's special tokens, ``[unused0..99]``,
    letters, digits, punctuation, the words of the entity prompts): the model needs a tokenizer with its
    BOS token ``[unused0]``; the MiniLM package that holds the default one is not on the GPU machine."""
    from transformers import BertTokenizerFast

    from gkcore.data import knowledge as K

    words = sorted(set(re.findall(r"[a-z]+", " ".join(K.entity_prompts()).lower())))
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(i) for i in range(10)]
    vocab = (["[PAD]"] + [f"[unused{i}]" for i in range(100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
             + list(".,:;-()/'%") + chars + [f"##{c}" for c in chars] + [w for w in words if len(w) > 1])
    vocab = list(dict.fromkeys(vocab))
    with open(os.path.join(folder, "vocab.txt"), "w") as fh:
        fh.write("\n".join(vocab) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump({"do_lower_case": True, "model_max_length": 512}, fh)
    tok = BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    if len(tok) < len(vocab) or tok.convert_tokens_to_ids("[unused0]") == tok.unk_token_id:
        raise RuntimeError(f"the synthetic tokenizer did not load its vocabulary ({len(tok)} of {len(vocab)} tokens)")
    return tok


def synthetic_batch(model, B: int, L: int, seed: int, device) -> Dict[str, Any]:
    """A batch of the model's contract (docs/api.md, ``GKMVLP.check_batch``): random images, token ids
    ``[CLS] ... [SEP]`` of random lengths padded to L, random entity labels, boxes and masks; samples 0 and
    1 share a study (so the ITM sampler must skip them)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    tok = model.tokenizer
    V = len(tok)
    E = len(model.entity_prompts)
    ids = torch.randint(110, V, (B, L), generator=g)
    lengths = torch.randint(L // 4, L + 1, (B,), generator=g)
    pos = torch.arange(L)[None, :]
    att = (pos < lengths[:, None]).long()
    ids[:, 0] = tok.cls_token_id
    ids[torch.arange(B), lengths - 1] = tok.sep_token_id
    ids = torch.where(att.bool(), ids, torch.full_like(ids, tok.pad_token_id))
    labels = torch.randint(-1, 2, (B, E), generator=g)
    labels[:, 0] = 1
    study = torch.arange(B) + 100
    if B > 2:
        study[1] = study[0]
    batch = {"image": torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, generator=g),
             "input_ids": ids, "attention_mask": att, "entity_labels": labels,
             "region_boxes": _boxes(g, B, 29), "region_mask": torch.rand(B, 29, generator=g) > 0.15,
             "study_id": study}
    model.check_batch(batch)
    return {k: v.to(device) for k, v in batch.items()}


#: the base preset shrunk for the CPU smoke run (same code paths, seconds instead of minutes)
SMOKE_OVERRIDES = dict(image_size=32, embed_dim=32, dropout=0.0, max_length=24, vision__patch_size=8,
                       vision__embed_dim=64, vision__depth=1, vision__num_heads=2, text__hidden_size=64,
                       text__num_layers=2, text__fusion_start=1, text__num_heads=2, text__intermediate_size=128,
                       text__decoder_layers=1, text__vocab_size=1000, gk__depth=1, gk__num_heads=2,
                       loss__queue_size=16)


def _peak_mem(dev) -> Optional[int]:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def build_model(backend, tok, overrides, dev):
    """``create_model("gk_mvlp_base", ...)`` with its parameters created on ``dev`` (random init on the GPU
    takes a fraction of the CPU's time for half a billion parameters), then ``.to(dev)`` so the model
    moves its own state (the ITM generator); built on the CPU and moved if that fails."""
    import gkcore

    if dev.type == "cuda":
        try:
            with torch.device(dev):
                return gkcore.create_model("gk_mvlp_base", backend=backend, tokenizer=tok, **overrides).to(dev)
        except Exception as e:
            print(f"building on the device failed ({type(e).__name__}: {e}); building on the CPU", flush=True)
    return gkcore.create_model("gk_mvlp_base", backend=backend, tokenizer=tok, **overrides).to(dev)


def stage_train_step(ctx: Ctx) -> int:
    dev = ctx.dev
    B = 4 if ctx.smoke else 64
    overrides = SMOKE_OVERRIDES if ctx.smoke else {}
    amp = dev.type == "cuda"
    tmp = tempfile.mkdtemp(prefix="gkcheck-tok-")
    tok = synthetic_tokenizer(tmp)
    results = {}
    flops = None
    if not ctx.smoke:
        flops = perf_model.gk_mvlp_step(B=B).flops
    failed = 0
    for label, backend in (("fused", None), ("reference", "reference")):
        rec = dict(kind="train_step", variant=label, backend=backend or "auto", preset="gk_mvlp_base", batch=B,
                   amp="bf16 autocast" if amp else "off (fp32)", device=str(dev), overrides=overrides or None)
        if ctx.left() < 8:
            ctx.record(status="skipped", reason="budget spent", **rec)
            continue
        t0 = time.perf_counter()
        model = opt = batch = None
        try:
            torch.manual_seed(0)
            model = build_model(backend, tok, overrides, dev)
            model.train()
            build_s = time.perf_counter() - t0
            batch = synthetic_batch(model, B, model.config.max_length, 0, dev)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.02)

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(batch)
                out["loss"].backward()
                opt.step()
                return out

            times, losses = [], []
            warm = 1 if ctx.smoke else 2
            static = None
            for i in range(warm + (1 if ctx.smoke else 5)):
                if i == warm:
                    ctx.sync()
                    _reset_peak(dev)
                    static = int(torch.cuda.memory_allocated(dev)) if dev.type == "cuda" else None
                if i >= warm and times and ctx.left() < 3 * max(times) + 2:
                    break
                ctx.sync()
                s0 = time.perf_counter()
                out = step()
                ctx.sync()
                dt = time.perf_counter() - s0
                if i >= warm:
                    times.append(dt)
                else:
                    rec.setdefault("warmup_s", []).append(round(dt, 3))
                losses.append(float(out["loss"].detach()))
            peak = _peak_mem(dev)
            med = sorted(times)[len(times) // 2] if times else None
            finite = all(math.isfinite(x) for x in losses)
            res = dict(status="pass" if finite and times else "fail", build_s=round(build_s, 2), step_times_s=times,
                       median_step_s=med, steps_per_s=(1.0 / med) if med else None, peak_bytes=peak,
                       static_bytes=static, peak_extra_bytes=(peak - static) if peak and static else None,
                       losses=losses, params=sum(p.numel() for p in model.parameters()),
                       model_flops=flops, model_tflops_per_s=(flops / med / 1e12) if flops and med else None,
                       wall_s=round(time.perf_counter() - t0, 2))
            if res["status"] != "pass":
                failed += 1
            results[label] = res
            ctx.record(**rec, **res)
        except Exception as e:
            failed += 1
            ctx.record(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:],
                       wall_s=round(time.perf_counter() - t0, 2), **rec)
        finally:
            model = opt = batch = None
            _gc()
    f, r = results.get("fused"), results.get("reference")
    if f and r and f.get("steps_per_s") and r.get("steps_per_s"):
        speed = f["steps_per_s"] / r["steps_per_s"]
        mem = (f["peak_bytes"] / r["peak_bytes"]) if f.get("peak_bytes") and r.get("peak_bytes") else None
        ctx.record(kind="train_compare", speedup=speed, memory_ratio=mem, target_speedup=1.3, target_memory_ratio=0.8,
                   speedup_met=speed >= 1.3, memory_met=(mem is not None and mem <= 0.8))
    return 1 if failed else 0


STAGES = {"env": stage_env, "parity_design": stage_parity_design, "determinism": stage_determinism,
          "train_step": stage_train_step}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", help="comma-separated: " + ", ".join(STAGES))
    ap.add_argument("--records", default=None, help="folder for the <stage>.jsonl records")
    ap.add_argument("--state", default=None)
    ap.add_argument("--deadlines", default="", help="comma-separated unix times, one per stage")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    deadlines = [float(x) for x in args.deadlines.split(",") if x] or [None] * len(stages)
    if os.environ.get("GKCORE_CHECK_AUTOTUNE", "") not in ("", "0"):
        try:
            import check_plugin

            check_plugin.limit_autotune()
        except Exception as e:
            print(f"autotune limit not applied: {e}", file=sys.stderr)
    worst = 0
    for stage, deadline in zip(stages, deadlines):
        ctx = Ctx(args, stage, deadline)
        print(f"[{stage}] start ({ctx.left():.0f} s to its deadline)", flush=True)
        t0 = time.perf_counter()
        try:
            rc = STAGES[stage](ctx)
        except Exception as e:
            rc = 3
            ctx.record(kind="stage_error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            traceback.print_exc()
        wall = time.perf_counter() - t0
        ctx.record(kind="stage_end", rc=rc, wall_s=round(wall, 3))
        print(f"[{stage}] end rc={rc} in {wall:.1f} s", flush=True)
        worst = max(worst, rc)
    return worst


if __name__ == "__main__":
    sys.exit(main())
