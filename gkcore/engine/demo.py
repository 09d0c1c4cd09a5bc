"""``gkcore demo``: the main job on a CPU-only machine in about ten minutes.

1. generate a small SynthCXR set (images + reports + entity labels + region and finding boxes);
2. build ``gk_mvlp_tiny`` and evaluate it on the held-out images: zero-shot AUROC through the entity
   queries and grounding (pointing game against the true finding boxes);
3. pre-train it on the training images (ITC + ITM + LM + LECLS) with :class:`~gkcore.engine.trainer.Trainer`;
4. evaluate again, print a before/after table next to chance, and save to the output folder
   ``results.json``, ``loss_curves.png``, ``grounding_before.png`` / ``grounding_after.png``, the training
   log and checkpoint, and ``model.safetensors``.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, Optional

import torch

from . import evaluate as EV
from .trainer import TrainConfig, Trainer, seed_everything

__all__ = ["run_demo", "DEFAULTS"]

#: defaults measured on the 2-core CPU box (see the README for the timing)
DEFAULTS = dict(n=1200, size=256, steps=200, batch_size=16, lr=5e-4, warmup=10, eval_fraction=0.25, seed=0)
#: gk_mvlp_tiny config overrides for the short CPU run (``--set`` replaces them):
#: - a lighter LM weight (the LM loss has by far the largest gradient early on);
#: - ``gk.knowledge_encoder="frozen"``: the entity queries come from a frozen copy of the pretrained
#:   MiniLM tower (mean-pooled), computed once. Measured on SynthCXR (25 steps, batch 16): with the online
#:   tower, ITC pulls every text feature together within a few steps (entity-prompt cosine 0.79 -> 0.99,
#:   loss_ecls stays ~log 56); with the frozen copy the prompts stay distinct (0.79) and loss_ecls falls
#:   4.08 -> 2.39. It also saves re-encoding the 56 prompts after every step;
#: - ``text.share_decoder_embeddings=False``: the LM loss does not move the report encoder's embeddings;
#: - ``dropout=0``: a few hundred steps on ~900 images do not overfit; dropout only slows learning here.
DEMO_OVERRIDES = {"loss.w_lm": 0.2, "gk.knowledge_encoder": "frozen", "text.share_decoder_embeddings": False,
                  "dropout": 0.0}


def _eval(model, loader, max_batches=None, keep_examples=0) -> Dict[str, Any]:
    zs = EV.zero_shot_classification(model, loader, max_batches=max_batches)
    gr = EV.grounding(model, loader, max_batches=max_batches, keep_examples=keep_examples)
    rt = EV.retrieval(model, loader, max_batches=max_batches, ks=(1, 5))
    return {"zero_shot_auroc": zs["macro"], "zero_shot_auroc_chexpert": zs["macro_chexpert"],
            "n_entities_scored": zs["n_classes"], "pointing_game": gr["pointing_game"],
            **{k: v for k, v in gr.items() if k.startswith("pointing_game_")},
            "pointing_chance": gr["pointing_chance"], "grounding_mAP": gr.get("mAP", float("nan")),
            "n_findings": gr["n_findings"], "i2t_R@1": rt["i2t_R@1"], "i2t_R@5": rt["i2t_R@5"],
            "t2i_R@5": rt["t2i_R@5"], "n_retrieval": rt["n_samples"],
            "_examples": gr["examples"], "_per_class": zs["per_class"]}


def _fmt(v) -> str:
    return "  n/a " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.3f}"


def _check_args(n, size, steps, batch_size, lr, warmup, eval_fraction, num_threads) -> None:
    """Raise ``ValueError`` naming the first bad argument, before any data is generated."""
    from .trainer import TrainConfig

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not integer(n) or n < 8:
        raise ValueError(f"n must be an int >= 8 (a train and a test split), got {n!r}")
    if not integer(size) or not 64 <= size <= 2048:
        raise ValueError(f"size must be an int in [64, 2048], got {size!r}")
    if not integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not integer(num_threads) or num_threads < 0:
        raise ValueError(f"num_threads must be an int >= 0, got {num_threads!r}")
    if not isinstance(eval_fraction, (int, float)) or not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    names = {"steps": "steps", "lr": "lr", "warmup_steps": "warmup"}
    bad = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup).problems()
    bad = [(names[k], why) for k, why in bad if k in names]
    if bad:
        raise ValueError(f"{bad[0][0]} {bad[0][1]}")


def run_demo(out: str = "gkcore-demo", *, n: int = DEFAULTS["n"], size: int = DEFAULTS["size"],
             steps: int = DEFAULTS["steps"], batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
             warmup: int = DEFAULTS["warmup"], eval_fraction: float = DEFAULTS["eval_fraction"],
             seed: int = DEFAULTS["seed"], device: str = "cpu", num_threads: int = 2, progress: bool = True,
             backend: Optional[str] = None, reuse_data: bool = True, overrides: Optional[Dict[str, Any]] = None,
             log=print) -> Dict[str, Any]:
    """Run the demo; returns the results dict also written to ``out/results.json``."""
    from gkcore import create_model
    from gkcore.data import SynthCXR
    from gkcore.data.synth import generate

    from .plots import plot_grounding, plot_loss_curves

    _check_args(n, size, steps, batch_size, lr, warmup, eval_fraction, num_threads)
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, "synthcxr")
    stamp = os.path.join(data_dir, ".gkcore-demo.json")
    want = {"n": n, "size": size, "seed": seed}
    if not (reuse_data and os.path.isfile(stamp) and json.load(open(stamp)) == want):
        log(f"[1/4] generating {n} synthetic chest X-rays ({size} px) in {data_dir}")
        generate(data_dir, n, size, seed, progress=progress, workers=max(1, min(num_threads, os.cpu_count() or 1)))
        with open(stamp, "w") as f:
            json.dump(want, f)
    else:
        log(f"[1/4] reusing the synthetic set in {data_dir}")
    ds = SynthCXR(data_dir)
    train_idx, test_idx = EV.split_indices(len(ds), eval_fraction, seed)
    t_data = time.perf_counter() - t0

    seed_everything(seed)
    overrides = dict(DEMO_OVERRIDES if overrides is None else overrides)
    model = create_model("gk_mvlp_tiny", backend=backend, **overrides).to(device)
    test_loader = EV.make_loader(model, EV.Subset(ds, test_idx), batch_size=batch_size, device=device,
                                 num_threads=num_threads, seed=seed)
    log(f"[2/4] evaluating the untrained model on {len(test_idx)} held-out images")
    before = _eval(model, test_loader, keep_examples=1)

    log(f"[3/4] pre-training gk_mvlp_tiny for {steps} steps (batch {batch_size}, {len(train_idx)} images, "
        f"lr {lr:g}, overrides {overrides})")
    train_loader = EV.make_loader(model, EV.Subset(ds, train_idx), batch_size=batch_size, device=device,
                                  train=True, num_threads=num_threads, seed=seed)
    from gkcore.models.config import config_to_dict

    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup, log_every=max(1, steps // 50), seed=seed,
                      progress=progress, ckpt_every=max(50, steps // 4))
    t1 = time.perf_counter()
    tr = Trainer(model, train_loader, cfg, os.path.join(out, "train"), device=device,
                 model_meta={"preset": "gk_mvlp_tiny", "overrides": overrides, "config": config_to_dict(model.config)})
    res = tr.fit()
    t_train = time.perf_counter() - t1
    model.save(os.path.join(out, "model.safetensors"))

    log("[4/4] evaluating the pre-trained model")
    after = _eval(model, test_loader, keep_examples=1)

    # figures
    plot_loss_curves(res.history, os.path.join(out, "loss_curves.png"), title="gk_mvlp_tiny on SynthCXR")
    for tag, r in (("before", before), ("after", after)):
        if r["_examples"]:
            ex = r["_examples"][0]
            plot_grounding(ex["image"], ex["saliency"], os.path.join(out, f"grounding_{tag}.png"),
                           true_boxes=ex["boxes"], region_box=ex["region_box"],
                           title=f"{ex['entity']}: GK saliency ({tag} pre-training)")
    chance_auc = 0.5
    rows = [("zero-shot AUROC (macro)", before["zero_shot_auroc"], after["zero_shot_auroc"], chance_auc),
            ("zero-shot AUROC (CheXpert)", before["zero_shot_auroc_chexpert"], after["zero_shot_auroc_chexpert"],
             chance_auc),
            *[(f"pointing game ({label})", before[k], after[k], after["pointing_chance"])
              for k, label in (("pointing_game_saliency", "GK saliency"), ("pointing_game", "GK attention"),
                               ("pointing_game_region", "region attn"), ("pointing_game_region_text", "region-text"))],
            ("grounding mAP (top region)", before["grounding_mAP"], after["grounding_mAP"], None),
            ("image->report R@1", before["i2t_R@1"], after["i2t_R@1"], 1.0 / max(after["n_retrieval"], 1)),
            ("image->report R@5", before["i2t_R@5"], after["i2t_R@5"], min(1.0, 5.0 / max(after["n_retrieval"], 1))),
            ("report->image R@5", before["t2i_R@5"], after["t2i_R@5"], min(1.0, 5.0 / max(after["n_retrieval"], 1)))]
    first, last = res.history[0], res.history[-1]
    lines = ["", f"{'metric':<28} {'before':>7} {'after':>7} {'chance':>7}", "-" * 52]
    lines += [f"{name:<28} {_fmt(b):>7} {_fmt(a):>7} {_fmt(c):>7}" for name, b, a, c in rows]
    lines += ["-" * 52,
              f"loss {first['loss']:.3f} -> {last['loss']:.3f} over {res.step} steps; "
              f"{len(test_idx)} test images, {after['n_findings']} findings, {after['n_entities_scored']} entities scored",
              f"time: data {t_data:.0f} s, training {t_train:.0f} s, total {time.perf_counter() - t0:.0f} s",
              f"outputs in {os.path.abspath(out)}"]
    log("\n".join(lines))
    improved = (after["zero_shot_auroc"] > chance_auc and after["pointing_game_saliency"] > after["pointing_chance"])
    results = {
        "before": {k: v for k, v in before.items() if not k.startswith("_")},
        "after": {k: v for k, v in after.items() if not k.startswith("_")},
        "per_entity_auroc_after": after["_per_class"],
        "above_chance_after_pretraining": bool(improved),
        "train": {"steps": res.step, "status": res.status, "first_loss": first, "last_loss": last,
                  "seconds": t_train},
        "settings": {"n": n, "size": size, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                     "overrides": overrides,
                     "device": device, "threads": torch.get_num_threads()},
        "seconds_total": time.perf_counter() - t0,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    return results
