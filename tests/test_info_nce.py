"""info_nce: the reference against the formula written out independently, every backend against the
float64 reference (docs/numerics.md: forward and the gradients of query, keys and a tensor scale), queue keys
without grad, soft targets, int / mask / default positives (incl. rows without a positive), label
smoothing, each reduction, odd and non-contiguous inputs, bad inputs, and the cpu backend's memory."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import REPO, kernel_backends, need_kernel, triton_devices
from strategies import SEEDS
from gkcore.functional import info_nce
from gkcore.ops.info_nce import OP
from gkcore.ops.registry import BackendError
from gkcore.reference.info_nce import info_nce_reference
from gkcore.testing import check_parity, noncontiguous

#: (backend, device) pairs that can run here: the C++ cpu backend and triton (GPU, or CPU interpreter).
CPU_OK, KERNELS, KERNEL_IDS = kernel_backends(OP, {"query": torch.zeros(1, 4), "keys": torch.zeros(1, 4)})


def _dtypes(backend, device):
    if backend == "cpu":
        return [torch.float32, torch.float64]
    if device == "cpu":  # interpreter: fp32 always, one half type to keep the file fast
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float16]


def make(M, N, D, *, positives="default", seed=0, dtype=torch.float32, device="cpu", key_grad=True,
         scale_tensor=True, no_pos_row=True):
    """Normalised features (as in CLIP / ALBEF) and a positives spec; returns (q, k, qm, scale, positives)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    # make the positives more similar than chance so that the loss is not flat
    n = min(M, N)
    k[:n] = F.normalize(k[:n] + 0.7 * q[:n], dim=1)
    qm = F.normalize(q + 0.2 * torch.randn(M, D, generator=g, dtype=torch.float64), dim=1)
    pos = None
    if positives == "int":
        pos = torch.randint(0, N, (M,), generator=g)
        if no_pos_row and M > 1:
            pos[M // 2] = -1
    elif positives == "mask":
        pos = torch.rand(M, N, generator=g) < 0.15
        pos[torch.arange(M), torch.randint(0, N, (M,), generator=g)] = True
        if no_pos_row and M > 1:
            pos[M // 2] = False
    q = q.to(device, dtype).requires_grad_(True)
    k = k.to(device, dtype).requires_grad_(key_grad)
    qm = qm.to(device, dtype)
    scale = 1.0 / 0.07
    if scale_tensor:
        scale = torch.tensor(math.log(scale), dtype=torch.float32, device=device).exp().detach().requires_grad_(True)
    if pos is not None:
        pos = pos.to(device)
    return q, k, qm, scale, pos


def formula(q, k, scale, positives=None, qm=None, alpha=0.0, eps=0.0, reduction="mean"):
    """The docstring's math in float64, written without log_softmax / cross_entropy."""
    q, k = q.double(), k.double()
    sc = float(scale) if not isinstance(scale, torch.Tensor) else float(scale.detach())
    M, N = q.shape[0], k.shape[0]
    s = sc * q @ k.T
    lse = torch.log(torch.exp(s - s.max(1, keepdim=True).values).sum(1)) + s.max(1).values
    y = torch.zeros(M, N, dtype=torch.float64)
    valid = torch.ones(M, dtype=torch.bool)
    for i in range(M):
        if positives is None:
            y[i, i] = 1
        elif positives.dtype == torch.bool:
            c = int(positives[i].sum())
            valid[i] = c > 0
            if c:
                y[i] = positives[i].double() / c
        else:
            j = int(positives[i])
            valid[i] = j >= 0
            if j >= 0:
                y[i, j] = 1
    t = y
    if alpha > 0:
        sm = sc * qm.double() @ k.T
        pm = torch.exp(sm - sm.max(1, keepdim=True).values)
        pm = pm / pm.sum(1, keepdim=True)
        t = (1 - alpha) * y + alpha * pm
    t = (1 - eps) * t + eps / N
    loss = lse - (t * s).sum(1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("positives", ["default", "int", "mask"])
@pytest.mark.parametrize("alpha,eps", [(0.0, 0.0), (0.4, 0.0), (0.0, 0.1), (0.4, 0.1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_formula(positives, alpha, eps, reduction):
    q, k, qm, scale, pos = make(9, 23, 16, positives=positives, dtype=torch.float64, seed=3)
    got = info_nce_reference(q, k, scale=scale, positives=pos, soft_query=qm, alpha=alpha, label_smoothing=eps,
                             reduction=reduction)
    want = formula(q, k, scale, pos, qm, alpha, eps, reduction)
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-10)


def test_reference_equals_cross_entropy():
    """Default positives, no soft targets: exactly F.cross_entropy on the logits (incl. label smoothing)."""
    q, k, _, _, _ = make(12, 40, 32, dtype=torch.float64, scale_tensor=False)
    for eps in (0.0, 0.1):
        want = F.cross_entropy(14.0 * q @ k.T, torch.arange(12), label_smoothing=eps)
        got = info_nce_reference(q, k, scale=14.0, label_smoothing=eps)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_no_positive_rows_left_out_of_mean():
    q, k, _, _, pos = make(8, 20, 16, positives="int", dtype=torch.float64, scale_tensor=False)
    pos[:3] = -1
    valid = pos >= 0
    per = info_nce(q, k, scale=10.0, positives=pos, reduction="none", backend="reference")
    assert bool((per[~valid] == 0).all()) and bool((per[valid] > 0).all())
    mean = info_nce(q, k, scale=10.0, positives=pos, backend="reference")
    torch.testing.assert_close(mean, per[valid].mean())
    none = torch.full((8,), -1)
    z = info_nce(q, k, scale=10.0, positives=none, backend="reference")
    assert float(z.detach()) == 0.0


# --------------------------------------------------------------------------------------- kernels
def _fn(backend, **kw):
    def run(q, k, scale):
        return info_nce(q, k, scale=scale, backend=backend, **kw)
    return run


def _ref(**kw):
    def run(q, k, scale):
        return info_nce_reference(q, k, scale=scale, **kw)
    return run


def _atol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]


def _rtol(dtype):
    """A few ulp of the largest value (a 'sum' loss of many rows is large: its rounding is relative)."""
    return {torch.float64: 1e-14, torch.float32: 5e-7, torch.bfloat16: 0.0, torch.float16: 0.0}[dtype]


CASES = [  # (positives, alpha, eps, reduction, key_grad, scale_tensor)
    ("default", 0.0, 0.0, "mean", True, True),
    ("default", 0.4, 0.0, "mean", False, True),    # ALBEF ITC: queue keys without grad, soft targets
    ("int", 0.0, 0.1, "sum", True, False),
    ("int", 0.4, 0.1, "none", False, True),
    ("mask", 0.0, 0.0, "mean", True, True),
    ("mask", 0.4, 0.1, "sum", True, True),
]


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-a{c[1]}-e{c[2]}-{c[3]}-kg{int(c[4])}-st{int(c[5])}"
                                             for c in CASES])
def test_kernel_parity_cases(backend, device, case):
    need_kernel(backend)
    positives, alpha, eps, reduction, key_grad, scale_tensor = case
    interp = device == "cpu" and backend == "triton"
    M, N, D = (13, 45, 24) if interp else (70, 333, 40)
    for dtype in _dtypes(backend, device):
        q, k, qm, scale, pos = make(M, N, D, positives=positives, dtype=dtype, device=device, key_grad=key_grad,
                                    scale_tensor=scale_tensor, seed=11)
        kw = dict(positives=pos, soft_query=qm, alpha=alpha, label_smoothing=eps, reduction=reduction)
        check_parity(_fn(backend, **kw), _ref(**kw), [q, k, scale], atol=_atol(dtype), rtol_floor=_rtol(dtype),
                     name=f"{backend} {dtype}")


def _hypothesis_case(backend, device, data, seed):
    interp = device == "cpu" and backend == "triton"
    M = data.draw(st.sampled_from([1, 2, 7, 29] if interp else [1, 7, 29, 97]), label="M")
    extra = data.draw(st.sampled_from([0, 1, 13, 40] if interp else [0, 1, 29, 300, 1000]), label="extra")
    D = data.draw(st.sampled_from([16, 20, 48] if interp else [16, 29, 64, 100, 256, 512]), label="D")
    positives = data.draw(st.sampled_from(["default", "int", "mask"]), label="positives")
    alpha = data.draw(st.sampled_from([0.0, 0.4]), label="alpha")
    eps = data.draw(st.sampled_from([0.0, 0.1]), label="eps")
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    key_grad = data.draw(st.booleans(), label="key_grad")
    contiguous = data.draw(st.booleans(), label="contiguous")
    N = M + extra
    q, k, qm, scale, pos = make(M, N, D, positives=positives, seed=seed, device=device, key_grad=key_grad,
                                scale_tensor=data.draw(st.booleans(), label="scale_tensor"))
    if not contiguous:
        q, k, qm = noncontiguous(q), noncontiguous(k, 0), noncontiguous(qm)
    kw = dict(positives=pos, soft_query=qm, alpha=alpha, label_smoothing=eps, reduction=reduction)
    check_parity(_fn(backend, **kw), _ref(**kw), [q, k, scale], atol=_atol(torch.float32),
                 rtol_floor=_rtol(torch.float32), name=backend)


@pytest.mark.skipif(not CPU_OK, reason="gkcore._C (cpu backend) not built")
@given(data=st.data(), seed=SEEDS)
def test_cpu_parity_hypothesis(data, seed):
    _hypothesis_case("cpu", "cpu", data, seed)


@pytest.mark.parametrize("device", triton_devices() or ["none"])
@settings(max_examples=6)
@given(data=st.data(), seed=SEEDS)
def test_triton_parity_hypothesis(device, data, seed):
    if device == "none":
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    _hypothesis_case("triton", device, data, seed)


@pytest.mark.skipif(not CPU_OK, reason="gkcore._C (cpu backend) not built")
@pytest.mark.parametrize("key_grad", [False, True])
def test_cpu_moderate_shape(key_grad):
    """Several row blocks and key tiles with partial ones, both the fused (queue) and the recompute path."""
    q, k, qm, scale, pos = make(300, 1300, 96, positives="int", key_grad=key_grad, seed=5)
    kw = dict(positives=pos, soft_query=qm, alpha=0.4, label_smoothing=0.1)
    check_parity(_fn("cpu", **kw), _ref(**kw), [q, k, scale], atol=2e-5, rtol_floor=_rtol(torch.float32),
                 name="cpu moderate")


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
def test_easy_rows_loss_is_accurate(backend, device):
    """Rows whose positive is the largest logit have a loss far below the scale (about 14 here). The kernels
    form (max - positive) before adding log z; forming lse - positive instead loses about one ulp of the
    scale per row (a CI draw, M=29 D=512 sum, had a relative error of 1e-4, cpu; 1.8e-5, triton)."""
    need_kernel(backend)
    worst = 0.0
    for seed in range(4):
        for D in (64, 512):
            q, k, _, scale, _ = make(29, 29 + 40 * (seed % 2), D, seed=seed, device=device, scale_tensor=False)
            got = info_nce(q.detach(), k.detach(), scale=scale, reduction="sum", backend=backend)
            truth = info_nce_reference(q.detach().double(), k.detach().double(), scale=scale, reduction="sum")
            worst = max(worst, abs(float(got) - float(truth)) / float(truth))
    assert worst < 1e-5, worst


@pytest.mark.skipif(not CPU_OK, reason="gkcore._C (cpu backend) not built")
def test_cpu_deterministic():
    q, k, qm, scale, pos = make(150, 400, 32, positives="mask", seed=2)
    outs = []
    for _ in range(2):
        q.grad = k.grad = scale.grad = None
        info_nce(q, k, scale=scale, positives=pos, soft_query=qm, alpha=0.4, backend="cpu").backward()
        outs.append((q.grad.clone(), k.grad.clone(), scale.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
def test_queue_keys_get_no_grad_and_scale_float(backend, device):
    need_kernel(backend)
    q, k, qm, _, _ = make(10, 50, 16, device=device, key_grad=False, scale_tensor=False)
    loss = info_nce(q, k, scale=12.5, soft_query=qm, alpha=0.4, backend=backend)
    loss.backward()
    assert k.grad is None and q.grad is not None and bool(torch.isfinite(q.grad).all())
    q2 = q.detach().clone().requires_grad_(True)
    info_nce_reference(q2, k, scale=12.5, soft_query=qm, alpha=0.4).backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend,device", KERNELS, ids=KERNEL_IDS)
def test_no_grad_mode(backend, device):
    need_kernel(backend)
    q, k, _, scale, _ = make(9, 30, 16, device=device)
    with torch.no_grad():
        a = info_nce(q, k, scale=scale, backend=backend)
        b = info_nce_reference(q, k, scale=scale)
    assert not a.requires_grad
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- inputs
def test_bad_inputs_name_the_argument():
    q, k, qm, _, _ = make(4, 6, 8, scale_tensor=False)
    with pytest.raises(ValueError, match="keys"):
        info_nce(q, k[:, :5], scale=1.0)
    with pytest.raises(ValueError, match="keys dtype"):
        info_nce(q, k.double(), scale=1.0)
    with pytest.raises(ValueError, match="N >= M"):
        info_nce(q, k[:3], scale=1.0)
    with pytest.raises(ValueError, match="positives"):
        info_nce(q, k, scale=1.0, positives=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="positives"):
        info_nce(q, k, scale=1.0, positives=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="positives"):
        info_nce(q, k, scale=1.0, positives=torch.full((4,), 6))
    with pytest.raises(ValueError, match="soft_query"):
        info_nce(q, k, scale=1.0, alpha=0.4)
    with pytest.raises(ValueError, match="soft_query"):
        info_nce(q, k, scale=1.0, alpha=0.4, soft_query=qm[:2])
    with pytest.raises(ValueError, match="alpha"):
        info_nce(q, k, scale=1.0, alpha=1.5, soft_query=qm)
    with pytest.raises(ValueError, match="label_smoothing"):
        info_nce(q, k, scale=1.0, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="reduction"):
        info_nce(q, k, scale=1.0, reduction="avg")
    with pytest.raises(ValueError, match="scale"):
        info_nce(q, k, scale=torch.ones(2))
    with pytest.raises(ValueError, match="scale"):
        info_nce(q, k, scale="1")
    with pytest.raises(BackendError):
        info_nce(q.half(), k.half(), scale=1.0, backend="cpu")


# --------------------------------------------------------------------------------------- memory
_MEM_SCRIPT = textwrap.dedent("""
    import sys, torch
    from gkcore.functional import info_nce
    torch.set_num_threads(2)
    M, N, D = 2048, 18432, 256
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1).requires_grad_(True)
    k = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    qm = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1)
    # warm up the allocator and the op on a small problem, then measure the peak RSS growth
    info_nce(q[:64], k[:256], scale=14.0, soft_query=qm[:64], alpha=0.4, backend="cpu").backward()
    q.grad = None
    def peak():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak to the current RSS
    base = peak()
    x = torch.ones(M, N)  # probe: what one (M, N) fp32 logits matrix looks like to this measurement
    probe = peak() - base
    del x
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = peak()
    loss = info_nce(q, k, scale=14.0, soft_query=qm, alpha=0.4, backend="cpu")
    loss.backward()
    print(probe, peak() - base, float(loss), float(q.grad.abs().sum()))
""")


def _peak_extra():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], capture_output=True, text=True, env=env,
                       cwd=str(REPO), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    probe, extra, loss, gsum = r.stdout.split()
    return int(probe), int(extra), float(loss), float(gsum)


@pytest.mark.skipif(not CPU_OK, reason="gkcore._C (cpu backend) not built")
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_cpu_memory_is_linear_not_quadratic():
    """ITC with a queue at M=2048, N=18432, D=256, soft targets, forward + backward: the cpu backend's peak
    extra memory (peak RSS growth) is linear in the inputs, at most twice their (M + N) D fp32 bytes (the
    chunked logits buffers are capped at about the inputs' size, plus the O(M D) gradient rows), and under
    a quarter of the (M, N) fp32 logits that the reference materialises (several times over). The probe
    checks that the measurement does see a logits matrix."""
    M, N, D = 2048, 18432, 256
    logits_bytes = M * N * 4
    inputs_bytes = (M + N) * D * 4
    probe, extra_cpu, loss, gsum = _peak_extra()
    assert probe > 0.9 * logits_bytes, (probe, logits_bytes)
    assert math.isfinite(loss) and loss > 0 and math.isfinite(gsum) and gsum > 0
    assert extra_cpu < min(2 * inputs_bytes, 0.25 * logits_bytes), (
        f"cpu backend peak extra {extra_cpu / 2**20:.1f} MiB: more than twice the inputs "
        f"({inputs_bytes / 2**20:.1f} MiB) or a quarter of the logits ({logits_bytes / 2**20:.1f} MiB)")


@pytest.mark.skipif(not CPU_OK, reason="gkcore._C (cpu backend) not built")
def test_opcheck_custom_ops():
    """torch.library.opcheck: schema, fake (meta) registration and autograd registration of the cpu ops."""
    from gkcore.ops.info_nce import _info_nce_bwd, _info_nce_fwd

    q, k, qm, scale, _ = make(9, 21, 16, seed=4)
    idx = torch.arange(9)
    sc = scale.detach().requires_grad_(True)
    mask = torch.rand(9, 21) < 0.3
    torch.library.opcheck(_info_nce_fwd, (q, k.detach(), sc, idx[:0], mask, None, 0.0, 0.0, True, False, "cpu"))
    # the key side fused in the forward (eager only: its backward checks on the host that the upstream gradient
    # is uniform, so it is not traced by AOT dispatch; torch.compile turns the fusion off)
    torch.library.opcheck(_info_nce_fwd, (q, k, sc, idx, None, qm, 0.4, 0.1, True, True, "cpu"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    loss, lse, lse_m, _, _ = _info_nce_fwd(q.detach(), k.detach(), sc.detach(), idx, None, qm, 0.4, 0.1, False, False,
                                           "cpu")
    g = torch.rand(9)
    torch.library.opcheck(_info_nce_bwd, (g, q.detach(), k.detach(), sc.detach(), idx, None, qm, lse, lse_m, 0.4,
                                          0.1, True, True, "cpu"))


@pytest.mark.parametrize("backend,device", KERNELS + [("reference", "cpu")], ids=KERNEL_IDS + ["reference-cpu"])
def test_edge_cases_empty_batch_and_no_positive_at_all(backend, device):
    """M = 0 and a batch in which no row has a positive: loss 0 under 'mean', zero (not NaN) gradients."""
    need_kernel(backend)
    q = torch.randn(0, 16, device=device, requires_grad=True)
    k = torch.randn(5, 16, device=device, requires_grad=True)
    loss = info_nce(q, k, scale=2.0, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and q.grad.shape == (0, 16) and float(k.grad.abs().sum()) == 0.0
    q = torch.randn(4, 16, device=device, requires_grad=True)
    k = torch.randn(6, 16, device=device, requires_grad=True)
    s = torch.tensor(3.0, device=device, requires_grad=True)
    loss = info_nce(q, k, scale=s, positives=torch.zeros(4, 6, dtype=torch.bool, device=device), backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0
    for g in (q.grad, k.grad, s.grad):
        assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) == 0.0
