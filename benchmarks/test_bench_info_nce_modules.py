"""Contrastive loss modules side by side.

* ``ITCLoss`` (ALBEF ITC with queues, alpha 0.4): ``gkcore.nn.ITCLoss(backend="reference")`` (plain
  torch, materialises the (B, B + Q) logits of both directions) against ``gkcore.nn.ITCLoss()``
  (automatic backend: the fused triton / cpu info_nce where they serve the inputs). Target shape
  (docs/performance.md) on the GPU: B=1024, queue 65536, D=256; on the CPU: B=256, queue 4096 and the CPU-twin target B=4096,
  queue 16384 (D=256). The module runs in eval mode (no enqueue) so every timed call sees the same
  queues and the output can be checked against the float64 reference; the enqueue itself is an
  O(B * D) ``index_copy_``.
* ``ClipLoss`` (no queue): open_clip's ``ClipLoss``, ``gkcore.nn.ClipLoss(backend="reference")`` and
  ``gkcore.nn.ClipLoss()``. GPU: B=32768, D=512 (docs/performance.md: runs where the reference runs out of memory);
  CPU: B=2048, D=512.

Modes: forward and full (forward + backward). float32 (plus bfloat16 on the GPU). ``max_error`` is
against the float64 CPU reference (loss for forward; the feature gradients for full), skipped for the
32768-batch CLIP shape whose float64 logits would not fit. Quick (GKCORE_BENCH_QUICK=1): B=64,
queue 1024 (ITC) and B=256 (CLIP), float32 only.
"""
import pytest
import torch
import torch.nn.functional as F

from harness import QUICK, bench_case, cuda_or_cpu, modes, peer

from gkcore.nn import ClipLoss, ITCLoss

DEV = cuda_or_cpu()
GPU = DEV.type == "cuda"
D_ITC = 256
ALPHA = 0.4
if QUICK:
    ITC_SHAPES = {"quick": (64, 1024)}
    CLIP_SHAPES = {"quick": (256, 512)}
    DTYPES = [torch.float32]
elif GPU:
    ITC_SHAPES = {"design": (1024, 65536)}
    CLIP_SHAPES = {"design": (32768, 512)}
    DTYPES = [torch.float32, torch.bfloat16]
else:
    ITC_SHAPES = {"small": (256, 4096), "cpu_twin": (4096, 16384)}
    CLIP_SHAPES = {"cpu": (2048, 512)}
    DTYPES = [torch.float32]
MODES = modes(["forward", "full"])
TRUTH_MAX_LOGITS = 2 ** 28  # float64 truth only when B * N fits comfortably in host memory


def _unit(g, n, d):
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


# ------------------------------------------------------------------------------------------- ITC
def _itc_module(Q, backend, dtype):
    torch.manual_seed(0)  # the same queues for every provider
    m = ITCLoss(D_ITC, Q, backend=backend).to(DEV, dtype)
    return m.eval()


def _itc_inputs(B, dtype):
    def make():
        g = torch.Generator().manual_seed(1)
        v, t = _unit(g, B, D_ITC), _unit(g, B, D_ITC)
        vm = F.normalize(v + 0.1 * _unit(g, B, D_ITC), dim=1)
        tm = F.normalize(t + 0.1 * _unit(g, B, D_ITC), dim=1)
        return {"image_feat": v.to(DEV, dtype).requires_grad_(True), "text_feat": t.to(DEV, dtype).requires_grad_(True),
                "image_feat_m": vm.to(DEV, dtype), "text_feat_m": tm.to(DEV, dtype)}
    return make


_TRUTH = {}


def _cached(key, fn):
    """The float64 truth of one (shape, dtype, mode): the inputs are the same for every provider."""
    if key not in _TRUTH:
        _TRUTH.clear()  # one at a time: at the GPU shapes each is large
        _TRUTH[key] = fn()
    return _TRUTH[key]


