"""gkcore.nn.ClipLoss (vs open_clip's ClipLoss), gkcore.nn.ITCLoss (vs a plain-torch ALBEF ITC written
here) and gkcore.functional.entity_contrastive_loss (hand-checked cases), single process.
The 2-process runs are in test_info_nce_distributed.py."""
import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gkcore.ops.info_nce as ops_info_nce
from gkcore.functional import entity_contrastive_loss
from gkcore.nn import ClipLoss, ITCLoss



def load_open_clip_loss():
    """open_clip's ``loss.py`` (the real ClipLoss), loaded on its own: importing the ``open_clip`` package
    pulls in its model zoo and takes ~10 s, which matters in the spawned processes of the distributed
    test. ``loss.py`` itself imports only torch (and horovod when present)."""
    name = "_gk_test_open_clip_loss"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip (open-clip-torch) is a test dependency and is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "loss.py")
    mod_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


open_clip_loss = load_open_clip_loss()

BACKENDS = ["reference", None]


# ------------------------------------------------------------------------------ ALBEF ITC (plain torch)
class AlbefITC(nn.Module):
    """ALBEF's ITC as in its paper / REFERENCES.md, plain torch: queues stored (D, Q) with a Python
    pointer, targets alpha * softmax(momentum sims) + (1 - alpha) * onehot, loss (i2t + t2i) / 2,
    enqueue after the loss. ``gather`` (optional) all-gathers the momentum features before enqueueing;
    ``key_gather`` (optional) also makes them the in-batch keys (positives shifted by ``offset``)."""

    def __init__(self, dim, queue_size, temp=0.07):
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(float(temp), dtype=torch.float64))
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, queue_size, dtype=torch.float64), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, queue_size, dtype=torch.float64), dim=0))
        self.ptr = 0
        self.queue_size = queue_size

    def forward(self, v, t, vm, tm, alpha, gather=None, key_gather=False, offset=0):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        vm_all = gather(vm) if gather is not None else vm
        tm_all = gather(tm) if gather is not None else tm
        kv, kt = (vm_all, tm_all) if key_gather else (vm, tm)
        with torch.no_grad():
            image_all = torch.cat([kv.t(), self.image_queue.clone()], 1)
            text_all = torch.cat([kt.t(), self.text_queue.clone()], 1)
            onehot = torch.zeros(v.shape[0], image_all.shape[1], dtype=v.dtype)
            onehot[torch.arange(v.shape[0]), torch.arange(v.shape[0]) + offset] = 1
            i2t_t = alpha * F.softmax(vm @ text_all / self.temp, 1) + (1 - alpha) * onehot
            t2i_t = alpha * F.softmax(tm @ image_all / self.temp, 1) + (1 - alpha) * onehot
        s_i2t = v @ text_all / self.temp
        s_t2i = t @ image_all / self.temp
        l_i2t = -(F.log_softmax(s_i2t, 1) * i2t_t).sum(1).mean()
        l_t2i = -(F.log_softmax(s_t2i, 1) * t2i_t).sum(1).mean()
        with torch.no_grad():
            n = vm_all.shape[0]
            assert self.queue_size % n == 0
            self.image_queue[:, self.ptr:self.ptr + n] = vm_all.t()
            self.text_queue[:, self.ptr:self.ptr + n] = tm_all.t()
            self.ptr = (self.ptr + n) % self.queue_size
        return (l_i2t + l_t2i) / 2


def _feats(g, B, D, dtype=torch.float64):
    out = [F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=1) for _ in range(4)]
    return out[0].requires_grad_(), out[1].requires_grad_(), out[2], out[3]


def _copy_state(ours: ITCLoss, ref: AlbefITC):
    with torch.no_grad():
        ours.image_queue.copy_(ref.image_queue.t())
        ours.text_queue.copy_(ref.text_queue.t())
        ours.temp.copy_(ref.temp)
        ours.queue_ptr.fill_(ref.ptr)


