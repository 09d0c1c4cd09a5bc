"""Downstream evaluation of a GK-MVLP model (``gkcore eval``): classification (zero-shot, linear probe,
fine-tuning with a label fraction), localization, report generation, retrieval and VQA.

Every task takes a model following the model contract (``encode_image``, ``encode_text``,
``zero_shot_classify``, ``ground``, ``generate_report``) and batches from ``gkcore.data.build_loader``
(keys ``image``, ``input_ids``, ``attention_mask``, ``entity_labels``, ``region_boxes``, ``region_mask``,
``study_id``, ``report``, ``finding_boxes``). Splits for the supervised tasks are deterministic by
sample index and grouped by study (:func:`split_indices` with :func:`study_ids`: 70 % train / 30 % test
by default, the views of one study on one side; the label fraction is taken from the train part).
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M

__all__ = ["load_model", "make_loader", "Subset", "split_indices", "study_ids", "zero_shot_classification", "grounding",
           "extract_features", "linear_probe", "fine_tune", "report_generation", "report_baseline", "retrieval", "vqa",
           "TASKS", "run_task"]

TASKS = ("zero-shot", "linear-probe", "fine-tune", "localization", "report-generation", "retrieval", "vqa")


# ------------------------------------------------------------------------------------------ plumbing
def load_model(path: str, device: str = "cpu", backend: Optional[str] = None):
    """Load a model from a ``.safetensors`` file written by ``model.save`` or from a trainer checkpoint
    (``checkpoint.pt``, whose ``model_meta["config"]`` holds the model config)."""
    from gkcore.models import GKMVLP

    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError

        try:
            return GKMVLP.load(path, backend=backend, device=device)
        except SafetensorError as e:  # empty, truncated or not a safetensors file
            raise ValueError(f"--checkpoint {path} is not a readable safetensors file (empty, truncated or "
                             f"damaged): {e}") from None
    from gkcore.models.config import config_from_dict

    from .trainer import load_checkpoint

    ck = load_checkpoint(path)
    cfg = (ck.get("model_meta") or {}).get("config")
    if cfg is None:
        raise ValueError(f"{path} holds no model config (model_meta['config']); pass the model.safetensors file")
    cfg = config_from_dict(cfg)
    cfg.vision.checkpoint = None
    cfg.text.pretrained = None
    model = GKMVLP(cfg, backend=backend, init_pretrained=False)
    model.load_state_dict(ck["model"])
    return model.to(device)


class Subset:
    """A view of ``dataset`` restricted to ``indices`` (other attributes forwarded)."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def __getattr__(self, name):
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def split_indices(n: int, test_fraction: float = 0.3, seed: int = 0,
                  groups: Optional[Sequence[Any]] = None) -> Tuple[List[int], List[int]]:
    """Deterministic shuffled split of ``range(n)`` into (train, test).

    ``groups`` (n,): a key per sample (e.g. its study id); every sample of a group lands on the same
    side, so the second view of a study (with the same report) is never held out while its first view
    trains. Groups are shuffled and taken into the test part until it holds ``round(n * test_fraction)``
    samples or more. None: each sample is its own group."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    k = max(1, int(round(n * test_fraction)))
    rng = np.random.default_rng(seed)
    if groups is None:
        perm = rng.permutation(n)
        return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())
    if len(groups) != n:
        raise ValueError(f"groups must have one key per sample ({n}), got {len(groups)}")
    members: Dict[Any, List[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(members)
    test: List[int] = []
    for j in rng.permutation(len(keys)):
        if len(test) >= k:
            break
        test += members[keys[j]]
    held = set(test)
    return [i for i in range(n) if i not in held], sorted(test)


def study_ids(dataset) -> Optional[List[int]]:
    """The study id of every sample of ``dataset`` without loading its images, where the dataset keeps
    them (SynthCXR's ``records``, the adapters' ``samples``); None otherwise."""
    recs = getattr(dataset, "records", None)
    if recs is not None and len(recs) == len(dataset) and all("study_id" in r for r in recs):
        return [int(r["study_id"]) for r in recs]
    samples = getattr(dataset, "samples", None)
    if samples is not None and len(samples) == len(dataset):
        return [int(s.study_id) for s in samples]
    return None


def label_fraction_indices(indices: Sequence[int], fraction: float, seed: int = 0, minimum: int = 4) -> List[int]:
    """The first ``max(minimum, round(fraction * n))`` of a seeded shuffle of ``indices``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    perm = np.random.default_rng(seed + 17).permutation(len(indices))
    k = min(len(indices), max(minimum, int(round(fraction * len(indices)))))
    return sorted(int(indices[i]) for i in perm[:k])


