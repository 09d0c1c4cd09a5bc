"""Metric code on cases worked out by hand (the arithmetic is in the comments), plus AUROC against sklearn."""
import math

import numpy as np
import pytest
import torch

from gkcore.engine import metrics as M


# ---------------------------------------------------------------- AUROC
def test_auroc_hand_case():
    # positives 0.35 and 0.8; negatives 0.1 and 0.4. Pairs won: (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3 of 4
    assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auroc_ties_and_ignored_labels():
    # one tie between a positive and a negative counts 1/2; the -1 entry (score 100) is ignored
    assert M.auroc([0.5, 0.5, 100.0], [0, 1, -1]) == pytest.approx(0.5)
    # pos {0.5, 0.9}, neg {0.5, 0.1}: pairs 0.5~0.5 -> 1/2, 0.5>0.1, 0.9>0.5, 0.9>0.1 -> 3.5/4
    assert M.auroc([0.5, 0.9, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert math.isnan(M.auroc([0.1, 0.2], [1, 1]))


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 200)
        s = np.round(rng.normal(size=200) + y * 0.7, 1)  # rounding makes many ties
        assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # torch input
    t = torch.tensor(s)
    assert M.auroc(t, torch.tensor(y)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_per_class_macro_skips_undefined():
    s = np.array([[0.1, 0.9, 0.3], [0.8, 0.2, 0.3], [0.7, 0.4, 0.3]])
    y = np.array([[0, 1, 1], [1, 0, 1], [1, -1, 1]])
    out = M.auroc_per_class(s, y, names=["a", "b", "c"])
    assert out["per_class"]["a"] == pytest.approx(1.0)  # negative 0.1 below both positives
    assert out["per_class"]["b"] == pytest.approx(1.0)  # 0.9 (pos) > 0.2 (neg); 0.4 ignored
    assert math.isnan(out["per_class"]["c"])            # no negative
    assert out["macro"] == pytest.approx(1.0) and out["n_classes"] == 2


def test_auroc_bad_inputs():
    with pytest.raises(ValueError, match="labels"):
        M.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="same length"):
        M.auroc([0.1, 0.2], [0])
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([float("nan"), 0.2], [0, 1])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        M.auroc_per_class(np.zeros((2, 3)), np.zeros((2, 2)))


# ---------------------------------------------------------------- grounding / detection
def test_pointing_game_hand_case():
    h = np.zeros((3, 2, 2))
    h[0, 0, 1] = 1.0  # arg-max cell row 0, col 1 -> point (x=0.75, y=0.25)
    h[1, 0, 1] = 1.0
    h[2, 1, 0] = 1.0
    boxes = [[(0.5, 0.0, 1.0, 0.5)],                         # contains (0.75, 0.25): hit
             [(0.0, 0.0, 0.5, 0.5), (0.0, 0.5, 1.0, 1.0)],   # neither box: miss
             []]                                             # no box: not counted
    out = M.pointing_game(h, boxes)
    assert out == {"accuracy": 0.5, "hits": 1, "count": 2}


def test_box_iou():
    iou = M.box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    np.testing.assert_allclose(iou, [[1 / 7, 1.0, 0.0]])


def test_detection_map_hand_case():
    gt = [(0, (0, 0, 1, 1)), (1, (0, 0, 1, 1))]
    preds = [(0, 0.9, (0, 0, 1, 1)),      # TP
             (0, 0.8, (0, 0, 1, 1)),      # duplicate -> FP
             (1, 0.7, (0, 0, 0.5, 1))]    # IoU 0.5: TP at t=0.5, FP at t=0.75
    out = M.detection_map(preds, gt, iou_thresholds=(0.5, 0.75))
    # t=0.5: recall [.5,.5,1], precision [1,.5,2/3] -> AP = .5*1 + .5*(2/3)
    assert out["AP@0.5"] == pytest.approx(0.5 + 1 / 3)
    # t=0.75: recall stays at .5 with precision 1 first -> AP = .5
    assert out["AP@0.75"] == pytest.approx(0.5)
    assert out["mAP"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 2)
    with pytest.raises(ValueError, match="iou_thresholds"):
        M.detection_map(preds, gt, iou_thresholds=(0.0,))


# ---------------------------------------------------------------- text
def test_bleu_hand_case():
    out = M.bleu(["The cat sat on the mat."], ["the cat is on the mat"])
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3, equal lengths -> BP = 1
    assert out["BLEU-1"] == pytest.approx(5 / 6)
    assert out["BLEU-2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert out["BLEU-3"] == pytest.approx(0.5)
    assert out["BLEU-4"] == 0.0


def test_bleu_brevity_penalty_and_multi_refs():
    out = M.bleu(["the cat"], [["the cat sat on mat", "a dog"]])
    # closest reference length: |2-5|=3 vs |2-2|=0 -> r = 2 (a dog), so BP = 1 and p1 = 1
    assert out["BLEU-1"] == pytest.approx(1.0)
    out = M.bleu(["the cat"], ["the cat sat on mat"])
    assert out["BLEU-1"] == pytest.approx(math.exp(1 - 5 / 2))


def test_rouge_l_hand_case():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5, P = R = 5/6 -> F = 5/6
    assert M.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # LCS(a b c, a c d e) = 2: P = 2/3, R = 1/2, F = 2.44 * (1/3) / (1/2 + 1.44 * 2/3)
    f = 2.44 * (2 / 3) * 0.5 / (0.5 + 1.44 * 2 / 3)
    assert M.rouge_l(["a b c"], ["a c d e"]) == pytest.approx(f)
    assert M.lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook example


def test_cider_d_hand_case():
    # two images with disjoint vocabularies: every n-gram has df = 1 < N = 2, identical candidates give
    # cosine 1 for n = 1, 2 and nothing for n = 3, 4 (two-word texts) -> 10 * (1 + 1 + 0 + 0) / 4 = 5
    assert M.cider_d(["a b", "c d"], ["a b", "c d"]) == pytest.approx(5.0)
    # swapped candidates share nothing with their references
    assert M.cider_d(["c d", "a b"], ["a b", "c d"]) == pytest.approx(0.0)
    # a word in every reference has idf log(2/2) = 0 and contributes nothing
    assert M.cider_d(["x a", "x c"], ["x a", "x c"]) == pytest.approx(10 * (1 + 1) / 4)


# ---------------------------------------------------------------- retrieval / VQA
def test_retrieval_recall_hand_case():
    s = np.array([[0.9, 0.1, 0.2], [0.8, 0.3, 0.1], [0.1, 0.2, 0.3]])
    out = M.retrieval_recall(s, ks=(1, 2))
    # ranks of the correct items: 0, 1 (0.8 above 0.3), 0
    assert out == {"R@1": pytest.approx(2 / 3), "R@2": 1.0}
    # group ids: query 1 also accepts item 0 -> rank 0
    out = M.retrieval_recall(s, query_ids=[0, 0, 2], item_ids=[0, 1, 2], ks=(1,))
    assert out["R@1"] == 1.0
    # a tie with a wrong item counts against the query
    assert M.retrieval_recall(np.array([[0.5, 0.5]]), ks=(1,))["R@1"] == 0.0


def test_vqa_accuracy():
    out = M.vqa_accuracy(["Yes", "no", "left lung", "heart"], ["yes", "yes", "Left lung.", "spine"],
                         [True, True, False, False])
    assert out["closed"] == 0.5 and out["open"] == 0.5 and out["overall"] == 0.5
    assert out["n_closed"] == 2 and out["n_open"] == 2
    with pytest.raises(ValueError, match="same length"):
        M.vqa_accuracy(["a"], [], [True])