# ------------------------------------------------------------------------------------------ ClipLoss
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,D", [(1, 16), (7, 33), (40, 64)])
@pytest.mark.parametrize("scale_kind", ["tensor", "float"])
def test_clip_loss_matches_open_clip(backend, B, D, scale_kind):
    g = torch.Generator().manual_seed(B * 100 + D)
    img = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    # correlate the pairs a little so the loss is not at its random value
    txt = F.normalize(txt + 0.7 * img, dim=1)
    results = []
    for mod in (open_clip_loss.ClipLoss(), ClipLoss(backend=backend)):
        i = img.clone().requires_grad_()
        t = txt.clone().requires_grad_()
        p = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
        scale = p.exp() if scale_kind == "tensor" else math.exp(math.log(1 / 0.07))
        loss = mod(i, t, scale)
        loss.backward()
        results.append((loss.detach(), i.grad, t.grad, p.grad))
    (l0, gi0, gt0, gp0), (l1, gi1, gt1, gp1) = results
    assert torch.isfinite(l1) and l1.dim() == 0
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gi1, gi0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gt1, gt0, rtol=1e-9, atol=1e-12)
    if scale_kind == "tensor":
        assert gp1 is not None and gp0 is not None
        torch.testing.assert_close(gp1, gp0, rtol=1e-9, atol=1e-12)


def test_clip_loss_float32_and_output_dict():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(29, 48, generator=g), dim=1)
    txt = F.normalize(torch.randn(29, 48, generator=g), dim=1)
    scale = torch.tensor(14.3)
    ref = open_clip_loss.ClipLoss()(img, txt, scale, output_dict=True)
    ours = ClipLoss()(img, txt, scale, output_dict=True)
    assert set(ours) == {"contrastive_loss"}
    torch.testing.assert_close(ours["contrastive_loss"], ref["contrastive_loss"], rtol=1e-5, atol=1e-5)
    # open_clip 2.x's positional output_dict and a scalar logit_bias (no effect on a softmax loss)
    d = ClipLoss()(img, txt, scale, True)
    assert isinstance(d, dict)
    bias = torch.tensor(-3.0, requires_grad=True)
    lb = ClipLoss()(img, txt, scale, logit_bias=bias)
    ob = open_clip_loss.ClipLoss()(img, txt, scale, logit_bias=bias)
    torch.testing.assert_close(lb, ob, rtol=1e-5, atol=1e-5)
    lb.backward()
    assert bias.grad is not None and float(bias.grad.abs()) < 1e-6


def test_clip_loss_labels_cache_and_errors():
    ours = ClipLoss(local_loss=True, cache_labels=True, rank=1, world_size=2)
    ref = open_clip_loss.ClipLoss(local_loss=True, cache_labels=True, rank=1, world_size=2)
    assert torch.equal(ours.get_ground_truth(torch.device("cpu"), 5), ref.get_ground_truth(torch.device("cpu"), 5))
    assert torch.equal(ours.get_ground_truth(torch.device("cpu"), 5), torch.arange(5, 10))
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(x, torch.randn(5, 8), 10.0)
    with pytest.raises(ValueError, match="2-D"):
        ClipLoss()(x[0], x[0], 10.0)
    with pytest.raises(ValueError, match="logit_scale"):
        ClipLoss()(x, x, torch.ones(2))
    with pytest.raises(ValueError, match="logit_bias"):
        ClipLoss()(x, x, 10.0, torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="process group"):
        ClipLoss(rank=0, world_size=2)(x, x, 10.0)
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(NotImplementedError):
        ClipLoss(use_horovod=True)