def make_loader(model, dataset, batch_size: int = 16, device: str = "cpu", train: bool = False,
                num_threads: int = 2, seed: int = 0, **kw):
    """``gkcore.data.build_loader`` with the model's image size, channels, tokenizer and max length."""
    from gkcore.data import build_loader

    cfg = model.config
    return build_loader(dataset, batch_size, cfg.image_size, tokenizer=getattr(model, "tokenizer", None),
                        max_length=cfg.max_length, channels=cfg.channels, train=train, device=device,
                        num_threads=num_threads, seed=seed, drop_last=False if not train else None, **kw)


def _knowledge():
    from gkcore.data import knowledge

    return knowledge


def _limited(loader, max_batches: Optional[int]):
    for i, b in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield b


def _dev(model) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------ classification
@torch.no_grad()
def zero_shot_classification(model, loader, entity_names: Optional[Sequence[str]] = None,
                             max_batches: Optional[int] = None) -> Dict[str, Any]:
    """Zero-shot AUROC through entity queries: ``model.zero_shot_classify`` gives P(entity) (B, E) for
    every knowledge-base entity; AUROC per entity on the 1 / 0 labels (-1 ignored), macro over entities
    with both classes present, and macro over the CheXpert observations among them."""
    model.eval()
    K = _knowledge()
    names = list(entity_names or K.ENTITY_NAMES)
    scores, labels = [], []
    for b in _limited(loader, max_batches):
        p = model.zero_shot_classify(b["image"], None, region_boxes=b.get("region_boxes"),
                                     region_mask=b.get("region_mask"))
        scores.append(p.float().cpu())
        labels.append(b["entity_labels"].cpu())
    if not scores:
        raise ValueError("the loader yielded no batch")
    s, y = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    res = M.auroc_per_class(s, y, names=list(K.ENTITY_NAMES))
    chex = [e.name for e in K.ENTITIES if getattr(e, "chexpert", False)]
    cv = [res["per_class"][n] for n in chex if not math.isnan(res["per_class"][n])]
    res["macro_chexpert"] = float(np.mean(cv)) if cv else float("nan")
    if entity_names is not None:
        sel = [res["per_class"][n] for n in names if not math.isnan(res["per_class"][n])]
        res["macro_selected"] = float(np.mean(sel)) if sel else float("nan")
    res["n_samples"] = int(s.shape[0])
    return res


@torch.no_grad()
def extract_features(model, loader, text: bool = False, max_batches: Optional[int] = None,
                     pooled: bool = False) -> Dict[str, np.ndarray]:
    """Image embeddings (N, De) (and report embeddings when ``text``; the image encoder's pooled
    features (N, Dv) under ``"pooled"`` when ``pooled``), entity labels (N, E), study ids, reports."""
    model.eval()
    out: Dict[str, List] = {"image": [], "labels": [], "study_id": [], "text": [], "report": [], "pooled": []}
    for b in _limited(loader, max_batches):
        if pooled:  # one encoder pass for both
            emb, pool = model.image_features(b["image"])
            out["pooled"].append(pool.float().cpu())
        else:
            emb = model.encode_image(b["image"])
        out["image"].append(emb.float().cpu())
        out["labels"].append(b["entity_labels"].cpu())
        out["study_id"].append(b["study_id"].cpu())
        out["report"].extend(b["report"])
        if text:
            out["text"].append(model.encode_text(b["input_ids"], b["attention_mask"]).float().cpu())
    res = {k: torch.cat(v).numpy() for k, v in out.items() if v and k != "report"}
    res["report"] = out["report"]
    return res


