"""``gkcore demo``: the main job on a CPU-only machine in about ten minutes.

1. generate a small SynthCXR set (images + reports + entity labels + region and finding boxes);
2. build ``gk_mvlp_tiny`` and evaluate it on the held-out images on every downstream task of the paper:
   zero-shot classification (GK entity queries), grounding (pointing game on the GK maps, mAP), retrieval,
   report generation (greedy; BLEU-4, CIDEr-D) and a label-efficiency linear probe (a few fractions of
   the training labels);
3. pre-train it on the training images (ITC + ITM + LM + LECLS) with :class:`~gkcore.engine.trainer.Trainer`;
4. evaluate again; with ``ablation``, also pre-train and evaluate the same model without the GK module
   (ITC + ITM + LM; zero-shot through text prompts) on the same data, split, seed and budget;
5. print the table next to each metric's chance or trivial baseline and save to the output folder
   ``results.json`` (valid JSON: a metric that does not apply is ``null``), ``loss_curves.png``,
   ``grounding_before.png`` / ``grounding_after.png``, the training log and checkpoint, and
   ``model.safetensors``.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import evaluate as EV
from .host_memory import keep_freed_memory
from .trainer import TrainConfig, Trainer, seed_everything

__all__ = ["run_demo", "DEFAULTS", "DEMO_OVERRIDES", "PROBE_FRACTIONS", "loss_trend", "json_safe"]

#: defaults measured on the 2-core CPU box (see the README for the timing)
DEFAULTS = dict(n=1200, size=256, steps=400, batch_size=16, lr=5e-4, warmup=10, eval_fraction=0.25, seed=0)
#: gk_mvlp_tiny config overrides for the short CPU run (``--set`` replaces them): a lighter LM weight, frozen
#: knowledge prompts, no embeddings shared with the decoder, no dropout, the pretrained report encoder at
#: 1/25 of the base lr (2e-5: at 5e-4 its features collapse), no ITC queue (a queue filled by a momentum
#: tower that barely moves in a few hundred steps made loss_itc climb), no ITM (it stays at its prior,
#: 0.63, for 200 steps in every run, and costs a third of a step), no LECLS (it pulls every image embedding
#: towards the few knowledge-book entity embeddings: mean pairwise cosine 0.98 with it, 0.84 without, and
#: zero-shot AUROC lower), knowledge queries centred on the book's mean prompt (uncentred, the 56 entity
#: queries start nearly equal), an ITC temperature of 0.2 (at 0.07 the image embeddings stay nearly equal,
#: mean pairwise cosine 0.88 against 0.42), no momentum tower and no distillation (``loss.momentum`` 0 reuses
#: the online features, a third of a step's encoder passes saved; ``loss.alpha`` 0: soft targets from a
#: tower that is the online one teach nothing); ``run_demo`` also restricts the LM head to the training
#: reports' tokens (``text.lm_vocab``: the head over 30522 tokens was a third of a step); the decoder reads
#: the entity states (``gk.decoder_entity_states``: the true states in training, ``gk.decoder_label_forcing``
#: 1; the GK head's calibrated decisions in evaluation), through a projection that starts as the entities'
#: names (``gk.decoder_state_init``: from 0 the decoder learned to read hardly any state in 400 steps),
#: decisions that make the most right calls on the training images (``gk.decoder_state_rule``), scored
#: after training in eval mode (``calibrate_states``: the margins seen in training, under augmentation,
#: called 5 entities present per image against 2.3 true).
#: The measurements behind each are in docs/experiments.md.
DEMO_OVERRIDES = {"loss.w_lm": 0.2, "gk.knowledge_encoder": "frozen", "text.share_decoder_embeddings": False,
                  "dropout": 0.0, "lr_scale.text_encoder": 0.04, "loss.queue_size": 0, "loss.w_itm": 0.0,
                  "loss.w_ecls": 0.0, "gk.center_queries": True, "loss.temperature": 0.2, "loss.momentum": 0.0,
                  "loss.alpha": 0.0, "gk.decoder_entity_states": True, "gk.decoder_label_forcing": 1.0,
                  "gk.decoder_state_rule": "accuracy"}


#: label fractions of the linear probe (frozen pooled image features, logistic regression per entity)
PROBE_FRACTIONS: Tuple[float, ...] = (0.05, 0.2, 1.0)
#: report generation is scored on this many held-out images (greedy decoding is the slow part of the eval)
GEN_IMAGES = 100


def json_safe(x):
    """``x`` with every NaN / inf float replaced by None (JSON has no NaN), numpy scalars as Python ones."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def loss_trend(history: Sequence[Dict[str, float]], window: float = 0.125, tol: float = 0.02) -> Dict[str, Dict]:
    """Per loss component of ``history`` (keys ``loss``, ``loss_*``): the mean over the first ``window`` of the
    second half of the run and over its last ``window``; ``rising`` when the end exceeds the start by more
    than ``tol`` (relative) -- the smoothed check that no component rises over the second half."""
    n = len(history)
    w = max(1, int(round(n * window)))
    out: Dict[str, Dict] = {}
    if n < 4:
        return out
    half = history[n // 2:]
    for k in sorted({k for h in history for k in h if k == "loss" or k.startswith("loss_")}):
        a = [h[k] for h in half[:w] if k in h and math.isfinite(h[k])]
        b = [h[k] for h in history[-w:] if k in h and math.isfinite(h[k])]
        if not a or not b:
            continue
        s, e = float(sum(a) / len(a)), float(sum(b) / len(b))
        out[k] = {"start": s, "end": e, "rising": bool(e > s + tol * max(abs(s), 1e-6))}
    return out


def _trained_losses(model) -> str:
    """The losses a run trains, e.g. "ITC + LM + GK" (a zero weight skips a loss; no LECLS / GK loss
    without the GK module)."""
    w, gk = model.config.loss, _has_gk(model)
    on = [("ITC", w.w_itc), ("ITM", w.w_itm), ("LM", w.w_lm), ("LECLS", w.w_ecls if gk else 0.0),
          ("GK", w.w_gk if gk else 0.0)]
    return " + ".join(n for n, v in on if v) or "none"


def _has_gk(model) -> bool:
    gk = getattr(model.config, "gk", None)
    return bool(getattr(gk, "enabled", True))


def _eval(model, test_loader, train_loader, gen_loader, *, keep_examples: int = 0, fractions=PROBE_FRACTIONS,
          seed: int = 0, log=print, tag: str = "") -> Dict[str, Any]:
    """Every downstream task on the held-out images; keys starting with ``_`` are not written to results.json."""
    from . import metrics as M

    log(f"      {tag}zero-shot classification")
    zs = EV.zero_shot_classification(model, test_loader)
    res: Dict[str, Any] = {"zero_shot_auroc": zs["macro"], "zero_shot_auroc_chexpert": zs["macro_chexpert"],
                           "zero_shot_auroc_cardiomegaly": zs["per_class"].get("cardiomegaly", float("nan")),
                           "n_entities_scored": zs["n_classes"], "_per_class": zs["per_class"]}
    log(f"      {tag}grounding")
    gr = EV.grounding(model, test_loader, keep_examples=keep_examples)
    res.update({"pointing_game": gr["pointing_game"],
                **{k: v for k, v in gr.items() if k.startswith("pointing_game_")},
                "pointing_chance": gr["pointing_chance"], "grounding_mAP": gr.get("mAP", float("nan")),
                "n_findings": gr["n_findings"], "_examples": gr["examples"]})
    log(f"      {tag}retrieval and features")
    fte = EV.extract_features(model, test_loader, text=True, pooled=True)
    sim = fte["image"] @ fte["text"].T
    sid = fte["study_id"]
    i2t = M.retrieval_recall(sim, sid, sid, (1, 5))
    t2i = M.retrieval_recall(sim.T, sid, sid, (1, 5))
    res.update({"i2t_R@1": i2t["R@1"], "i2t_R@5": i2t["R@5"], "t2i_R@5": t2i["R@5"], "n_retrieval": int(len(sid)),
                "embedding_cosine": M.mean_pairwise_cosine(fte["image"]),
                "text_embedding_cosine": M.mean_pairwise_cosine(fte["text"])})
    log(f"      {tag}report generation ({GEN_IMAGES} images, greedy)")
    gen = EV.report_generation(model, gen_loader)
    res.update({"bleu4": gen["BLEU-4"], "cider": gen["CIDEr-D"], "rouge_l": gen["ROUGE-L"],
                "_gen_examples": gen["examples"]})
    log(f"      {tag}linear probe ({', '.join(f'{f:.0%}' for f in fractions)} of the training labels)")
    ftr = EV.extract_features(model, train_loader, pooled=True)
    res["_probe"] = {}
    for f in fractions:
        p = EV.linear_probe(ftr, fte, f, seed, key="pooled")
        res["_probe"][f"{f:g}"] = {"auroc": p["macro"], "n_train": p["n_train"]}
    res["probe_auroc"] = res["_probe"][f"{fractions[-1]:g}"]["auroc"] if fractions else float("nan")
    return res


def _train(model, train_loader, *, steps, lr, warmup, seed, progress, out, overrides, device, preset="gk_mvlp_tiny"):
    from gkcore.models.config import config_to_dict

    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup, log_every=max(1, steps // 50), seed=seed,
                      progress=progress, ckpt_every=max(50, steps // 4))
    t1 = time.perf_counter()
    tr = Trainer(model, train_loader, cfg, out, device=device,
                 model_meta={"preset": preset, "overrides": overrides, "config": config_to_dict(model.config)})
    res = tr.fit()
    return res, time.perf_counter() - t1


def _shown(overrides: Dict[str, Any], longest: int = 8) -> Dict[str, Any]:
    """``overrides`` for the log: a list longer than ``longest`` as its length."""
    return {k: (f"<{len(v)} values>" if isinstance(v, list) and len(v) > longest else v)
            for k, v in overrides.items()}


def _fmt(v) -> str:
    return "  n/a " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.3f}"


#: the table: (label, key of the evaluation dict, baseline key or a number)
_ROWS: List[Tuple[str, str, Any]] = [
    ("zero-shot AUROC (macro)", "zero_shot_auroc", "zero_shot_auroc"),
    ("zero-shot AUROC (CheXpert)", "zero_shot_auroc_chexpert", "zero_shot_auroc"),
    ("zero-shot AUROC (cardiomegaly)", "zero_shot_auroc_cardiomegaly", "zero_shot_auroc"),
    ("pointing game (GK saliency)", "pointing_game_saliency", "pointing_game"),
    ("pointing game (GK attention)", "pointing_game", "pointing_game"),
    ("pointing game (region attn)", "pointing_game_region", "pointing_game"),
    ("pointing game (region-text)", "pointing_game_region_text", "pointing_game"),
    ("grounding mAP (top region)", "grounding_mAP", None),
    ("image->report R@1", "i2t_R@1", "i2t_R@1"),
    ("image->report R@5", "i2t_R@5", "i2t_R@5"),
    ("report->image R@5", "t2i_R@5", "t2i_R@5"),
    ("report BLEU-4 (greedy)", "bleu4", "bleu4"),
    ("report CIDEr-D (greedy)", "cider", "cider"),
    *[(f"linear probe AUROC, {f:.0%} labels", f"probe@{f:g}", "probe") for f in PROBE_FRACTIONS],
    ("image embedding cosine", "embedding_cosine", None),
]


def _row_value(r: Dict[str, Any], key: str):
    if key.startswith("probe@"):
        return r["_probe"].get(key[6:], {}).get("auroc")
    return r.get(key)


def _table(columns: Sequence[Tuple[str, Dict[str, Any]]], baseline: Dict[str, Any]) -> List[str]:
    head = f"{'metric':<34}" + "".join(f" {name:>8}" for name, _ in columns) + f" {'chance':>8}"
    lines = [head, "-" * len(head)]
    for label, key, base in _ROWS:
        b = baseline.get(base) if isinstance(base, str) else base
        lines.append(f"{label:<34}" + "".join(f" {_fmt(_row_value(r, key)):>8}" for _, r in columns)
                     + f" {_fmt(b):>8}")
    lines.append("-" * len(head))
    return lines


def _public(r: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in r.items() if not k.startswith("_")}


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
             ablation: bool = False, probe_fractions: Sequence[float] = PROBE_FRACTIONS,
             gen_images: int = GEN_IMAGES, log=print) -> Dict[str, Any]:
    """Run the demo; returns the results dict also written to ``out/results.json``."""
    from gkcore import create_model
    from gkcore.data import SynthCXR
    from gkcore.data.synth import generate

    from .plots import plot_grounding, plot_loss_curves

    _check_args(n, size, steps, batch_size, lr, warmup, eval_fraction, num_threads)
    if gen_images < 1:
        raise ValueError(f"gen_images must be >= 1, got {gen_images}")
    if any(not 0.0 < float(f) <= 1.0 for f in probe_fractions):
        raise ValueError(f"probe_fractions must lie in (0, 1], got {list(probe_fractions)}")
    fractions = tuple(float(f) for f in probe_fractions)
    stages = 5 if ablation else 4
    # a CPU step re-faults its large blocks unless freed memory stays in the heap (host_memory)
    allocator = keep_freed_memory() if str(device).startswith("cpu") else None
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, "synthcxr")
    stamp = os.path.join(data_dir, ".gkcore-demo.json")
    want = {"n": n, "size": size, "seed": seed}
    if not (reuse_data and os.path.isfile(stamp) and json.load(open(stamp)) == want):
        log(f"[1/{stages}] generating {n} synthetic chest X-rays ({size} px) in {data_dir}")
        generate(data_dir, n, size, seed, progress=progress, workers=max(1, min(num_threads, os.cpu_count() or 1)))
        with open(stamp, "w") as f:
            json.dump(want, f)
    else:
        log(f"[1/{stages}] reusing the synthetic set in {data_dir}")
    ds = SynthCXR(data_dir)
    train_idx, test_idx = EV.split_indices(len(ds), eval_fraction, seed, groups=EV.study_ids(ds))
    t_data = time.perf_counter() - t0
    train_reports = [ds.records[i]["report"] for i in train_idx]
    overrides = dict(DEMO_OVERRIDES if overrides is None else overrides)
    if "text.lm_vocab" not in overrides:  # the decoder writes only tokens the training reports use
        from gkcore.data import report_token_ids

        overrides["text.lm_vocab"] = report_token_ids(train_reports)

    def loaders(model):
        kw = dict(batch_size=batch_size, device=device, num_threads=num_threads, seed=seed)
        return (EV.make_loader(model, EV.Subset(ds, test_idx), **kw),
                EV.make_loader(model, EV.Subset(ds, train_idx), **kw),
                EV.make_loader(model, EV.Subset(ds, test_idx[:gen_images]), **kw),
                EV.make_loader(model, EV.Subset(ds, train_idx), train=True, **kw))

    def evaluate(model, tag, keep=1):
        te, tr_eval, gen, _ = loaders(model)
        return _eval(model, te, tr_eval, gen, keep_examples=keep, fractions=fractions, seed=seed, log=log, tag=tag)

    seed_everything(seed)
    model = create_model("gk_mvlp_tiny", backend=backend, **overrides).to(device)
    log(f"[2/{stages}] evaluating the untrained model on {len(test_idx)} held-out images")
    before = evaluate(model, "untrained: ")

    log(f"[3/{stages}] pre-training gk_mvlp_tiny for {steps} steps on {_trained_losses(model)} (batch {batch_size}, "
        f"{len(train_idx)} images, lr {lr:g}, overrides {_shown(overrides)})")
    kw = dict(steps=steps, lr=lr, warmup=warmup, seed=seed, progress=progress, device=device)
    res, t_train = _train(model, loaders(model)[3], out=os.path.join(out, "train"), overrides=overrides, **kw)
    if getattr(model, "_state_window", 0):  # the decoder's decisions, calibrated as generation will score
        model.calibrate_states(loaders(model)[1])
    model.save(os.path.join(out, "model.safetensors"))
    log(f"[4/{stages}] evaluating the pre-trained model")
    after = evaluate(model, "GK-MVLP: ")

    abl = abl_res = None
    t_abl = 0.0
    if ablation:
        ab_over = {**overrides, "gk.enabled": False}
        seed_everything(seed)
        ab_model = create_model("gk_mvlp_tiny", backend=backend, **ab_over).to(device)
        log(f"[5/{stages}] the ablation: the same model without the GK module ({_trained_losses(ab_model)}), same data, "
            f"split, seed and budget")
        abl_res, t_abl = _train(ab_model, loaders(ab_model)[3], out=os.path.join(out, "train_no_gk"),
                                overrides=ab_over, **kw)
        abl = evaluate(ab_model, "no-GK: ", keep=0)
        del ab_model

    # baselines: chance for the ranking metrics, the most frequent training report for generation
    n_ret = max(after["n_retrieval"], 1)
    rb = EV.report_baseline(train_reports,
                            [ds.records[i]["report"] for i in test_idx[:gen_images]])
    baseline = {"zero_shot_auroc": 0.5, "pointing_game": after["pointing_chance"], "i2t_R@1": 1.0 / n_ret,
                "i2t_R@5": min(1.0, 5.0 / n_ret), "t2i_R@5": min(1.0, 5.0 / n_ret), "bleu4": rb["BLEU-4"],
                "cider": rb["CIDEr-D"], "probe": 0.5, "report": rb["report"]}

    # figures
    plot_loss_curves(res.history, os.path.join(out, "loss_curves.png"), title="gk_mvlp_tiny on SynthCXR")
    if abl_res is not None:
        plot_loss_curves(abl_res.history, os.path.join(out, "loss_curves_no_gk.png"),
                         title="gk_mvlp_tiny without the GK module")
    for tag, r in (("before", before), ("after", after)):
        if r["_examples"] and r["_examples"][0].get("saliency") is not None:
            ex = r["_examples"][0]
            plot_grounding(ex["image"], ex["saliency"], os.path.join(out, f"grounding_{tag}.png"),
                           true_boxes=ex["boxes"], region_box=ex["region_box"],
                           title=f"{ex['entity']}: GK saliency ({tag} pre-training)")

    cols = [("before", before), ("after", after)] + ([("no-GK", abl)] if abl is not None else [])
    trend = loss_trend(res.history)
    rising = [k for k, v in trend.items() if v["rising"]]
    first, last = res.history[0], res.history[-1]
    lines = [""] + _table(cols, baseline)
    lines += [f"loss {first['loss']:.3f} -> {last['loss']:.3f} over {res.step} steps; "
              f"{len(test_idx)} test images, {after['n_findings']} findings, {after['n_entities_scored']} entities "
              f"scored; generation on {min(gen_images, len(test_idx))} images; chance for BLEU/CIDEr: the most "
              f"frequent training report",
              ("loss components rising over the second half: " + ", ".join(rising)) if rising
              else "no loss component rises over the second half (smoothed)"]
    if after["_gen_examples"]:
        ex = after["_gen_examples"][0]
        lines += ["", "a generated report (after pre-training, greedy):", "  " + ex["generated"],
                  "its true report:", "  " + ex["reference"].replace("\n", " ")]
    lines += ["", f"time: data {t_data:.0f} s, training {t_train:.0f} s"
              + (f", ablation training {t_abl:.0f} s" if ablation else "")
              + f", total {time.perf_counter() - t0:.0f} s", f"outputs in {os.path.abspath(out)}"]
    log("\n".join(lines))
    improved = (after["zero_shot_auroc"] > 0.5 and after["pointing_game_saliency"] > after["pointing_chance"])

    results = {
        "before": _public(before),
        "after": _public(after),
        "baseline": baseline,
        "probe": {f: {"before": before["_probe"][f]["auroc"], "after": after["_probe"][f]["auroc"],
                      **({"no_gk": abl["_probe"][f]["auroc"]} if abl is not None else {}),
                      "n_train": after["_probe"][f]["n_train"]} for f in after["_probe"]},
        "generated_examples": after["_gen_examples"],
        "per_entity_auroc_after": after["_per_class"],
        "above_chance_after_pretraining": bool(improved),
        "train": {"steps": res.step, "status": res.status, "first_loss": first, "last_loss": last,
                  "seconds": t_train, "loss_trend": trend, "rising": rising},
        "settings": {"n": n, "size": size, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                     "overrides": overrides, "probe_fractions": list(fractions), "gen_images": gen_images,
                     "device": device, "threads": torch.get_num_threads(), "host_allocator": allocator},
        "seconds_total": time.perf_counter() - t0,
    }
    if abl is not None:
        results["ablation"] = {**_public(abl), "probe": abl["_probe"],
                               "train": {"steps": abl_res.step, "status": abl_res.status, "seconds": t_abl,
                                         "loss_trend": loss_trend(abl_res.history)}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(json_safe(results), f, indent=1, allow_nan=False)
    return results
