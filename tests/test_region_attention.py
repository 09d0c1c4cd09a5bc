"""region_attention: the reference against an independent definition, and every backend's parity with
the reference (docs/numerics.md), forward and backward, on small shapes (Triton runs in the interpreter here)."""
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import HAS_CUDA, triton_devices
from hypothesis import given, settings
from hypothesis import strategies as st

from gkcore.functional import region_attention
from gkcore.ops.region_attention import OP
from gkcore.reference.region_attention import region_attention_reference
from gkcore.reference.region_pool import pooling_matrix
from gkcore.testing import check_parity, noncontiguous, poison_outputs

TRITON_DEVS = triton_devices()
needs_triton = pytest.mark.skipif(not TRITON_DEVS, reason="no CUDA device and the Triton interpreter is off")


def make(B=2, H=2, P=5, gh=4, gw=4, d=16, R=3, *, shared=False, dtype=torch.float32, device="cpu", seed=0,
         degenerate=False):
    """Random q (B, H, P, d) or shared (H, P, d), k, v (B, H, gh * gw, d) and boxes (B, R, 4); with
    ``degenerate`` regions 0, 1, 2 are a zero-area box, the whole image (on the border) and a box partly
    outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    N = gh * gw
    q = torch.randn((H, P, d) if shared else (B, H, P, d), generator=g).to(device, dtype).requires_grad_(True)
    k = torch.randn(B, H, N, d, generator=g).to(device, dtype).requires_grad_(True)
    v = torch.randn(B, H, N, d, generator=g).to(device, dtype).requires_grad_(True)
    xy = torch.rand(B, R, 2, generator=g) * 0.8
    wh = torch.rand(B, R, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + wh], -1)
    if degenerate:
        boxes[:, 0] = torch.tensor([0.3, 0.4, 0.3, 0.4])        # zero area
        boxes[:, 1 % R] = torch.tensor([0.0, 0.0, 1.0, 1.0])    # the whole image, on the border
        boxes[:, 2 % R] = torch.tensor([-0.3, 0.7, 0.2, 1.4])   # partly outside [0, 1]
    bdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return q, k, v, boxes.to(device, bdt)


def naive(q, k, v, boxes, grid, mask=None, attend_patches=False, output_size=1, sampling_ratio=2, scale=None):
    """An independent, loop-based definition (float64): pooled keys by the dense pooling matrix, then a
    masked softmax per row with an explicit all-masked rule."""
    B, H, N, d = k.shape
    if q.dim() == 3:
        q = q.expand(B, -1, -1, -1)
    W = pooling_matrix(boxes.double(), grid[0], grid[1], output_size, sampling_ratio, True).mean(2)  # (B, R, N)
    scale = scale or 1 / math.sqrt(d)
    outs = torch.zeros(B, H, q.shape[2], d, dtype=torch.float64)
    R = boxes.shape[1]
    weights = torch.zeros(B, H, q.shape[2], R + (N if attend_patches else 0), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            keys = W[b] @ k[b, h].double()
            vals = W[b] @ v[b, h].double()
            keep = torch.ones(R, dtype=torch.bool) if mask is None else mask[b].clone()
            if attend_patches:
                keys = torch.cat([keys, k[b, h].double()])
                vals = torch.cat([vals, v[b, h].double()])
                keep = torch.cat([keep, torch.ones(N, dtype=torch.bool)])
            if not keep.any():
                continue
            s = (q[b, h].double() @ keys.T) * scale
            s[:, ~keep] = -math.inf
            a = torch.softmax(s, -1)
            weights[b, h] = a
            outs[b, h] = a @ vals
    return outs, weights


# ------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("attend_patches", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("masking", ["none", "some", "all"])
def test_reference_matches_naive(attend_patches, shared, masking):
    q, k, v, boxes = make(shared=shared, dtype=torch.float64, R=4, degenerate=True)
    mask = None
    if masking != "none":
        mask = torch.ones(2, 4, dtype=torch.bool)
        if masking == "some":
            mask[0, 1] = mask[1, 3] = False
        else:
            mask[1] = False
    out, w = region_attention_reference(q, k, v, boxes, (4, 4), mask, attend_patches, return_weights=True)
    out2 = region_attention_reference(q, k, v, boxes, (4, 4), mask, attend_patches)  # the SDPA path
    exp_out, exp_w = naive(q, k, v, boxes, (4, 4), mask, attend_patches)
    torch.testing.assert_close(out, exp_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out2, exp_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w, exp_w, atol=1e-12, rtol=1e-10)
    if masking == "all" and not attend_patches:
        assert out[1].abs().max() == 0 and w[1].abs().max() == 0
        (out.sum() + out2.sum()).backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_reference_pooling_is_linear():
    """Pooling projected keys equals projecting pooled features (the docstring's claim)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 8, generator=g, dtype=torch.float64)
    wk = torch.randn(8, 2 * 4, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 0.5]]] * 2, dtype=torch.float64)
    from gkcore.functional import region_pool

    k = (x @ wk).view(2, 12, 2, 4).transpose(1, 2)
    pooled_then_proj = (region_pool(x, boxes, (3, 4), backend="reference") @ wk).view(2, 2, 2, 4).transpose(1, 2)
    from gkcore.reference.region_attention import region_keys_values

    rk, _ = region_keys_values(k, k, boxes, (3, 4))
    torch.testing.assert_close(rk, pooled_then_proj)


