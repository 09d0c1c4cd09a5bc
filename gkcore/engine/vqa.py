"""A VQA question set generated from SynthCXR ground truth (entity labels, finding boxes, region boxes).

Three question kinds, answers drawn only from what the generator drew:

* closed "presence": ``"Is there {entity}?"`` -> ``"yes"`` for a present entity (label 1), ``"no"`` for
  an absent one (label 0); per image one of each when available, so the closed set is balanced.
* open "where": ``"Where is the {entity}?"`` -> the name of the anatomical region whose box has the
  highest IoU with the finding box (so the answer is the tightest region, e.g. a lung zone).
* open "what": ``"What abnormality is in the {region}?"`` -> the entity, for a region holding exactly one
  finding of the image.

VQA is then answer classification over the answers seen in training (see :func:`gkcore.engine.evaluate.vqa`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .metrics import box_iou

__all__ = ["VQAItem", "build_questions"]


@dataclass(frozen=True)
class VQAItem:
    index: int        #: sample index in the dataset
    question: str
    answer: str
    closed: bool      #: True for yes/no questions
    kind: str         #: "presence" | "where" | "what"


def build_questions(samples: Sequence, entity_names: Sequence[str], region_names: Sequence[str],
                    seed: int = 0, indices: Optional[Sequence[int]] = None) -> List[VQAItem]:
    """Questions for ``samples`` (each with ``entity_labels`` (E,), ``finding_boxes`` list of
    ``(entity_index, x0, y0, x1, y1)`` and ``region_boxes`` (29, 4) or None). ``indices`` restricts to
    those sample indices. Deterministic for a seed."""
    rng = random.Random(seed)
    out: List[VQAItem] = []
    idx = range(len(samples)) if indices is None else indices
    for i in idx:
        s = samples[i]
        labels = np.asarray(s.entity_labels).reshape(-1)
        if labels.shape[0] != len(entity_names):
            raise ValueError(f"sample {i} has {labels.shape[0]} entity labels, expected {len(entity_names)}")
        pos = [int(k) for k in np.nonzero(labels == 1)[0]]
        neg = [int(k) for k in np.nonzero(labels == 0)[0]]
        if pos:
            out.append(VQAItem(i, f"Is there {entity_names[rng.choice(pos)]}?", "yes", True, "presence"))
        if neg:
            out.append(VQAItem(i, f"Is there {entity_names[rng.choice(neg)]}?", "no", True, "presence"))
        fb = list(getattr(s, "finding_boxes", None) or [])
        rb = getattr(s, "region_boxes", None)
        if not fb or rb is None:
            continue
        rb = np.asarray(rb, np.float64).reshape(-1, 4)
        where = {}
        for f in fb:
            e, box = int(f[0]), [float(v) for v in f[1:5]]
            r = int(np.argmax(box_iou([box], rb)[0]))
            where.setdefault(r, []).append(e)
            out.append(VQAItem(i, f"Where is the {entity_names[e]}?", region_names[r], False, "where"))
        for r, es in where.items():
            if len(set(es)) == 1:
                out.append(VQAItem(i, f"What abnormality is in the {region_names[r]}?", entity_names[es[0]],
                                   False, "what"))
    return out
