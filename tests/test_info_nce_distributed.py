"""2-process (gloo, CPU) runs of gkcore.nn.ClipLoss and gkcore.nn.ITCLoss.

One ``torch.multiprocessing.spawn`` (world size 2) runs every scenario; each rank records, per scenario,
either "ok" or the failure text, and the tests below assert on those records:

* ClipLoss, for local_loss x gather_with_grad: loss and gradients equal open_clip's ClipLoss run in the
  same distributed setting; with gather_with_grad also equal to a single-process run on the
  concatenated batch (feature gradients are world_size x the single-process ones, which DDP's averaging
  turns into the single-process parameter gradient).
* ITCLoss with queues (alpha 0 and 0.4, 3 steps, the queue pointer wraps): loss (averaged over ranks),
  feature gradients (/ world_size), temperature gradient (averaged) and the queues after each step
  equal one process on the concatenated batch; the ALBEF-original ``gather_keys=False`` variant equals
  the plain-torch ALBEF ITC of test_info_nce_modules with gathered enqueues.
* The queue divisibility error uses the global batch size.
"""
import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from test_info_nce_modules import load_open_clip_loss

load_open_clip_loss()  # skips the module when open_clip is missing

WORLD = 2
B = 4  # local batch
D = 12
TOL = dict(rtol=1e-9, atol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_feats(seed, n, d, corr=0.5):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64) + corr * a, dim=1)
    return a, b


def _mean_over_ranks(x):
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def _clip_case(rank, local_loss, gather_with_grad):
    from gkcore.nn import ClipLoss

    OCClipLoss = load_open_clip_loss().ClipLoss

    img_all, txt_all = _global_feats(123, WORLD * B, D)
    rows = slice(rank * B, (rank + 1) * B)
    got = {}
    for name, mod in (("open_clip", OCClipLoss(local_loss, gather_with_grad, rank=rank, world_size=WORLD)),
                      ("gkcore", ClipLoss(local_loss, gather_with_grad, rank=rank, world_size=WORLD))):
        i = img_all[rows].clone().requires_grad_()
        t = txt_all[rows].clone().requires_grad_()
        p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
        loss = mod(i, t, p.exp())
        loss.backward()
        got[name] = (loss.detach(), i.grad, t.grad, p.grad)
    for a, b, what in zip(got["gkcore"], got["open_clip"], ("loss", "image grad", "text grad", "scale grad")):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"vs open_clip, {what}: {m}")
    if gather_with_grad:  # a single process on the concatenated batch
        i = img_all.clone().requires_grad_()
        t = txt_all.clone().requires_grad_()
        p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
        single = ClipLoss(backend="reference")(i, t, p.exp())
        single.backward()
        loss, gi, gt, gp = got["gkcore"]
        torch.testing.assert_close(_mean_over_ranks(loss), single.detach(), **TOL)
        torch.testing.assert_close(gi, WORLD * i.grad[rows], **TOL)
        torch.testing.assert_close(gt, WORLD * t.grad[rows], **TOL)
        torch.testing.assert_close(_mean_over_ranks(gp), p.grad, **TOL)
        assert float(gi.abs().sum()) > 0


def _itc_case(rank, alpha):
    from gkcore.nn import ITCLoss

    Q, steps = 24, 4  # global batch 8: the pointer wraps after 3 steps
    torch.manual_seed(7)  # same initial queues on every rank and in the single-process run
    dist_mod = ITCLoss(D, Q, backend=None).double()
    single = ITCLoss(D, Q, distributed=False, backend="reference").double()
    single.load_state_dict(dist_mod.state_dict())
    rows = slice(rank * B, (rank + 1) * B)
    for step in range(steps):
        v, t = _global_feats(1000 + step, WORLD * B, D)
        vm, tm = _global_feats(2000 + step, WORLD * B, D, corr=0.8)
        vm = F.normalize(vm + 0.3 * v, dim=1)
        tm = F.normalize(tm + 0.3 * t, dim=1)
        vl, tl = v[rows].clone().requires_grad_(), t[rows].clone().requires_grad_()
        vs, ts = v.clone().requires_grad_(), t.clone().requires_grad_()
        dist_mod.temp.grad = None
        single.temp.grad = None
        ld = dist_mod(vl, tl, vm[rows], tm[rows], alpha=alpha)
        ls = single(vs, ts, vm, tm, alpha=alpha)
        ld.backward()
        ls.backward()
        torch.testing.assert_close(_mean_over_ranks(ld), ls.detach(), **TOL)
        torch.testing.assert_close(vl.grad, WORLD * vs.grad[rows], **TOL)
        torch.testing.assert_close(tl.grad, WORLD * ts.grad[rows], **TOL)
        tg = _mean_over_ranks(dist_mod.temp.grad)
        torch.testing.assert_close(tg, single.temp.grad, **TOL)
        torch.testing.assert_close(dist_mod.image_queue, single.image_queue, rtol=0, atol=0)
        torch.testing.assert_close(dist_mod.text_queue, single.text_queue, rtol=0, atol=0)
        assert int(dist_mod.queue_ptr) == int(single.queue_ptr) == ((step + 1) * WORLD * B) % Q
        with torch.no_grad():
            dist_mod.temp -= 0.05 * tg
            single.temp -= 0.05 * single.temp.grad


