"""End to end on a tiny SynthCXR set with a shrunken gk_mvlp_tiny: every ``gkcore eval`` task, the
``gkcore pretrain`` / ``gkcore eval`` commands, an exact resume of the real model, plots and the VQA
question set."""
import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("gkcore.data.synth")

from gkcore.engine import evaluate as EV  # noqa: E402
from gkcore.engine import trainer as T  # noqa: E402

N_IMAGES = 24
BATCH = 8
# small enough for 2 CPU cores: 64 px images (the preset's resnet10t layer3: a 4x4 grid), short reports
# and a small random text tower instead of MiniLM (the tokenizer stays MiniLM's)
OVERRIDES = {"image_size": 64, "max_length": 40, "loss.queue_size": 32,
             "text.pretrained": None, "text.hidden_size": 64, "text.num_layers": 2, "text.num_heads": 2,
             "text.intermediate_size": 128, "text.fusion_start": 1, "text.decoder_layers": 1}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from gkcore.data.synth import SynthCXR, generate

    root = str(tmp_path_factory.mktemp("synthcxr"))
    generate(root, N_IMAGES, 96, 0)
    return root, SynthCXR(root)


@pytest.fixture(scope="module")
def model():
    from gkcore import create_model

    torch.manual_seed(0)
    return create_model("gk_mvlp_tiny", **OVERRIDES).eval()


def _in01(x):
    return isinstance(x, float) and (math.isnan(x) or 0.0 <= x <= 1.0)


def test_zero_shot_and_localization(model, synth):
    _, ds = synth
    r = EV.run_task("zero-shot", model, ds, batch_size=BATCH)
    assert r["n_samples"] == N_IMAGES and r["n_classes"] >= 1 and 0.0 <= r["macro"] <= 1.0
    assert all(_in01(v) for v in r["per_class"].values())
    g = EV.grounding(model, EV.make_loader(model, ds, batch_size=BATCH), keep_examples=1)
    assert g["n_findings"] > 0 and 0.0 <= g["pointing_game"] <= 1.0 and 0.0 < g["pointing_chance"] < 1.0
    for k in ("saliency", "region", "region_text"):
        assert 0.0 <= g[f"pointing_game_{k}"] <= 1.0, k
    assert g["examples"][0]["saliency"].shape == model.visual.grid_size
    assert _in01(g["mAP"])
    ex = g["examples"][0]
    assert ex["heatmap"].ndim == 2 and ex["image"].shape[-2:] == (64, 64)


def test_generation_retrieval_vqa(model, synth):
    _, ds = synth
    r = EV.run_task("report-generation", model, ds, batch_size=BATCH, max_batches=1)
    assert r["n_samples"] == BATCH
    assert all(_in01(r[k]) for k in ("BLEU-1", "BLEU-4", "ROUGE-L")) and r["CIDEr-D"] >= 0.0
    r = EV.run_task("retrieval", model, ds, batch_size=BATCH)
    assert r["n_samples"] == N_IMAGES
    assert r["i2t_R@1"] <= r["i2t_R@5"] <= r["i2t_R@10"] <= 1.0 and r["t2i_R@10"] >= r["t2i_R@1"]
    r = EV.run_task("vqa", model, ds, batch_size=BATCH)
    assert r["n_closed"] > 0 and r["n_open"] > 0 and 0.0 <= r["overall"] <= 1.0


