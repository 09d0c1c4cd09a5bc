"""Downstream metrics for GK-MVLP: classification, grounding, detection, report generation, retrieval, VQA.

Every function takes plain numpy arrays / torch tensors / Python lists and returns floats or dicts of
floats. Inner loops that are slow in plain Python (the tie-aware ranking of AUROC, the longest common
subsequence of ROUGE-L, the greedy box matching of detection AP) are compiled with numba.

Summary of the definitions (N samples, C classes):

* AUROC (per class): the probability that a random positive scores above a random negative, ties
  counted 1/2 — the Mann-Whitney statistic ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with
  ``R_pos`` the sum of mid-ranks of the positives. Labels ``-1`` (not mentioned) are ignored; a class
  with no positive or no negative has AUROC ``nan`` and is left out of the macro mean.
* Pointing game: a hit when the arg-max cell of a heat map lies inside one of the true boxes.
* Detection AP at an IoU threshold: predictions sorted by score, greedily matched to unmatched true
  boxes of the same image with IoU >= t; AP is the area under the all-point interpolated
  precision-recall curve (VOC 2010+). mAP averages over thresholds.
* BLEU-n (corpus level, Papineni et al. 2002): ``BP * exp(mean_{k<=n} log p_k)`` with clipped n-gram
  precisions ``p_k`` and brevity penalty ``BP = min(1, exp(1 - r / c))`` (``r`` the closest reference
  length, ``c`` the candidate length, both summed over the corpus).
* ROUGE-L (Lin 2004): ``F = (1 + b^2) P R / (R + b^2 P)`` with ``P = LCS / |cand|``, ``R = LCS / |ref|``,
  ``b = 1.2`` (as in the COCO caption toolkit), the best over references, averaged over samples.
* CIDEr-D (Vedantam et al. 2015): n-gram (n = 1..4) TF-IDF vectors with document frequencies over the
  references of the corpus; per n the mean over references of the clipped cosine times a Gaussian length
  penalty ``exp(-(|c| - |r|)^2 / (2 sigma^2))``, sigma = 6; averaged over n and multiplied by 10.
* Retrieval R@K: fraction of queries whose first correct item is among the K most similar.
* VQA: accuracy of exact (normalised) answers, split into closed (yes/no) and open questions.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

try:  # numba is a hard dependency of the package, but keep the module importable without it
    import numba

    _njit = numba.njit(cache=True, nogil=True)
except Exception:  # pragma: no cover - exercised only where numba is missing
    numba = None

    def _njit(fn):
        return fn

__all__ = [
    "auroc", "auroc_per_class", "pointing_game", "box_iou", "average_precision", "detection_map",
    "tokenize", "bleu", "rouge_l", "cider_d", "retrieval_recall", "vqa_accuracy", "mean_pairwise_cosine",
]

ArrayLike = Union[np.ndarray, Sequence, "torch.Tensor"]  # noqa: F821


def _np(x, dtype=None) -> np.ndarray:
    """Convert a tensor / list / array to a numpy array (tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------------
@_njit
def _auroc_sorted(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC. ``scores`` (n,) float64 sorted ascending, ``labels`` (n,) int64 in {0, 1}
    aligned with them. Ties share their mid-rank."""
    n = scores.shape[0]
    n_pos = 0
    for i in range(n):
        n_pos += labels[i]
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.nan
    rank_sum = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and scores[j + 1] == scores[i]:
            j += 1
        mid = 0.5 * (i + j) + 1.0  # 1-based mid-rank of the tie block i..j
        for k in range(i, j + 1):
            if labels[k] == 1:
                rank_sum += mid
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of one class.

    Args:
        scores: (N,) real scores (higher = more likely positive).
        labels: (N,) in {1, 0, -1}; ``-1`` entries (not mentioned / unknown) are ignored.
    Returns:
        AUROC in [0, 1], or ``nan`` when the kept labels lack a positive or a negative.
    """
    s = _np(scores, np.float64).reshape(-1)
    y = _np(labels).reshape(-1).astype(np.int64)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.shape[0]} and {y.shape[0]}")
    if np.any(~np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    if np.any((y != 0) & (y != 1) & (y != -1)):
        raise ValueError("labels must be 1 (positive), 0 (negative) or -1 (ignored)")
    keep = y >= 0
    s, y = s[keep], y[keep]
    order = np.argsort(s, kind="mergesort")
    return float(_auroc_sorted(np.ascontiguousarray(s[order]), np.ascontiguousarray(y[order])))


def auroc_per_class(scores: ArrayLike, labels: ArrayLike, names: Optional[Sequence[str]] = None) -> Dict:
    """Per-class and macro AUROC.

    Args:
        scores: (N, C) scores or probabilities.
        labels: (N, C) in {1, 0, -1} (-1 ignored).
        names: optional C class names (default ``"0".."C-1"``).
    Returns:
        ``{"per_class": {name: auroc or nan}, "macro": mean over defined classes (nan if none),
        "n_classes": number of classes with a defined AUROC}``.
    """
    s = _np(scores, np.float64)
    y = _np(labels)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"scores and labels must both be (N, C), got {s.shape} and {y.shape}")
    if names is None:
        names = [str(i) for i in range(s.shape[1])]
    if len(names) != s.shape[1]:
        raise ValueError(f"names has {len(names)} entries for {s.shape[1]} classes")
    per = {n: auroc(s[:, c], y[:, c]) for c, n in enumerate(names)}
    vals = [v for v in per.values() if not math.isnan(v)]
    return {"per_class": per, "macro": float(np.mean(vals)) if vals else float("nan"), "n_classes": len(vals)}


# ----------------------------------------------------------------------------------------------------
# grounding and detection
# ----------------------------------------------------------------------------------------------------
def pointing_game(heatmaps: ArrayLike, boxes: Sequence[Sequence[Sequence[float]]]) -> Dict[str, float]:
    """Pointing game accuracy.

    Args:
        heatmaps: (N, H, W) scores over the image, cell (i, j) covering the normalised rectangle
            ``[j/W, (j+1)/W] x [i/H, (i+1)/H]``.
        boxes: N lists of true boxes (x0, y0, x1, y1), normalised to [0, 1]; samples with no box are
            skipped.
    Returns:
        ``{"accuracy": hits / counted, "hits": ..., "count": ...}``. The point is the centre of the
        arg-max cell; a hit when it lies inside (inclusive) any true box of the sample.
    """
    h = _np(heatmaps, np.float64)
    if h.ndim != 3:
        raise ValueError(f"heatmaps must be (N, H, W), got shape {h.shape}")
    if len(boxes) != h.shape[0]:
        raise ValueError(f"boxes has {len(boxes)} entries for {h.shape[0]} heat maps")
    H, W = h.shape[1:]
    hits = count = 0
    for i in range(h.shape[0]):
        bs = boxes[i]
        if bs is None or len(bs) == 0:
            continue
        idx = int(np.argmax(h[i]))
        py, px = (idx // W + 0.5) / H, (idx % W + 0.5) / W
        count += 1
        hits += any(b[0] <= px <= b[2] and b[1] <= py <= b[3] for b in bs)
    return {"accuracy": hits / count if count else float("nan"), "hits": hits, "count": count}


def box_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """IoU matrix. ``a`` (M, 4), ``b`` (K, 4) in xyxy -> (M, K)."""
    a = _np(a, np.float64).reshape(-1, 4)
    b = _np(b, np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


@_njit
def _match(pred_img: np.ndarray, pred_boxes: np.ndarray, gt_img: np.ndarray, gt_boxes: np.ndarray,
           thr: float) -> np.ndarray:
    """Greedy matching of score-sorted predictions (P,) / (P, 4) to true boxes (G,) / (G, 4); returns
    (P,) 1 for a true positive, 0 for a false positive."""
    P = pred_boxes.shape[0]
    G = gt_boxes.shape[0]
    used = np.zeros(G, dtype=np.bool_)
    tp = np.zeros(P, dtype=np.int64)
    for p in range(P):
        best = -1.0
        best_g = -1
        ax0, ay0, ax1, ay1 = pred_boxes[p, 0], pred_boxes[p, 1], pred_boxes[p, 2], pred_boxes[p, 3]
        area_a = max(ax1 - ax0, 0.0) * max(ay1 - ay0, 0.0)
        for g in range(G):
            if gt_img[g] != pred_img[p] or used[g]:
                continue
            bx0, by0, bx1, by1 = gt_boxes[g, 0], gt_boxes[g, 1], gt_boxes[g, 2], gt_boxes[g, 3]
            iw = min(ax1, bx1) - max(ax0, bx0)
            ih = min(ay1, by1) - max(ay0, by0)
            if iw <= 0.0 or ih <= 0.0:
                continue
            inter = iw * ih
            union = area_a + max(bx1 - bx0, 0.0) * max(by1 - by0, 0.0) - inter
            iou = inter / union if union > 0 else 0.0
            if iou > best:
                best = iou
                best_g = g
        if best_g >= 0 and best >= thr:
            used[best_g] = True
            tp[p] = 1
    return tp


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP: ``sum_k (r_k - r_{k-1}) * max_{j >= k} p_j``. Inputs (P,), recall
    non-decreasing."""
    r = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    p = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    idx = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[idx + 1] - r[idx]) * p[idx + 1]))


def detection_map(predictions: Sequence[Tuple[int, float, Sequence[float]]],
                  ground_truth: Sequence[Tuple[int, Sequence[float]]],
                  iou_thresholds: Iterable[float] = (0.5,)) -> Dict[str, float]:
    """IoU-based mean average precision for one class.

    Args:
        predictions: list of ``(image_id, score, (x0, y0, x1, y1))``.
        ground_truth: list of ``(image_id, (x0, y0, x1, y1))``.
        iou_thresholds: thresholds t; a prediction is a true positive when it matches a not yet matched
            true box of the same image with IoU >= t.
    Returns:
        ``{"mAP": mean AP over thresholds, "AP@t": AP for each t}`` (``nan`` without true boxes).
    """
    thrs = [float(t) for t in iou_thresholds]
    if not thrs or any(not 0.0 < t <= 1.0 for t in thrs):
        raise ValueError(f"iou_thresholds must be non-empty values in (0, 1], got {thrs}")
    out: Dict[str, float] = {}
    G = len(ground_truth)
    gt_img = np.array([int(g[0]) for g in ground_truth], np.int64)
    gt_boxes = np.array([list(g[1]) for g in ground_truth], np.float64).reshape(-1, 4)
    preds = sorted(predictions, key=lambda p: -float(p[1]))
    pr_img = np.array([int(p[0]) for p in preds], np.int64)
    pr_boxes = np.array([list(p[2]) for p in preds], np.float64).reshape(-1, 4)
    for t in thrs:
        if G == 0:
            out[f"AP@{t:g}"] = float("nan")
            continue
        tp = _match(pr_img, pr_boxes, gt_img, gt_boxes, t).astype(np.float64)
        ctp = np.cumsum(tp)
        cfp = np.cumsum(1.0 - tp)
        rec = ctp / G
        prec = ctp / np.maximum(ctp + cfp, 1e-12)
        out[f"AP@{t:g}"] = average_precision(rec, prec) if len(preds) else 0.0
    vals = [v for v in out.values() if not math.isnan(v)]
    out["mAP"] = float(np.mean(vals)) if vals else float("nan")
    return out


# ----------------------------------------------------------------------------------------------------
# report generation
# ----------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> List[str]:
    """Lower-case word tokens (punctuation dropped), the normalisation used by every text metric here."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _as_refs(references) -> List[List[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def bleu(candidates: Sequence[str], references: Sequence[Union[str, Sequence[str]]], max_n: int = 4) -> Dict[str, float]:
    """Corpus BLEU-1..max_n.

    Args:
        candidates: N generated texts.
        references: N references, each a string or a list of strings.
    Returns:
        ``{"BLEU-1": ..., ..., "BLEU-max_n": ...}``; a zero clipped precision gives 0 for that order and
        every higher one.
    """
    refs = _as_refs(references)
    if len(candidates) != len(refs):
        raise ValueError(f"{len(candidates)} candidates but {len(refs)} references")
    match = np.zeros(max_n)
    total = np.zeros(max_n)
    c_len = r_len = 0
    for cand, rs in zip(candidates, refs):
        c = tokenize(cand)
        rt = [tokenize(r) for r in rs]
        c_len += len(c)
        # closest reference length, ties to the shorter one
        r_len += min((abs(len(r) - len(c)), len(r)) for r in rt)[1] if rt else 0
        for n in range(1, max_n + 1):
            cn = _ngrams(c, n)
            mx: Counter = Counter()
            for r in rt:
                for g, k in _ngrams(r, n).items():
                    mx[g] = max(mx[g], k)
            match[n - 1] += sum(min(k, mx[g]) for g, k in cn.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    bp = 1.0 if c_len > r_len else (math.exp(1.0 - r_len / c_len) if c_len > 0 else 0.0)
    out = {}
    logs = 0.0
    for n in range(1, max_n + 1):
        p = match[n - 1] / total[n - 1] if total[n - 1] > 0 else 0.0
        if p <= 0.0 or logs == -math.inf:
            logs = -math.inf
            out[f"BLEU-{n}"] = 0.0
        else:
            logs += math.log(p)
            out[f"BLEU-{n}"] = bp * math.exp(logs / n)
    return out


@_njit
def _lcs(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common subsequence of two int arrays, O(|a| |b|) time, O(|b|) memory."""
    m, n = a.shape[0], b.shape[0]
    prev = np.zeros(n + 1, np.int64)
    cur = np.zeros(n + 1, np.int64)
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            if a[i - 1] == b[j - 1]:
                cur[j] = prev[j - 1] + 1
            else:
                cur[j] = max(prev[j], cur[j - 1])
        for j in range(n + 1):
            prev[j] = cur[j]
            cur[j] = 0
    return prev[n]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length of two token lists."""
    vocab: Dict[str, int] = {}
    ia = np.array([vocab.setdefault(t, len(vocab)) for t in a], np.int64)
    ib = np.array([vocab.setdefault(t, len(vocab)) for t in b], np.int64)
    if ia.size == 0 or ib.size == 0:
        return 0
    return int(_lcs(ia, ib))


def rouge_l(candidates: Sequence[str], references: Sequence[Union[str, Sequence[str]]], beta: float = 1.2) -> float:
    """ROUGE-L F-measure averaged over samples (best over each sample's references)."""
    refs = _as_refs(references)
    if len(candidates) != len(refs):
        raise ValueError(f"{len(candidates)} candidates but {len(refs)} references")
    scores = []
    for cand, rs in zip(candidates, refs):
        c = tokenize(cand)
        best = 0.0
        for r in rs:
            rt = tokenize(r)
            lcs = lcs_length(c, rt)
            if lcs == 0:
                continue
            p, rc = lcs / len(c), lcs / len(rt)
            best = max(best, (1 + beta ** 2) * p * rc / (rc + beta ** 2 * p))
        scores.append(best)
    return float(np.mean(scores)) if scores else float("nan")


def cider_d(candidates: Sequence[str], references: Sequence[Union[str, Sequence[str]]], sigma: float = 6.0,
            max_n: int = 4) -> float:
    """Corpus CIDEr-D (document frequencies from the references of this corpus). See the module docstring."""
    refs = [[tokenize(r) for r in rs] for rs in _as_refs(references)]
    cands = [tokenize(c) for c in candidates]
    if len(cands) != len(refs):
        raise ValueError(f"{len(candidates)} candidates but {len(refs)} references")
    N = len(cands)
    if N == 0:
        return float("nan")
    df: List[Counter] = []
    for n in range(1, max_n + 1):
        d: Counter = Counter()
        for rs in refs:
            for g in set().union(*[set(_ngrams(r, n)) for r in rs]) if rs else ():
                d[g] += 1
        df.append(d)
    log_n = math.log(float(N))

    def vec(tokens, n):
        tf = _ngrams(tokens, n)
        v = {g: k * (log_n - math.log(max(1.0, df[n - 1][g]))) for g, k in tf.items()}
        norm = math.sqrt(sum(x * x for x in v.values()))
        return v, tf, norm

    total = 0.0
    for c, rs in zip(cands, refs):
        score = np.zeros(max_n)
        for n in range(1, max_n + 1):
            vc, tfc, nc = vec(c, n)
            for r in rs:
                vr, tfr, nr = vec(r, n)
                # clipped dot product: min of the candidate's and the reference's tf-idf per n-gram
                dot = sum(min(vc[g], vr[g]) * vr[g] for g in vc if g in vr)
                if nc > 0 and nr > 0:
                    pen = math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma ** 2))
                    score[n - 1] += pen * dot / (nc * nr)
            score[n - 1] /= max(len(rs), 1)
        total += float(np.mean(score)) * 10.0
    return total / N


# ----------------------------------------------------------------------------------------------------
# retrieval and VQA
# ----------------------------------------------------------------------------------------------------
def retrieval_recall(similarity: ArrayLike, query_ids: Optional[ArrayLike] = None,
                     item_ids: Optional[ArrayLike] = None, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Recall@K of a query-by-item similarity matrix.

    Args:
        similarity: (Q, M) scores, higher = more similar.
        query_ids, item_ids: (Q,) and (M,) group ids; item m is correct for query q when the ids are
            equal (default: the diagonal, ``query_ids = arange(Q)``, ``item_ids = arange(M)``).
        ks: the K values.
    Returns:
        ``{"R@K": fraction of queries with a correct item in the top K}`` (queries with no correct item
        are skipped).
    """
    s = _np(similarity, np.float64)
    if s.ndim != 2:
        raise ValueError(f"similarity must be (Q, M), got shape {s.shape}")
    q = np.arange(s.shape[0]) if query_ids is None else _np(query_ids).reshape(-1)
    m = np.arange(s.shape[1]) if item_ids is None else _np(item_ids).reshape(-1)
    if q.shape[0] != s.shape[0] or m.shape[0] != s.shape[1]:
        raise ValueError(f"query_ids/item_ids lengths {q.shape[0]}/{m.shape[0]} do not match similarity {s.shape}")
    correct = q[:, None] == m[None, :]
    keep = correct.any(1)
    s, correct = s[keep], correct[keep]
    # rank of the best correct item = number of items scoring strictly higher than it (optimistic
    # on ties would inflate recall: count ties above as well, except the item itself)
    best_correct = np.where(correct, s, -np.inf).max(1)
    rank = (s > best_correct[:, None]).sum(1) + ((s == best_correct[:, None]) & ~correct).sum(1)
    return {f"R@{k}": float(np.mean(rank < k)) if len(rank) else float("nan") for k in ks}


def _norm_answer(a: str) -> str:
    return " ".join(tokenize(str(a)))


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str], closed: Sequence[bool]) -> Dict[str, float]:
    """Exact-match VQA accuracy after normalisation (lower case, punctuation dropped).

    Args:
        predictions, answers: N answer strings.
        closed: N flags, True for closed (yes/no) questions.
    Returns:
        ``{"closed": ..., "open": ..., "overall": ..., "n_closed": ..., "n_open": ...}``.
    """
    if not (len(predictions) == len(answers) == len(closed)):
        raise ValueError(f"predictions ({len(predictions)}), answers ({len(answers)}) and closed "
                         f"({len(closed)}) must have the same length")
    ok = np.array([_norm_answer(p) == _norm_answer(a) for p, a in zip(predictions, answers)], bool)
    cl = np.asarray(closed, bool)

    def acc(m):
        return float(ok[m].mean()) if m.any() else float("nan")

    return {"closed": acc(cl), "open": acc(~cl), "overall": acc(np.ones_like(cl)),
            "n_closed": int(cl.sum()), "n_open": int((~cl).sum())}


def mean_pairwise_cosine(x: ArrayLike) -> float:
    """Mean cosine similarity between distinct rows of ``x`` (N, D) (the diagonal left out): near 1 when the
    embeddings have collapsed to one direction; NaN for fewer than two rows."""
    x = _np(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D (N, D) array, got shape {x.shape}")
    n = len(x)
    if n < 2:
        return float("nan")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = x @ x.T
    return float((s.sum() - np.trace(s)) / (n * (n - 1)))
