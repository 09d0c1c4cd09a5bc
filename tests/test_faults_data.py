"""Fault injection, data (issue #14): a data set with unreadable images and bad records trains with full
batches; every left-out or repaired sample is warned about once, counted by reason, printed and written to
the training log; a swapped box is left out, never flipped; a set with nothing usable stops with a clear
error instead of training on nothing."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gkcore.data.knowledge import ENTITY_NAMES, REGIONS
from gkcore.data.loader import build_loader, dali_available
from gkcore.data.sample import Sample
from gkcore.engine import trainer as T
from gkcore.engine.trainer import DataError, TrainConfig, Trainer

E, R = len(ENTITY_NAMES), len(REGIONS)
BACKENDS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed"))]


def _good(path, i):
    boxes = np.tile(np.array([[0.1, 0.2, 0.6, 0.7]], np.float32), (R, 1))
    return Sample(path=str(path), report=f"FINDINGS: case {i}.", entity_labels=np.zeros(E, np.int64),
                  region_boxes=boxes, study_id=i)


@pytest.fixture
def bad_ds(tmp_path):
    """14 records: 8 good, 4 left out (unreadable image, label 7, empty report, 28 boxes), 2 kept with one
    region box left out (swapped, NaN)."""
    ds = []
    for i in range(14):
        p = tmp_path / f"im{i:02d}.png"
        Image.fromarray(np.full((20, 24), 10 * i, np.uint8)).save(p)
        ds.append(_good(p, i))
    (tmp_path / "im01.png").write_bytes(b"junk" * 40)
    ds[3].entity_labels[5] = 7
    ds[5].report = "   "
    ds[7].region_boxes = ds[7].region_boxes[:28]
    ds[9].region_boxes[4] = [0.9, 0.9, 0.1, 0.1]
    ds[11].region_boxes[2, 1] = float("nan")
    return ds


REJECTED = {"bad label value": 1, "empty or missing report": 1, "unreadable image": 1, "wrong number of boxes": 1}
REPAIRED = {"non-finite box": 1, "swapped box": 1}
LEFT_OUT = {"im01.png", "im03.png", "im05.png", "im07.png"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_batches_stay_full_and_bad_samples_are_counted(bad_ds, backend):
    L = build_loader(bad_ds, 4, 16, train=True, backend=backend, num_threads=0, seed=1, device="cpu")
    assert len(L) == 3
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        epochs = [list(L) for _ in range(2)]
    for batches in epochs:
        assert [len(b["path"]) for b in batches] == [4, 4, 4]  # refilled from the rest of the epoch
        paths = {p.rsplit("/", 1)[-1] for b in batches for p in b["path"]}
        assert not paths & LEFT_OUT
    s = L.summary()
    assert s["rejected"] == REJECTED and s["repaired"] == REPAIRED  # distinct samples, not occurrences
    msgs = [str(x.message) for x in w]
    for name in sorted(LEFT_OUT):
        assert sum(name in m for m in msgs) == 1, (name, msgs)  # warned once, not once per epoch
    # the swapped and the NaN box are left out (region unknown), not flipped into a valid box
    for b in (b for bs in epochs for b in bs):
        for k, p in enumerate(b["path"]):
            mask = b["region_mask"][k]
            if p.endswith("im09.png"):
                assert not bool(mask[4]) and bool(mask[:4].all()) and not b["region_boxes"][k, 4].any()
            if p.endswith("im11.png"):
                assert not bool(mask[2]) and bool(mask[3:].all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_sees_every_usable_sample_once(bad_ds, backend):
    L = build_loader(bad_ds, 4, 16, train=False, backend=backend, num_threads=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = [p.rsplit("/", 1)[-1] for b in L for p in b["path"]]
    assert sorted(got) == sorted(f"im{i:02d}.png" for i in range(14) if f"im{i:02d}.png" not in LEFT_OUT)
    assert L.summary()["rejected"] == REJECTED


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, batch):
        assert batch["image"].shape[0] == 4  # every batch is full
        return {"loss": (self.w * batch["image"].mean() - 1.0) ** 2}


def _cfg(steps):
    return TrainConfig(steps=steps, lr=0.01, warmup_steps=0, log_every=1, progress=False)


def test_a_run_survives_bad_samples_and_logs_the_counts(bad_ds, tmp_path, capsys):
    L = build_loader(bad_ds, 4, 16, train=True, backend="pil", num_threads=0, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = Trainer(_Tiny(), L, _cfg(7), str(tmp_path / "run"), device="cpu").fit()
    assert res.status == "completed" and res.step == 7
    err = capsys.readouterr().err
    assert "data: 4 samples left out (bad label value: 1" in err and "repaired: non-finite box in 1 sample" in err
    lines = [json.loads(x) for x in open(tmp_path / "run" / T.LOG_NAME)]
    data = [r["data"] for r in lines if "data" in r]
    assert data and data[-1] == {"rejected": REJECTED, "repaired": REPAIRED}
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 8))


def test_nothing_usable_is_an_error_not_an_empty_run(bad_ds, tmp_path):
    junk = [bad_ds[i] for i in (1, 3, 5, 7)] * 2
    L = build_loader(junk, 2, 16, train=True, backend="pil", num_threads=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(DataError, match=r"no batch in epoch 0: every sample was left out \(bad label value"):
            Trainer(_Tiny(), L, _cfg(3), str(tmp_path / "run"), device="cpu").fit()


def test_worker_processes_refill_the_same_way(bad_ds):
    runs = []
    for nt in (0, 2):
        L = build_loader(bad_ds, 4, 16, train=True, backend="pil", num_threads=nt, seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            runs.append(([b["path"] for b in L], L.summary()))
    assert runs[0][0] == runs[1][0] and all(len(p) == 4 for p in runs[1][0])
    # one epoch checks only the samples it reaches: the counts match the inline run's
    assert runs[1][1]["rejected"] == runs[0][1]["rejected"] and runs[1][1]["rejected"]
    assert runs[1][1]["repaired"] == runs[0][1]["repaired"]


def test_gk_mvlp_run_survives_an_unreadable_image_with_an_odd_batch_size(tmp_path, capsys):
    """The issue's case: one unreadable image and a batch size that does not divide the ITC queue
    (16 here, batch 3) used to end the run at the first step."""
    from gkcore import create_model
    from gkcore.data import SynthCXR
    from gkcore.data.synth import generate
    from gkcore.engine import evaluate as EV
    from test_model_gk_mvlp import MICRO

    root = tmp_path / "synth"
    generate(str(root), 10, 64, 0, progress=False)
    ds = SynthCXR(str(root))
    with open(ds[4].path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)  # a truncated PNG
    torch.manual_seed(0)
    model = create_model("gk_mvlp_tiny", **MICRO)
    assert model.config.loss.queue_size % 3
    loader = EV.make_loader(model, ds, batch_size=3, train=True, num_threads=0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = Trainer(model, loader, _cfg(4), str(tmp_path / "run"), device="cpu").fit()
    assert res.status == "completed" and res.step == 4
    assert all(np.isfinite(r["loss"]) for r in res.history)
    assert loader.summary()["rejected"] == {"unreadable image": 1}
    assert "data: 1 sample left out (unreadable image: 1)" in capsys.readouterr().err
