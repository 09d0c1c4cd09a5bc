"""The training loop on a small toy model that follows the trainer's contract (``model(batch) -> dict``
with ``loss``, a queue buffer, dropout, a private ``torch.Generator``), so that the loop's guarantees are
tested in isolation: exact resume after a SIGINT, 2-process gloo DDP against one process on the same
global batch, gradient accumulation, NaN stop and atomic checkpoints."""
import glob
import json
import os
import signal

import pytest
import torch

from gkcore.engine import trainer as T
from gkcore.engine.trainer import NonFiniteLossError, TrainConfig, Trainer, cosine_with_warmup


class ToyModel(torch.nn.Module):
    """Regression with dropout, a feature queue (buffer) and random noise from its own generator."""

    def __init__(self, dropout=0.3, queue=True, noise=True):
        super().__init__()
        self.lin = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 1)
        self.drop = torch.nn.Dropout(dropout)
        self.use_queue, self.use_noise = queue, noise
        self.register_buffer("queue", torch.zeros(6, 8))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.gen = torch.Generator().manual_seed(7)

    def forward(self, batch, alpha=None):
        h = self.drop(torch.relu(self.lin(batch["image"])))
        pred = self.head(h).squeeze(-1)
        loss_mse = ((pred - batch["target"]) ** 2).mean()
        loss = loss_mse
        out = {"loss_mse": loss_mse}
        if self.use_queue:
            loss_q = 0.1 * (h.mean(0) - self.queue.mean(0)).pow(2).mean()
            with torch.no_grad():
                self.queue[int(self.ptr)] = h.detach().mean(0)
                self.ptr.fill_((int(self.ptr) + 1) % self.queue.shape[0])
            loss = loss + loss_q
            out["loss_queue"] = loss_q
        if self.use_noise:
            loss = loss + 1e-3 * torch.rand((), generator=self.gen)
        out["loss"] = loss * (1.0 if alpha is None else 1.0 + 0.0 * alpha)
        return out


class ToyLoader:
    """Shuffled per epoch from (seed, epoch) only; global batch = batch_size * world_size, rank-sharded."""

    def __init__(self, n=24, batch_size=4, rank=0, world_size=1, seed=0, bad_at=None):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 0.3]) + 0.1 * torch.randn(n, generator=g)
        self.b, self.rank, self.world, self.seed, self.epoch = batch_size, rank, world_size, seed, 0
        self.bad_at = bad_at  # (epoch, batch) whose targets are NaN

    def __len__(self):
        return len(self.x) // (self.b * self.world)

    def set_epoch(self, e):
        self.epoch = e

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed + 1000 * self.epoch))
        gb = self.b * self.world
        for i in range(len(self)):
            idx = perm[i * gb:(i + 1) * gb][self.rank * self.b:(self.rank + 1) * self.b]
            y = self.y[idx].clone()
            if self.bad_at == (self.epoch, i):
                y[:] = float("nan")
            yield {"image": self.x[idx], "target": y, "report": ["r"] * len(idx)}


def _cfg(**kw):
    base = dict(steps=10, lr=0.05, warmup_steps=2, log_every=1, progress=False, clip_grad=1.0)
    base.update(kw)
    return TrainConfig(**base)


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_cosine_with_warmup_values():
    f = cosine_with_warmup(2, 10, 0.0)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.5)  # halfway through the cosine part
    assert f(10) == pytest.approx(0.0)
    assert cosine_with_warmup(0, 4, 0.1)(4) == pytest.approx(0.1)


def test_config_validation():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0).validate()
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8").validate()


def test_loss_goes_down_and_log_written(tmp_path):
    torch.manual_seed(0)
    tr = Trainer(ToyModel(dropout=0.0), ToyLoader(), _cfg(steps=30), str(tmp_path), device="cpu")
    res = tr.fit()
    assert res.status == "completed" and res.step == 30
    assert res.history[-1]["loss_mse"] < 0.5 * res.history[0]["loss_mse"]
    lines = [json.loads(x) for x in open(tmp_path / T.LOG_NAME)]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert {"loss", "loss_mse", "loss_queue", "lr", "images_per_s", "memory_mb"} <= set(lines[0])
    assert T.load_checkpoint(str(tmp_path / T.CHECKPOINT_NAME))["step"] == 30