def _itc_local_keys_case(rank):
    """gather_keys=False: in-batch keys are the local momentum features (ALBEF's code); the queue is
    filled with the gathered ones."""
    from gkcore.nn import ITCLoss
    from gkcore.collectives import all_gather_no_grad
    from test_info_nce_modules import AlbefITC, _copy_state

    torch.manual_seed(3)
    ref = AlbefITC(D, 16)
    ours = ITCLoss(D, 16, gather_keys=False).double()
    _copy_state(ours, ref)
    rows = slice(rank * B, (rank + 1) * B)
    for step in range(3):
        v, t = _global_feats(50 + step, WORLD * B, D)
        vm, tm = _global_feats(60 + step, WORLD * B, D)
        v1, t1 = v[rows].clone().requires_grad_(), t[rows].clone().requires_grad_()
        v2, t2 = v[rows].clone().requires_grad_(), t[rows].clone().requires_grad_()
        lr = ref(v1, t1, vm[rows], tm[rows], 0.4, gather=all_gather_no_grad)
        lo = ours(v2, t2, vm[rows], tm[rows], alpha=0.4)
        lr.backward()
        lo.backward()
        torch.testing.assert_close(lo.detach(), lr.detach(), **TOL)
        torch.testing.assert_close(v2.grad, v1.grad, **TOL)
        torch.testing.assert_close(t2.grad, t1.grad, **TOL)
        torch.testing.assert_close(ours.image_queue, ref.image_queue.t(), rtol=0, atol=0)
        assert int(ours.queue_ptr) == ref.ptr


def _divisibility_case(rank):
    """A queue size that is no multiple of the global batch (12 vs 2 x 4): the writes wrap around the end of
    the queue, identically on both ranks."""
    from gkcore.collectives import all_gather
    from gkcore.nn import ITCLoss

    m = ITCLoss(D, 12)
    for _ in range(2):  # 8 + 8 rows into 12 slots: the second write wraps
        x = F.normalize(torch.randn(B, D), dim=1)
        m(x, x, x, x)
    assert int(m.queue_ptr) == 16 % 12, int(m.queue_ptr)
    q = m.image_queue.contiguous()
    both = all_gather(q[None], grad=False)
    assert torch.equal(both[0], both[1]), "the ranks' queues differ"


def _all_gather_case(rank):
    from gkcore.collectives import all_gather, world_info

    assert world_info() == (rank, WORLD)
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    y = all_gather(x, grad=True)
    assert y.shape == (4, 3) and y[:2].eq(1).all() and y[2:].eq(2).all()
    w = torch.arange(4, dtype=torch.float64).view(4, 1) * (rank + 1)  # a different loss on each rank
    (y * w).sum().backward()
    # d/dx_r of sum_s loss_s = sum over ranks s of (s + 1) * rows of x_r in the gathered order
    expect = sum((s + 1) * torch.arange(4, dtype=torch.float64)[rank * 2:(rank + 1) * 2] for s in range(WORLD))
    torch.testing.assert_close(x.grad, expect.view(2, 1).expand(2, 3))
    z = torch.ones(2, 3, requires_grad=True)
    yz = all_gather(z)  # keep_local: only the local slot carries a gradient
    yz.sum().backward()
    assert torch.equal(z.grad, torch.ones(2, 3))
    assert not all_gather(z, keep_local=False).requires_grad


SCENARIOS = {
    "all_gather": _all_gather_case,
    **{f"clip_local{int(ll)}_grad{int(gw)}": (lambda r, ll=ll, gw=gw: _clip_case(r, ll, gw))
       for ll in (False, True) for gw in (False, True)},
    "itc_alpha0": lambda r: _itc_case(r, 0.0),
    "itc_alpha0.4": lambda r: _itc_case(r, 0.4),
    "itc_local_keys": _itc_local_keys_case,
    "itc_divisibility": _divisibility_case,
}


def _worker(rank, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    try:
        for name, fn in SCENARIOS.items():
            try:
                fn(rank)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(_free_port(), d), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_process_gloo(dist_results, scenario):
    for rank, res in enumerate(dist_results):
        assert scenario in res, f"rank {rank} did not run {scenario}"
        assert res[scenario] == "ok", f"rank {rank}, {scenario}:\n{res[scenario]}"