# -------------------------------------------------------------------------------------------- backends
def _parity(q, k, v, boxes, grid=(4, 4), **kw):
    """Parity (docs/numerics.md) of ``backend`` (default triton) with the reference, forward and gradients
    of q, k, v."""
    be = kw.pop("backend", "triton")
    kw_ref = dict(kw)
    mask = kw_ref.get("region_mask")

    def ref(q_, k_, v_, b_):
        kk = dict(kw_ref)
        if mask is not None:
            kk["region_mask"] = mask.to(q_.device)
        return region_attention(q_, k_, v_, b_, grid, backend="reference", **kk)

    fn = lambda q_, k_, v_, b_: region_attention(q_, k_, v_, b_, grid, backend=be, **kw)  # noqa: E731
    half = q.dtype in (torch.float16, torch.bfloat16)
    return check_parity(fn, ref, [q, k, v, boxes], atol=2e-2 if half else 1e-5, name=f"region_attention {be}")


def _mask(B, R, kind, device="cpu"):
    if kind == "none":
        return None
    m = torch.ones(B, R, dtype=torch.bool, device=device)
    if kind == "some":
        m[0, 0] = False
        m[-1, R - 1] = False
    else:
        m[:] = False
    return m


# (id, dtype, head dim, attend_patches, shared q, masking)
CASES = [
    ("fp32-d16", torch.float32, 16, False, False, "none"),
    ("fp32-d48-patches-shared", torch.float32, 48, True, True, "some"),
    ("fp32-d64-patches", torch.float32, 64, True, False, "none"),
    ("bf16-d80-patches-masked", torch.bfloat16, 80, True, False, "some"),
    ("fp16-d96-shared-masked", torch.float16, 96, False, True, "some"),
    ("bf16-d128-shared", torch.bfloat16, 128, False, True, "none"),
]


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("device", TRITON_DEVS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_parity(device, case):
    """Forward and backward of q, k, v against the reference: head dims incl. non-powers of two, shared and
    per-batch queries, attend_patches on/off, fp32 and half."""
    _, dtype, d, attend_patches, shared, masking = case
    q, k, v, boxes = make(H=1, gh=3, gw=4, d=d, R=3, shared=shared, dtype=dtype, device=device, seed=d)
    _parity(q, k, v, boxes, grid=(3, 4), attend_patches=attend_patches, region_mask=_mask(2, 3, masking, device))


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("device", TRITON_DEVS)
def test_triton_several_blocks(device):
    """More queries, regions and patches than one block of each (P=40, R=35, N=35 on a 5x7 grid), so
    every loop of both kernels runs several iterations and the online softmax rescales."""
    q, k, v, boxes = make(B=1, H=1, P=40, gh=5, gw=7, R=35, d=16, device=device, seed=29)
    mask = torch.rand(1, 35, generator=torch.Generator().manual_seed(3)).to(device) > 0.3
    _parity(q, k, v, boxes, grid=(5, 7), attend_patches=True, region_mask=mask)


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("device", TRITON_DEVS)
@pytest.mark.parametrize("masking", ["some", "all"])
@pytest.mark.parametrize("attend_patches", [False, True])
def test_triton_masks(device, masking, attend_patches):
    """Masked regions leave the softmax; every region masked gives zeros (no patches) or attention over the
    patches alone (attend_patches), and never NaN in the output or the gradients."""
    q, k, v, boxes = make(H=1, gh=3, gw=3, R=4, device=device, seed=7)
    mask = _mask(2, 4, masking, device)
    _parity(q, k, v, boxes, grid=(3, 3), attend_patches=attend_patches, region_mask=mask)
    if masking == "all":
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = region_attention(qq, kk, vv, boxes, (3, 3), region_mask=mask, attend_patches=attend_patches,
                               backend="triton")
        out.backward(torch.randn_like(out))
        assert all(torch.isfinite(t).all() for t in (out, qq.grad, kk.grad, vv.grad))
        if not attend_patches:
            assert out.abs().max() == 0 and qq.grad.abs().max() == 0 and kk.grad.abs().max() == 0
        else:
            assert out.abs().max() > 0


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("device", TRITON_DEVS)
@pytest.mark.parametrize("attend_patches", [False, True])
def test_triton_degenerate_boxes_odd_grid(device, attend_patches):
    """Zero-area box, the whole image (border samples), a box partly outside [0, 1]; odd 3x5 grid."""
    q, k, v, boxes = make(H=1, gh=3, gw=5, R=4, P=3, device=device, degenerate=True, seed=11)
    _parity(q, k, v, boxes, grid=(3, 5), attend_patches=attend_patches)


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("device", TRITON_DEVS)
def test_triton_noncontiguous_inputs(device):
    """k, v, q as strided views (head dim and patch dim strides != contiguous): read in place."""
    q, k, v, boxes = make(H=1, gh=3, gw=4, d=16, device=device, seed=5)
    k2, v2, q2 = noncontiguous(k, dim=-1), noncontiguous(v, dim=2), noncontiguous(q, dim=1)
    assert not (k2.is_contiguous() or v2.is_contiguous() or q2.is_contiguous())
    _parity(q2, k2, v2, boxes, grid=(3, 4), attend_patches=True)


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("device", TRITON_DEVS)
@pytest.mark.parametrize("output_size,sampling_ratio,aligned", [(2, 2, True), (1, 0, True), (2, 1, False)])
def test_triton_roi_options(device, output_size, sampling_ratio, aligned):
    q, k, v, boxes = make(H=1, gh=3, gw=4, R=3, device=device, seed=13, degenerate=sampling_ratio == 0)
    _parity(q, k, v, boxes, grid=(3, 4), output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned,
            scale=0.3)


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("device", TRITON_DEVS)
@pytest.mark.parametrize("attend_patches", [False, True])
def test_triton_weights(device, attend_patches):
    """return_weights: (B, H, P, R [+ N]) equal to the float64 reference; zero rows where all is masked."""
    q, k, v, boxes = make(H=2, gh=3, gw=3, R=3, device=device, seed=19)
    mask = torch.tensor([[True, False, True], [False, False, False]], device=device)
    with poison_outputs():
        out, w = region_attention(q, k, v, boxes, (3, 3), region_mask=mask, attend_patches=attend_patches,
                                  return_weights=True, backend="triton")
    d64 = lambda t: t.detach().double().cpu()  # noqa: E731
    out_r, w_r = region_attention_reference(d64(q), d64(k), d64(v), d64(boxes), (3, 3), mask.cpu(), attend_patches,
                                            return_weights=True)
    assert w.shape == (2, 2, 5, 3 + (9 if attend_patches else 0)) and w.dtype == q.dtype
    torch.testing.assert_close(w.double().cpu(), w_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double().cpu(), out_r, atol=1e-5, rtol=1e-5)
    assert w[:, :, :, 1].abs().max() == 0 and not w.requires_grad  # masked region; detached in triton
    out2 = region_attention(q, k, v, boxes, (3, 3), region_mask=mask, attend_patches=attend_patches, backend="triton")
    assert torch.equal(out, out2)  # writing the weights does not change the output


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("device", TRITON_DEVS)
def test_triton_backward_deterministic(device):
    q, k, v, boxes = make(H=1, gh=3, gw=4, R=4, device=device, seed=23, shared=True)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = region_attention(qq, kk, vv, boxes, (3, 4), attend_patches=True, backend="triton")
        out.backward(torch.ones_like(out))
        grads.append([qq.grad, kk.grad, vv.grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.interpreter
@settings(max_examples=4)
@given(B=st.integers(1, 2), H=st.integers(1, 2), P=st.integers(1, 5), R=st.integers(0, 4),
       grid=st.sampled_from([(3, 3), (2, 5), (1, 2)]), d=st.sampled_from([16, 24, 48]),
       attend_patches=st.booleans(), shared=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_triton_parity_hypothesis(B, H, P, R, grid, d, attend_patches, shared, seed):
    q, k, v, boxes = make(B, H, P, grid[0], grid[1], d, R, shared=shared, device=TRITON_DEVS[0], seed=seed)
    _parity(q, k, v, boxes, grid=grid, attend_patches=attend_patches)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (the compiled Triton kernel cannot run here)")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_cuda_design_shape(dtype):
    """On the GPU: parity at a slice of the target shape of docs/performance.md (75 queries, 29 regions + 196
    patches, d=64), and bitwise-deterministic gradients."""
    q, k, v, boxes = make(B=3, H=2, P=75, gh=14, gw=14, d=64, R=29, dtype=dtype, device="cuda", seed=31)
    mask = (torch.rand(3, 29, generator=torch.Generator().manual_seed(1)) > 0.2).cuda()
    _parity(q, k, v, boxes, grid=(14, 14), attend_patches=True, region_mask=mask)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = region_attention(qq, kk, vv, boxes, (14, 14), region_mask=mask, attend_patches=True, backend="triton")
        out.backward(torch.ones_like(out))
        grads.append([qq.grad, kk.grad, vv.grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@needs_triton
@pytest.mark.interpreter
def test_custom_op_fake_registration():
    """The fused op's register_fake agrees with the kernel (shapes/dtypes, incl. the weights), so that
    torch.compile can trace through it."""
    from gkcore.ops.region_attention import _region_attention_fwd

    q, k, v, boxes = make(H=1, gh=3, gw=3, R=3, device=TRITON_DEVS[0])
    mask = _mask(2, 3, "some", TRITON_DEVS[0])
    res = torch.library.opcheck(_region_attention_fwd, (q, k, v, boxes, mask, 3, 3, True, 1, 2, True, 0.25, True,
                                                        "triton"), test_utils=("test_schema", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}, res


# ------------------------------------------------------------------------------------ selection, errors
def test_cpu_backend_is_the_twin():
    """On the CPU, automatic choice takes the C++ twin (not the reference) for every dtype it serves."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        q, k, v, boxes = make(dtype=dtype)
        inputs = {"q": q, "k": k, "v": v, "boxes": boxes, "region_mask": None, "grid": (4, 4)}
        assert OP.select(inputs).name == "cpu", dtype
    assert "no C++ twin" not in OP.backends["cpu"].note


def test_triton_refuses_unsupported_head_dims():
    t = OP.backends["triton"]
    for d, dtype in ((160, torch.bfloat16), (96, torch.float32)):
        q, k, v, boxes = make(d=d, dtype=dtype)
        why = t.not_supported_reasons({"q": q, "k": k, "v": v, "boxes": boxes, "grid": (4, 4)}, explicit=True)
        assert any("head dim" in w for w in why), why


@pytest.mark.parametrize("bad,match", [
    (dict(grid=(3, 4)), "grid_size"),
    (dict(boxes_shape=(2, 3, 5)), "boxes must have shape"),
    (dict(mask_dtype=torch.int64), "region_mask must be a bool"),
    (dict(mask_shape=(2, 4)), "region_mask must have shape"),
    (dict(q_shape=(2, 3, 5, 16)), "q must have shape"),
    (dict(q_shape=(3, 5, 16)), "shared q must have shape"),
    (dict(swap=True), "x1 >= x0"),
    (dict(scale=-1.0), "scale"),
    (dict(v_shape=(2, 2, 16, 8)), "k and v"),
    (dict(q_dtype=torch.float64), "share one dtype"),
])
def test_validation_errors(bad, match):
    q, k, v, boxes = make()
    grid = bad.get("grid", (4, 4))
    mask = None
    if "boxes_shape" in bad:
        boxes = torch.rand(bad["boxes_shape"])
    if "mask_dtype" in bad:
        mask = torch.ones(2, 3, dtype=bad["mask_dtype"])
    if "mask_shape" in bad:
        mask = torch.ones(bad["mask_shape"], dtype=torch.bool)
    if "q_shape" in bad:
        q = torch.randn(bad["q_shape"])
    if "q_dtype" in bad:
        q = q.detach().to(bad["q_dtype"])
    if "v_shape" in bad:
        v = torch.randn(bad["v_shape"])
    if bad.get("swap"):
        boxes = boxes.clone()
        boxes[0, 0, 0], boxes[0, 0, 2] = 0.9, 0.1
    with pytest.raises(ValueError, match=match):
        region_attention(q, k, v, boxes, grid, region_mask=mask, scale=bad.get("scale"))


# ------------------------------------------------------------------------------------------ cpu twin
needs_cpu_ext = pytest.mark.skipif(bool(OP.backends["cpu"].not_supported_reasons(
    {"q": torch.zeros(1, 1, 1, 16), "k": torch.zeros(1, 1, 1, 16), "v": torch.zeros(1, 1, 1, 16),
     "boxes": torch.zeros(1, 1, 4), "grid": (1, 1)})), reason="gkcore._C (the C++ cpu backend) is not built")

# (id, dtype, B, H, P, grid, R, head dim, attend_patches, shared q, masking)
CPU_CASES = [
    ("fp32-P1-R1-d16", torch.float32, 1, 1, 1, (1, 1), 1, 16, False, False, "none"),
    ("fp32-P7-R7-d48-patches-shared", torch.float32, 2, 3, 7, (3, 5), 7, 48, True, True, "some"),
    ("fp32-P29-R29-d64-patches", torch.float32, 2, 2, 29, (7, 7), 29, 64, True, False, "some"),
    ("fp32-P97-R29-d80-shared", torch.float32, 2, 1, 97, (4, 6), 29, 80, False, True, "some"),
    ("fp32-P97-R7-d96-patches-N97", torch.float32, 1, 2, 97, (1, 97), 7, 96, True, False, "none"),
    ("fp32-P7-R29-d128-all-masked", torch.float32, 2, 1, 7, (5, 5), 29, 128, False, False, "all"),
    ("fp32-P29-R7-d24", torch.float32, 2, 2, 29, (3, 4), 7, 24, True, False, "some"),
    ("fp64-P7-R29-d48-patches", torch.float64, 2, 2, 7, (8, 8), 29, 48, True, True, "some"),
    ("fp64-P29-R1-d16-all-masked-patches", torch.float64, 2, 1, 29, (2, 3), 1, 16, True, False, "all"),
    ("bf16-P29-R29-d64-patches", torch.bfloat16, 2, 2, 29, (7, 7), 29, 64, True, False, "some"),
    ("fp16-P7-R7-d80-shared", torch.float16, 2, 2, 7, (3, 3), 7, 80, False, True, "some"),
]


@needs_cpu_ext
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_cpu_parity(case):
    """The C++ twin against the reference (the 2x rule of docs/numerics.md, forward and the gradients of q, k, v): odd
    sizes 1, 7, 29, 97, head dims 16..128 incl. 24/48/80/96, shared and per-batch queries, attend_patches
    on/off, masked regions and fully masked items, degenerate boxes, fp32/fp64 and upcast fp16/bf16."""
    _, dtype, B, H, P, grid, R, d, attend_patches, shared, masking = case
    q, k, v, boxes = make(B=B, H=H, P=P, gh=grid[0], gw=grid[1], d=d, R=R, shared=shared, dtype=dtype,
                          seed=d + P, degenerate=R >= 3)
    _parity(q, k, v, boxes, grid=grid, attend_patches=attend_patches, region_mask=_mask(B, R, masking),
            backend="cpu")


@needs_cpu_ext
def test_cpu_noncontiguous_inputs():
    """Strided q, k, v views (as RegionCrossAttention passes them) are read in place."""
    q, k, v, boxes = make(H=2, gh=3, gw=4, d=48, R=5, seed=5)
    k2, v2, q2 = noncontiguous(k, dim=-1), noncontiguous(v, dim=2), noncontiguous(q, dim=1)
    assert not (k2.is_contiguous() or v2.is_contiguous() or q2.is_contiguous())
    _parity(q2, k2, v2, boxes, grid=(3, 4), attend_patches=True, region_mask=_mask(2, 5, "some"), backend="cpu")
    qs, _, _, _ = make(H=2, gh=3, gw=4, d=48, R=5, seed=6, shared=True)
    _parity(noncontiguous(qs, dim=-1), k2, v2, boxes, grid=(3, 4), backend="cpu")


@needs_cpu_ext
@pytest.mark.parametrize("masking", ["some", "all"])
@pytest.mark.parametrize("attend_patches", [False, True])
def test_cpu_masks(masking, attend_patches):
    """Fully masked items give zeros and zero gradients without patches, never NaN."""
    q, k, v, boxes = make(H=2, gh=3, gw=3, R=4, seed=7)
    mask = _mask(2, 4, masking)
    _parity(q, k, v, boxes, grid=(3, 3), attend_patches=attend_patches, region_mask=mask, backend="cpu")
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = region_attention(qq, kk, vv, boxes, (3, 3), region_mask=mask, attend_patches=attend_patches, backend="cpu")
    out.backward(torch.randn_like(out))
    assert all(torch.isfinite(t).all() for t in (out, qq.grad, kk.grad, vv.grad))
    if masking == "all" and not attend_patches:
        assert out.abs().max() == 0 and qq.grad.abs().max() == 0 and kk.grad.abs().max() == 0
        assert vv.grad.abs().max() == 0
    else:
        assert out.abs().max() > 0 and kk.grad.abs().max() > 0


@needs_cpu_ext
@pytest.mark.parametrize("output_size,sampling_ratio,aligned", [(2, 2, True), (1, 0, True), (3, 1, False), (7, 2, True)])
def test_cpu_roi_options(output_size, sampling_ratio, aligned):
    q, k, v, boxes = make(H=1, gh=5, gw=4, R=6, d=16, seed=13, degenerate=True)
    _parity(q, k, v, boxes, grid=(5, 4), output_size=output_size, sampling_ratio=sampling_ratio, aligned=aligned,
            scale=0.3, attend_patches=True, backend="cpu")


@needs_cpu_ext
def test_cpu_boxes_outside_the_grid():
    """Boxes entirely outside [0, 1] (every sample more than a cell away pools to zero keys) and on the border."""
    q, k, v, boxes = make(H=2, gh=4, gw=4, R=4, d=16, seed=17)
    boxes[:, 0] = torch.tensor([1.5, 1.5, 2.0, 2.0])
    boxes[:, 1] = torch.tensor([-2.0, -1.0, -1.5, -0.5])
    boxes[:, 2] = torch.tensor([0.9, 0.0, 1.3, 0.2])
    _parity(q, k, v, boxes, grid=(4, 4), backend="cpu")
    _parity(q, k, v, boxes, grid=(4, 4), attend_patches=True, region_mask=_mask(2, 4, "some"), backend="cpu")


@needs_cpu_ext
@pytest.mark.parametrize("attend_patches", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_weights(attend_patches, dtype):
    """return_weights: (B, H, P, R [+ N]) equal to the float64 reference, detached, exact zeros for masked
    regions and fully masked rows; the output does not change when the weights are written."""
    q, k, v, boxes = make(H=2, gh=3, gw=3, R=3, P=7, d=48, seed=19, dtype=dtype)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    with poison_outputs():
        out, w = region_attention(q, k, v, boxes, (3, 3), region_mask=mask, attend_patches=attend_patches,
                                  return_weights=True, backend="cpu")
    d64 = lambda t: t.detach().double()  # noqa: E731
    out_r, w_r = region_attention_reference(d64(q), d64(k), d64(v), d64(boxes), (3, 3), mask, attend_patches,
                                            return_weights=True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert w.shape == (2, 2, 7, 3 + (9 if attend_patches else 0)) and w.dtype == dtype and not w.requires_grad
    torch.testing.assert_close(w.double(), w_r, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), out_r, atol=tol, rtol=tol)
    assert w[:, :, :, 1].abs().max() == 0
    if not attend_patches:
        assert w[1].abs().max() == 0
    torch.testing.assert_close(w.sum(-1)[0], torch.ones(2, 7, dtype=dtype))
    out2 = region_attention(q, k, v, boxes, (3, 3), region_mask=mask, attend_patches=attend_patches, backend="cpu")
    assert torch.equal(out, out2)


@needs_cpu_ext
def test_cpu_backward_deterministic():
    """Two backward passes give bitwise equal gradients (fixed summation order, no atomics)."""
    q, k, v, boxes = make(B=3, H=2, P=29, gh=5, gw=5, R=7, d=48, seed=23, shared=True)
    grads = []
    for _ in range(2):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = region_attention(qq, kk, vv, boxes, (5, 5), attend_patches=True, backend="cpu")
        out.backward(torch.ones_like(out))
        grads.append([qq.grad, kk.grad, vv.grad])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@needs_cpu_ext
def test_cpu_matches_naive_float64():
    """Independent check of the twin (not through the reference): the loop-based float64 definition."""
    q, k, v, boxes = make(H=2, gh=4, gw=4, R=4, d=16, dtype=torch.float64, seed=3, degenerate=True)
    mask = _mask(2, 4, "some")
    for ap in (False, True):
        out, w = region_attention(q, k, v, boxes, (4, 4), region_mask=mask, attend_patches=ap, return_weights=True,
                                  backend="cpu")
        exp_out, exp_w = naive(q, k, v, boxes, (4, 4), mask, ap)
        torch.testing.assert_close(out, exp_out, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(w, exp_w, atol=1e-12, rtol=1e-10)


@needs_cpu_ext
def test_cpu_custom_op_fake_registration():
    from gkcore.ops.region_attention import _region_attention_fwd

    q, k, v, boxes = make(H=1, gh=3, gw=3, R=3)
    mask = _mask(2, 3, "some")
    for dt in (torch.float32, torch.float64):
        args = (q.detach().to(dt).requires_grad_(True), k.detach().to(dt).requires_grad_(True),
                v.detach().to(dt).requires_grad_(True), boxes.to(dt), mask, 3, 3, True, 1, 2, True, 0.25, True, "cpu")
        res = torch.library.opcheck(_region_attention_fwd, args,
                                    test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        assert set(res.values()) == {"SUCCESS"}, res


@needs_cpu_ext
@pytest.mark.parametrize("bad,match", [
    (dict(grid=(3, 5)), "grid_size"),
    (dict(k_dim=3), "k must have 4 dimensions"),
    (dict(boxes_dtype=torch.float64), "boxes dtype"),
    (dict(nan_box=True), "boxes contain NaN"),
    (dict(output_size=0), "output_size"),
])
def test_cpu_validation_errors(bad, match):
    """Bad input raises a ValueError that names the argument before any kernel runs (backend='cpu')."""
    q, k, v, boxes = make()
    if "k_dim" in bad:
        k = k[0]
    if "boxes_dtype" in bad:
        boxes = boxes.double()
    if bad.get("nan_box"):
        boxes = boxes.clone()
        boxes[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=match):
        region_attention(q, k, v, boxes, bad.get("grid", (4, 4)), output_size=bad.get("output_size", 1), backend="cpu")


@needs_cpu_ext
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 2), P=st.sampled_from([1, 2, 7, 29, 97]), R=st.sampled_from([0, 1, 7, 29]),
       grid=st.sampled_from([(3, 3), (2, 5), (1, 2), (7, 7), (1, 97)]), d=st.sampled_from([16, 24, 48, 80, 96]),
       attend_patches=st.booleans(), shared=st.booleans(), masked=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_cpu_parity_hypothesis(B, H, P, R, grid, d, attend_patches, shared, masked, seed):
    q, k, v, boxes = make(B, H, P, grid[0], grid[1], d, R, shared=shared, seed=seed)
    mask = None
    if masked and R:
        mask = torch.rand(B, R, generator=torch.Generator().manual_seed(seed)) > 0.4
    _parity(q, k, v, boxes, grid=grid, attend_patches=attend_patches, region_mask=mask, backend="cpu")


# ------------------------------------------------------------------------------------------- AOT
@pytest.mark.skipif(sys.platform != "linux", reason="the AOT compile uses the bundled ptxas (linux)")
def test_aot_compile_no_spills():
    """Compile the forward and backward for the target configuration of docs/performance.md (bf16, head
    dim 64) for sm_90a and sm_80 without a GPU: no register spills, shared memory within the limit.
    ``python -m gkcore.aot --module region_attention`` compiles every entry of AOT_SPECS (fp16, bf16 d128, fp32 too)."""
    code = ("from gkcore.kernels.region_attention import AOT_SPECS\n"
            "from gkcore.testing import aot_compile, SHARED_MEMORY_LIMIT\n"
            "bad, done = [], 0\n"
            "for s in AOT_SPECS:\n"
            "    if not s['name'].endswith('bf16_d64'): continue\n"
            "    for a in (90, 80):\n"
            "        r = aot_compile(s, a); done += 1\n"
            "        if r.spills or r.shared > SHARED_MEMORY_LIMIT[a]: bad.append((s['name'], a, r.spills, r.shared))\n"
            "print(done, bad)\n"
            "assert done == 4 and not bad, bad\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