def test_resume_after_sigint_matches_uninterrupted_run(tmp_path):
    cfg = _cfg(steps=10, grad_accum=2)  # 6 batches/epoch, 20 micro-batches: the stop falls mid-epoch

    torch.manual_seed(0)
    ref = Trainer(ToyModel(), ToyLoader(), cfg, str(tmp_path / "a"), device="cpu")
    ref_res = ref.fit()
    ref_params = _params(ref.module)

    def interrupt(trainer, rec):
        if rec["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler turns it into a clean stop

    torch.manual_seed(0)
    b = Trainer(ToyModel(), ToyLoader(), cfg, str(tmp_path / "b"), device="cpu", callbacks=[interrupt])
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    part = b.fit()
    assert part.status == "interrupted" and part.step == 4
    assert signal.getsignal(signal.SIGINT) is before  # the handler that was there before the run is restored

    # a different initialisation and a scrambled global RNG: everything must come from the checkpoint
    torch.manual_seed(999)
    c = Trainer(ToyModel(), ToyLoader(), cfg, str(tmp_path / "b"), device="cpu")
    rest = c.fit(resume=str(tmp_path / "b" / T.CHECKPOINT_NAME))
    assert rest.status == "completed" and rest.step == 10
    got = [r["loss"] for r in part.history + rest.history]
    want = [r["loss"] for r in ref_res.history]
    assert got == want  # bit-identical
    for k, v in _params(c.module).items():
        assert torch.equal(v, ref_params[k]), k
    steps = [json.loads(x)["step"] for x in open(tmp_path / "b" / T.LOG_NAME)]
    assert steps == list(range(1, 11))


def test_grad_accumulation_equals_large_batch(tmp_path):
    torch.manual_seed(0)
    a = Trainer(ToyModel(0.0, queue=False, noise=False), ToyLoader(batch_size=8), _cfg(steps=5),
                str(tmp_path / "a"), device="cpu")
    ra = a.fit()
    torch.manual_seed(0)
    b = Trainer(ToyModel(0.0, queue=False, noise=False), ToyLoader(batch_size=4), _cfg(steps=5, grad_accum=2),
                str(tmp_path / "b"), device="cpu")
    rb = b.fit()
    for x, y in zip(ra.history, rb.history):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    pa, pb = _params(a.module), _params(b.module)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    tr = Trainer(ToyModel(), ToyLoader(bad_at=(0, 4)), _cfg(steps=10, ckpt_every=2), str(tmp_path), device="cpu")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5.*last good checkpoint"):
        tr.fit()
    ck = T.load_checkpoint(str(tmp_path / T.CHECKPOINT_NAME))
    assert ck["step"] == 4
    assert not glob.glob(str(tmp_path / "*.tmp-*"))


class _InfGrad(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return {"loss": torch.sqrt((self.w - 1.0).pow(2).sum())}  # finite loss (0), NaN gradient


def test_non_finite_gradient_stops_before_the_step(tmp_path):
    tr = Trainer(_InfGrad(), ToyLoader(), _cfg(steps=3), str(tmp_path), device="cpu")
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm at step 1"):
        tr.fit()
    assert torch.equal(tr.module.w.detach(), torch.ones(3))  # the optimiser did not step
    assert not os.path.exists(tmp_path / T.CHECKPOINT_NAME)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    T.save_checkpoint_atomic({"format": "gkcore-train-v1", "step": 1}, path)

    def torn_save(obj, f):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(T.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        T.save_checkpoint_atomic({"format": "gkcore-train-v1", "step": 2}, path)
    monkeypatch.undo()
    assert T.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]
    with pytest.raises(ValueError, match="not a gkcore training checkpoint"):
        torch.save({"x": 1}, str(tmp_path / "other.pt"))
        T.load_checkpoint(str(tmp_path / "other.pt"))


# ------------------------------------------------------------------------------ subprocesses
# This file is also a script (``python tests/test_engine_trainer.py MODE OUT``) run by the tests below in a
# fresh process: ``ddp`` under ``torchrun --nproc_per_node 2`` (gloo on CPU), ``long`` for the SIGTERM test.
HERE = os.path.dirname(os.path.abspath(__file__))


def _script_main(mode, out_dir):
    import time

    from gkcore.engine import launch as D

    torch.set_num_threads(1)
    if mode == "ddp":
        info = D.init_from_env(device="cpu", timeout_s=60)
        try:
            torch.manual_seed(0)
            model = ToyModel(0.0, queue=False, noise=False)
            loader = ToyLoader(batch_size=4, rank=info.rank, world_size=info.world_size)
            tr = Trainer(model, loader, _cfg(steps=4, grad_accum=2), out_dir, dist_info=info)
            res = tr.fit()
            torch.save({"losses": [r["loss"] for r in res.history], "params": _params(tr.module),
                        "world_size": info.world_size},
                       os.path.join(out_dir, f"ddp_result_rank{info.rank}.pt.out"))
        finally:
            D.cleanup()
        return 0
    if mode == "long":  # slow steps so that the parent can send SIGTERM in the middle
        def slow(trainer, rec):
            print(f"step {rec['step']}", flush=True)
            time.sleep(0.2)

        torch.manual_seed(0)
        tr = Trainer(ToyModel(), ToyLoader(), _cfg(steps=1000), out_dir, device="cpu", callbacks=[slow])
        res = tr.fit()
        print(f"status {res.status} step {res.step}", flush=True)
        return 0 if res.status == "completed" else 128 + (tr.stop_signal or 2)
    raise SystemExit(f"unknown mode {mode}")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    return env


def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path):
    import subprocess
    import sys
    import time

    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "test_engine_trainer.py"), "long", out],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 120
        for line in p.stdout:  # wait until 3 steps are done
            if line.strip() == "step 3" or time.time() > deadline:
                break
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, stderr[-2000:])
    assert "received SIGTERM" in stderr and "--resume" in stderr
    last = int(stdout.strip().splitlines()[-1].split()[-1])  # "status interrupted step N"
    assert "status interrupted" in stdout and 3 <= last < 1000
    ck = T.load_checkpoint(os.path.join(out, T.CHECKPOINT_NAME))
    assert ck["step"] == last
    assert not glob.glob(os.path.join(out, "*.tmp-*"))
    logged = [json.loads(x)["step"] for x in open(os.path.join(out, T.LOG_NAME))]
    assert logged == list(range(1, last + 1))


