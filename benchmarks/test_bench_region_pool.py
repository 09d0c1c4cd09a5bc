"""region_pool: reference, torch.compile(reference), cpu, cuda, triton and torchvision's roi_align,
side by side. The region-attention shape of docs/performance.md: B=256, 14x14 grid, C=768, R=29 regions,
output_size 1 and 7 (quick: B=8)."""
import pytest
import torch

from harness import QUICK, bench_case, compiled, cuda_or_cpu, modes, peer

from gkcore.functional import region_pool
from gkcore.ops.region_pool import OP
from gkcore.reference.region_pool import region_pool_reference

DEV = cuda_or_cpu()
B = 8 if QUICK else 256
GH = GW = 14
C = 768
R = 29
PROVIDERS = ["reference", "compile", "cpu", "cuda", "triton", "torchvision"]
MODES = modes(["forward", "backward", "full"])


def make_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(B, GH * GW, C, generator=g).to(DEV, dtype).requires_grad_(True)
    xy = torch.rand(B, R, 2, generator=g) * 0.7
    wh = torch.rand(B, R, 2, generator=g) * 0.3 + 0.05
    boxes = torch.cat([xy, xy + wh], -1).to(DEV)
    return {"tokens": tokens, "boxes": boxes}


def _tv_fn(os_):
    import torchvision

    def fn(inp):
        t, bx = inp["tokens"], inp["boxes"]
        img = t.transpose(1, 2).reshape(B, C, GH, GW)
        idx = torch.arange(B, device=bx.device, dtype=bx.dtype).repeat_interleave(R)[:, None]
        scale = torch.tensor([GW, GH, GW, GH], device=bx.device, dtype=bx.dtype)
        rois = torch.cat([idx, (bx * scale).reshape(-1, 4)], 1)
        out = torchvision.ops.roi_align(img, rois, os_, 1.0, 2, True)  # (B*R, C, os, os)
        return out.mean(dim=(2, 3)).view(B, R, C)

    return fn


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("output_size", [1, 7])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_region_pool(benchmark, provider, output_size, mode):
    ref = lambda inp: region_pool_reference(inp["tokens"], inp["boxes"], (GH, GW), output_size)  # noqa: E731
    if provider == "reference":
        fn = ref
    elif provider == "compile":
        cref = compiled(lambda t, b: region_pool_reference(t, b, (GH, GW), output_size))
        fn = lambda inp: cref(inp["tokens"], inp["boxes"])  # noqa: E731
    elif provider == "torchvision":
        peer("torchvision", "torchvision")
        fn = _tv_fn(output_size)
    else:
        probe = make_inputs()
        why = OP.backends[provider].not_supported_reasons({"tokens": probe["tokens"], "boxes": probe["boxes"],
                                                            "grid": (GH, GW)})
        if why:
            pytest.skip(f"{provider} cannot run here: {'; '.join(why)}")
        fn = lambda inp: region_pool(inp["tokens"], inp["boxes"], (GH, GW), output_size=output_size,  # noqa: E731
                                     backend=provider)

    def truth(inp):
        t = inp["tokens"].detach().double().cpu()
        return region_pool_reference(t, inp["boxes"].double().cpu(), (GH, GW), output_size)

    bench_case(benchmark, op="region_pool", provider=provider, mode=mode,
               shape=dict(B=B, grid=f"{GH}x{GW}", C=C, R=R, output_size=output_size, dtype="float32"),
               make_inputs=make_inputs, fn=fn, truth=truth if mode == "forward" else None)
