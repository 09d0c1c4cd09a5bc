"""info_nce: reference, torch.compile(reference), cpu, triton (and Inf-CL where installed, GPU only, hard
labels only) side by side, at the ITC shape of docs/performance.md: queries (B, D) with a learnable temperature against
[momentum keys; queue] (no grad), hard labels (alpha 0) and momentum distillation (alpha 0.4).

GPU: B=1024, queue 65536, D=256. CPU twin: B=4096, queue 16384, D=256 (N = 20480).
Quick (GKCORE_BENCH_QUICK=1): B=256, queue 1024, D=64. Check mode (GKCORE_BENCH_CHECK=1): full only.

Inf-CL runs through ``inf_cl.cal_flash_loss`` (the single-process path that ``cal_inf_loss`` itself takes
without torch.distributed; ``cal_inf_loss``'s scale wrapper all-reduces the scale's gradient, which needs
a process group). It computes in float32 whatever the input dtype.
"""
import pytest
import torch
import torch.nn.functional as F

from harness import QUICK, bench_case, compiled, cuda_or_cpu, modes, peer

from gkcore.functional import info_nce
from gkcore.ops.info_nce import OP
from gkcore.reference.info_nce import info_nce_reference

DEV = cuda_or_cpu()
if QUICK:
    B, Q, D = 256, 1024, 64
elif DEV.type == "cuda":
    B, Q, D = 1024, 65536, 256
else:
    B, Q, D = 4096, 16384, 256
N = B + Q
PROVIDERS = ["reference", "compile", "cpu", "triton", "inf_cl"]
MODES = modes(["forward", "full"])
DTYPE = torch.bfloat16 if DEV.type == "cuda" else torch.float32
#: the big CPU shape takes seconds per call: fewer timed rounds there
ROUNDS = None if (QUICK or DEV.type == "cuda") else 3


def make_inputs():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, D, generator=g), dim=1)
    k = F.normalize(torch.randn(N, D, generator=g), dim=1)
    k[:B] = F.normalize(k[:B] + q, dim=1)
    qm = F.normalize(q + 0.1 * torch.randn(B, D, generator=g), dim=1)
    temp = torch.tensor(0.07)
    return {"query": q.to(DEV, DTYPE).requires_grad_(True), "keys": k.to(DEV, DTYPE),
            "soft_query": qm.to(DEV, DTYPE), "temp": temp.to(DEV).requires_grad_(True)}


def _call(f, alpha):
    def fn(inp):
        return f(inp["query"], inp["keys"], scale=1.0 / inp["temp"], soft_query=inp["soft_query"], alpha=alpha)
    return fn


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_info_nce_itc(benchmark, provider, alpha, mode):
    if provider == "reference":
        fn = _call(info_nce_reference, alpha)
    elif provider == "compile":
        fn = _call(compiled(info_nce_reference), alpha)
    elif provider == "inf_cl":
        if DEV.type != "cuda":
            pytest.skip("Inf-CL runs on CUDA only")
        mod = peer("inf_cl", "inf-cl")
        if alpha > 0:
            pytest.skip("Inf-CL has no soft (momentum-distillation) targets")

        def fn(inp):
            labels = torch.arange(B, device=DEV)
            return mod.cal_flash_loss(inp["query"], inp["keys"], labels=labels, scale=1.0 / inp["temp"],
                                      head_dim=D).mean()
    else:
        probe = make_inputs()
        why = OP.backends[provider].not_supported_reasons({"query": probe["query"], "keys": probe["keys"]})
        if why:
            pytest.skip(f"{provider} cannot run here: {'; '.join(why)}")
        fn = _call(lambda *a, **kw: info_nce(*a, backend=provider, **kw), alpha)

    def truth(inp):
        return info_nce_reference(inp["query"].detach().double().cpu(), inp["keys"].double().cpu(),
                                  scale=1.0 / float(inp["temp"].detach()), soft_query=inp["soft_query"].double().cpu(),
                                  alpha=alpha)

    bench_case(benchmark, op="info_nce", provider=provider, mode=mode,
               shape=dict(B=B, queue=Q, N=N, D=D, alpha=alpha, dtype=str(DTYPE).replace("torch.", "")),
               make_inputs=make_inputs, fn=fn, truth=truth if mode == "forward" else None, rounds=ROUNDS)
