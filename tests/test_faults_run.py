"""Fault injection, training runs (issue #14): corrupted, truncated and foreign checkpoints are refused
naming the file, a damaged checkpoint falls back to the previous one, a run killed with SIGKILL keeps its
last checkpoint and the next run removes the temporaries it left, a second run on the same folder is
refused. The toy model and loader are those of tests/test_engine_trainer.py."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gkcore.engine import outdir
from gkcore.engine import trainer as T
from gkcore.engine.trainer import CheckpointError, Trainer
from test_engine_trainer import ToyLoader, ToyModel, _cfg

HERE = os.path.dirname(os.path.abspath(__file__))


def _train(out, steps, resume=None, meta=None, **kw):
    torch.manual_seed(0)
    tr = Trainer(ToyModel(), ToyLoader(), _cfg(steps=steps, **kw), str(out), device="cpu", model_meta=meta)
    res = tr.fit(resume=resume)
    return tr, res


@pytest.fixture
def run4(tmp_path):
    """A finished 4-step run with checkpoints at steps 2 (kept as the previous one) and 4."""
    out = tmp_path / "run"
    _train(out, 4, ckpt_every=2)
    ck, prev = out / T.CHECKPOINT_NAME, out / "checkpoint.prev.pt"
    assert T.load_checkpoint(str(ck))["step"] == 4 and T.load_checkpoint(str(prev))["step"] == 2
    return out


def _flip_middle(path, n=4096):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_refused_naming_the_file(run4):
    ck = run4 / T.CHECKPOINT_NAME
    _flip_middle(ck)
    with pytest.raises(CheckpointError, match=rf"{ck}.*SHA-256 digest differs"):
        T.load_checkpoint(str(ck))


@pytest.mark.parametrize("keep", [0, 100, 0.5, -1])
def test_truncated_checkpoint_is_refused(run4, keep):
    ck = run4 / T.CHECKPOINT_NAME
    data = ck.read_bytes()
    n = {0: 0, 100: 100, 0.5: len(data) // 2, -1: len(data) - 1}[keep]
    ck.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=str(ck)):
        T.load_checkpoint(str(ck))


def test_checkpoint_without_its_digest_is_refused(run4):
    ck = run4 / T.CHECKPOINT_NAME
    ck.write_bytes(ck.read_bytes()[:-T._TRAILER_LEN])  # torch.load alone would still read it
    with pytest.raises(CheckpointError, match="digest trailer is missing"):
        T.load_checkpoint(str(ck))


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"x": 1}, str(other))
    with pytest.raises(CheckpointError, match=f"{other} is not a gkcore training checkpoint"):
        T.load_checkpoint(str(other))
    st = tmp_path / "model.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(st))
    with pytest.raises(CheckpointError, match="safetensors weights file"):
        T.load_checkpoint(str(st))
    with pytest.raises(CheckpointError, match="not found"):
        T.load_checkpoint(str(tmp_path / "nope.pt"))


def test_damaged_checkpoint_falls_back_to_the_previous_one(run4):
    ck = run4 / T.CHECKPOINT_NAME
    _flip_middle(ck)
    tr, res = _train(run4, 3, resume=str(ck))
    assert res.status == "completed" and res.step == 3
    assert any("previous checkpoint" in n and "step 2" in n for n in tr.notes), tr.notes
    assert len(res.history) == 1  # step 3 only: resumed from step 2
    assert T.load_checkpoint(str(ck))["step"] == 3  # the damaged file was replaced by a good one
    # the damaged file did not become the previous checkpoint: the good one at step 2 is still there
    assert T.load_checkpoint(str(run4 / "checkpoint.prev.pt"))["step"] == 2


def test_both_checkpoints_damaged_is_an_error_naming_both(run4):
    ck, prev = run4 / T.CHECKPOINT_NAME, run4 / "checkpoint.prev.pt"
    _flip_middle(ck)
    prev.write_bytes(prev.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{ck}.*previous checkpoint cannot be used either.*{prev}"):
        _train(run4, 6, resume=str(ck))


def test_checkpoint_of_another_config_names_the_field(tmp_path):
    out = tmp_path / "run"
    _train(out, 2, meta={"config": {"embed_dim": 256, "vision": {"depth": 12}}})
    with pytest.raises(CheckpointError, match=r"another model config: embed_dim is 256 there, 128 here"):
        _train(out, 4, resume=str(out / T.CHECKPOINT_NAME), meta={"config": {"embed_dim": 128, "vision": {"depth": 12}}})


def test_resume_past_or_at_the_asked_steps_says_so(run4):
    ck = str(run4 / T.CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"at step 4, past the 3 steps asked for"):
        _train(run4, 3, resume=ck)
    tr, res = _train(run4, 4, resume=ck)
    assert res.status == "completed" and res.step == 4 and res.history == []
    assert any("nothing to do" in n for n in tr.notes)


# ------------------------------------------------------------------------------------- other processes
def _env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))


def _wait_line(p, want, timeout=120):
    deadline = time.time() + timeout
    for line in p.stdout:
        if line.strip() == want:
            return
        if time.time() > deadline:
            break
    raise AssertionError(f"child never printed {want!r}")


def test_second_run_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = ("import sys, time\nfrom gkcore.engine import outdir\n"
              "with outdir.lock_output(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_line(p, "locked")
        with pytest.raises(outdir.OutputLockedError, match=rf"{out} is in use by process {p.pid}"):
            _train(out, 2)
        assert not (out / T.LOG_NAME).exists()  # the refused run wrote nothing
    finally:
        p.kill()
        p.wait()
    _, res = _train(out, 2)  # the lock ends with its process, however it ends
    assert res.status == "completed"


_LONG = """
import sys, time
import torch
from gkcore.engine.trainer import Trainer
from test_engine_trainer import ToyLoader, ToyModel, _cfg

def slow(trainer, rec):
    print(f"step {rec['step']}", flush=True)
    time.sleep(0.2)

torch.manual_seed(0)
Trainer(ToyModel(), ToyLoader(), _cfg(steps=1000, ckpt_every=2), sys.argv[1], device="cpu", callbacks=[slow]).fit()
"""


def test_sigkill_keeps_the_last_checkpoint_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", _LONG, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_line(p, "step 5")
        # a write cut short by the kill leaves a temporary named after the dead process
        (out / f"{T.CHECKPOINT_NAME}.tmp-{p.pid}").write_bytes(b"\0" * 1000)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    ck = T.load_checkpoint(str(out / T.CHECKPOINT_NAME))  # intact, verified
    assert ck["step"] in (4, 6)  # the last one written before the kill
    tr, res = _train(out, ck["step"] + 2, resume=str(out / T.CHECKPOINT_NAME))
    assert res.status == "completed" and res.step == ck["step"] + 2 and len(res.history) == 2
    assert not list(out.glob("*.tmp-*"))
    assert any(f"left by process {p.pid}" in n for n in tr.notes), tr.notes
