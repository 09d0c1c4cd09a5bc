"""RegionCrossAttention and GKFusion: shapes, the math against a hand-written composition of the reference,
shared queries, masks, gradients, and the triton backend inside the module (interpreter, tiny shapes)."""
import math

import pytest
import torch
from conftest import triton_devices

import gkcore.nn as gnn
from gkcore.reference.region_attention import region_keys_values

TRITON_DEVS = triton_devices()


def inputs(B=2, P=5, dim=32, gh=4, gw=4, R=3, seed=0, shared=False):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(1 if shared else B, P, dim, generator=g)
    patches = torch.randn(B, gh * gw, dim, generator=g)
    xy = torch.rand(B, R, 2, generator=g) * 0.7
    boxes = torch.cat([xy, xy + torch.rand(B, R, 2, generator=g) * 0.3 + 0.05], -1)
    return queries, patches, boxes


def test_region_cross_attention_math():
    torch.manual_seed(0)
    m = gnn.RegionCrossAttention(32, 4, kdim=24, attend_patches=True).double()
    q_in, _, boxes = inputs(dim=32)
    patches = torch.randn(2, 16, 24, dtype=torch.float64)
    q_in, boxes = q_in.double(), boxes.double()
    out, w = m(q_in, patches, boxes, (4, 4), return_weights=True)
    # by hand: projections, pooled keys from the reference pooling, softmax over [regions; patches]
    H, hd = 4, 8
    q = m.q_proj(q_in).view(2, 5, H, hd).transpose(1, 2)
    kv = m.kv_proj(patches)
    k = kv[..., :32].reshape(2, 16, H, hd).transpose(1, 2)
    v = kv[..., 32:].reshape(2, 16, H, hd).transpose(1, 2)
    rk, rv = region_keys_values(k, v, boxes, (4, 4))
    keys, vals = torch.cat([rk, k], 2), torch.cat([rv, v], 2)
    a = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(hd), -1)
    exp = m.out_proj((a @ vals).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(out, exp)
    torch.testing.assert_close(w, a)
    assert w.shape == (2, 4, 5, 3 + 16)


@pytest.mark.parametrize("attend_patches", [False, True])
def test_shared_queries_equal_expanded(attend_patches):
    torch.manual_seed(1)
    m = gnn.RegionCrossAttention(32, 2, attend_patches=attend_patches)
    q, patches, boxes = inputs(shared=True)
    a = m(q, patches, boxes, (4, 4))
    b = m(q.expand(2, -1, -1).contiguous(), patches, boxes, (4, 4))
    c = m(q[0], patches, boxes, (4, 4))
    assert a.shape == (2, 5, 32)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_region_cross_attention_gradients_and_errors():
    m = gnn.RegionCrossAttention(32, 4)
    q, patches, boxes = inputs()
    patches.requires_grad_(True)
    m(q, patches, boxes, (4, 4)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert patches.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible"):
        gnn.RegionCrossAttention(30, 4)
    with pytest.raises(ValueError, match="queries must have shape"):
        m(torch.randn(3, 5, 32), patches, boxes, (4, 4))


@pytest.mark.interpreter
@pytest.mark.parametrize("device", TRITON_DEVS or ["none"])
def test_region_cross_attention_triton_backend(device):
    """The module with backend='triton' (shared queries, masks incl. a fully masked item, patches) matches
    the reference backend in outputs and every parameter gradient."""
    if device == "none":
        pytest.skip("no CUDA device and the Triton interpreter is off")
    torch.manual_seed(2)
    m_ref = gnn.RegionCrossAttention(32, 2, attend_patches=True, backend="reference").to(device)
    m_tri = gnn.RegionCrossAttention(32, 2, attend_patches=True, backend="triton").to(device)
    m_tri.load_state_dict(m_ref.state_dict())
    q, patches, boxes = (t.to(device) for t in inputs(shared=True))
    mask = torch.tensor([[True, False, True], [False, False, False]], device=device)
    outs, grads = [], []
    for m in (m_ref, m_tri):
        m.zero_grad()
        out = m(q, patches, boxes, (4, 4), region_mask=mask)
        out.square().sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
def test_gkfusion_shapes_maps_and_backward(shared):
    torch.manual_seed(3)
    f = gnn.GKFusion(32, 4, depth=2, mlp_ratio=2.0)
    q, patches, boxes = inputs(shared=shared, R=4)
    mask = torch.tensor([[True, True, False, True], [False, False, False, False]])
    q.requires_grad_(True)
    fused, maps = f(q, patches, boxes, (4, 4), region_mask=mask)
    assert fused.shape == (2, 5, 32)
    assert len(maps) == 2 and all(m.shape == (2, 4, 5, 4) for m in maps)
    for m in maps:
        assert not m.requires_grad
        torch.testing.assert_close(m[0].sum(-1), torch.ones(4, 5))   # rows sum to 1 over present regions
        assert m[0, ..., 2].abs().max() == 0                          # a masked region gets no weight
        assert m[1].abs().max() == 0                                  # every region masked: zero map
    fused.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert all(p.grad is not None for p in f.parameters())


def test_gkfusion_shared_equals_expanded():
    torch.manual_seed(4)
    f = gnn.GKFusion(32, 2, depth=2).eval()
    q, patches, boxes = inputs(shared=True)
    a, ma = f(q, patches, boxes, (4, 4))
    b, mb = f(q.expand(2, -1, -1), patches, boxes, (4, 4))
    torch.testing.assert_close(a, b)
    for x, y in zip(ma, mb):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="patch_tokens"):
        f(q, patches[..., :16], boxes, (4, 4))


@pytest.mark.interpreter
@pytest.mark.parametrize("device", TRITON_DEVS or ["none"])
def test_gkfusion_triton_equals_reference(device):
    """GKFusion with backend='triton' (what the model's GK module runs on the GPU) matches the reference
    backend: fused features, every layer's maps, and the gradients of the queries."""
    if device == "none":
        pytest.skip("no CUDA device and the Triton interpreter is off")
    torch.manual_seed(5)
    f_ref = gnn.GKFusion(32, 2, depth=1, mlp_ratio=1.0, backend="reference").to(device)
    f_tri = gnn.GKFusion(32, 2, depth=1, mlp_ratio=1.0, backend="triton").to(device)
    f_tri.load_state_dict(f_ref.state_dict())
    q, patches, boxes = (t.to(device) for t in inputs(shared=True, gh=3, gw=3, R=3))
    mask = torch.tensor([[True, True, False], [True, False, True]], device=device)
    res = []
    for f in (f_ref, f_tri):
        qq = q.clone().requires_grad_(True)
        fused, maps = f(qq, patches, boxes, (3, 3), region_mask=mask)
        fused.square().sum().backward()
        res.append((fused, maps, qq.grad))
    torch.testing.assert_close(res[1][0], res[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(res[1][1], res[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res[1][2], res[0][2], atol=1e-4, rtol=1e-4)
