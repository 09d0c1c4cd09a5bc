"""region_attention side by side, forward, backward and full (forward + backward); time, peak memory and
the forward's error against the float64 reference.

Providers:
* ``reference``: region_pool (dense pooling matrix) + ``scaled_dot_product_attention`` with the mask;
* ``sdpa``: ``scaled_dot_product_attention`` with the boolean mask over precomputed region keys/values
  (``[region_pool(k); k]``, ``[region_pool(v); v]``, pooled by gkcore's region_pool, automatic backend,
  inside the timed call): the plain-PyTorch path with fast pooling;
* ``compile``: ``torch.compile(reference)``;
* ``flex``: FlexAttention (compiled) over precomputed region keys/values: ``[region_pool(k); k]`` and
  ``[region_pool(v); v]`` (B, H, R + N, d) materialised by gkcore's region_pool inside the timed call,
  masked regions removed by a ``score_mod``; forward only on the CPU (torch has no CPU backward for it);
* ``xformers``: ``memory_efficient_attention`` over the same precomputed keys/values with an additive
  bias for the mask (GPU, when xformers is installed);
* ``triton``: the fused kernel (pooling on chip, GPU only: on the CPU it would run in the interpreter);
* ``cpu``: the C++/OpenMP twin (pooling on the fly, online softmax; CPU only).

Shapes: the target of docs/performance.md (B=256, P=75 queries, R=29 regions + 196 patches on a 14x14 grid, D=768 = 12 heads of
64), a smaller (B=32) and a larger (B=512) batch; bf16 on the GPU, fp32 on the CPU; 10 % of the regions
masked. Quick (GKCORE_BENCH_QUICK=1): B=4, one shape. Check mode (GKCORE_BENCH_CHECK=1): the docs/performance.md shape,
full only.
"""
import pytest
import torch

from harness import CHECK, QUICK, bench_case, compiled, cuda_or_cpu, modes, peer

from gkcore.functional import region_attention, region_pool
from gkcore.ops.region_attention import OP
from gkcore.reference.region_attention import region_attention_reference

DEV = cuda_or_cpu()
DTYPE = torch.bfloat16 if DEV.type == "cuda" else torch.float32
GH = GW = 14
N = GH * GW
H, HD = 12, 64
P, R = 75, 29
SHAPES = {"quick": 4} if QUICK else {"design": 256} if CHECK else {"small": 32, "design": 256, "large": 512}
PROVIDERS = ["reference", "compile", "sdpa", "flex", "xformers", "triton", "cpu"]
MODES = modes(["forward", "backward", "full"])


def make_inputs(B):
    def make():
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, P, HD, generator=g).to(DEV, DTYPE).requires_grad_(True)
        k = torch.randn(B, H, N, HD, generator=g).to(DEV, DTYPE).requires_grad_(True)
        v = torch.randn(B, H, N, HD, generator=g).to(DEV, DTYPE).requires_grad_(True)
        xy = torch.rand(B, R, 2, generator=g) * 0.7
        wh = torch.rand(B, R, 2, generator=g) * 0.3 + 0.05
        boxes = torch.cat([xy, xy + wh], -1).to(DEV)
        mask = (torch.rand(B, R, generator=g) > 0.1).to(DEV)
        return {"q": q, "k": k, "v": v, "boxes": boxes, "mask": mask}
    return make


def _pooled_kv(inp):
    """[region_pool(k); k] and [region_pool(v); v], (B, H, R + N, d), pooled by gkcore.region_pool."""
    k, v, boxes = inp["k"], inp["v"], inp["boxes"]
    B = k.shape[0]
    kv = torch.cat([k, v], -1).permute(0, 2, 1, 3).reshape(B, N, H * 2 * HD)
    pooled = region_pool(kv, boxes, (GH, GW)).view(B, R, H, 2 * HD).transpose(1, 2)
    return torch.cat([pooled[..., :HD], k], 2), torch.cat([pooled[..., HD:], v], 2)


def _flex_fn(mode):
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"FlexAttention unavailable: {e}")
    if DEV.type == "cpu" and mode != "forward":
        pytest.skip("FlexAttention has no backward on the CPU (torch raises NotImplementedError)")
    flex = torch.compile(flex_attention, dynamic=False)

    def fn(inp):
        keys, vals = _pooled_kv(inp)
        mask = inp["mask"]
        q = inp["q"]
        if DEV.type == "cpu":  # forward only: the CPU path refuses inputs that require grad
            q, keys, vals = q.detach(), keys.detach(), vals.detach()

        def score_mod(score, b, h, q_idx, kv_idx):
            keep = (kv_idx >= R) | mask[b, torch.clamp(kv_idx, max=R - 1)]
            return torch.where(keep, score, -float("inf"))

        return flex(q, keys, vals, score_mod=score_mod)

    return fn