def test_linear_probe_and_fine_tune(model, synth):
    _, ds = synth
    r = EV.run_task("linear-probe", model, ds, batch_size=BATCH, fractions=(0.1, 1.0))
    assert set(r) == {"0.1", "1"} and r["1"]["n_train"] > r["0.1"]["n_train"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = EV.run_task("fine-tune", model, ds, batch_size=BATCH, fractions=(1.0,), epochs=1)
    assert _in01(r["1"]["macro"])
    for k, v in model.state_dict().items():  # fine-tuning works on a copy
        assert torch.equal(v, before[k]), k


def test_vqa_questions_follow_ground_truth(synth):
    from gkcore.data import knowledge as K
    from gkcore.engine.vqa import build_questions

    _, ds = synth
    qs = build_questions(ds, K.ENTITY_NAMES, K.REGIONS, seed=0)
    assert qs == build_questions(ds, K.ENTITY_NAMES, K.REGIONS, seed=0)  # deterministic
    for q in qs:
        s = ds[q.index]
        if q.kind == "presence":
            name = q.question[len("Is there "):-1]
            assert s.entity_labels[K.ENTITY_NAMES.index(name)] == (1 if q.answer == "yes" else 0)
        elif q.kind == "where":
            assert q.answer in K.REGIONS and not q.closed
        else:
            assert q.answer in K.ENTITY_NAMES
    assert {q.kind for q in qs} >= {"presence", "where"}


def test_real_model_resume_is_exact(model, synth, tmp_path):
    """gk_mvlp_tiny (queues, momentum encoders, alpha ramp, dropout, ITM sampler generator) on the real
    loader: 1 step + resume + 2 steps == 3 steps, bit for bit (the stop falls inside an epoch)."""
    import copy

    _, ds = synth
    cfg = dict(steps=3, lr=1e-4, warmup_steps=1, log_every=1, progress=False, grad_accum=1)
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def run(out, steps_first=None, resume=False):
        torch.manual_seed(123 if resume else 0)
        m = copy.deepcopy(model)
        m.itm_generator = None
        if resume:  # everything must come from the checkpoint, not from this model's state
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.01)
        else:
            m.load_state_dict(init)
        loader = EV.make_loader(m, ds, batch_size=BATCH, train=True, num_threads=0, seed=0)
        cb = []
        if steps_first:
            cb = [lambda tr, rec: tr.request_stop() if rec["step"] == steps_first else None]
        tr = T.Trainer(m, loader, T.TrainConfig(**cfg), out, device="cpu", callbacks=cb)
        res = tr.fit(resume=os.path.join(out, T.CHECKPOINT_NAME) if resume else None)
        return res, m

    full, m_full = run(str(tmp_path / "full"))
    part, _ = run(str(tmp_path / "part"), steps_first=1)
    assert part.status == "interrupted" and part.step == 1
    rest, m_rest = run(str(tmp_path / "part"), resume=True)
    assert rest.step == 3
    got = [r["loss"] for r in part.history + rest.history]
    assert got == [r["loss"] for r in full.history]
    sd = m_full.state_dict()
    for k, v in m_rest.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_pretrain_and_eval_commands(synth, tmp_path, capsys):
    from gkcore.cli import main

    root, _ = synth
    out = str(tmp_path / "run")
    sets = [f"--set={k}={json.dumps(v)}" for k, v in OVERRIDES.items()]
    argv = ["pretrain", "--preset", "gk_mvlp_tiny", "--data", f"synth:{root}", "--out", out, "--steps", "2",
            "--batch-size", str(BATCH), "--warmup", "1", "--log-every", "1", "--num-threads", "0",
            "--no-progress", "--device", "cpu"] + sets
    assert main(argv) == 0
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert main(argv[:-len(sets)] + ["--steps", "3", "--resume"] + sets) == 0
    log = [json.loads(x) for x in open(os.path.join(out, T.LOG_NAME))]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"loss", "loss_itc", "loss_itm", "loss_lm", "loss_ecls", "images_per_s", "memory_mb"} <= set(log[0])
    capsys.readouterr()
    js = str(tmp_path / "m.json")
    for ck in ("model.safetensors", T.CHECKPOINT_NAME):
        assert main(["eval", "--task", "zero-shot", "--checkpoint", os.path.join(out, ck), "--data",
                     f"synth:{root}", "--batch-size", str(BATCH), "--device", "cpu", "--json", js]) == 0
        text = capsys.readouterr().out
        assert "macro" in text
        assert 0.0 <= json.load(open(js))["macro"] <= 1.0


def test_pretrain_calibrates_the_decoders_states_on_the_training_images(synth, tmp_path):
    """``gkcore pretrain`` with the decoder's entity decisions (``gk.decoder_label_forcing`` > 0) saves a
    model whose window holds the eval-mode GK margins of the training images, not the training steps'."""
    from gkcore.cli import main
    from gkcore.models import GKMVLP

    root, ds = synth
    out = str(tmp_path / "run")
    over = {**OVERRIDES, "gk.decoder_entity_states": True, "gk.decoder_label_forcing": 1.0,
            "gk.decoder_state_rule": "accuracy"}
    sets = [f"--set={k}={json.dumps(v)}" for k, v in over.items()]
    assert main(["pretrain", "--preset", "gk_mvlp_tiny", "--data", f"synth:{root}", "--out", out, "--steps", "1",
                 "--batch-size", str(BATCH), "--warmup", "1", "--num-threads", "0", "--no-progress",
                 "--device", "cpu"] + sets) == 0
    model = GKMVLP.load(os.path.join(out, "model.safetensors")).eval()
    assert int(model.state_seen) == len(ds)  # every training image, where a step saw only BATCH
    assert torch.equal(model.state_present[:len(ds)], torch.tensor(np.stack([ds[i].entity_labels for i in
                                                                              range(len(ds))]) == 1))
    loader = EV.make_loader(model, ds, batch_size=BATCH, num_threads=0)
    with torch.no_grad():
        lg = torch.cat([model._gk_infer(b["image"], None, b["region_boxes"], b["region_mask"])[3]["logits"]
                        for b in loader])
    torch.testing.assert_close(model.state_margins[:len(ds)], lg[..., 1] - lg[..., 0], atol=1e-4, rtol=1e-4)