def _itc_truth(Q, mode):
    def truth(inp):
        key = ("itc", Q, mode, inp["image_feat"].shape[0], inp["image_feat"].dtype)
        return _cached(key, lambda: _itc_truth_of(inp, Q, mode))
    return truth


def _itc_truth_of(inp, Q, mode):
    m = _itc_module(Q, "reference", torch.float64).cpu()
    v = inp["image_feat"].detach().double().cpu().requires_grad_(True)
    t = inp["text_feat"].detach().double().cpu().requires_grad_(True)
    loss = m(v, t, inp["image_feat_m"].double().cpu(), inp["text_feat_m"].double().cpu(), alpha=ALPHA)
    if mode == "forward":
        return loss.detach()
    loss.backward()
    return v.grad, t.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", list(ITC_SHAPES))
@pytest.mark.parametrize("provider", ["reference", "gkcore"])
def test_itc_loss(benchmark, provider, shape, dtype, mode):
    B, Q = ITC_SHAPES[shape]
    m = _itc_module(Q, "reference" if provider == "reference" else None, dtype)
    fn = lambda inp: m(inp["image_feat"], inp["text_feat"], inp["image_feat_m"], inp["text_feat_m"],  # noqa: E731
                       alpha=ALPHA)
    small = B * (B + Q) <= TRUTH_MAX_LOGITS
    bench_case(benchmark, op="itc_loss", provider=provider, mode=mode,
               shape=dict(B=B, queue=Q, D=D_ITC, alpha=ALPHA, dtype=str(dtype).replace("torch.", "")),
               make_inputs=_itc_inputs(B, dtype), fn=fn, truth=_itc_truth(Q, mode) if small else None,
               grad_of=lambda inp, out: (inp["image_feat"].grad, inp["text_feat"].grad), device=DEV)


# ------------------------------------------------------------------------------------------ CLIP
def _clip_inputs(B, D, dtype):
    def make():
        g = torch.Generator().manual_seed(2)
        i = _unit(g, B, D)
        t = F.normalize(_unit(g, B, D) + 0.5 * i, dim=1)
        return {"image_features": i.to(DEV, dtype).requires_grad_(True),
                "text_features": t.to(DEV, dtype).requires_grad_(True),
                "logit_scale": torch.tensor(1 / 0.07, device=DEV, dtype=dtype)}
    return make


def _clip_truth(mode):
    def truth(inp):
        key = ("clip", mode, tuple(inp["image_features"].shape), inp["image_features"].dtype)
        return _cached(key, lambda: _clip_truth_of(inp, mode))
    return truth


def _clip_truth_of(inp, mode):
    i = inp["image_features"].detach().double().cpu().requires_grad_(True)
    t = inp["text_features"].detach().double().cpu().requires_grad_(True)
    loss = ClipLoss(backend="reference")(i, t, inp["logit_scale"].double().cpu())
    if mode == "forward":
        return loss.detach()
    loss.backward()
    return i.grad, t.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", list(CLIP_SHAPES))
@pytest.mark.parametrize("provider", ["open_clip", "reference", "gkcore"])
def test_clip_loss(benchmark, provider, shape, dtype, mode):
    B, D = CLIP_SHAPES[shape]
    if provider == "open_clip":
        oc = peer("open_clip.loss", "open-clip-torch")
        m = oc.ClipLoss()
    else:
        m = ClipLoss(backend="reference" if provider == "reference" else None)
    fn = lambda inp: m(inp["image_features"], inp["text_features"], inp["logit_scale"])  # noqa: E731
    small = B * B <= TRUTH_MAX_LOGITS
    bench_case(benchmark, op="clip_loss", provider=provider, mode=mode,
               shape=dict(B=B, D=D, dtype=str(dtype).replace("torch.", "")),
               make_inputs=_clip_inputs(B, D, dtype), fn=fn, truth=_clip_truth(mode) if small else None,
               grad_of=lambda inp, out: (inp["image_features"].grad, inp["text_features"].grad), device=DEV)