def _sdpa_fn():
    def fn(inp):
        keys, vals = _pooled_kv(inp)
        B = keys.shape[0]
        keep = torch.cat([inp["mask"], torch.ones(B, N, dtype=torch.bool, device=keys.device)], 1)
        return torch.nn.functional.scaled_dot_product_attention(inp["q"], keys, vals,
                                                                attn_mask=keep[:, None, None, :])

    return fn


def _xformers_fn():
    xops = peer("xformers.ops", "xformers")
    if DEV.type != "cuda":
        pytest.skip("xformers memory_efficient_attention needs a GPU")

    def fn(inp):
        keys, vals = _pooled_kv(inp)
        B, L = keys.shape[0], keys.shape[2]
        Lp = (L + 7) // 8 * 8  # xformers wants the bias' key length padded to a multiple of 8
        keep = torch.cat([inp["mask"], torch.ones(B, N, dtype=torch.bool, device=DEV)], 1)
        bias = torch.full((B, H, P, Lp), -float("inf"), device=DEV, dtype=DTYPE)
        bias[..., :L] = torch.where(keep, 0.0, -float("inf")).to(DTYPE)[:, None, None, :]
        out = xops.memory_efficient_attention(inp["q"].transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                              attn_bias=bias[..., :L])
        return out.transpose(1, 2)

    return fn


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_region_attention(benchmark, provider, shape, mode):
    B = SHAPES[shape]

    def ref(inp):
        return region_attention_reference(inp["q"], inp["k"], inp["v"], inp["boxes"], (GH, GW), inp["mask"],
                                          attend_patches=True)

    if provider == "reference":
        fn = ref
    elif provider == "compile":
        cref = compiled(lambda q, k, v, b, m: region_attention_reference(q, k, v, b, (GH, GW), m, attend_patches=True))
        fn = lambda inp: cref(inp["q"], inp["k"], inp["v"], inp["boxes"], inp["mask"])  # noqa: E731
    elif provider == "sdpa":
        fn = _sdpa_fn()
    elif provider == "flex":
        fn = _flex_fn(mode)
    elif provider == "xformers":
        fn = _xformers_fn()
    elif provider == "cpu":
        if DEV.type != "cpu":
            pytest.skip("the cpu backend serves CPU tensors only")
        probe = make_inputs(1)()
        probe = {k: probe[k] for k in ("q", "k", "v", "boxes")}
        why = OP.backends["cpu"].not_supported_reasons(dict(probe, grid=(GH, GW)))
        if why:
            pytest.skip(f"cpu cannot run here: {'; '.join(why)}")
        fn = lambda inp: region_attention(inp["q"], inp["k"], inp["v"], inp["boxes"], (GH, GW),  # noqa: E731
                                          region_mask=inp["mask"], attend_patches=True, backend="cpu")
    else:
        if DEV.type != "cuda":
            pytest.skip("triton is benchmarked on the GPU only (on the CPU it runs in the slow interpreter)")
        probe = make_inputs(1)()
        probe = {k: probe[k] for k in ("q", "k", "v", "boxes")}
        why = OP.backends["triton"].not_supported_reasons(dict(probe, grid=(GH, GW)))
        if why:
            pytest.skip(f"triton cannot run here: {'; '.join(why)}")
        fn = lambda inp: region_attention(inp["q"], inp["k"], inp["v"], inp["boxes"], (GH, GW),  # noqa: E731
                                          region_mask=inp["mask"], attend_patches=True, backend="triton")

    def truth(inp):
        d = lambda t: t.detach().to(torch.float64)  # noqa: E731
        return region_attention_reference(d(inp["q"]), d(inp["k"]), d(inp["v"]), d(inp["boxes"]), (GH, GW),
                                          inp["mask"], attend_patches=True)

    bench_case(benchmark, op="region_attention", provider=provider, mode=mode,
               shape=dict(B=B, P=P, R=R, grid=f"{GH}x{GW}", heads=H, head_dim=HD, attend_patches=True,
                          dtype=str(DTYPE).replace("torch.", "")),
               make_inputs=make_inputs(B), fn=fn, truth=truth if mode == "forward" else None)