def test_paint_regions_spreads_each_score_over_its_box():
    h = EV._paint_regions(np.array([0.6, 0.4]), np.array([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]]), size=4)
    want = np.zeros((4, 4))
    want[:2, :2] += 0.6 / 4
    want[1:, 1:] += 0.4 / 9
    np.testing.assert_allclose(h, want)
    assert np.unravel_index(h.argmax(), h.shape) == (1, 1)  # the overlap cell


def test_demo_end_to_end_small(tmp_path, capsys):
    """``gkcore demo --ablation`` on a few images with the shrunken model: the table with every downstream
    task, the before/after/no-GK metrics, the baselines, the figures, the checkpoint and a valid results.json
    (the full-size run is in the README)."""
    from gkcore.cli import main
    from gkcore.engine.demo import DEMO_OVERRIDES

    out = str(tmp_path / "demo")
    sets = [f"{k}={json.dumps(v)}" for k, v in {**OVERRIDES, **DEMO_OVERRIDES, "loss.queue_size": 16}.items()]
    argv = ["demo", "--out", out, "--n", "24", "--size", "96", "--steps", "3", "--batch-size", "8", "--no-progress",
            "--gen-images", "4"]
    for x in sets:
        argv += ["--set", x]
    assert main(argv + ["--ablation"]) == 0
    text = capsys.readouterr().out
    for row in ("zero-shot AUROC (macro)", "pointing game (GK saliency)", "pointing game (GK attention)",
                "image->report R@1", "report BLEU-4 (greedy)", "report CIDEr-D (greedy)",
                "linear probe AUROC, 5% labels", "linear probe AUROC, 100% labels", "image embedding cosine",
                "over 3 steps", "no-GK", "its true report:"):
        assert row in text, row
    raw = open(os.path.join(out, "results.json")).read()
    assert "NaN" not in raw and "Infinity" not in raw
    r = json.loads(raw)
    assert r["train"]["steps"] == 3 and r["train"]["status"] == "completed"
    # the LM head scores only the training reports' tokens (text.lm_vocab, added unless --set names it)
    from gkcore.data import SynthCXR, report_token_ids
    from gkcore.engine.evaluate import split_indices, study_ids

    ds = SynthCXR(os.path.join(out, "synthcxr"))
    train_idx, _ = split_indices(len(ds), 0.25, 0, groups=study_ids(ds))
    vocab = report_token_ids([ds.records[i]["report"] for i in train_idx])
    assert r["settings"]["overrides"]["text.lm_vocab"] == vocab
    assert f"'text.lm_vocab': '<{len(vocab)} values>'" in text  # the log shows the list's length
    from gkcore.engine.host_memory import keep_freed_memory

    assert r["settings"]["host_allocator"] == keep_freed_memory()  # what the CPU demo set (the call repeats it)
    for part in ("before", "after", "ablation"):
        assert 0.0 <= r[part]["zero_shot_auroc"] <= 1.0, part
        assert 0.0 <= r[part]["bleu4"] <= 1.0 and r[part]["cider"] >= 0.0, part
        assert -1.0 <= r[part]["embedding_cosine"] <= 1.0, part
    for part in ("before", "after"):
        assert 0.0 <= r[part]["pointing_game_saliency"] <= 1.0
    assert r["ablation"]["pointing_game"] is None  # no GK attention map without the GK module
    assert set(r["probe"]) == {"0.05", "0.2", "1"} and all("after" in v and "no_gk" in v for v in r["probe"].values())
    assert r["baseline"]["zero_shot_auroc"] == 0.5 and 0.0 <= r["baseline"]["bleu4"] <= 1.0
    assert isinstance(r["baseline"]["report"], str) and r["baseline"]["report"]
    assert isinstance(r["train"]["loss_trend"], dict)  # empty under 4 steps; test_demo_loss_trend_and_json_safe
    assert r["above_chance_after_pretraining"] == bool(
        r["after"]["zero_shot_auroc"] > 0.5 and r["after"]["pointing_game_saliency"] > r["after"]["pointing_chance"])
    for f in ("loss_curves.png", "loss_curves_no_gk.png", "grounding_before.png", "grounding_after.png"):
        assert open(os.path.join(out, f), "rb").read(8) == b"\x89PNG\r\n\x1a\n", f
    from gkcore.models import GKMVLP

    m = GKMVLP.load(os.path.join(out, "model.safetensors"))
    assert m.config.image_size == 64 and m.config.dropout == 0.0
    tok = m.tokenizer
    assert m.config.text.lm_vocab == vocab
    assert m.lm_rows.tolist() == sorted(set(vocab) | {tok.sep_token_id, tok.unk_token_id})
    # a second run reuses the generated images
    assert main(argv + ["--steps", "1"]) == 0
    assert "reusing the synthetic set" in capsys.readouterr().out