def test_torchrun_two_processes_gloo_match_single_process(tmp_path):
    """2 CPU processes under torchrun (gloo, local batch 4, accumulation 2) against one process with
    batch 8 (accumulation 2) on the same global batches: same losses and parameters; only rank 0 writes."""
    import subprocess
    import sys

    out = str(tmp_path / "ddp")
    os.makedirs(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(HERE, "test_engine_trainer.py"), "ddp", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    res = [torch.load(os.path.join(out, f"ddp_result_rank{k}.pt.out")) for k in range(2)]
    assert res[0]["world_size"] == 2
    # only rank 0 wrote the checkpoint and the log
    assert sorted(f for f in os.listdir(out) if not f.endswith(".out")) == sorted([T.CHECKPOINT_NAME, T.LOG_NAME])
    # both ranks hold the same parameters
    for k, v in res[0]["params"].items():
        assert torch.equal(v, res[1]["params"][k]), k

    torch.manual_seed(0)
    single = Trainer(ToyModel(0.0, queue=False, noise=False), ToyLoader(batch_size=8), _cfg(steps=4, grad_accum=2),
                     str(tmp_path / "single"), device="cpu")
    ref = single.fit()
    assert res[0]["losses"] == pytest.approx([r["loss"] for r in ref.history], rel=1e-5)
    for k, v in _params(single.module).items():
        torch.testing.assert_close(res[0]["params"][k], v, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    import sys

    sys.exit(_script_main(sys.argv[1], sys.argv[2]))