# ------------------------------------------------------------------------------------------- ITCLoss
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_loss_matches_albef_over_steps(backend, alpha):
    """4 training steps with Q = 12, B = 4: the pointer wraps; loss, gradients (features, temperature)
    and the queues follow the ALBEF implementation step by step."""
    torch.manual_seed(0)
    D, Q, B = 24, 12, 4
    ref = AlbefITC(D, Q, temp=0.07)
    ours = ITCLoss(D, Q, temperature=0.07, backend=backend).double()
    _copy_state(ours, ref)
    g = torch.Generator().manual_seed(11)
    for step in range(4):
        v, t, vm, tm = _feats(g, B, D)
        v2, t2 = v.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
        ref.temp.grad = None
        ours.temp.grad = None
        lr = ref(v, t, vm, tm, alpha)
        lo = ours(v2, t2, vm, tm, alpha=alpha)
        lr.backward()
        lo.backward()
        torch.testing.assert_close(lo.detach(), lr.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v2.grad, v.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(t2.grad, t.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.temp.grad, ref.temp.grad, rtol=1e-9, atol=1e-12)
        assert float(ours.temp.grad) != 0.0
        torch.testing.assert_close(ours.image_queue, ref.image_queue.t(), rtol=0, atol=0)
        torch.testing.assert_close(ours.text_queue, ref.text_queue.t(), rtol=0, atol=0)
        assert int(ours.queue_ptr) == ref.ptr == ((step + 1) * B) % Q
        with torch.no_grad():  # the same optimiser step on both temperatures
            ref.temp -= 0.01 * ref.temp.grad
            ours.temp -= 0.01 * ours.temp.grad


@pytest.mark.parametrize("start,clamped", [(0.9, 0.5), (1e-5, 0.001), (0.2, 0.2)])
def test_itc_temperature_clamp(start, clamped):
    torch.manual_seed(1)
    D, Q, B = 8, 8, 4
    ref = AlbefITC(D, Q)
    ours = ITCLoss(D, Q, backend="reference").double()
    _copy_state(ours, ref)
    with torch.no_grad():
        ref.temp.fill_(start)
        ours.temp.fill_(start)
    v, t, vm, tm = _feats(torch.Generator().manual_seed(2), B, D)
    lr = ref(v, t, vm, tm, 0.0)
    lo = ours(v.detach(), t.detach(), vm, tm)
    assert float(ours.temp.detach()) == pytest.approx(clamped)
    torch.testing.assert_close(lo, lr.detach(), rtol=1e-10, atol=1e-12)


def test_itc_queue_takes_any_batch_size_and_eval():
    """A batch that does not divide the queue (a skipped sample, an odd --batch-size) wraps around the
    queue's end instead of stopping the run; a batch larger than the queue leaves its last Q rows."""
    D = 8
    ours = ITCLoss(D, 10, backend="reference")
    v, t, vm, tm = _feats(torch.Generator().manual_seed(0), 4, D, torch.float32)
    for step in range(3):  # rows 0-3, 4-7, then 8, 9, 0, 1
        ours(v, t, vm, tm)
    assert int(ours.queue_ptr) == 2
    assert torch.equal(ours.image_queue[8:10], vm[:2]) and torch.equal(ours.image_queue[0:2], vm[2:4])
    assert torch.equal(ours.text_queue[4:8], tm)
    big = ITCLoss(D, 3, backend="reference")
    big(v, t, vm, tm)
    # rows 1, 2, 3 land at 1, 2, 0 (as if written one by one from 0): the pointer ends at 4 % 3 = 1
    assert int(big.queue_ptr) == 1
    assert torch.equal(big.image_queue, vm[[3, 1, 2]])
    # eval mode: no enqueue, and the queues stay as they were
    ours.eval()
    before = ours.image_queue.clone()
    loss = ours(v, t, vm, tm, alpha=0.4)
    assert torch.isfinite(loss)
    assert torch.equal(ours.image_queue, before) and int(ours.queue_ptr) == 2
    ours.train()
    with pytest.raises(ValueError, match="no rows"):
        ours(v[:0], t[:0], vm[:0], tm[:0])


def test_itc_queue_never_takes_non_finite_features():
    """A NaN momentum feature (a diverged step a user loop skips) must not poison later losses."""
    D = 8
    ours = ITCLoss(D, 16, backend="reference")
    v, t, vm, tm = _feats(torch.Generator().manual_seed(1), 4, D, torch.float32)
    before = ours.image_queue.clone()
    bad_vm = vm.clone()
    bad_vm[1, 3] = float("nan")
    bad_tm = tm.clone()
    bad_tm[2, 0] = float("inf")
    loss = ours(v, t, bad_vm, bad_tm)
    assert not torch.isfinite(loss)  # the bad batch's own loss is non-finite, as it must be
    assert torch.isfinite(ours.image_queue).all() and torch.isfinite(ours.text_queue).all()
    assert torch.equal(ours.image_queue[[1, 2]], before[[1, 2]])  # skipped rows keep the old features
    assert torch.equal(ours.image_queue[[0, 3]], vm[[0, 3]])
    assert int(ours.queue_ptr) == 4
    assert torch.isfinite(ours(v, t, vm, tm))  # the next batch trains normally


def test_itc_no_queue_and_input_errors():
    D, B = 16, 6
    v, t, vm, tm = _feats(torch.Generator().manual_seed(5), B, D)
    ours = ITCLoss(D, 0, backend="reference").double()
    tau = float(ours.temp.detach())  # 0.07 rounded to float32, then widened by .double()
    expect = (F.cross_entropy(v @ tm.t() / tau, torch.arange(B)) + F.cross_entropy(t @ vm.t() / tau, torch.arange(B))) / 2
    torch.testing.assert_close(ours(v, t, vm, tm), expect, rtol=1e-10, atol=1e-12)
    m = ITCLoss(D, 12)
    with pytest.raises(ValueError, match="feature size"):
        m(torch.randn(4, D + 1), torch.randn(4, D + 1), torch.randn(4, D + 1), torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="same shape"):
        m(torch.randn(4, D), torch.randn(4, D), torch.randn(2, D), torch.randn(2, D))
    with pytest.raises(ValueError, match="alpha"):
        m(torch.randn(4, D), torch.randn(4, D), torch.randn(4, D), torch.randn(4, D), alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        ITCLoss(D, 12, temperature=0.9)


def test_modules_pass_backend_through(monkeypatch):
    """The backend given to the constructor reaches every info_nce call."""
    seen = []
    real = ops_info_nce.info_nce

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **{**kwargs, "backend": "reference"})

    monkeypatch.setattr(ops_info_nce, "info_nce", spy)
    x = F.normalize(torch.randn(4, 8), dim=1)
    ClipLoss(backend="sentinel-a")(x, x, 10.0)
    ITCLoss(8, 8, backend="sentinel-b")(x, x, x, x)
    entity_contrastive_loss(x, x, torch.eye(4, dtype=torch.long), 10.0, backend="sentinel-c")
    assert seen == ["sentinel-a"] * 2 + ["sentinel-b"] * 2 + ["sentinel-c"]


# ----------------------------------------------------------------------------------- entity loss
def _hand_case():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    ent = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([[1, 0, -1], [0, -1, 0], [1, 1, 0]])
    # scale 2: row 0 logits [2, 0, -2], positive {0}; row 1 has no positive (dropped);
    # row 2 logits [2, 2, -2], positives {0, 1} (weight 1/2 each)
    e = math.exp
    l0 = -math.log(e(2) / (e(2) + e(0) + e(-2)))
    l2 = -0.5 * (2 * math.log(e(2) / (e(2) + e(2) + e(-2))))
    return image, ent, labels, l0, l2


@pytest.mark.parametrize("backend", BACKENDS)
def test_entity_loss_hand_checked(backend):
    image, ent, labels, l0, l2 = _hand_case()
    loss = entity_contrastive_loss(image, ent, labels, 2.0, backend=backend)
    assert float(loss) == pytest.approx((l0 + l2) / 2, rel=1e-12)
    s = entity_contrastive_loss(image, ent, labels, 2.0, reduction="sum", backend=backend)
    assert float(s) == pytest.approx(l0 + l2, rel=1e-12)
    per = entity_contrastive_loss(image, ent, labels, 2.0, reduction="none", backend=backend)
    assert per.shape == (3,)
    assert per.tolist() == pytest.approx([l0, 0.0, l2], rel=1e-12)


def test_entity_loss_unmentioned_stays_in_denominator():
    image, ent, labels, l0, _ = _hand_case()
    # -1 and 0 are the same (both negatives): swapping them leaves the loss unchanged
    flipped = labels.clone()
    flipped[labels == -1] = 0
    flipped[0, 1] = -1
    a = entity_contrastive_loss(image, ent, labels, 2.0)
    b = entity_contrastive_loss(image, ent, flipped, 2.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # a not-mentioned entity is in the denominator: removing that key changes the loss of row 0
    only0 = entity_contrastive_loss(image[:1], ent[:2], labels[:1, :2], 2.0)
    with_unmentioned = entity_contrastive_loss(image[:1], ent, labels[:1], 2.0)
    assert float(with_unmentioned) == pytest.approx(l0, rel=1e-12)
    assert float(only0) == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-12)
    assert float(only0) < float(with_unmentioned)


def test_entity_loss_gradients_and_dropped_rows():
    g = torch.Generator().manual_seed(7)
    B, E, D = 9, 6, 5
    image = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    ent = torch.randn(E, D, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(-1, 2, (B, E), generator=g)
    labels[2] = torch.tensor([0, -1, 0, 0, -1, 0])  # no positive: dropped
    labels[5] = 0
    assert torch.autograd.gradcheck(lambda a, b, s: entity_contrastive_loss(a, b, labels, s, backend="reference"),
                                    (image, ent, scale))
    loss = entity_contrastive_loss(image, ent, labels, scale)
    loss.backward()
    assert torch.all(image.grad[2] == 0) and torch.all(image.grad[5] == 0)
    assert image.grad[labels.eq(1).any(1)].abs().sum() > 0 and ent.grad.abs().sum() > 0 and scale.grad != 0
    # the mean runs over the kept rows only: a plain-torch version of the same formula
    keep = labels.eq(1).any(1)
    logp = F.log_softmax(3.0 * image.detach() @ ent.detach().t(), 1)
    y = labels.eq(1).double()
    per = -(y * logp).sum(1) / y.sum(1).clamp(min=1)
    torch.testing.assert_close(loss.detach(), per[keep].mean(), rtol=1e-12, atol=0)


def test_entity_loss_no_positive_and_errors():
    image = torch.randn(3, 4, requires_grad=True)
    ent = torch.randn(5, 4, requires_grad=True)
    labels = torch.tensor([[0, -1, 0, 0, 0]] * 3)
    loss = entity_contrastive_loss(image, ent, labels, 10.0)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert image.grad is not None and torch.all(image.grad == 0) and torch.all(ent.grad == 0)
    with pytest.raises(ValueError, match="labels must hold only"):
        entity_contrastive_loss(image, ent, torch.full((3, 5), 2), 10.0)
    with pytest.raises(ValueError, match="labels must be a"):
        entity_contrastive_loss(image, ent, torch.zeros(3, 4), 10.0)
    with pytest.raises(ValueError, match="entity_emb has feature size"):
        entity_contrastive_loss(image, torch.randn(5, 3), labels, 10.0)
    with pytest.raises(ValueError, match="reduction"):
        entity_contrastive_loss(image, ent, labels, 10.0, reduction="max")


# -------------------------------------------------------- float32 parity (docs/numerics.md)
def _run_f(make_module, feats, dtype, backend):
    m = make_module(backend).to(dtype)
    xs = [f.detach().to(dtype).requires_grad_(f.requires_grad) for f in feats]
    loss = m(*xs)
    loss.backward()
    return [loss.detach()] + [x.grad for x in xs if x.requires_grad]


@pytest.mark.parametrize("which", ["itc", "clip", "entity"])
def test_float32_parity_auto_backend(which):
    """The automatic backend in float32 against the float64 reference: error at most 2x the float32
    reference's error plus a floor, for the loss and every feature gradient."""
    from gkcore.testing import assert_parity

    g = torch.Generator().manual_seed(17)
    B, D = 33, 40
    v, t, vm, tm = _feats(g, B, D)
    if which == "itc":
        def make(backend):
            torch.manual_seed(4)
            return _Wrap(lambda a, b, c, d, m: m(a, b, c, d, alpha=0.4), ITCLoss(D, 99, backend=backend))
        feats = [v, t, vm, tm]
    elif which == "clip":
        def make(backend):
            return _Wrap(lambda a, b, m: m(a, b, torch.tensor(1 / 0.07, dtype=a.dtype)), ClipLoss(backend=backend))
        feats = [v, t]
    else:
        labels = torch.randint(-1, 2, (B, 11), generator=g)
        ent = F.normalize(torch.randn(11, D, generator=g, dtype=torch.float64), dim=1).requires_grad_()

        def make(backend):
            return _Wrap(lambda a, b: entity_contrastive_loss(a, b, labels, 1 / 0.07, backend=backend))
        feats = [v, ent]
    truth = _run_f(make, feats, torch.float64, "reference")
    ref32 = _run_f(make, feats, torch.float32, "reference")
    got = _run_f(make, feats, torch.float32, None)
    assert len(got) == len(truth) >= 3
    for k, (a, r, tr) in enumerate(zip(got, ref32, truth)):
        assert_parity(a, r, tr, atol=1e-6, name=f"{which} output {k}")


class _Wrap(nn.Module):
    def __init__(self, fn, mod=None):
        super().__init__()
        self.fn, self.mod = fn, mod

    def forward(self, *xs):
        return self.fn(*xs, self.mod) if self.mod is not None else self.fn(*xs)
