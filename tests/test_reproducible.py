"""Two training runs of the demo model with the same seed end bit-identical; the ITM gather that made
them drift.

Each run is its own process, as two `gkcore demo` runs are. Tensors are full size here: gk_mvlp_tiny at
the demo's settings with the real MiniLM text tower. The shrunken model of test_engine_eval is too small
to catch this, because it never reaches PyTorch's parallel CPU paths. Those paths broke this once: the
ITM negatives were gathered with ``x[idx]``, and its CPU backward adds repeated rows with parallel atomic
adds, so two runs drifted apart at step 2 or 3."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("gkcore.data.synth")

from conftest import REPO  # noqa: E402

SCRIPT = textwrap.dedent("""
    import hashlib, sys, torch
    from gkcore import create_model
    from gkcore.data import SynthCXR
    from gkcore.engine import evaluate as EV
    from gkcore.engine.demo import DEMO_OVERRIDES
    from gkcore.engine.trainer import Trainer, TrainConfig, seed_everything
    torch.set_num_threads(2)
    root, out = sys.argv[1], sys.argv[2]
    seed_everything(0)
    m = create_model("gk_mvlp_tiny", **DEMO_OVERRIDES)
    loader = EV.make_loader(m, SynthCXR(root), batch_size=16, train=True, num_threads=0, seed=0)
    cfg = TrainConfig(steps=4, lr=5e-4, warmup_steps=2, log_every=1, progress=False, seed=0)
    Trainer(m, loader, cfg, out, device="cpu").fit()
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().contiguous().cpu().numpy().tobytes())
    print("STATE", h.hexdigest())
""")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from gkcore.data.synth import generate

    root = str(tmp_path_factory.mktemp("synth_repro"))
    generate(root, 32, 128, 0)
    return root


def _run(root, out):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", SCRIPT, root, out], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("STATE ")]
    assert lines, r.stdout[-2000:]
    return lines[-1].split()[1]


def test_two_training_runs_are_bit_identical(synth_root, tmp_path):
    a = _run(synth_root, str(tmp_path / "a"))
    b = _run(synth_root, str(tmp_path / "b"))
    assert a == b, "two runs with the same seed ended with different weights"



def test_take_rows_matches_indexing_with_repeats():
    """The ITM gather: same rows and the same gradient as x[idx] (repeats summed), float64."""
    import torch

    from gkcore.models.pretrain_losses import _take_rows

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.tensor([2, 0, 2, 5, 2, 1])
    w = torch.randn(6, 5, 3, dtype=torch.float64, generator=g)
    (_take_rows(x, idx) * w).sum().backward()
    ga = x.grad.clone()
    x.grad = None
    (x[idx] * w).sum().backward()
    assert torch.equal(_take_rows(x, idx), x[idx])
    torch.testing.assert_close(ga, x.grad, rtol=0, atol=1e-12)
    assert torch.equal(ga[3], torch.zeros(5, 3, dtype=torch.float64)) and ga[2].abs().sum() > 0
