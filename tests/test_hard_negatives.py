"""sample_hard_negatives: law of the draws (chi-square), exclusion of positives, reproducibility,
identical draws across the counter-based backends, Philox known answers, input errors."""
import pytest
import torch
from hypothesis import given, strategies as st

from conftest import HAS_CUDA, INTERPRETER, triton_devices
from strategies import SEEDS
from gkcore.functional import sample_hard_negatives
from gkcore.ops.hard_negatives import OP, draw_seed
from gkcore.ops.registry import BackendError
from gkcore.reference.hard_negatives import (hard_negatives_gumbel, hard_negatives_multinomial, negative_mask,
                                             philox4x32, similarities)
from gkcore.testing import noncontiguous, poison_outputs

scipy_stats = pytest.importorskip("scipy.stats")

CPU_BACKENDS = [b for b in ("cpu", "reference") if not OP.backends[b].unavailable_reason()]
GUMBEL_CPU = [b for b in ("cpu",) if not OP.backends[b].unavailable_reason()]
TRITON_DEVS = triton_devices()

# Random123's known-answer vectors for Philox4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def feats(B, D, gen, dtype=torch.float32, device="cpu", normalise=True):
    v = torch.randn(B, D, generator=gen, dtype=torch.float64)
    t = torch.randn(B, D, generator=gen, dtype=torch.float64)
    if normalise:
        v, t = torch.nn.functional.normalize(v, dim=1), torch.nn.functional.normalize(t, dim=1)
    return v.to(device, dtype), t.to(device, dtype)