def test_split_keeps_the_views_of_a_study_on_one_side(synth):
    from gkcore.engine.evaluate import split_indices, study_ids

    groups = [i // 3 for i in range(30)]  # studies of three views
    tr, te = split_indices(30, 0.3, 0, groups=groups)
    assert sorted(tr + te) == list(range(30)) and len(te) == 9
    assert not {groups[i] for i in tr} & {groups[i] for i in te}
    assert split_indices(30, 0.3, 0, groups=groups) == (tr, te)  # deterministic
    assert split_indices(30, 0.3, 1, groups=groups) != (tr, te)
    with pytest.raises(ValueError, match="groups"):
        split_indices(30, 0.3, 0, groups=groups[:-1])
    # SynthCXR keeps its study ids: a second view shares its study (and report) with the image before it
    _, ds = synth
    ids = study_ids(ds)
    assert ids == [int(ds[i].study_id) for i in range(len(ds))] and len(set(ids)) < len(ids)
    tr, te = split_indices(len(ds), 0.25, 0, groups=ids)
    assert not {ids[i] for i in tr} & {ids[i] for i in te}
    assert study_ids(list(range(4))) is None  # a dataset that keeps no ids: each sample is its own group


def test_demo_loss_trend_and_json_safe():
    """The second-half check flags a component that rises and not one that falls or stays flat; NaN becomes
    null so results.json is valid JSON."""
    from gkcore.engine.demo import json_safe, loss_trend

    hist = [{"loss": 10.0 - 0.01 * s, "loss_itc": 2.0 + (0.01 * s if s > 50 else 0.0), "loss_lm": 1.0, "step": s}
            for s in range(100)]
    t = loss_trend(hist)
    assert not t["loss"]["rising"] and t["loss_itc"]["rising"] and not t["loss_lm"]["rising"]
    assert "step" not in t
    assert loss_trend(hist[:3]) == {}
    doc = json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(0.5), "d": {"e": 2}})
    assert doc == {"a": None, "b": [1.0, None], "c": 0.5, "d": {"e": 2}}
    json.dumps(doc, allow_nan=False)


def test_mean_pairwise_cosine():
    from gkcore.engine.metrics import mean_pairwise_cosine

    assert mean_pairwise_cosine(np.ones((5, 3))) == pytest.approx(1.0)  # collapsed: one direction
    assert mean_pairwise_cosine(np.eye(4)) == pytest.approx(0.0)
    assert mean_pairwise_cosine(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    assert math.isnan(mean_pairwise_cosine(np.ones((1, 3))))
    with pytest.raises(ValueError, match="2-D"):
        mean_pairwise_cosine(np.ones(3))


def test_plots(tmp_path):
    from gkcore.engine.plots import plot_grounding, plot_loss_curves

    hist = [{"step": i, "loss": 3.0 / i, "loss_itc": 1.0 / i} for i in range(1, 6)]
    p = plot_loss_curves(hist, str(tmp_path / "loss.png"))
    img = np.random.default_rng(0).random((64, 64))
    q = plot_grounding(img, np.eye(4), str(tmp_path / "g.png"), true_boxes=[(0.1, 0.1, 0.4, 0.5)])
    for f in (p, q):
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="heatmap"):
        plot_grounding(img, np.zeros(3), str(tmp_path / "x.png"))


def test_pretrain_under_torchrun_two_cpu_processes(synth, tmp_path):
    """The real model through ``torchrun --nproc_per_node 2 -m gkcore pretrain`` (gloo): one step runs, only
    rank 0 writes. (Loss equivalence with one process is tested on a toy model in test_engine_trainer.py;
    GK-MVLP's contrastive losses gather features only where gkcore.nn.ITCLoss does.)"""
    import subprocess
    import sys

    root, _ = synth
    out = str(tmp_path / "ddp")
    sets = [f"--set={k}={json.dumps(v)}" for k, v in OVERRIDES.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "gkcore",
           "pretrain", "--preset", "gk_mvlp_tiny", "--data", f"synth:{root}", "--out", out, "--steps", "1",
           "--batch-size", "4", "--warmup", "1", "--num-threads", "0", "--no-progress", "--device", "cpu"] + sets
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr
    assert sorted(os.listdir(out)) == sorted([T.CHECKPOINT_NAME, T.LOG_NAME, "model.safetensors"])
    ck = T.load_checkpoint(os.path.join(out, T.CHECKPOINT_NAME))
    assert ck["step"] == 1 and ck["world_size"] == 2 and len(ck["rng"]) == 2