def _fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0):
    """Logistic regression on standardised features (lbfgs converges on unnormalised encoder features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x, y)


def linear_probe(train: Dict[str, np.ndarray], test: Dict[str, np.ndarray], fraction: float = 1.0,
                 seed: int = 0, key: str = "image") -> Dict[str, Any]:
    """Per-entity logistic regression on frozen features ``train[key]`` (``"image"``: the embeddings;
    ``"pooled"``: the image encoder's pooled features) from a ``fraction`` of the training rows (labels
    -1 dropped per entity); AUROC on the test rows. Entities whose training labels hold a single class
    are skipped."""
    K = _knowledge()
    rows = label_fraction_indices(list(range(len(train[key]))), fraction, seed)
    xtr, ytr = train[key][rows], train["labels"][rows]
    scores = np.zeros(test["labels"].shape, np.float64)
    valid = np.zeros(test["labels"].shape[1], bool)
    for e in range(ytr.shape[1]):
        keep = ytr[:, e] >= 0
        if len(np.unique(ytr[keep, e])) < 2:
            continue
        clf = _fit_logistic(xtr[keep], ytr[keep, e])
        scores[:, e] = clf.predict_proba(test[key])[:, 1]
        valid[e] = True
    labels = np.where(valid[None, :], test["labels"], -1)
    res = M.auroc_per_class(scores, labels, names=list(K.ENTITY_NAMES))
    res.update(fraction=fraction, n_train=len(rows), n_test=int(len(test["labels"])))
    return res


def fine_tune(model, train_loader, test_loader, fraction: float = 1.0, epochs: int = 3, lr: float = 1e-4,
              max_batches: Optional[int] = None) -> Dict[str, Any]:
    """Fine-tune the image encoder with a linear multi-label head (BCE on labels 1/0, -1 masked) on the
    training loader (already restricted to the label fraction), then AUROC on the test loader. The model
    passed in is not modified (a deep copy is trained)."""
    K = _knowledge()
    m = copy.deepcopy(model).train()
    dev = _dev(m)
    E = len(K.ENTITY_NAMES)
    head = torch.nn.Linear(m.config.embed_dim, E).to(dev)
    params = [p for n, p in m.named_parameters() if n.startswith(("visual.", "vision_proj."))] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def logits(images):
        img = m._images(images)
        _, emb = m._image(img)[:2]
        return head(emb.float())

    for ep in range(epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(ep)
        for b in _limited(train_loader, max_batches):
            y = b["entity_labels"].to(dev)
            mask = (y >= 0).float()
            lo = logits(b["image"])
            loss = (F.binary_cross_entropy_with_logits(lo, y.clamp(min=0).float(), reduction="none") * mask).sum() \
                / mask.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    m.eval()
    s, yl = [], []
    with torch.no_grad():
        for b in _limited(test_loader, max_batches):
            s.append(torch.sigmoid(logits(b["image"])).cpu())
            yl.append(b["entity_labels"].cpu())
    res = M.auroc_per_class(torch.cat(s).numpy(), torch.cat(yl).numpy(), names=list(K.ENTITY_NAMES))
    res.update(fraction=fraction, epochs=epochs)
    return res


# ------------------------------------------------------------------------------------------ localization
def _cells(box, size: int = 64) -> Tuple[slice, slice]:
    """(rows, cols) of the cells of a (size, size) grid that a normalised xyxy box touches."""
    x0, y0, x1, y1 = box
    return (slice(int(y0 * size), int(math.ceil(y1 * size))), slice(int(x0 * size), int(math.ceil(x1 * size))))


def _paint_regions(scores: np.ndarray, boxes: np.ndarray, size: int = 64) -> np.ndarray:
    """Region scores (R,) painted on a (size, size) map: each region adds score / area over its cells."""
    h = np.zeros((size, size), np.float64)
    for s, bx in zip(scores, boxes):
        cell = h[_cells(bx, size)]
        if cell.size:
            cell += float(s) / cell.size
    return h


@torch.no_grad()
def grounding(model, loader, max_batches: Optional[int] = None, keep_examples: int = 0,
              iou_thresholds: Sequence[float] = (0.1, 0.25, 0.5)) -> Dict[str, Any]:
    """Localization of the true finding boxes.

    Every (image, finding entity) pair of the batch's ``finding_boxes`` is grounded in one
    ``model.ground(images, entities)`` call per batch (one entity per row): the pointing game
    (``pointing_game``) uses the arg-max of ``patch_map`` (B, gh, gw), NaN for a model without one;
    detection mAP uses the box of the top-scoring region of ``region_scores`` (B, 29) (or of
    ``region_text_scores`` for a model without GK region attention) as the predicted box with that
    score, matched per entity against the true boxes at the IoU thresholds. A random-point baseline is the
    fraction of image area covered by the true boxes (reported as ``pointing_chance``).

    The pointing game is also scored on the model's other maps: ``pointing_game_saliency`` on
    ``patch_saliency``, ``pointing_game_region`` / ``pointing_game_region_text`` on ``region_scores`` /
    ``region_text_scores`` painted over the region boxes (each region adds score / box area, 64 x 64 grid).
    """
    model.eval()
    K = _knowledge()
    names = list(K.ENTITY_NAMES)
    boxes, chance = [], []
    preds: Dict[int, list] = {}
    gts: Dict[int, list] = {}
    examples = []
    extra: Dict[str, list] = {}
    uid = 0
    for b in _limited(loader, max_batches):
        # one (image, entity) pair per finding entity of each image, grounded in one call per batch
        pairs: List[Tuple[int, int, List]] = []
        for i, fl in enumerate(b["finding_boxes"]):
            per: Dict[int, List] = {}
            for f in fl:
                per.setdefault(int(f[0]), []).append([float(v) for v in f[1:5]])
            pairs.extend((i, e, bx) for e, bx in per.items())
        if not pairs:
            continue
        idx = torch.tensor([i for i, _, _ in pairs])
        rb, rm = b.get("region_boxes"), b.get("region_mask")
        g = model.ground(b["image"][idx.to(b["image"].device)], [names[e] for _, e, _ in pairs],
                         region_boxes=None if rb is None else rb[idx.to(rb.device)],
                         region_mask=None if rm is None else rm[idx.to(rm.device)])
        maps = {k: (None if g.get(k) is None else g[k].float().cpu().numpy())
                for k in ("patch_map", "region_scores", "region_text_scores", "patch_saliency")}
        rbx = rb[idx.to(rb.device)].float().cpu().numpy() if rb is not None else None
        for j, (i, e, bx) in enumerate(pairs):
            if maps["patch_map"] is not None:
                extra.setdefault("attention", []).append(maps["patch_map"][j])
            if maps["patch_saliency"] is not None:
                extra.setdefault("saliency", []).append(maps["patch_saliency"][j])
            rs = maps["region_scores"]
            if rbx is not None and rs is not None:
                extra.setdefault("region", []).append(_paint_regions(rs[j], rbx[j]))
            if rbx is not None and maps["region_text_scores"] is not None:
                extra.setdefault("region_text", []).append(_paint_regions(maps["region_text_scores"][j], rbx[j]))
            boxes.append(bx)
            area = np.zeros((64, 64), bool)
            for bb in bx:
                area[_cells(bb)] = True
            chance.append(area.mean())
            for bb in bx:
                gts.setdefault(e, []).append((uid, bb))
            top = rs if rs is not None else maps["region_text_scores"]  # the detection's region scores
            if rbx is not None and top is not None:
                r = int(np.argmax(top[j]))
                preds.setdefault(e, []).append((uid, float(top[j, r]), rbx[j, r].tolist()))
            if len(examples) < keep_examples:
                sal = maps["patch_saliency"]
                examples.append({"image": b["image"][i].float().cpu().numpy(), "heatmap": None if maps["patch_map"] is None else maps["patch_map"][j],
                                 "saliency": None if sal is None else sal[j], "boxes": bx, "entity": names[e],
                                 "region_box": None if rbx is None or rs is None else rbx[j, int(np.argmax(rs[j]))].tolist()})
            uid += 1
    if not boxes:
        raise ValueError("no finding boxes in the evaluated data: localization needs finding_boxes")
    res: Dict[str, Any] = {"pointing_chance": float(np.mean(chance)), "n_findings": len(boxes)}
    for k, v in extra.items():
        res[f"pointing_game_{k}"] = M.pointing_game(np.stack(v), boxes)["accuracy"]
    # the GK fusion's patch attention is the headline map; NaN for a model without one
    res["pointing_game"] = res.pop("pointing_game_attention", float("nan"))
    if preds:
        per_t: Dict[str, List[float]] = {}
        for e in gts:
            d = M.detection_map(preds.get(e, []), gts[e], iou_thresholds)
            for k, v in d.items():
                if k != "mAP" and not math.isnan(v):
                    per_t.setdefault(k, []).append(v)
        for k, v in per_t.items():
            res[f"m{k}"] = float(np.mean(v))
        res["mAP"] = float(np.mean([res[f"m{k}"] for k in per_t])) if per_t else float("nan")
    res["examples"] = examples
    return res


# ------------------------------------------------------------------------------------------ generation / retrieval
@torch.no_grad()
def report_generation(model, loader, max_length: Optional[int] = None, num_beams: int = 1,
                      max_batches: Optional[int] = None) -> Dict[str, Any]:
    """Generate a report per image; BLEU-1..4, ROUGE-L and CIDEr-D against the reference reports
    (METEOR is not computed: its usual implementations need WordNet data from the network)."""
    model.eval()
    hyp, ref = [], []
    for b in _limited(loader, max_batches):
        hyp.extend(model.generate_report(b["image"], max_length=max_length, num_beams=num_beams))
        ref.extend(b["report"])
    res: Dict[str, Any] = dict(M.bleu(hyp, ref))
    res["ROUGE-L"] = M.rouge_l(hyp, ref)
    res["CIDEr-D"] = M.cider_d(hyp, ref)
    res["n_samples"] = len(hyp)
    res["examples"] = [{"generated": h, "reference": r} for h, r in list(zip(hyp, ref))[:3]]
    return res


def report_baseline(train_reports: Sequence[str], test_reports: Sequence[str]) -> Dict[str, Any]:
    """The trivial report-generation baseline: the most frequent training report (the first of the most
    frequent, exact text) as the hypothesis for every test image, scored like :func:`report_generation`."""
    if not train_reports or not test_reports:
        raise ValueError("report_baseline needs training and test reports")
    counts: Dict[str, int] = {}
    for r in train_reports:
        counts[r] = counts.get(r, 0) + 1
    top = max(counts, key=lambda r: counts[r])  # max keeps the first of equal counts
    hyp = [top] * len(test_reports)
    res: Dict[str, Any] = dict(M.bleu(hyp, list(test_reports)))
    res["ROUGE-L"] = M.rouge_l(hyp, list(test_reports))
    res["CIDEr-D"] = M.cider_d(hyp, list(test_reports))
    res.update(report=top, count=counts[top], n_samples=len(hyp))
    return res


def retrieval(model, loader, max_batches: Optional[int] = None, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, Any]:
    """Image-to-report and report-to-image R@K with cosine similarity of the embeddings; reports of the
    same study count as correct."""
    f = extract_features(model, loader, text=True, max_batches=max_batches)
    sim = f["image"] @ f["text"].T
    sid = f["study_id"]
    i2t = M.retrieval_recall(sim, sid, sid, ks)
    t2i = M.retrieval_recall(sim.T, sid, sid, ks)
    res = {f"i2t_{k}": v for k, v in i2t.items()}
    res.update({f"t2i_{k}": v for k, v in t2i.items()})
    res["n_samples"] = int(sim.shape[0])
    return res


# ------------------------------------------------------------------------------------------ VQA
def vqa(model, dataset, train_idx: Sequence[int], test_idx: Sequence[int], batch_size: int = 16,
        device: str = "cpu", seed: int = 0, max_batches: Optional[int] = None) -> Dict[str, Any]:
    """VQA as answer classification on the generated question set (:mod:`gkcore.engine.vqa`).

    Features: the concatenation of the image embedding and the question embedding (report encoder)
    (2 De); a multinomial logistic regression over the answers seen in training; exact-match accuracy
    on the test questions, closed (yes/no) and open separately. Test answers never seen in training
    count as wrong."""
    from .vqa import build_questions

    K = _knowledge()
    names, regions = list(K.ENTITY_NAMES), list(K.REGIONS)
    q_tr = build_questions(dataset, names, regions, seed=seed, indices=train_idx)
    q_te = build_questions(dataset, names, regions, seed=seed + 1, indices=test_idx)
    if not q_tr or not q_te:
        raise ValueError("no VQA questions could be generated (needs entity labels / finding boxes)")
    need = sorted({q.index for q in q_tr + q_te})
    loader = make_loader(model, Subset(dataset, need), batch_size=batch_size, device=device)
    feats = extract_features(model, loader, max_batches=max_batches)["image"]
    row = {ix: r for r, ix in enumerate(need[:len(feats)])}
    q_tr = [q for q in q_tr if q.index in row]
    q_te = [q for q in q_te if q.index in row]

    def qemb(qs):
        out = []
        with torch.no_grad():
            for i in range(0, len(qs), 64):
                out.append(model.encode_text([q.question for q in qs[i:i + 64]]).float().cpu().numpy())
        return np.concatenate(out)

    xtr = np.concatenate([feats[[row[q.index] for q in q_tr]], qemb(q_tr)], 1)
    xte = np.concatenate([feats[[row[q.index] for q in q_te]], qemb(q_te)], 1)
    ytr = [q.answer for q in q_tr]
    if len(set(ytr)) < 2:
        pred = [ytr[0]] * len(q_te)
    else:
        clf = _fit_logistic(xtr, np.array(ytr), c=10.0)
        pred = list(clf.predict(xte))
    res = M.vqa_accuracy(pred, [q.answer for q in q_te], [q.closed for q in q_te])
    res["n_train_questions"] = len(q_tr)
    return res


# ------------------------------------------------------------------------------------------ dispatcher
def run_task(task: str, model, dataset, *, batch_size: int = 16, device: str = "cpu", fractions=(0.01, 0.1, 1.0),
             epochs: int = 3, seed: int = 0, max_batches: Optional[int] = None, num_threads: int = 2) -> Dict[str, Any]:
    """Run one of :data:`TASKS` on ``dataset`` and return its metrics."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def loader(idx=None, train=False):
        ds = dataset if idx is None else Subset(dataset, idx)
        return make_loader(model, ds, batch_size=batch_size, device=device, train=train,
                           num_threads=num_threads, seed=seed)

    if task == "zero-shot":
        return zero_shot_classification(model, loader(), max_batches=max_batches)
    if task == "localization":
        r = grounding(model, loader(), max_batches=max_batches)
        r.pop("examples", None)
        return r
    if task == "report-generation":
        return report_generation(model, loader(), max_batches=max_batches)
    if task == "retrieval":
        return retrieval(model, loader(), max_batches=max_batches)
    tr, te = split_indices(len(dataset), seed=seed, groups=study_ids(dataset))
    if task == "vqa":
        return vqa(model, dataset, tr, te, batch_size=batch_size, device=device, seed=seed, max_batches=max_batches)
    if task == "linear-probe":
        ftr = extract_features(model, loader(tr), max_batches=max_batches)
        fte = extract_features(model, loader(te), max_batches=max_batches)
        return {f"{f:g}": linear_probe(ftr, fte, f, seed) for f in fractions}
    out = {}
    for f in fractions:  # fine-tune
        sub = label_fraction_indices(tr, f, seed)
        out[f"{f:g}"] = fine_tune(model, loader(sub, train=True), loader(te), fraction=f, epochs=epochs,
                                  max_batches=max_batches)
    return out
