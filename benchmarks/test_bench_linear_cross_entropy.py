"""linear_cross_entropy (LM head + loss): reference (``F.linear`` + ``F.cross_entropy``),
``torch.compile(reference)``, Liger-Kernel's fused linear cross-entropy, cut-cross-entropy, and our cpu /
triton backends side by side; forward and forward + backward, time and peak extra memory.

Shapes: GPU 8192 tokens x vocab 31090 x D 768 (docs/performance.md: logits never materialised, faster than the
reference), float32 and bfloat16. CPU: the CPU-twin shape of docs/performance.md, 4096 tokens x vocab 30522 x D 384 float32
(quick: 256 tokens x 31090 x 768). On the CPU cut-cross-entropy runs its ``torch_compile`` implementation
(its triton kernels need a GPU).
A quarter of the targets are ``ignore_index``; mean reduction, bias on (Liger and cut-cross-entropy run
without a bias where their API has none: noted as ``bias=False`` in the shape).
"""
import math

import pytest
import torch

from harness import QUICK, bench_case, compiled, cuda_or_cpu, modes, peer

from gkcore.functional import linear_cross_entropy
from gkcore.ops.linear_cross_entropy import OP
from gkcore.reference.linear_cross_entropy import linear_cross_entropy_reference

DEV = cuda_or_cpu()
V, D = 31090, 768
if DEV.type == "cuda":
    T = 8192
    DTYPES = [torch.float32, torch.bfloat16]
elif QUICK:
    T = 256
    DTYPES = [torch.float32]
else:
    T, V, D = 4096, 30522, 384
    DTYPES = [torch.float32]
PROVIDERS = ["reference", "compile", "liger", "cut_cross_entropy", "cpu", "triton"]
MODES = modes(["forward", "full"])


def make_inputs(dtype):
    def make():
        g = torch.Generator().manual_seed(0)
        h = torch.randn(T, D, generator=g).to(DEV, dtype).requires_grad_(True)
        w = (torch.randn(V, D, generator=g) / math.sqrt(D)).to(DEV, dtype).requires_grad_(True)
        b = (torch.randn(V, generator=g) * 0.1).to(DEV, dtype).requires_grad_(True)
        y = torch.randint(0, V, (T,), generator=g)
        y[torch.rand(T, generator=g) < 0.25] = -100
        return {"hidden": h, "weight": w, "bias": b, "targets": y.to(DEV)}

    return make


def _probe(name, fn, dtype):
    """Run a third-party provider once on a tiny problem; skip (with its error) when it cannot serve."""
    g = torch.Generator().manual_seed(1)
    tiny = {"hidden": torch.randn(16, 64, generator=g).to(DEV, dtype).requires_grad_(True),
            "weight": torch.randn(97, 64, generator=g).to(DEV, dtype).requires_grad_(True),
            "bias": torch.randn(97, generator=g).to(DEV, dtype).requires_grad_(True),
            "targets": torch.randint(0, 97, (16,), generator=g).to(DEV)}
    try:
        fn(tiny).backward()
    except Exception as e:  # e.g. a dtype or a bias the package does not support
        pytest.skip(f"{name} cannot run this case: {type(e).__name__}: {str(e)[:200]}")
    return fn


def _liger(dtype):
    if DEV.type != "cuda":
        pytest.skip("Liger-Kernel's fused linear cross-entropy is a GPU (triton) kernel; no CUDA device here")
    mod = peer("liger_kernel.transformers", "liger-kernel")
    loss = mod.LigerFusedLinearCrossEntropyLoss()
    return _probe("Liger-Kernel", lambda inp: loss(inp["weight"], inp["hidden"], inp["targets"], inp["bias"]), dtype)


def _cce(dtype):
    """cut-cross-entropy: its triton kernel on the GPU, its ``torch_compile`` implementation on the CPU.
    Returns (fn, has_bias): the 25.x API takes no bias, so the bias is left out there."""
    import inspect

    mod = peer("cut_cross_entropy", "cut-cross-entropy")
    kw = {} if DEV.type == "cuda" else {"impl": "torch_compile"}
    has_bias = "bias" in inspect.signature(mod.linear_cross_entropy).parameters
    if has_bias:
        def fn(inp):
            return mod.linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], bias=inp["bias"], **kw)
    else:
        def fn(inp):
            return mod.linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], **kw)
    return _probe("cut-cross-entropy", fn, dtype), has_bias


_TRUTH = {}


def _truth(dtype):
    """The float64 CPU reference loss of the inputs of ``dtype`` (computed once per dtype: at the GPU
    shape it is a 2 GB logits matrix)."""
    def truth(inp):
        if dtype not in _TRUTH:
            f64 = {k: (v.detach().double().cpu() if v.is_floating_point() else v.cpu()) for k, v in inp.items()}
            _TRUTH[dtype] = linear_cross_entropy_reference(f64["hidden"], f64["weight"], f64["targets"], f64["bias"])
        return _TRUTH[dtype]

    return truth


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_cross_entropy(benchmark, provider, dtype, mode):
    ref = lambda inp: linear_cross_entropy_reference(inp["hidden"], inp["weight"], inp["targets"],  # noqa: E731
                                                     inp["bias"])
    bias = True
    if provider == "reference":
        fn = ref
    elif provider == "compile":
        cref = compiled(linear_cross_entropy_reference)
        fn = lambda inp: cref(inp["hidden"], inp["weight"], inp["targets"], inp["bias"])  # noqa: E731
    elif provider == "liger":
        fn = _liger(dtype)
    elif provider == "cut_cross_entropy":
        fn, bias = _cce(dtype)
    else:
        probe = {"hidden": torch.empty(1, D, device=DEV, dtype=dtype), "weight": torch.empty(1, D, device=DEV, dtype=dtype),
                 "targets": torch.zeros(1, dtype=torch.long, device=DEV), "bias": None}
        why = OP.backends[provider].not_supported_reasons(probe)
        if why:
            pytest.skip(f"{provider} cannot run here: {'; '.join(why)}")
        fn = lambda inp: linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], inp["bias"],  # noqa: E731
                                              backend=provider)

    bench_case(benchmark, op="linear_cross_entropy", provider=provider, mode=mode,
               shape=dict(T=T, V=V, D=D, dtype=str(dtype).replace("torch.", ""), bias=bias, ignored=0.25),
               make_inputs=make_inputs(dtype), fn=fn, truth=_truth(dtype) if mode == "forward" and bias else None,
               rounds=(2 if QUICK and DEV.type == "cpu" else 3 if DEV.type == "cpu" else None))