def gen_for(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def assert_no_positive(neg_t, neg_i, group_ids=None):
    B = neg_t.shape[0]
    valid = negative_mask(B, group_ids, "cpu")
    nt, ni = neg_t.cpu(), neg_i.cpu()
    assert nt.dtype == torch.int64 and ni.dtype == torch.int64
    assert ((nt >= 0) & (nt < B)).all(), nt
    assert ((ni >= 0) & (ni < B)).all(), ni
    r = torch.arange(B)
    assert valid[r, nt].all(), f"image side drew a positive: {nt.tolist()}"
    assert valid[ni, r].all(), f"text side drew a positive: {ni.tolist()}"


# ----------------------------------------------------------------------------------- Philox
@pytest.mark.parametrize("ctr,key,out", PHILOX_KAT)
def test_philox_known_answers(ctr, key, out):
    got = philox4x32(*ctr, *key)
    assert tuple(int(x) for x in got) == out
    if GUMBEL_CPU:
        from gkcore import _ext

        assert tuple(_ext.ext().philox4x32_10(*ctr, *key)) == out


def test_philox_vectorised_matches_scalar():
    i = torch.arange(5)[:, None]
    j = torch.arange(4)[None, :] * 1000003
    r0, r1, r2, r3 = philox4x32(i, j, 0, 0, 0xDEADBEEF, 0x12345678)
    for a in range(5):
        for b in range(4):
            s = philox4x32(a, int(j[0, b]), 0, 0, 0xDEADBEEF, 0x12345678)
            assert (int(r0[a, b]), int(r1[a, b]), int(r2[a, b]), int(r3[a, b])) == tuple(int(x) for x in s)


# ------------------------------------------------------------------------- distribution (chi-square)
CASE_B, CASE_D, CASE_SCALE = 6, 4, 2.0
CASE_GROUPS = torch.tensor([0, 0, 1, 2, 3, 3])


def case():
    v, t = feats(CASE_B, CASE_D, torch.Generator().manual_seed(7))
    return v, t


def softmax_weights(v, t, scale, group_ids):
    """(image-side P (B, B), text-side P (B, B)) in float64: row i of the first is image i's law over
    texts, row j of the second text j's law over images."""
    s = similarities(v.double(), t.double(), scale)
    valid = negative_mask(s.shape[0], group_ids, "cpu")
    ninf = torch.tensor(float("-inf"), dtype=torch.float64)
    return (torch.softmax(torch.where(valid, s, ninf), 1), torch.softmax(torch.where(valid.T, s.T, ninf), 1))


def chi_square_pvalue(counts_t, counts_i, p_img, p_txt):
    """Sum of per-row Pearson chi-squares over both sides (cells with zero probability must be empty)."""
    n = int(counts_t[0].sum())
    chi2, dof = 0.0, 0
    for counts, p in ((counts_t, p_img), (counts_i, p_txt)):
        assert (counts[p == 0] == 0).all(), "drew an index of probability zero"
        for row in range(p.shape[0]):
            m = p[row] > 0
            e = n * p[row][m]
            o = counts[row][m].double()
            chi2 += float(((o - e) ** 2 / e).sum())
            dof += int(m.sum()) - 1
    return float(scipy_stats.chi2.sf(chi2, dof)), chi2, dof


def draw_counts(sample, n):
    """Counts (B, B) of n draws of ``sample()`` -> (neg_t, neg_i).

    The draws run with one intra-op thread: on a loaded machine every tiny parallel region (even a 6x6
    softmax) can wait milliseconds for a second thread, which would dominate thousands of tiny calls."""
    ct = torch.zeros(CASE_B, CASE_B, dtype=torch.long)
    ci = torch.zeros(CASE_B, CASE_B, dtype=torch.long)
    r = torch.arange(CASE_B)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(n):
            nt, ni = sample()
            ct[r, nt.cpu()] += 1
            ci[r, ni.cpu()] += 1
    finally:
        torch.set_num_threads(threads)
    return ct, ci


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference_gumbel"])
def test_distribution_chi_square(backend, groups):
    v, t = case()
    gid = CASE_GROUPS if groups else None
    p_img, p_txt = softmax_weights(v, t, CASE_SCALE, gid)
    n = 1000 if backend == "reference_gumbel" else 3000  # the gumbel oracle's Philox in torch is slower
    if backend == "reference_gumbel":
        seeds = torch.Generator().manual_seed(11)
        ct, ci = draw_counts(lambda: hard_negatives_gumbel(v, t, CASE_SCALE, draw_seed(seeds, v.device), gid), n)
    else:
        g = torch.Generator().manual_seed(11)
        ct, ci = draw_counts(lambda: sample_hard_negatives(v, t, CASE_SCALE, group_ids=gid, generator=g,
                                                           backend=backend), n)
    p, chi2, dof = chi_square_pvalue(ct, ci, p_img, p_txt)
    assert p > 1e-3, f"{backend}: chi2 {chi2:.1f} on {dof} dof, p={p:.2e}"
    # The test has power: the same counts are far from the uniform law over the valid negatives.
    valid = negative_mask(CASE_B, gid, "cpu").double()
    unif = valid / valid.sum(1, keepdim=True)
    p_u, _, _ = chi_square_pvalue(ct, ci, unif, unif.T / unif.T.sum(1, keepdim=True))
    assert p_u < 1e-6, f"{backend}: could not tell the draws from uniform (p={p_u:.2e})"


@pytest.mark.parametrize("device", TRITON_DEVS)
def test_distribution_chi_square_triton(device):
    """Few draws under the interpreter (each call is two interpreted launches; the exact match with the
    Gumbel oracle, whose law is checked with many draws above, is tested separately); on a GPU 3000."""
    v, t = case()
    v, t = v.to(device), t.to(device)
    gid = CASE_GROUPS.to(device)
    p_img, p_txt = softmax_weights(v.cpu(), t.cpu(), CASE_SCALE, CASE_GROUPS)
    n = 60 if device == "cpu" else 3000
    g = gen_for(device, 5)
    ct, ci = draw_counts(lambda: sample_hard_negatives(v, t, CASE_SCALE, group_ids=gid, generator=g,
                                                       backend="triton"), n)
    p, chi2, dof = chi_square_pvalue(ct, ci, p_img, p_txt)
    assert p > 1e-3, f"triton: chi2 {chi2:.1f} on {dof} dof, p={p:.2e}"


# ------------------------------------------------------------------------ never a positive, odd B
@given(B=st.sampled_from([2, 3, 7, 29, 97]), D=st.sampled_from([1, 5, 16, 33]), seed=SEEDS,
       n_groups=st.sampled_from([0, 2, 5, 50]), scale=st.sampled_from([0.5, 14.3, 100.0]))
def test_never_positive_cpu_backends(B, D, seed, n_groups, scale):
    g = torch.Generator().manual_seed(seed)
    v, t = feats(B, D, g)
    gid = torch.randint(0, n_groups, (B,), generator=g) if n_groups else None
    if gid is not None and bool((gid == gid[0]).all()):
        gid[-1] = gid[0] + 1
    for backend in CPU_BACKENDS:
        with poison_outputs():
            nt, ni = sample_hard_negatives(v, t, scale, group_ids=gid, generator=gen_for("cpu", seed),
                                           backend=backend)
        assert nt.shape == (B,) and ni.shape == (B,)
        assert_no_positive(nt, ni, gid)


@pytest.mark.parametrize("B", [2, 7, 97])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_never_positive_odd_b(backend, B):
    """The issue's batch sizes on every CPU backend, with and without groups, several seeds."""
    g = torch.Generator().manual_seed(100 + B)
    v, t = feats(B, 12, g)
    gid = torch.arange(B) % max(2, B // 3)
    for k in range(4):
        grp = gid if k % 2 else None
        with poison_outputs():
            nt, ni = sample_hard_negatives(v, t, 20.0, group_ids=grp, generator=gen_for("cpu", k), backend=backend)
        assert nt.shape == (B,) and ni.shape == (B,)
        assert_no_positive(nt, ni, grp)


@pytest.mark.parametrize("device", TRITON_DEVS)
@pytest.mark.parametrize("B", [2, 7, 97])
def test_never_positive_triton(device, B):
    g = torch.Generator().manual_seed(B)
    v, t = feats(B, 17, g, device=device)
    gid = torch.arange(B) % max(2, B // 3)
    for k in range(2):
        grp = gid.to(device) if k else None
        with poison_outputs():
            nt, ni = sample_hard_negatives(v, t, 20.0, group_ids=grp, generator=gen_for(device, k), backend="triton")
        assert nt.device.type == device
        assert_no_positive(nt, ni, grp.cpu() if grp is not None else None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_b2_is_forced(backend):
    """B=2: each row has exactly one valid negative, the other sample."""
    v, t = feats(2, 8, torch.Generator().manual_seed(0))
    for s in range(5):
        nt, ni = sample_hard_negatives(v, t, 10.0, generator=gen_for("cpu", s), backend=backend)
        assert nt.tolist() == [1, 0] and ni.tolist() == [1, 0]


def test_group_ids_exclusion_single_candidate():
    """Groups leave sample 4 as the only negative of samples 0-3, and 0-3 as the negatives of 4."""
    B = 5
    v, t = feats(B, 6, torch.Generator().manual_seed(3))
    gid = torch.tensor([9, 9, 9, 9, 2])
    for backend in CPU_BACKENDS:
        for s in range(10):
            nt, ni = sample_hard_negatives(v, t, 5.0, group_ids=gid, generator=gen_for("cpu", s), backend=backend)
            assert nt[:4].tolist() == [4] * 4 and ni[:4].tolist() == [4] * 4
            assert nt[4] < 4 and ni[4] < 4
    gid32 = gid.to(torch.int32)
    nt, ni = sample_hard_negatives(v, t, 5.0, group_ids=gid32, generator=gen_for("cpu", 0))
    assert nt[:4].tolist() == [4] * 4


def test_hard_negatives_prefer_similar():
    """With a large scale the draws concentrate on the most similar non-positive."""
    B, D = 29, 32
    v, t = feats(B, D, torch.Generator().manual_seed(1))
    s = v @ t.T
    s.fill_diagonal_(float("-inf"))
    best = s.argmax(1)
    for backend in CPU_BACKENDS:
        nt, _ = sample_hard_negatives(v, t, 1e4, generator=gen_for("cpu", 0), backend=backend)
        assert torch.equal(nt, best), backend


# ------------------------------------------------------------------------ reproducibility, parity
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_same_seed_same_draws(backend):
    v, t = feats(97, 24, torch.Generator().manual_seed(2))
    a = sample_hard_negatives(v, t, 14.0, generator=gen_for("cpu", 123), backend=backend)
    b = sample_hard_negatives(v, t, 14.0, generator=gen_for("cpu", 123), backend=backend)
    c = sample_hard_negatives(v, t, 14.0, generator=gen_for("cpu", 124), backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])), "another seed gave the same 194 draws"
    # the generator advances: two consecutive calls differ
    g = gen_for("cpu", 5)
    d1 = sample_hard_negatives(v, t, 14.0, generator=g, backend=backend)
    d2 = sample_hard_negatives(v, t, 14.0, generator=g, backend=backend)
    assert not torch.equal(torch.cat(d1), torch.cat(d2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [2, 7, 97, 130])
def test_cpu_matches_gumbel_reference(B, dtype):
    if not GUMBEL_CPU:
        pytest.skip("gkcore._C is not built")
    g = torch.Generator().manual_seed(B)
    v, t = feats(B, 40, g, dtype=dtype)
    gid = torch.randint(0, max(2, B // 3), (B,), generator=g)
    gid[0], gid[1] = 0, 1
    for k, grp in enumerate((None, gid)):
        for scale in (3.0, torch.tensor(14.2857, dtype=dtype)):
            with poison_outputs():
                got = sample_hard_negatives(v, t, scale, group_ids=grp, generator=gen_for("cpu", k), backend="cpu")
            exp = hard_negatives_gumbel(v, t, scale, draw_seed(gen_for("cpu", k), v.device), grp)
            assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


def test_cpu_chunked_matches(monkeypatch):
    """The cpu backend's row chunks (similarities O(chunk * B)) give the same draws as one chunk."""
    if not GUMBEL_CPU:
        pytest.skip("gkcore._C is not built")
    import gkcore.ops.hard_negatives as mod

    v, t = feats(97, 16, torch.Generator().manual_seed(4))
    exp = hard_negatives_gumbel(v, t, 7.0, draw_seed(gen_for("cpu", 1), v.device))
    monkeypatch.setattr(mod, "_CPU_CHUNK_ELEMS", 97 * 10)
    got = sample_hard_negatives(v, t, 7.0, generator=gen_for("cpu", 1), backend="cpu")
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


@pytest.mark.parametrize("device", TRITON_DEVS)
@pytest.mark.parametrize("B", [2, 7, 40])
def test_triton_matches_gumbel_reference(device, B):
    g = torch.Generator().manual_seed(B)
    v, t = feats(B, 20, g, device=device)
    gid = (torch.arange(B) % max(2, B // 4)).to(device)
    for k, grp in enumerate((None, gid)):
        with poison_outputs():
            got = sample_hard_negatives(v, t, 9.0, group_ids=grp, generator=gen_for(device, k), backend="triton")
        exp = hard_negatives_gumbel(v, t, 9.0, draw_seed(gen_for(device, k), v.device), grp)
        assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])
        if GUMBEL_CPU and device == "cpu":
            c = sample_hard_negatives(v, t, 9.0, group_ids=grp, generator=gen_for(device, k), backend="cpu")
            assert torch.equal(got[0], c[0]) and torch.equal(got[1], c[1])


@pytest.mark.parametrize("device", TRITON_DEVS)
def test_triton_noncontiguous_and_half(device):
    B = 19
    v, t = feats(B, 24, torch.Generator().manual_seed(8), device=device)
    exp = hard_negatives_gumbel(v, t, 4.0, draw_seed(gen_for(device, 3), v.device))
    got = sample_hard_negatives(noncontiguous(v), noncontiguous(t), 4.0, generator=gen_for(device, 3),
                                backend="triton")
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])
    for dt in (torch.float16, torch.bfloat16):
        # 16-bit products are exact in float32; only the summation order differs from the reference
        vh, th = v.to(dt), t.to(dt)
        nt, ni = sample_hard_negatives(vh, th, 4.0, generator=gen_for(device, 3), backend="triton")
        assert_no_positive(nt, ni)
        e = hard_negatives_gumbel(vh, th, 4.0, draw_seed(gen_for(device, 3), v.device))
        assert (nt == e[0]).float().mean() > 0.9 and (ni == e[1]).float().mean() > 0.9, dt


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_and_dtypes_cpu(backend):
    B = 29
    v, t = feats(B, 12, torch.Generator().manual_seed(6))
    a = sample_hard_negatives(v, t, 3.0, generator=gen_for("cpu", 9), backend=backend)
    b = sample_hard_negatives(noncontiguous(v), noncontiguous(t), 3.0, generator=gen_for("cpu", 9), backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if backend == "reference":
        for dt in (torch.float16, torch.bfloat16):
            nt, ni = sample_hard_negatives(v.to(dt), t.to(dt), 3.0, generator=gen_for("cpu", 9), backend=backend)
            assert_no_positive(nt, ni)


def test_requires_grad_inputs_and_auto_backend():
    v, t = feats(7, 8, torch.Generator().manual_seed(0))
    v.requires_grad_(True)
    nt, ni = sample_hard_negatives(v, t, torch.tensor(2.0, requires_grad=True), generator=gen_for("cpu", 0))
    assert not nt.requires_grad and not ni.requires_grad
    assert_no_positive(nt, ni)
    expected = "cpu" if GUMBEL_CPU else "reference"
    assert OP.select({"image_feat": v, "text_feat": t}).name == expected


def test_default_generator_follows_manual_seed():
    v, t = feats(29, 8, torch.Generator().manual_seed(0))
    torch.manual_seed(77)
    a = sample_hard_negatives(v, t, 5.0)
    torch.manual_seed(77)
    b = sample_hard_negatives(v, t, 5.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_multinomial_reference_matches_softmax_law_exactly_when_forced():
    """Weights of the multinomial oracle equal the masked softmax (it is the ALBEF recipe)."""
    v, t = case()
    p_img, p_txt = softmax_weights(v, t, CASE_SCALE, CASE_GROUPS)
    assert torch.allclose(p_img.sum(1), torch.ones(CASE_B, dtype=torch.float64))
    assert (p_img[negative_mask(CASE_B, CASE_GROUPS, "cpu") == 0] == 0).all()
    nt, ni = hard_negatives_multinomial(v, t, CASE_SCALE, CASE_GROUPS, torch.Generator().manual_seed(0))
    assert_no_positive(nt, ni, CASE_GROUPS)


# ----------------------------------------------------------------------------------------- errors
def test_b1_raises():
    v, t = feats(1, 8, torch.Generator().manual_seed(0))
    for backend in CPU_BACKENDS + [None]:
        with pytest.raises(ValueError, match="row 0 has no valid negative"):
            sample_hard_negatives(v, t, 1.0, backend=backend)


def test_all_in_one_group_raises():
    v, t = feats(6, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="row 0 .*no valid negative"):
        sample_hard_negatives(v, t, 1.0, group_ids=torch.full((6,), 3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_feat=torch.randn(4)), "image_feat must have 2 dimensions"),
    (dict(text_feat=torch.randn(5, 8)), "must have one shape"),
    (dict(text_feat=torch.randn(4, 8, dtype=torch.float64)), "dtype"),
    (dict(image_feat=torch.ones(4, 8, dtype=torch.long)), "image_feat must be a floating-point"),
    (dict(image_feat=[[1.0]]), "image_feat must be a torch.Tensor"),
    (dict(image_feat=torch.randn(4, 0), text_feat=torch.randn(4, 0)), "D=0"),
    (dict(scale=float("nan")), "scale must be finite"),
    (dict(scale=torch.ones(2)), "scale must be a float or a one-element tensor"),
    (dict(scale="2"), "scale must be a float or a one-element tensor, got str"),
    (dict(group_ids=torch.zeros(3, dtype=torch.long)), r"group_ids must have shape \(B=4,\)"),
    (dict(group_ids=torch.zeros(4)), "group_ids must be an integer tensor"),
    (dict(group_ids=[0, 1, 2, 3]), "group_ids must be a tensor"),
    (dict(generator=123), "generator must be a torch.Generator"),
])
def test_bad_inputs(kwargs, match):
    args = dict(image_feat=torch.randn(4, 8), text_feat=torch.randn(4, 8), scale=2.0)
    args.update(kwargs)
    v, t, s = args.pop("image_feat"), args.pop("text_feat"), args.pop("scale")
    with pytest.raises(ValueError, match=match):
        sample_hard_negatives(v, t, s, **args)


def test_backend_errors():
    v, t = feats(4, 8, torch.Generator().manual_seed(0))
    with pytest.raises(BackendError, match="unknown backend"):
        sample_hard_negatives(v, t, 1.0, backend="nope")
    if GUMBEL_CPU:
        with pytest.raises(BackendError, match="dtype float16 not supported"):
            sample_hard_negatives(v.half(), t.half(), 1.0, backend="cpu")
    if not INTERPRETER and not HAS_CUDA:
        with pytest.raises(BackendError):
            sample_hard_negatives(v, t, 1.0, backend="triton")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_triton_no_host_sync():
    """The triton path draws its seed on the device and launches without synchronising the host."""
    v, t = feats(300, 64, torch.Generator().manual_seed(0), device="cuda")
    g = gen_for("cuda", 0)
    sample_hard_negatives(v, t, 14.0, generator=g, backend="triton")  # compile outside the check
    scale = torch.tensor(14.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        nt, ni = sample_hard_negatives(v, t, scale, generator=g, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_no_positive(nt, ni)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_generator_device_mismatch():
    v, t = feats(4, 8, torch.Generator().manual_seed(0), device="cuda")
    with pytest.raises(ValueError, match="generator is on"):
        sample_hard_negatives(v, t, 1.0, generator=torch.Generator())
    nt, ni = sample_hard_negatives(v, t, 1.0, group_ids=torch.tensor([0, 0, 1, 2]), generator=gen_for("cuda", 0))
    assert nt.device.type == "cuda"
    assert_no_positive(nt, ni, torch.tensor([0, 0, 1, 2]))


# ------------------------------------------------------------------------ torch.compile, AOT compile
def test_custom_op_opcheck_and_compile():
    if not GUMBEL_CPU:
        pytest.skip("gkcore._C is not built")
    from gkcore.ops.hard_negatives import _sample_hard_negatives

    v, t = feats(7, 8, torch.Generator().manual_seed(0))
    res = torch.library.opcheck(_sample_hard_negatives, (v, t, torch.tensor([5.0]), torch.tensor([3]), None, "cpu"),
                                test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    assert all(r == "SUCCESS" for r in res.values()), res

    @torch.compile(backend="eager")
    def step(v, t, g):
        nt, ni = sample_hard_negatives(v, t, 5.0, group_ids=g, backend="cpu")
        return nt, ni

    gid = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    torch.manual_seed(3)
    a = step(v, t, gid)
    torch.manual_seed(3)
    b = sample_hard_negatives(v, t, 5.0, group_ids=gid, backend="cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert_no_positive(*a, gid)

# The AOT compile check of kernels/hard_negatives.py (24 builds, sm_80 + sm_90a, no spills) runs in
# tests/test_foundation.py::test_aot_compile_all_triton_kernels with every other kernels module.
