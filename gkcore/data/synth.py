"""Synthetic chest X-rays with known ground truth (the built-in demo data).

:func:`generate` draws PA-view radiograph-like grey images with numpy: body outline, lungs with vessel
markings, heart, mediastinum, trachea and carina, aortic knob, spine, ribs, clavicles, hemidiaphragms,
a gastric bubble; then per-patient findings from the entity vocabulary (:mod:`gkcore.data.knowledge`)
placed in plausible regions; then acquisition effects (contrast, gamma, brightness, low-frequency
illumination, blur, noise). For every image it records

- the 29 Chest ImaGenome region boxes, derived from the anatomy actually drawn (they move with each
  patient's anatomy and with the acquisition shift/scale),
- the findings with their boxes (normalised xyxy, image frame),
- a report (FINDINGS + IMPRESSION) written from the findings, with varied phrasing, negations,
  uncertainty and region mentions, and
- entity labels 1 / 0 / -1 (present / absent / not mentioned) for what that report states
  (:func:`labels_from_statements`): drawn findings are 1 even where the report hedges ("possible ...";
  CheXpert's U-ones convention, as :func:`gkcore.data.reports.label_report` does by default), parents
  follow their children (consolidation -> lung opacity, rib fracture -> fracture, a catheter -> support
  devices, ...), negated findings are 0, and "no finding" is 1 when no pathology is present. The
  phrasing is kept plain enough that the rule-based labeller of :mod:`gkcore.data.reports` gives the
  same labels (checked in tests/test_synth.py).

Conventions: image coordinates x to the right, y down, normalised to [0, 1]; a PA view, so the patient's
right lung is on the image's left. Output: ``images/NNNNNNN.png`` (8-bit grey) plus ``metadata.jsonl``
(one JSON record per image) and ``synth.json`` (the generator settings and vocabularies).

Determinism: every image has its own random streams seeded by ``(seed, index)``, so image ``i`` is the
same whatever ``n`` is (a set of ``n`` images is a prefix of a larger set with the same seed). About one
image in ten is a second view of the previous image's study (same patient, findings and report, a
different acquisition); both carry the same ``study_id``.

:class:`SynthCXR` reads such a folder as a sequence of :class:`~gkcore.data.sample.Sample` records.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .knowledge import ENTITY_NAMES, REGION_INDEX, REGIONS, entity_index
from .sample import Sample

__all__ = ["generate", "render", "SynthCXR", "labels_from_statements", "study_starts", "PARENTS", "FINDING_TYPES",
           "MIN_SIZE", "MAX_SIZE"]

MIN_SIZE, MAX_SIZE = 64, 2048
FOLLOW_UP_PROB = 0.1
META_FILE, HEADER_FILE, IMAGE_DIR = "metadata.jsonl", "synth.json", "images"
FORMAT_VERSION = 1

Box = Tuple[float, float, float, float]


# ============================================================================== labels
#: child -> (parent, whether a negated child also negates the parent): a finding also labels its parent
#: observation (as CheXpert's hierarchy and :func:`gkcore.data.reports.label_report` do).
PARENTS: Tuple[Tuple[str, str, bool], ...] = (
    ("rib fracture", "fracture", True), ("clavicle fracture", "fracture", True),
    ("nodule", "lung lesion", False), ("mass", "lung lesion", False), ("cavity", "lung lesion", False),
    ("consolidation", "lung opacity", False), ("atelectasis", "lung opacity", False),
    ("edema", "lung opacity", False), ("pneumonia", "lung opacity", False),
    ("infiltration", "lung opacity", False), ("interstitial opacity", "lung opacity", False),
    ("ground glass opacity", "lung opacity", False),
    ("cardiomegaly", "enlarged cardiomediastinum", False), ("widened mediastinum", "enlarged cardiomediastinum", False),
    ("calcified granuloma", "granuloma", True), ("pleural thickening", "pleural other", False),
    ("hydropneumothorax", "pneumothorax", False), ("hydropneumothorax", "pleural effusion", False),
    ("endotracheal tube", "support devices", False), ("central venous catheter", "support devices", False),
    ("nasogastric tube", "support devices", False), ("pacemaker", "support devices", False),
    ("sternotomy wires", "support devices", False), ("chest tube", "support devices", False),
)
_DEVICE_ENTITIES = ("endotracheal tube", "central venous catheter", "nasogastric tube", "pacemaker",
                    "sternotomy wires", "chest tube")
_NOT_PATHOLOGY = {"no finding", "support devices", *_DEVICE_ENTITIES}


def labels_from_statements(statements: Dict[str, int]) -> np.ndarray:
    """Entity labels (E,) int64 from what a report states: ``statements`` maps entity name -> 1 (affirmed,
    including uncertain mentions: the "U-ones" convention, since -1 means "not mentioned") or 0 (negated).
    Parents are added (:data:`PARENTS`: affirmed children always, negated ones where marked); affirmed wins
    over negated; "no finding" is 1 when no pathology (support devices aside) is affirmed, else 0."""
    state: Dict[str, set] = {k: {int(v)} for k, v in statements.items()}
    for child, parent, neg in PARENTS:
        if child in state:
            st = set(state[child]) if neg else state[child] - {0}
            if st:
                state.setdefault(parent, set()).update(st)
    lab = np.full(len(ENTITY_NAMES), -1, np.int64)
    for name, st in state.items():
        lab[entity_index(name)] = 1 if 1 in st else 0
    lab[entity_index("no finding")] = 0 if any(
        lab[i] == 1 for i, n in enumerate(ENTITY_NAMES) if n not in _NOT_PATHOLOGY) else 1
    return lab


# ============================================================================== drawing helpers
def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _seg_dist(X, Y, x0, y0, x1, y1):
    """Distance of every grid point to the segment (x0,y0)-(x1,y1), and the position t in [0,1] along it."""
    dx, dy = x1 - x0, y1 - y0
    L2 = dx * dx + dy * dy + 1e-12
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / L2, 0.0, 1.0)
    return np.hypot(X - (x0 + t * dx), Y - (y0 + t * dy)), t


def _smooth_noise(rng, shape, cells):
    """Low-frequency noise (H, W) in about [-1, 1]: a (cells x cells) normal grid, bilinearly upsampled."""
    from PIL import Image

    g = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    z = np.asarray(Image.fromarray(g, mode="F").resize((shape[1], shape[0]), Image.BILINEAR))
    return z / 1.5


class _Canvas:
    """The density map being drawn, in patient coordinates.

    ``X``, ``Y`` (S, S) are the patient-frame coordinates of each pixel centre (the acquisition maps
    patient coordinates p to image coordinates u = (p - 0.5) * scale + 0.5 + shift). ``crop(box)``
    gives the pixel slices covering a patient-frame box so local shapes are drawn on a window only.
    """

    def __init__(self, size: int, scale: float, shift: Tuple[float, float]):
        self.S = size
        self.scale, self.shift = scale, shift
        u = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.xs = (u - 0.5 - shift[0]) / scale + 0.5  # patient x of each column
        self.ys = (u - 0.5 - shift[1]) / scale + 0.5  # patient y of each row
        self.X = np.broadcast_to(self.xs[None, :], (size, size))
        self.Y = np.broadcast_to(self.ys[:, None], (size, size))
        self.D = np.zeros((size, size), np.float32)

    def to_image(self, box: Sequence[float]) -> Box:
        """Patient-frame box -> image-frame normalised box, clipped to [0, 1]."""
        x0, y0, x1, y1 = box
        sx, sy = self.shift
        c = lambda v, s: float(np.clip((v - 0.5) * self.scale + 0.5 + s, 0.0, 1.0))  # noqa: E731
        return (c(x0, sx), c(y0, sy), c(x1, sx), c(y1, sy))

    def crop(self, box: Sequence[float]):
        x0, y0, x1, y1 = box
        c0, c1 = np.searchsorted(self.xs, [x0, x1])
        r0, r1 = np.searchsorted(self.ys, [y0, y1])
        return slice(int(r0), int(max(r1, r0 + 1))), slice(int(c0), int(max(c1, c0 + 1)))

    def grid(self, sl):
        return self.X[sl], self.Y[sl]


def _mask_box(mask: np.ndarray) -> Optional[Box]:
    """Image-frame normalised box of the True pixels of an (S, S) mask, or None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    S = mask.shape[0]
    return (cols[0] / S, rows[0] / S, (cols[-1] + 1) / S, (rows[-1] + 1) / S)


def _box_union(*boxes: Box) -> Box:
    b = np.array(boxes, np.float64)
    return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))


def _contains(box: Box, x: float, y: float, pad: float = 0.0) -> bool:
    return box[0] - pad <= x <= box[2] + pad and box[1] - pad <= y <= box[3] + pad


def _area(b: Box) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


# ============================================================================== the patient
@dataclass
class _Patient:
    cx: float
    tw: float           # lateral lung edge distance from the midline (half thoracic width)
    top: float          # lung apex level
    base: Dict[str, float]  # costophrenic angle level per side ("R", "L")
    dome: Dict[str, float]  # height of each hemidiaphragm dome above its costophrenic angle
    mw: float           # upper mediastinum half width
    ctr: float          # cardiothoracic ratio
    heart_h: float
    carina: float
    scoliosis: float = 0.0
    aorta_r: float = 0.03
    hilum_r: Dict[str, float] = field(default_factory=lambda: {"R": 0.03, "L": 0.03})
    hyper: bool = False

    def side_sign(self, side: str) -> float:
        return -1.0 if side == "R" else 1.0  # patient's right on the image's left


def _draw_patient(rng) -> _Patient:
    base_l = rng.uniform(0.74, 0.80)
    return _Patient(
        cx=0.5 + rng.normal(0, 0.012),
        tw=rng.uniform(0.34, 0.40),
        top=rng.uniform(0.12, 0.17),
        base={"L": base_l, "R": base_l - rng.uniform(0.0, 0.03)},
        dome={"L": rng.uniform(0.05, 0.075), "R": rng.uniform(0.055, 0.08)},
        mw=rng.uniform(0.05, 0.065),
        ctr=rng.uniform(0.39, 0.47),
        heart_h=rng.uniform(0.22, 0.26),
        carina=0.0,  # set below
    )


class _Anatomy:
    """Geometry of one patient (patient frame): lung masks, heart, diaphragm, bones, and region boxes."""

    def __init__(self, p: _Patient):
        self.p = p
        self.hw = p.ctr * 2 * p.tw / 2.0  # heart half width
        self.hx = p.cx + 0.2 * 2 * self.hw  # about 30 % of the heart right of the midline, 70 % left
        low = min(p.base["L"] - p.dome["L"], p.base["R"] - p.dome["R"])
        self.hbot = p.base["L"] - p.dome["L"] + 0.035
        self.hh = p.heart_h / 2.0
        self.hy = self.hbot - self.hh
        self.htop = self.hy - self.hh
        self.dome_top = low
        if not p.carina:
            p.carina = p.top + 0.15

    # -- lungs
    def lung_edges(self, side: str, y):
        """(t, inner x, outer x) for rows y of one lung (x increasing from the image left)."""
        p = self.p
        s = p.side_sign(side)
        xm = p.cx + s * p.mw
        xl = p.cx + s * p.tw
        xa = xm + s * 0.38 * abs(xl - xm)
        H = p.base[side] - p.top
        t = (y - p.top) / H
        g = np.sqrt(np.clip(t / 0.32, 0.0, 1.0))
        bow = 1.0 + 0.04 * np.sin(np.pi * np.clip(t, 0, 1))
        a = xa + (xm - xa) * g
        b = xa + (xl - xa) * g * bow
        return t, np.minimum(a, b), np.maximum(a, b)

    def diaphragm_y(self, side: str, x):
        """The hemidiaphragm contour (patient frame) over x."""
        p = self.p
        s = p.side_sign(side)
        xl = p.cx + s * p.tw
        W = abs(p.tw - p.mw)
        u = np.clip(np.abs(x - xl) / W, 0.0, 1.0)  # 0 lateral (costophrenic angle) .. 1 medial
        return p.base[side] - p.dome[side] * np.sin(0.5 * np.pi * np.clip(u / 0.6, 0.0, 1.0))

    def heart_field(self, X, Y):
        """Heart ellipse field: < 1 inside."""
        dx = (X - self.hx) / self.hw
        dy = (Y - self.hy) / self.hh
        return dx * dx + dy * dy

    def lung_mask(self, side: str, X, Y, hf=None):
        t, a, b = self.lung_edges(side, Y)
        m = (t >= 0) & (X >= a) & (X <= b) & (Y <= self.diaphragm_y(side, X))
        return m & ((self.heart_field(X, Y) if hf is None else hf) > 1.0)

    def lung_soft(self, side: str, X, Y, px: float, hf=None):
        """Lung mask with about one-pixel soft edges (float32 in [0, 1])."""
        t, a, b = self.lung_edges(side, Y)
        e = 1.2 * px
        m = _smoothstep(-e, e, X - a) * _smoothstep(-e, e, b - X)
        m = m * _smoothstep(-e, e, self.diaphragm_y(side, X) - Y) * (t >= 0)
        hf = self.heart_field(X, Y) if hf is None else hf
        return (m * _smoothstep(1.0, 1.08, hf)).astype(np.float32)

    def hilum(self, side: str) -> Tuple[float, float]:
        p = self.p
        s = p.side_sign(side)
        y = p.top + 0.42 * (p.base[side] - p.top)
        return p.cx + s * (p.mw + 0.035), y

    def spine_x(self, y):
        p = self.p
        return p.cx + p.scoliosis * np.sin(np.pi * (y - 0.1) / 0.8)

    def clavicle(self, side: str):
        p = self.p
        s = p.side_sign(side)
        return (p.cx + s * 0.035, p.top + 0.055, p.cx + s * (p.tw * 0.78), p.top - 0.03)

    def aorta(self):
        p = self.p
        return p.cx + p.mw * 0.9, p.carina - 0.035, p.aorta_r


# ============================================================================== region boxes
def _region_boxes(an: _Anatomy, cv: _Canvas, lung_masks: Dict[str, np.ndarray]) -> np.ndarray:
    """(29, 4) float32 normalised xyxy in the image frame, in REGIONS order."""
    p = an.p
    S = cv.S
    out: Dict[str, Box] = {}
    for side, name in (("R", "right"), ("L", "left")):
        m = lung_masks[side]
        lb = _mask_box(m)
        out[f"{name} lung"] = lb
        y0, y1 = lb[1], lb[3]
        h = y1 - y0
        rows = (np.arange(S) + 0.5) / S

        def band(a, b, m=m):
            sel = (rows >= a) & (rows < b)
            mm = m & sel[:, None]
            bx = _mask_box(mm)
            return bx if bx is not None else (lb[0], a, lb[2], b)

        out[f"{name} upper lung zone"] = band(y0, y0 + h / 3)
        out[f"{name} mid lung zone"] = band(y0 + h / 3, y0 + 2 * h / 3)
        out[f"{name} lower lung zone"] = band(y0 + 2 * h / 3, y1 + 1.0)
        out[f"{name} apical zone"] = band(y0, y0 + 0.2 * h)
        s = p.side_sign(side)
        hx, hy = an.hilum(side)
        hr = max(p.hilum_r[side], 0.03)
        out[f"{name} hilar structures"] = cv.to_image(
            (min(hx - hr - 0.02, hx + s * (hr + 0.04)), hy - hr - 0.035,
             max(hx + hr + 0.02, hx + s * (hr + 0.04)), hy + hr + 0.035))
        xl = p.cx + s * p.tw
        yb = p.base[side]
        out[f"{name} costophrenic angle"] = cv.to_image(
            (min(xl - s * 0.08, xl + s * 0.015), yb - 0.075, max(xl - s * 0.08, xl + s * 0.015), yb + 0.015))
        xm = p.cx + s * p.mw
        out[f"{name} hemidiaphragm"] = cv.to_image(
            (min(xl, xm) - 0.01, yb - p.dome[side] - 0.02, max(xl, xm) + 0.01, yb + 0.02))
        c = an.clavicle(side)
        out[f"{name} clavicle"] = cv.to_image((min(c[0], c[2]) - 0.005, min(c[1], c[3]) - 0.02,
                                               max(c[0], c[2]) + 0.005, max(c[1], c[3]) + 0.02))
    tx = float(an.spine_x(p.carina * 0.5))
    out["trachea"] = cv.to_image((tx - 0.025, 0.03, tx + 0.025, p.carina + 0.01))
    ys = np.linspace(0.02, 0.97, 50)
    sx = an.spine_x(ys)
    out["spine"] = cv.to_image((float(sx.min()) - 0.04, 0.02, float(sx.max()) + 0.04, 0.97))
    ax, ay, ar = an.aorta()
    out["aortic arch"] = cv.to_image((ax - ar - 0.015, ay - ar - 0.01, ax + ar + 0.01, ay + ar + 0.015))
    hb = (an.hx - an.hw, an.htop, an.hx + an.hw, an.hbot)
    out["cardiac silhouette"] = cv.to_image(hb)
    um = (p.cx - p.mw - 0.01, p.top - 0.03, max(p.cx + p.mw + 0.01, ax + ar), an.htop + 0.02)
    out["upper mediastinum"] = cv.to_image(um)
    out["mediastinum"] = cv.to_image(_box_union(um, (min(hb[0], um[0]), um[1], max(hb[2], um[2]), hb[3])))
    out["svc"] = cv.to_image((p.cx - p.mw - 0.012, p.carina - 0.06, p.cx - 0.012, an.htop + 0.03))
    rb = an.hx - an.hw  # right heart border (image left)
    out["cavoatrial junction"] = cv.to_image((rb - 0.02, an.htop - 0.01, rb + 0.05, an.htop + 0.06))
    out["right atrium"] = cv.to_image((rb - 0.01, an.hy - 0.6 * an.hh, rb + 0.42 * an.hw * 2 * 0.5, an.hbot - 0.01))
    out["carina"] = cv.to_image((tx - 0.035, p.carina - 0.025, tx + 0.035, p.carina + 0.03))
    out["abdomen"] = cv.to_image((p.cx - p.tw - 0.04, an.dome_top + 0.02, p.cx + p.tw + 0.04, 1.0))
    boxes = np.array([out[r] for r in REGIONS], np.float32)
    boxes = np.clip(boxes, 0.0, 1.0)
    boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0] + 1.0 / cv.S)
    boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1] + 1.0 / cv.S)
    return np.clip(boxes, 0.0, 1.0)


# ============================================================================== findings
# finding type -> relative weight (its prevalence among abnormal images; 1-3 types per abnormal image)
FINDING_TYPES: Dict[str, float] = {
    "cardiomegaly": 0.13,
    "pleural effusion": 0.13,
    "consolidation": 0.12,
    "atelectasis": 0.09,
    "pneumothorax": 0.08,
    "nodule": 0.08,
    "mass": 0.04,
    "edema": 0.06,
    "lung opacity": 0.06,
    "widened mediastinum": 0.04,
    "device": 0.10,
    "fracture": 0.04,
    "elevated hemidiaphragm": 0.03,
    "emphysema": 0.03,
    "low lung volumes": 0.02,
    "scoliosis": 0.03,
    "calcified granuloma": 0.03,
    "hilar enlargement": 0.03,
    "pleural thickening": 0.02,
    "pneumoperitoneum": 0.015,
    "cavity": 0.02,
    "interstitial opacity": 0.03,
    "tortuous aorta": 0.03,
    "hernia": 0.02,
}

# Findings whose anatomy changes must be known before drawing (they modify the patient).
_ANATOMY_FINDINGS = {"cardiomegaly", "emphysema", "low lung volumes", "scoliosis", "elevated hemidiaphragm",
                     "widened mediastinum", "tortuous aorta", "hilar enlargement"}

_SIDE = {"R": "right", "L": "left"}


def _choose_findings(rng) -> List[dict]:
    """Finding specs for one patient: none (about 28 %) or 1-3 distinct types, with sides and options."""
    if rng.random() < 0.28:
        return []
    k = 1 + int(rng.random() < 0.45) + int(rng.random() < 0.2)
    names = list(FINDING_TYPES)
    w = np.array([FINDING_TYPES[n] for n in names])
    pick = rng.choice(len(names), size=k, replace=False, p=w / w.sum())
    chosen = [names[i] for i in sorted(pick)]
    if "emphysema" in chosen and "low lung volumes" in chosen:
        chosen.remove("low lung volumes")
    specs = []
    for name in chosen:
        side = "R" if rng.random() < 0.5 else "L"
        specs.append({"type": name, "side": side, "bilateral": bool(rng.random() < 0.25),
                      "uncertain": bool(rng.random() < 0.12), "u": float(rng.random()),
                      "v": float(rng.random()), "w": float(rng.random())})
    return specs


def _apply_anatomy_findings(p: _Patient, specs: List[dict], rng):
    for f in specs:
        t = f["type"]
        if t == "cardiomegaly":
            p.ctr = 0.58 + 0.1 * f["u"]
            p.heart_h *= 1.12
        elif t == "emphysema":
            p.hyper = True
            p.top -= 0.02
            for s in "RL":
                p.base[s] += 0.05
                p.dome[s] = 0.02
        elif t == "low lung volumes":
            for s in "RL":
                p.base[s] -= 0.07
                p.dome[s] += 0.01
        elif t == "scoliosis":
            p.scoliosis = (0.035 + 0.03 * f["u"]) * (1 if f["v"] < 0.5 else -1)
        elif t == "elevated hemidiaphragm":
            p.base[f["side"]] -= 0.08 + 0.04 * f["u"]
            p.dome[f["side"]] += 0.02
        elif t == "widened mediastinum":
            p.mw += 0.035 + 0.02 * f["u"]
        elif t == "tortuous aorta":
            p.aorta_r = 0.045 + 0.01 * f["u"]
        elif t == "hilar enlargement":
            sides = "RL" if f["bilateral"] else f["side"]
            for s in sides:
                p.hilum_r[s] = 0.055 + 0.015 * f["u"]


# ============================================================================== rendering
@dataclass
class _Finding:
    type: str
    entities: List[str]
    boxes: List[Box]
    region: str
    side: Optional[str]
    uncertain: bool
    detail: dict = field(default_factory=dict)


def _pick_point(rng, mask: np.ndarray, cv: _Canvas) -> Tuple[float, float]:
    """A random pixel of ``mask`` -> its patient-frame (x, y)."""
    idx = np.flatnonzero(mask.ravel())
    if idx.size == 0:
        raise RuntimeError("internal: empty placement mask")
    k = int(idx[rng.integers(idx.size)])
    r, c = divmod(k, cv.S)
    return float(cv.xs[c]), float(cv.ys[r])


def _zone_mask(lm: np.ndarray, zone: str) -> np.ndarray:
    rows = np.flatnonzero(lm.any(axis=1))
    y0, y1 = rows[0], rows[-1] + 1
    h = y1 - y0
    a, b = {"upper": (0.12, 0.33), "mid": (0.36, 0.64), "lower": (0.67, 0.9), "any": (0.15, 0.85)}[zone]
    m = np.zeros_like(lm)
    m[int(y0 + a * h):int(y0 + b * h)] = True
    return lm & m


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels of ``mask`` farther than ``r`` pixels from its outside."""
    if r <= 0:
        return mask
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(mask) > r


def _blob(cv: _Canvas, rng, x, y, r, irregular=0.25, soft=0.35):
    """A soft irregular blob (slice, field in [0, 1]) centred at patient (x, y), radius r."""
    sl = cv.crop((x - 1.6 * r, y - 1.6 * r, x + 1.6 * r, y + 1.6 * r))
    X, Y = cv.grid(sl)
    th = np.arctan2(Y - y, X - x)
    k = rng.uniform(0, 2 * np.pi, 3)
    rr = r * (1 + irregular * (0.5 * np.sin(2 * th + k[0]) + 0.3 * np.sin(3 * th + k[1]) + 0.2 * np.sin(5 * th + k[2])))
    d = np.hypot(X - x, Y - y) / rr
    return sl, _smoothstep(1.0, 1.0 - soft, d).astype(np.float32)


def _region_for(point: Tuple[float, float], candidates: Sequence[str], boxes: np.ndarray) -> str:
    """Smallest candidate region whose box contains the image-frame point (falls back to the nearest)."""
    x, y = point
    best, best_a = None, 9.0
    for r in candidates:
        b = tuple(boxes[REGION_INDEX[r]])
        if _contains(b, x, y) and _area(b) < best_a:
            best, best_a = r, _area(b)
    if best is None:
        d = [(abs(x - (boxes[REGION_INDEX[r]][0] + boxes[REGION_INDEX[r]][2]) / 2)
              + abs(y - (boxes[REGION_INDEX[r]][1] + boxes[REGION_INDEX[r]][3]) / 2), r) for r in candidates]
        best = min(d)[1]
    return best


def _center(b: Box) -> Tuple[float, float]:
    return (0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3]))


def _zones(side):
    n = _SIDE[side]
    return [f"{n} lung", f"{n} upper lung zone", f"{n} mid lung zone", f"{n} lower lung zone",
            f"{n} apical zone", f"{n} costophrenic angle", f"{n} hilar structures"]


def render(size: int, patient_seed, acq_seed, findings: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, dict]:
    """Draw one image.

    Args:
        size: image side S in pixels.
        patient_seed, acq_seed: seeds (anything ``np.random.default_rng`` accepts) of the patient
            (anatomy, findings, report) and of the acquisition (shift, scale, contrast, noise).
        findings: None draws the patient's own random findings; a list of names from
            :data:`FINDING_TYPES` (possibly empty) replaces them, keeping the same anatomy and acquisition
            (used to see what a finding changes).

    Returns:
        ``(image, record)``: uint8 array (S, S) and a dict with ``region_boxes`` (29, 4) float32
        (normalised xyxy, image frame), ``findings`` (list of finding objects with ``type``, ``entities``,
        ``boxes`` (normalised xyxy), ``region``, ``side``, ``uncertain``), the report
        (``findings_text``, ``impression_text``, ``report``) and ``labels`` int64 (E,).
    """
    prng = np.random.default_rng(patient_seed)
    arng = np.random.default_rng(acq_seed)
    S = int(size)
    p = _draw_patient(prng)
    specs = _choose_findings(prng)
    if findings is not None:
        unknown = [f for f in findings if f not in FINDING_TYPES]
        if unknown:
            raise ValueError(f"findings: unknown finding types {unknown}; expected names from {list(FINDING_TYPES)}")
        frng = np.random.default_rng(prng.integers(2**63))
        specs = [{"type": t, "side": "R" if frng.random() < 0.5 else "L", "bilateral": bool(frng.random() < 0.25),
                  "uncertain": False, "u": float(frng.random()), "v": float(frng.random()),
                  "w": float(frng.random())} for t in dict.fromkeys(findings)]
    else:
        prng.integers(2**63)  # keep the streams aligned with the forced case
    _apply_anatomy_findings(p, specs, prng)
    an = _Anatomy(p)
    scale = arng.uniform(0.93, 1.04)
    shift = (arng.normal(0, 0.015), arng.normal(0, 0.02))
    cv = _Canvas(S, scale, shift)
    px = 1.0 / (S * scale)
    X, Y = cv.X, cv.Y
    D = cv.D
    draw_rng = np.random.default_rng(prng.integers(2**63))  # patient-specific texture details

    # ---- body, neck and shoulders
    bw = p.tw + 0.085
    ax = np.abs(X - p.cx)
    torso = _smoothstep(bw + 0.01, bw - 0.01, ax) * _smoothstep(p.top - 0.1, p.top - 0.04, Y)
    shoulder = _smoothstep(1.05, 0.95, (ax / (bw + 0.04)) ** 2 + ((p.top + 0.02 - Y) / 0.16) ** 2)
    shoulder *= Y < p.top + 0.02
    neck = _smoothstep(0.09, 0.075, ax)
    body = np.maximum(np.maximum(torso, shoulder), neck)
    D += 0.52 * body
    # abdomen below the diaphragm (denser), gastric bubble under the left hemidiaphragm
    dia = np.where(X < p.cx, an.diaphragm_y("R", X), an.diaphragm_y("L", X))
    D += 0.1 * _smoothstep(0.0, 0.04, Y - dia) * body
    gx, gy = p.cx + 0.5 * p.tw, p.base["L"] - 0.3 * p.dome["L"] + 0.05
    sl = cv.crop((gx - 0.08, gy - 0.05, gx + 0.08, gy + 0.05))
    Xs, Ys = cv.grid(sl)
    D[sl] -= 0.16 * _smoothstep(1.1, 0.8, ((Xs - gx) / 0.055) ** 2 + ((Ys - gy) / 0.03) ** 2) * (Ys > dia[sl] + 0.01)

    # ---- lungs
    hf = an.heart_field(X, Y)
    an.hf = hf
    lung_soft = {s: an.lung_soft(s, X, Y, px, hf) for s in "RL"}
    lung_mask = {s: lung_soft[s] > 0.5 for s in "RL"}
    dark = 0.37 if not p.hyper else 0.43
    lungs = lung_soft["R"] + lung_soft["L"]
    D -= dark * lungs
    # lungs slightly denser towards the bases and medially (soft tissue overlap)
    D += 0.05 * lungs * np.clip((Y - p.top) / 0.6, 0, 1)

    region_boxes = _region_boxes(an, cv, lung_mask)

    # ---- findings (drawn before the vessels so a pneumothorax can clear them)
    findings: List[_Finding] = []
    vessel_block = np.zeros((S, S), bool)
    for f in specs:
        fd = _draw_finding(f, an, cv, prng, lung_mask, region_boxes, vessel_block, px)
        if fd is not None:
            findings.append(fd)

    # ---- lung markings: vessels branching from each hilum, fine texture
    for s in "RL":
        hx, hy = an.hilum(s)
        sg = p.side_sign(s)
        for k in range(9):
            ang = np.deg2rad(-70 + 140 * (k + draw_rng.uniform(-0.3, 0.3)) / 8)
            L = draw_rng.uniform(0.12, 0.24)
            x1 = hx + sg * L * np.cos(ang)
            y1 = hy + L * np.sin(ang) * 1.2
            sl = cv.crop((min(hx, x1) - 0.02, min(hy, y1) - 0.02, max(hx, x1) + 0.02, max(hy, y1) + 0.02))
            Xs, Ys = cv.grid(sl)
            d, t = _seg_dist(Xs, Ys, hx, hy, x1, y1)
            wdt = 0.0065 * (1 - 0.7 * t) + 0.6 * px
            v = _smoothstep(wdt, 0.3 * wdt, d) * (1 - 0.6 * t)
            D[sl] += 0.09 * v * lung_soft[s][sl] * ~vessel_block[sl]
        r = p.hilum_r[s]
        sl = cv.crop((hx - 2.5 * r, hy - 2.5 * r, hx + 2.5 * r, hy + 2.5 * r))
        Xs, Ys = cv.grid(sl)
        D[sl] += (0.09 + 0.08 * (r > 0.04)) * _smoothstep(1.6 * r, 0.2 * r, np.hypot((Xs - hx) * 1.3, Ys - hy))
    tex = _smooth_noise(draw_rng, (S, S), max(8, S // 10))
    D += 0.03 * tex * lungs * ~vessel_block

    # ---- heart and mediastinum
    D += 0.3 * _smoothstep(1.06, 0.94, hf)
    ytop = p.top - 0.08
    sl = cv.crop((p.cx - p.mw - 0.02, ytop, p.cx + p.mw + 0.02, an.hy))
    Xs, Ys = cv.grid(sl)
    med = _smoothstep(p.mw + 0.008, p.mw - 0.008, np.abs(Xs - p.cx)) * _smoothstep(ytop, ytop + 0.04, Ys)
    D[sl] += 0.26 * med * (1 - _smoothstep(1.3, 0.9, hf[sl]))
    axo, ayo, ar = an.aorta()
    sl = cv.crop((axo - 2 * ar, ayo - 2 * ar, axo + 2 * ar, ayo + 2 * ar))
    Xs, Ys = cv.grid(sl)
    D[sl] += 0.2 * _smoothstep(ar, ar - 0.006, np.hypot(Xs - axo, Ys - ayo))

    # ---- trachea and main bronchi (air: darker)
    tx = float(an.spine_x(p.carina * 0.5))
    sl = cv.crop((tx - 0.03, 0.0, tx + 0.03, p.carina))
    Xs, Ys = cv.grid(sl)
    D[sl] -= 0.14 * _smoothstep(0.017, 0.011, np.abs(Xs - tx)) * _smoothstep(0.0, 0.05, Ys)
    for s in "RL":
        sl = cv.crop((tx - 0.1, p.carina - 0.02, tx + 0.1, p.carina + 0.09))
        Xs, Ys = cv.grid(sl)
        d, _ = _seg_dist(Xs, Ys, tx, p.carina, tx + p.side_sign(s) * 0.06, p.carina + 0.065)
        D[sl] -= 0.1 * _smoothstep(0.011, 0.006, d)

    # ---- spine with vertebral end plates
    sl = cv.crop((p.cx - abs(p.scoliosis) - 0.05, -1.0, p.cx + abs(p.scoliosis) + 0.05, 2.0))
    Xs, Ys = cv.grid(sl)
    sp = _smoothstep(0.036, 0.028, np.abs(Xs - an.spine_x(Ys)))
    plates = 0.75 + 0.25 * np.cos(2 * np.pi * (Ys - p.top) / 0.048)
    D[sl] += 0.13 * sp * plates

    # ---- ribs (posterior arcs) and clavicles
    H = (p.base["L"] - p.top)
    n_ribs = 10
    for s in "RL":
        sg = p.side_sign(s)
        for k in range(n_ribs):
            y0 = p.top - 0.01 + k * H / (n_ribs - 0.5)
            xa, xb = sorted((p.cx + sg * 0.02, p.cx + sg * (p.tw + 0.06)))
            sl = cv.crop((xa, y0 - 0.04, xb, y0 + 0.12))
            Xs, Ys = cv.grid(sl)
            dx = (Xs - p.cx) * sg
            in_side = (dx > 0.03) & (dx < p.tw + 0.05)
            yc = y0 - 0.2 * dx + 0.95 * dx * dx
            th = 0.011 + 0.002 * k / n_ribs
            dist = np.abs(Ys - yc)
            band = _smoothstep(th, th * 0.55, dist)
            edge = _smoothstep(th * 0.35, 0.0, np.abs(dist - th * 0.8))
            fr = [f for f in findings if f.type == "fracture" and f.detail.get("rib") == (s, k)]
            if fr:  # a gap with a step: the lateral fragment displaced downwards
                gx = fr[0].detail["x"]
                gap = _smoothstep(0.005, 0.011, np.abs(Xs - gx))
                lat = (Xs - gx) * sg > 0
                dist2 = np.abs(Ys - yc - 0.014)
                band = np.where(lat, _smoothstep(th, th * 0.55, dist2), band) * gap
                edge = np.where(lat, _smoothstep(th * 0.35, 0.0, np.abs(dist2 - th * 0.8)), edge) * gap
            D[sl] += (0.065 * band + 0.03 * edge) * in_side * (1.0 - 0.6 * _smoothstep(1.1, 0.8, hf[sl]))
        x0, y0, x1, y1 = an.clavicle(s)
        sl = cv.crop((min(x0, x1) - 0.03, min(y0, y1) - 0.03, max(x0, x1) + 0.03, max(y0, y1) + 0.03))
        Xs, Ys = cv.grid(sl)
        fr = [f for f in findings if f.type == "fracture" and f.detail.get("clavicle") == s]
        if fr:
            gt = fr[0].detail["t"]
            xm_, ym_ = x0 + gt * (x1 - x0), y0 + gt * (y1 - y0)
            # two fragments with a gap, the lateral one displaced downwards
            frags = ((x0, y0, xm_ - sg * 0.006, ym_), (xm_ + sg * 0.006, ym_ + 0.012, x1, y1 + 0.012))
            for (a, b, c, d_) in frags:
                dd, _ = _seg_dist(Xs, Ys, a, b, c, d_)
                D[sl] += 0.24 * _smoothstep(0.013, 0.008, dd)
        else:
            dd, _ = _seg_dist(Xs, Ys, x0, y0, x1, y1)
            D[sl] += 0.24 * _smoothstep(0.013, 0.008, dd)

    # ---- devices drawn last (radio-opaque, over everything)
    for f in findings:
        if f.type == "device":
            _draw_device(f, an, cv, px)

    # ---- acquisition: contrast, gamma, illumination, blur, noise
    img = np.clip(D, 0.0, None)
    gamma = arng.uniform(0.8, 1.25)
    img = np.power(img / 1.2, gamma)
    img = img * arng.uniform(0.85, 1.15) + arng.uniform(-0.05, 0.06)
    img += 0.035 * _smooth_noise(arng, (S, S), 4)
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(img, sigma=max(0.5, 0.7 * S / 256.0))
    img += arng.normal(0.0, arng.uniform(0.008, 0.025), size=(S, S)).astype(np.float32)
    img8 = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    report = _write_report(findings, prng)
    labels = labels_from_statements(report.pop("statements"))
    return img8, {"region_boxes": region_boxes, "findings": findings, "labels": labels, **report}


# ------------------------------------------------------------------------------ finding drawers
def _draw_finding(f, an: _Anatomy, cv: _Canvas, rng, lung_mask, boxes, vessel_block, px) -> Optional[_Finding]:
    p = an.p
    t = f["type"]
    side = f["side"]
    name = _SIDE[side]
    D, S = cv.D, cv.S
    unc = f["uncertain"]
    lm = lung_mask[side]

    def fin(entities, mask_or_box, candidates, **detail):
        bx = _mask_box(mask_or_box) if isinstance(mask_or_box, np.ndarray) else mask_or_box
        if bx is None:
            return None
        reg = _region_for(_center(bx), candidates, boxes)
        return _Finding(t, list(entities), [bx], reg, side, unc, detail)

    if t in ("consolidation", "lung opacity", "nodule", "mass", "calcified granuloma", "cavity"):
        zone = {"consolidation": ["lower", "mid", "upper"][int(f["u"] * 2.99) if f["u"] > 0.4 else 0],
                "lung opacity": "any", "cavity": "upper"}.get(t, "any")
        r = {"consolidation": 0.08 + 0.035 * f["v"], "lung opacity": 0.08 + 0.03 * f["v"],
             "nodule": 0.03 + 0.012 * f["v"], "mass": 0.06 + 0.02 * f["v"],
             "calcified granuloma": 0.014 + 0.005 * f["v"], "cavity": 0.045 + 0.015 * f["v"]}[t]
        er = int(round(r * S * (0.6 if t in ("consolidation", "lung opacity") else 1.05)))
        place = _zone_mask(_erode(lm, max(1, er)), zone)
        if not place.any():
            place = _zone_mask(lm, zone)
        if not place.any():
            return None
        x, y = _pick_point(rng, place, cv)
        irregular, soft = {"consolidation": (0.3, 0.45), "lung opacity": (0.25, 0.8), "nodule": (0.05, 0.35),
                           "mass": (0.15, 0.25), "calcified granuloma": (0.0, 0.3), "cavity": (0.1, 0.3)}[t]
        sl, fld = _blob(cv, rng, x, y, r, irregular, soft)
        lmc = lm[sl] if t in ("consolidation", "lung opacity") else np.ones_like(fld, bool)
        fld = fld * lmc
        strength = {"consolidation": 0.4, "lung opacity": 0.3, "nodule": 0.38, "mass": 0.38,
                    "calcified granuloma": 0.55, "cavity": 0.32}[t]
        if t == "consolidation":  # mottled, with air bronchograms
            Xs, Ys = cv.grid(sl)
            tex = 0.85 + 0.15 * np.sin(Xs * 140 + 2 * np.sin(Ys * 90)) * np.cos(Ys * 120)
            fld = fld * tex
        if t == "cavity":
            Xs, Ys = cv.grid(sl)
            inner = _smoothstep(0.55 * r, 0.4 * r, np.hypot(Xs - x, Ys - y))
            fld = fld - 1.1 * inner * fld
        D[sl] += strength * fld
        m = np.zeros((S, S), bool)
        m[sl] = fld > 0.2 if t != "cavity" else (np.abs(fld) > 0.2) | (_blob(cv, rng, x, y, r, 0, 0.01)[1] > 0.5)
        ents = {"consolidation": ["consolidation"], "lung opacity": ["lung opacity"],
                "nodule": ["nodule"], "mass": ["mass"], "calcified granuloma": ["calcified granuloma", "granuloma"],
                "cavity": ["cavity"]}[t]
        if t == "consolidation" and f["w"] < 0.5:
            ents = ents + ["pneumonia"]
        if t == "cavity" and f["w"] < 0.5:
            ents = ents + ["tuberculosis"]
        zones = _zones(side)
        return fin(ents, m, zones)

    if t == "pleural effusion":
        sides = "RL" if f["bilateral"] else side
        outs = []
        for s in sides:
            sg = p.side_sign(s)
            xl = p.cx + sg * p.tw
            W = p.tw - p.mw
            h = (0.16 + 0.14 * f["u"]) * (p.base[s] - p.top)
            uu = np.clip(np.abs(cv.X - xl) / W, 0, 1)
            ym = p.base[s] - p.dome[s] * 0.4 - h * (1.0 - 0.55 * uu) - 0.02
            fld = _smoothstep(ym - 0.012, ym + 0.025, cv.Y) * an.lung_soft(s, cv.X, cv.Y, px, an.hf)
            # blunt the costophrenic angle: fill the lateral recess below the dome too
            D[...] += 0.5 * fld
            vessel_block |= fld > 0.5
            outs.append(_mask_box(fld > 0.3))
        outs = [b for b in outs if b is not None]
        if not outs:
            return None
        reg = _region_for(_center(outs[0]), [f"{_SIDE[sides[0]]} costophrenic angle",
                                             f"{_SIDE[sides[0]]} lower lung zone", f"{_SIDE[sides[0]]} lung"], boxes)
        ent = ["pleural effusion"]
        return _Finding(t, ent, outs, reg, None if len(sides) == 2 else side, unc, {"bilateral": len(sides) == 2})

    if t == "pneumothorax":
        sg = p.side_sign(side)
        tt, a, b = an.lung_edges(side, cv.Y)
        outer = b if sg > 0 else a
        depth = 0.055 + 0.04 * f["u"]
        dist_lat = np.abs(outer - cv.X)
        # the rim along the lateral wall and the apex, fading out towards the base
        span = np.clip(1.0 - (tt - 0.05) / 0.65, 0.0, 1.0)
        d_eff = depth * np.sqrt(span)
        apex = (tt < 0.06 + depth)
        rim = lm & ((dist_lat < d_eff) | apex) & (span > 0)
        D[rim] -= 0.15
        D[lm & ~rim] += 0.12  # the partly collapsed lung is denser
        vessel_block |= rim
        # visceral pleural line
        from scipy.ndimage import binary_dilation

        edge = binary_dilation(rim, iterations=1) & lm & ~rim
        D[edge] += 0.2
        return fin(["pneumothorax"], rim, [f"{name} apical zone", f"{name} upper lung zone", f"{name} lung"])

    if t == "atelectasis":
        place = _zone_mask(_erode(lm, max(1, int(0.05 * S))), "lower")
        if not place.any():
            return None
        x, y = _pick_point(rng, place, cv)
        L = 0.07 + 0.04 * f["v"]
        ang = rng.uniform(-0.25, 0.25)
        x0, y0, x1, y1 = x - L * np.cos(ang), y - L * np.sin(ang), x + L * np.cos(ang), y + L * np.sin(ang)
        sl = cv.crop((min(x0, x1) - 0.05, min(y0, y1) - 0.05, max(x0, x1) + 0.05, max(y0, y1) + 0.05))
        Xs, Ys = cv.grid(sl)
        d, _ = _seg_dist(Xs, Ys, x0, y0, x1, y1)
        fld = _smoothstep(0.028, 0.012, d) * lm[sl]
        # plus a wedge of volume loss below the band
        fld = np.maximum(fld, 0.6 * _smoothstep(0.045, 0.02, d) * (Ys > y) * lm[sl])
        D[sl] += 0.4 * fld
        m = np.zeros((S, S), bool)
        m[sl] = fld > 0.25
        return fin(["atelectasis"], m, _zones(side))

    if t == "edema":
        outs = []
        for s in "RL":
            hx, hy = an.hilum(s)
            l2 = lung_mask[s]
            dd = np.hypot((cv.X - hx) / 1.3, (cv.Y - hy - 0.08) / 1.5)
            fld = _smoothstep(0.22, 0.06, dd) * l2
            tex = 0.8 + 0.2 * np.sin(cv.Y * 180) * np.sin(cv.X * 150)
            D[...] += 0.2 * fld * tex
            outs.append(_mask_box(fld > 0.3))
        outs = [b for b in outs if b is not None]
        if not outs:
            return None
        ents = ["edema"] + (["kerley lines"] if f["w"] < 0.3 else [])
        reg = _region_for(_center(outs[0]), _zones("R"), boxes)
        return _Finding(t, ents, outs, reg, None, unc, {"bilateral": True})

    if t == "interstitial opacity":
        outs = []
        for s in "RL":
            l2 = _zone_mask(lung_mask[s], "lower") | _zone_mask(lung_mask[s], "mid")
            tex = ((np.sin(cv.X * 260 + 3 * np.sin(cv.Y * 70)) > 0.55)
                   | (np.sin(cv.Y * 240 + 3 * np.sin(cv.X * 60)) > 0.6))
            D[...] += 0.14 * (l2 & tex) + 0.04 * l2
            outs.append(_mask_box(l2))
        ents = ["interstitial opacity"] + (["fibrosis"] if f["w"] < 0.5 else [])
        reg = _region_for(_center(outs[0]), _zones("R"), boxes)
        return _Finding(t, ents, outs, reg, None, unc, {"bilateral": True})

    if t == "cardiomegaly":
        return _Finding(t, ["cardiomegaly"], [tuple(boxes[REGION_INDEX["cardiac silhouette"]])],
                        "cardiac silhouette", None, unc)

    if t == "widened mediastinum":
        ents = ["widened mediastinum"] + (["enlarged cardiomediastinum"] if f["w"] < 0.6 else [])
        return _Finding(t, ents, [tuple(boxes[REGION_INDEX["upper mediastinum"]])], "upper mediastinum", None, unc)

    if t == "tortuous aorta":
        ax_, ay_, ar = an.aorta()
        sl = cv.crop((ax_ - 2 * ar, ay_ - 2 * ar, ax_ + 2 * ar, ay_ + 2 * ar))
        Xs, Ys = cv.grid(sl)
        rim = _smoothstep(0.006, 0.002, np.abs(np.hypot(Xs - ax_, Ys - ay_) - ar * 0.92)) * (Ys < ay_)
        D[sl] += 0.3 * rim
        ents = ["tortuous aorta"] + (["aortic calcification"] if f["w"] < 0.6 else [])
        return _Finding(t, ents, [tuple(boxes[REGION_INDEX["aortic arch"]])], "aortic arch", None, unc)

    if t == "hilar enlargement":
        sides = "RL" if f["bilateral"] else side
        bx = [tuple(boxes[REGION_INDEX[f"{_SIDE[s]} hilar structures"]]) for s in sides]
        return _Finding(t, ["hilar enlargement"], bx, f"{_SIDE[sides[0]]} hilar structures",
                        None if len(sides) == 2 else side, unc, {"bilateral": len(sides) == 2})

    if t == "elevated hemidiaphragm":
        return _Finding(t, ["elevated hemidiaphragm"], [tuple(boxes[REGION_INDEX[f"{name} hemidiaphragm"]])],
                        f"{name} hemidiaphragm", side, unc)

    if t == "emphysema":
        bx = [tuple(boxes[REGION_INDEX["right lung"]]), tuple(boxes[REGION_INDEX["left lung"]])]
        return _Finding(t, ["emphysema", "hyperinflation"], bx, "right lung", None, unc)

    if t == "low lung volumes":
        bx = [tuple(boxes[REGION_INDEX["right lung"]]), tuple(boxes[REGION_INDEX["left lung"]])]
        return _Finding(t, ["low lung volumes"], bx, "right lung", None, unc)

    if t == "scoliosis":
        return _Finding(t, ["scoliosis"], [tuple(boxes[REGION_INDEX["spine"]])], "spine", None, unc,
                        {"convex": "right" if p.scoliosis < 0 else "left"})

    if t == "pleural thickening":
        tt, a, b = an.lung_edges(side, cv.Y)
        sg = p.side_sign(side)
        outer = b if sg > 0 else a
        capm = lm & ((tt < 0.12) | ((np.abs(outer - cv.X) < 0.014) & (tt < 0.45)))
        D[capm] += 0.25
        return fin(["pleural thickening"], capm, [f"{name} apical zone", f"{name} upper lung zone", f"{name} lung"])

    if t == "pneumoperitoneum":
        s = "R"
        xl, xm = p.cx - p.tw, p.cx - p.mw
        dy = an.diaphragm_y(s, cv.X)
        thick = 0.022 * np.sin(np.pi * np.clip((cv.X - xl - 0.03) / (xm - xl - 0.06), 0, 1))
        cres = (cv.X > xl + 0.03) & (cv.X < xm - 0.03) & (cv.Y > dy + 0.008) & (cv.Y < dy + 0.008 + thick)
        D[cres] -= 0.4
        fd = fin(["pneumoperitoneum"], cres, ["right hemidiaphragm", "abdomen"])
        if fd is not None:
            fd.side = "R"
        return fd

    if t == "hernia":
        x, y = an.hx - 0.02, an.hbot - 0.05
        r = 0.045
        sl = cv.crop((x - 2 * r, y - 2 * r, x + 2 * r, y + 2 * r))
        Xs, Ys = cv.grid(sl)
        d = np.hypot(Xs - x, (Ys - y) * 1.2)
        inside = _smoothstep(r, r - 0.006, d)
        air = inside * (Ys < y + 0.005)
        D[sl] -= 0.3 * air
        D[sl] += 0.1 * _smoothstep(0.004, 0.0, np.abs(d - r))
        m = np.zeros((S, S), bool)
        m[sl] = inside > 0.3
        return _Finding(t, ["hernia"], [_mask_box(m)], "cardiac silhouette", None, unc)

    if t == "fracture":
        if f["v"] < 0.5:  # clavicle
            x0, y0, x1, y1 = an.clavicle(side)
            gt = 0.45 + 0.2 * f["u"]
            xm_, ym_ = x0 + gt * (x1 - x0), y0 + gt * (y1 - y0)
            bx = cv.to_image((xm_ - 0.035, ym_ - 0.03, xm_ + 0.035, ym_ + 0.04))
            return _Finding(t, ["clavicle fracture", "fracture"], [bx], f"{name} clavicle", side, unc,
                            {"clavicle": side, "t": gt})
        k = 3 + int(f["u"] * 4.99)
        sg = p.side_sign(side)
        dxf = 0.18 + 0.12 * f["w"]
        H = p.base["L"] - p.top
        y0r = p.top - 0.01 + k * H / 9.5
        yc = y0r - 0.2 * dxf + 0.95 * dxf * dxf
        gx = p.cx + sg * dxf
        D_ = 0.03
        bx = cv.to_image((gx - D_, yc - D_, gx + D_, yc + D_))
        return _Finding(t, ["rib fracture", "fracture"], [bx], _region_for(_center(bx), _zones(side), boxes),
                        side, unc, {"rib": (side, k), "x": gx, "rib_number": k + 2})

    if t == "device":
        kind = ["endotracheal tube", "central venous catheter", "nasogastric tube", "pacemaker",
                "sternotomy wires", "chest tube"][int(f["u"] * 5.999)]
        fd = _Finding(t, [kind, "support devices"], [], "", side, False, {"kind": kind})
        fd.boxes = [_device_box(fd, an, cv)]
        fd.region = {"endotracheal tube": "trachea", "central venous catheter": "svc",
                     "nasogastric tube": "mediastinum", "pacemaker": "cardiac silhouette",
                     "sternotomy wires": "mediastinum", "chest tube": f"{name} lung"}[kind]
        if kind == "pacemaker":
            fd.region = "cardiac silhouette"
        return fd
    raise ValueError(f"unknown finding type {t!r}")


def _device_path(fd: _Finding, an: _Anatomy):
    """Polyline (patient frame) of a tube or line device; None for the others."""
    p = an.p
    k = fd.detail["kind"]
    tx = float(an.spine_x(p.carina * 0.5))
    if k == "endotracheal tube":
        return [(tx, 0.0), (tx, p.carina - 0.05)]
    if k == "nasogastric tube":
        return [(tx + 0.01, 0.0), (tx + 0.012, p.carina), (p.cx + 0.02, an.hbot), (p.cx + 0.12, an.hbot + 0.09)]
    if k == "central venous catheter":
        return [(p.cx - p.tw * 0.7, p.top - 0.01), (p.cx - p.mw * 0.6, p.top + 0.05),
                (p.cx - p.mw * 0.55, an.htop + 0.02)]
    if k == "chest tube":
        s = p.side_sign(fd.side)
        return [(p.cx + s * (p.tw + 0.07), p.base[fd.side] - 0.12), (p.cx + s * (p.tw - 0.03), p.base[fd.side] - 0.18),
                (p.cx + s * (p.tw - 0.1), p.top + 0.1)]
    return None


def _device_box(fd: _Finding, an: _Anatomy, cv: _Canvas) -> Box:
    p = an.p
    k = fd.detail["kind"]
    path = _device_path(fd, an)
    if path is not None:
        a = np.array(path)
        return cv.to_image((a[:, 0].min() - 0.012, a[:, 1].min() - 0.012, a[:, 0].max() + 0.012,
                            a[:, 1].max() + 0.012))
    if k == "pacemaker":
        gx, gy = p.cx + 0.22, p.top + 0.03
        return cv.to_image((min(gx - 0.05, an.hx - 0.05), gy - 0.035, gx + 0.05, an.hy + 0.02))
    # sternotomy wires
    return cv.to_image((p.cx - 0.025, p.carina - 0.04, p.cx + 0.025, an.hy + 0.04))


def _draw_device(fd: _Finding, an: _Anatomy, cv: _Canvas, px: float):
    p = an.p
    D = cv.D
    k = fd.detail["kind"]
    path = _device_path(fd, an)
    w = 0.011 if k in ("endotracheal tube", "chest tube") else 0.008
    w = max(w, 0.8 * px)

    def seg(x0, y0, x1, y1, width, val):
        sl = cv.crop((min(x0, x1) - 2 * width - 0.01, min(y0, y1) - 2 * width - 0.01,
                      max(x0, x1) + 2 * width + 0.01, max(y0, y1) + 2 * width + 0.01))
        Xs, Ys = cv.grid(sl)
        d, _ = _seg_dist(Xs, Ys, x0, y0, x1, y1)
        D[sl] = np.maximum(D[sl], D[sl] * 0.3 + val * _smoothstep(width, width * 0.5, d))

    if path is not None:
        for (x0, y0), (x1, y1) in zip(path[:-1], path[1:]):
            seg(x0, y0, x1, y1, w, 1.3)
        return
    if k == "pacemaker":
        gx, gy = p.cx + 0.22, p.top + 0.03
        sl = cv.crop((gx - 0.05, gy - 0.04, gx + 0.05, gy + 0.04))
        Xs, Ys = cv.grid(sl)
        D[sl] = np.maximum(D[sl], 1.4 * _smoothstep(1.1, 0.9, ((Xs - gx) / 0.04) ** 4 + ((Ys - gy) / 0.028) ** 4))
        seg(gx - 0.02, gy, p.cx - 0.01, p.carina + 0.02, 0.007, 1.3)
        seg(p.cx - 0.01, p.carina + 0.02, an.hx - 0.03, an.hy + 0.02, 0.007, 1.3)
        return
    for i in range(5):  # sternotomy wires
        y = p.carina - 0.02 + i * (an.hy - p.carina + 0.02) / 4.5
        sl = cv.crop((p.cx - 0.03, y - 0.03, p.cx + 0.03, y + 0.03))
        Xs, Ys = cv.grid(sl)
        ring = np.abs(np.hypot((Xs - p.cx) / 1.6, Ys - y) - 0.013)
        D[sl] = np.maximum(D[sl], 1.3 * _smoothstep(0.0065, 0.003, ring))


# ============================================================================== reports
_DESC = {
    "consolidation": ["focal consolidation", "airspace consolidation", "patchy consolidation", "dense consolidation"],
    "lung opacity": ["hazy opacity", "ill-defined opacity", "patchy opacity", "an area of increased opacity"],
    "nodule": ["a {mm} mm nodule", "a rounded nodule", "a small well-circumscribed nodule"],
    "mass": ["a {cm} cm mass", "a lobulated mass", "a large rounded mass"],
    "calcified granuloma": ["a calcified granuloma", "a small calcified granuloma"],
    "cavity": ["a thick-walled cavity", "a cavity"],
    "atelectasis": ["linear atelectasis", "plate-like atelectasis", "subsegmental atelectasis",
                    "bandlike atelectasis"],
}

_SIZE_WORD = ["small", "small", "moderate", "moderate to large"]


def _loc(region: str, rng) -> str:
    prep = "at the" if "angle" in region or "junction" in region else "in the"
    return f"{prep} {region}"


def _pos_sentence(fd: _Finding, rng) -> Tuple[str, Optional[str]]:
    """(FINDINGS sentence, IMPRESSION phrase) for one finding; phrasing follows ``fd.uncertain``."""
    t = fd.type
    ch = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    loc = _loc(fd.region, rng)
    unc = fd.uncertain
    side = _SIDE.get(fd.side or "", "")
    cue = ch(["Possible", "Questionable", "Suspected"])
    if t in _DESC:
        mm = int(rng.integers(8, 19))
        d = ch(_DESC[t]).format(mm=mm, cm=int(rng.integers(3, 6)))
        if d.startswith(f"a {mm} mm") and (mm == 8 or mm in (11, 18)):
            d = "an " + d[2:]  # "an 8 mm", "an 11 mm", "an 18 mm"
        bare = d.split(" ", 1)[1] if d.startswith(("a ", "an ")) else d  # without the article
        if unc:
            s = f"{cue} {bare} {loc}."
        else:
            s = ch([f"There is {d} {loc}.", f"{d[0].upper() + d[1:]} is seen {loc}.",
                    f"{d[0].upper() + d[1:]} {loc}.", f"Redemonstrated {bare} {loc}."])
        if t == "consolidation" and "pneumonia" in fd.entities:
            imp = (f"{side.capitalize()} consolidation, which may represent pneumonia" if unc or rng.random() < 0.5
                   else f"{side.capitalize()} consolidation compatible with pneumonia")
            if unc:
                imp = "Possible consolidation or pneumonia"
            return s, imp
        if t == "cavity" and "tuberculosis" in fd.entities:
            return s, f"{'Possible ' if unc else ''}cavity in the {fd.region}; tuberculosis cannot be excluded"
        if t == "calcified granuloma":
            return s, None if rng.random() < 0.5 else "Calcified granuloma, a benign finding"
        noun = {"consolidation": "consolidation", "lung opacity": "opacity", "nodule": "nodule", "mass": "mass",
                "cavity": "cavity", "atelectasis": "atelectasis"}[t]
        where = fd.region.split(" ", 1)[1] if fd.region.startswith(side) else fd.region
        return s, f"{'Possible ' if unc else ''}{side} {where} {noun}".replace("  ", " ").strip()
    if t == "pleural effusion":
        sz = ch(_SIZE_WORD)
        if fd.detail.get("bilateral"):
            s = f"{cue} small bilateral pleural effusions." if unc else ch(
                [f"Bilateral {sz} pleural effusions.", f"There are {sz} bilateral pleural effusions blunting "
                 f"both costophrenic angles."])
            return s, f"{'Possible ' if unc else ''}bilateral pleural effusions"
        s = f"{cue} {sz} {side} pleural effusion." if unc else ch(
            [f"There is a {sz} {side} pleural effusion.", f"{sz.capitalize()} {side} pleural effusion "
             f"blunting the {side} costophrenic angle.", f"A {sz} {side} effusion layers {loc}."])
        return s, f"{'Possible ' if unc else ''}{sz} {side} pleural effusion"
    if t == "pneumothorax":
        sz = ch(["small", "small", "moderate", "apical"])
        s = f"{cue} {sz} {side} pneumothorax." if unc else ch(
            [f"There is a {sz} {side} pneumothorax.", f"{sz.capitalize()} {side} apical pneumothorax with a visible "
             f"pleural line.", f"A {side} pneumothorax is present {loc}."])
        return s, f"{'Possible ' if unc else ''}{side} pneumothorax"
    if t == "edema":
        extra = " with kerley lines at the bases" if "kerley lines" in fd.entities else ""
        s = f"{cue} mild pulmonary edema{extra}." if unc else ch(
            [f"Perihilar haziness and vascular indistinctness consistent with pulmonary edema{extra}.",
             f"Moderate pulmonary edema{extra}.", f"Interstitial pulmonary edema is present{extra}."])
        return s, f"{'Possible ' if unc else ''}pulmonary edema"
    if t == "interstitial opacity":
        fib = "fibrosis" in fd.entities
        s = (f"{cue} interstitial opacity in both lower lung zones." if unc else
             "Reticular interstitial opacity in the mid and lower lung zones bilaterally.")
        if fib:
            s += " Findings may reflect fibrosis."
        return s, None
    if t == "cardiomegaly":
        s = f"{cue} mild cardiomegaly." if unc else ch(
            ["The heart is enlarged.", "Cardiomegaly.", "Moderate cardiomegaly is present.",
             "Enlarged cardiac silhouette consistent with cardiomegaly."])
        return s, f"{'Possible ' if unc else ''}cardiomegaly"
    if t == "widened mediastinum":
        ecm = "enlarged cardiomediastinum" in fd.entities
        s = f"{cue} widened mediastinum." if unc else ch(["Widened mediastinum at the level of the aortic arch.",
                                                            "There is a widened mediastinum."])
        if ecm:
            s += f" {'Possible enlarged' if unc else 'Enlarged'} cardiomediastinum contour."
        return s, f"{'Possible ' if unc else ''}widened mediastinum"
    if t == "tortuous aorta":
        s = ("Tortuous aorta with aortic calcification." if "aortic calcification" in fd.entities
             else "Tortuous aorta.")
        if unc:
            s = "Possible tortuous aorta." + (" Possible aortic calcification." if "aortic calcification" in fd.entities
                                              else "")
        return s, None
    if t == "hilar enlargement":
        where = "bilateral" if fd.detail.get("bilateral") else side
        s = f"{cue} {where} hilar enlargement." if unc else f"There is {where} hilar enlargement."
        return s, f"{'Possible ' if unc else ''}{where} hilar enlargement"
    if t == "elevated hemidiaphragm":
        s = f"{cue} elevated {side} hemidiaphragm." if unc else ch(
            [f"Elevated {side} hemidiaphragm.", f"The {side} hemidiaphragm is elevated."])
        return s, None
    if t == "emphysema":
        s = ("Hyperinflation with flattened hemidiaphragms; possible emphysema." if unc else
             ch(["Hyperinflation with flattened hemidiaphragms, consistent with emphysema.",
                 "Emphysema with hyperinflation of both lungs."]))
        if unc:  # one polarity per sentence
            s = "Possible hyperinflation. Possible emphysema."
        return s, f"{'Possible ' if unc else ''}emphysema"
    if t == "low lung volumes":
        return ("Low lung volumes." if not unc else "Possible low lung volumes."), None
    if t == "scoliosis":
        conv = fd.detail.get("convex", "right")
        return (f"{cue} scoliosis." if unc else f"Thoracic scoliosis, convex to the {conv}."), None
    if t == "pleural thickening":
        s = f"{cue} {side} apical pleural thickening." if unc else f"{side.capitalize()} apical pleural thickening."
        return s, None
    if t == "pneumoperitoneum":
        s = ("Possible free air under the right hemidiaphragm, suspicious for pneumoperitoneum." if unc else
             "Free air under the right hemidiaphragm consistent with pneumoperitoneum.")
        return s, f"{'Possible ' if unc else ''}pneumoperitoneum"
    if t == "hernia":
        s = ("Retrocardiac air-fluid level, possibly a hiatal hernia." if unc else
             "Retrocardiac air-fluid level consistent with a hiatal hernia.")
        return s, None
    if t == "fracture":
        if "clavicle fracture" in fd.entities:
            s = f"{cue} {side} clavicle fracture." if unc else ch(
                [f"Displaced {side} clavicle fracture.", f"There is an acute {side} clavicle fracture."])
            return s, f"{'Possible ' if unc else ''}{side} clavicle fracture"
        n = fd.detail.get("rib_number", 5)
        sfx = {1: "st", 2: "nd", 3: "rd"}.get(n if n < 20 else n % 10, "th")
        s = f"{cue} {side} {n}{sfx} rib fracture." if unc else f"Acute {side} {n}{sfx} posterior rib fracture."
        return s, f"{'Possible ' if unc else ''}{side} rib fracture"
    if t == "device":
        k = fd.detail["kind"]
        txt = {"endotracheal tube": ["an endotracheal tube terminates about {n} cm above the carina"],
               "central venous catheter": ["a right central venous catheter with tip in the svc",
                                           "a central venous catheter terminates at the cavoatrial junction"],
               "nasogastric tube": ["a nasogastric tube courses below the diaphragm into the stomach"],
               "pacemaker": ["a left-sided pacemaker with leads in the right atrium and ventricle",
                             "a pacemaker generator projects over the left chest"],
               "sternotomy wires": ["median sternotomy wires are intact", "sternotomy wires are seen"],
               "chest tube": [f"a {side} chest tube is in place"]}[k]
        d = ch(txt).format(n=int(rng.integers(3, 6)))
        s = ch([f"Support devices: {d}.", f"Support devices in place: {d}."])
        return s, None
    raise ValueError(t)


# negatable statements: (phrase, entity, finding types that forbid negating it)
_NEGATABLE = [
    ("pleural effusion", "pleural effusion", {"pleural effusion"}),
    ("pneumothorax", "pneumothorax", {"pneumothorax"}),
    ("focal consolidation", "consolidation", {"consolidation", "cavity"}),
    ("pulmonary edema", "edema", {"edema", "interstitial opacity"}),
    ("cardiomegaly", "cardiomegaly", {"cardiomegaly"}),
    ("pneumonia", "pneumonia", {"consolidation", "lung opacity", "cavity"}),
    ("fracture", "fracture", {"fracture"}),
    ("pulmonary nodule", "nodule", {"nodule", "calcified granuloma", "mass", "cavity"}),
    ("mass", "mass", {"mass", "nodule", "cavity"}),
    ("atelectasis", "atelectasis", {"atelectasis", "low lung volumes"}),
    ("pneumoperitoneum", "pneumoperitoneum", {"pneumoperitoneum"}),
    ("widened mediastinum", "widened mediastinum", {"widened mediastinum", "tortuous aorta"}),
    ("pneumomediastinum", "pneumomediastinum", set()),
    ("hilar enlargement", "hilar enlargement", {"hilar enlargement"}),
    ("lymphadenopathy", "lymphadenopathy", {"hilar enlargement", "widened mediastinum"}),
    ("hydropneumothorax", "hydropneumothorax", {"pneumothorax", "pleural effusion"}),
    ("emphysema", "emphysema", {"emphysema"}),
    ("scoliosis", "scoliosis", {"scoliosis"}),
    ("support devices", "support devices", {"device"}),
    ("focal lung lesion", "lung lesion", {"nodule", "mass", "cavity", "calcified granuloma"}),
]
_ALWAYS_OPACITY_CONFLICT = {"consolidation", "lung opacity", "atelectasis", "nodule", "mass", "edema",
                            "interstitial opacity", "cavity", "calcified granuloma"}
#: phrases of positive sentences that state one more entity
_EXTRA = (("blunting", "blunted costophrenic angle"),)


def _join(items: List[str]) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} or {items[1]}"
    return ", ".join(items[:-1]) + f", or {items[-1]}"


def _write_report(findings: List[_Finding], rng) -> dict:
    """FINDINGS + IMPRESSION text for the drawn findings, and ``statements`` {entity: 1 | 0}: what the text
    affirms (uncertain phrasing included) or negates."""
    ch = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    types = {f.type for f in findings}
    said: Dict[str, int] = {}

    def state(ents, v, sentence=""):
        for e in ents:
            said[e] = max(said.get(e, v), v)
        for phrase, e in _EXTRA:
            if v == 1 and phrase in sentence:
                said[e] = 1

    pos, imp = [], []
    for f in findings:
        s, i = _pos_sentence(f, rng)
        state(f.entities, 1, s)
        pos.append(s)
        if i:
            state(f.entities, 1, i)
            imp.append(i[0].upper() + i[1:])
    # negations: 2-5 statements about things not drawn
    cands = [(ph, e) for ph, e, bad in _NEGATABLE if not (bad & types)]
    k = min(len(cands), int(rng.integers(2, 6)))
    negs = [cands[i] for i in sorted(rng.choice(len(cands), size=k, replace=False))]
    neg_sents = []
    while negs:
        m = min(len(negs), int(rng.integers(1, 4)))
        grp, negs = negs[:m], negs[m:]
        state([e for _, e in grp], 0)
        tpl = ["No {}.", "No evidence of {}.", "Negative for {}."]
        if not any(ph.endswith("devices") for ph, _ in grp):
            tpl.append("There is no {}.")
        neg_sents.append(ch(tpl).format(_join([ph for ph, _ in grp])))
    if not (types & _ALWAYS_OPACITY_CONFLICT) and rng.random() < 0.5:
        neg_sents.append(ch(["No focal airspace opacity.", "The lungs are clear without focal opacity."]))
        state(["lung opacity"], 0)
    if ("cardiomegaly" not in types and "widened mediastinum" not in types and rng.random() < 0.5
            and "cardiomegaly" not in said):
        if rng.random() < 0.5:
            neg_sents.append("Heart size is normal without cardiomegaly.")
            state(["cardiomegaly"], 0)
        else:
            neg_sents.append(ch(["Normal cardiomediastinal silhouette.",
                                 "The cardiomediastinal silhouette is normal."]))
            state(["cardiomegaly", "enlarged cardiomediastinum"], 0)
    order = pos + neg_sents
    if rng.random() < 0.5 and pos:
        # sometimes a negative first, as in many reports
        order = neg_sents[:1] + pos + neg_sents[1:]
    if rng.random() < 0.3:
        order.append(ch(["The osseous structures are unremarkable.", "Visualized upper abdomen is unremarkable."]))
    findings_text = " ".join(order)
    patho = [f for f in findings if f.type != "device"]
    if not imp:
        if patho:
            s = _pos_sentence(patho[0], rng)[0]
            state(patho[0].entities, 1, s)
            imp = [s.rstrip(".")]
        else:
            imp = [ch(["No acute cardiopulmonary process", "No acute cardiopulmonary abnormality"]
                      + ([] if findings else ["Normal chest radiograph"]))]
    if len(imp) > 1 and rng.random() < 0.6:
        impression_text = " ".join(f"{i + 1}. {x}." for i, x in enumerate(imp))
    else:
        impression_text = " ".join(f"{x}." for x in imp)
    report = f"FINDINGS: {findings_text}\nIMPRESSION: {impression_text}"
    return {"findings_text": findings_text, "impression_text": impression_text, "report": report,
            "statements": said}


# ============================================================================== files
def _image_streams(seed: int, i: int):
    """(patient seed, acquisition seed, study index) of image ``i``: independent of n and of the order."""
    return [seed, i, 0], [seed, i, 2]


def _is_follow_up(seed: int, i: int) -> bool:
    return i > 0 and float(np.random.default_rng([seed, i, 1]).random()) < FOLLOW_UP_PROB


def study_starts(seed: int, n: int) -> List[int]:
    """For each of the first ``n`` images, the index of the first image of its study (its study id). An image
    is a second view of the previous image's study with probability FOLLOW_UP_PROB, never a third view."""
    out: List[int] = []
    for i in range(n):
        if _is_follow_up(seed, i) and out[i - 1] == i - 1:
            out.append(i - 1)
        else:
            out.append(i)
    return out


def _record(i: int, study: int, fname: str, size: int, rec: dict) -> dict:
    labels = rec["labels"]
    fb = []
    for f in rec["findings"]:
        for e in f.entities:
            for b in f.boxes:
                fb.append([e, *[round(float(v), 5) for v in b]])
    return {
        "id": i,
        "file": fname,
        "study_id": study,
        "size": size,
        "view": "PA",
        "report": rec["report"],
        "findings_text": rec["findings_text"],
        "impression_text": rec["impression_text"],
        "labels": {ENTITY_NAMES[k]: int(v) for k, v in enumerate(labels) if v != -1},
        "region_boxes": [[round(float(v), 5) for v in b] for b in rec["region_boxes"]],
        "findings": [{"type": f.type, "entities": f.entities, "region": f.region, "side": f.side,
                      "uncertain": bool(f.uncertain), "boxes": [[round(float(v), 5) for v in b] for b in f.boxes]}
                     for f in rec["findings"]],
        "finding_boxes": fb,
    }


FORMATS = ("png", "jpg")


def _render_one(job):
    i, st, seed, size, root, fmt = job
    from PIL import Image

    ps, _ = _image_streams(seed, st)
    _, acq = _image_streams(seed, i)
    img, rec = render(size, ps, acq)
    fname = f"{IMAGE_DIR}/{i:07d}.{fmt}"
    im = Image.fromarray(img, mode="L")
    if fmt == "png":
        im.save(os.path.join(root, fname), compress_level=1)
    else:
        im.save(os.path.join(root, fname), quality=95)
    return json.dumps(_record(i, st, fname, size, rec))


def generate(out: str, n: int, size: int = 256, seed: int = 0, progress: bool = True, workers: int = 1,
             fmt: str = "png") -> str:
    """Write ``n`` synthetic chest X-rays to the folder ``out``.

    Args:
        out: output folder (created); any previous ``metadata.jsonl`` there is replaced.
        n: number of images (>= 1).
        size: image side in pixels (square), between 64 and 2048 (224 to 1024 are the intended sizes).
        seed: base seed; image ``i`` depends only on (seed, i), so outputs are prefixes of each other.
        progress: show a tqdm progress bar on stderr.
        workers: processes drawing images in parallel (the output does not depend on it).
        fmt: image format, "png" (lossless, default) or "jpg" (quality 95).

    Writes ``out/images/{i:07d}.png`` (or ``.jpg``; 8-bit grey, size x size), ``out/metadata.jsonl`` (one JSON object
    per image: id, file, study_id, report, findings_text, impression_text, labels {entity: 1|0} for the
    mentioned entities (others -1), region_boxes (29, 4), findings, finding_boxes [[entity, x0, y0, x1, y1],
    ...]) and ``out/synth.json`` (n, size, seed, REGIONS, ENTITY_NAMES). Returns ``out``.
    """
    n = _check_int("n", n, 1, None)
    size = _check_int("size", size, MIN_SIZE, MAX_SIZE)
    seed = _check_int("seed", seed, 0, None)
    workers = _check_int("workers", workers, 1, 256)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    out = os.fspath(out)
    os.makedirs(os.path.join(out, IMAGE_DIR), exist_ok=True)
    studies = study_starts(seed, n)
    jobs = ((i, studies[i], seed, size, out, fmt) for i in range(n))
    pool = None
    if workers > 1 and n > 1:
        import multiprocessing as mp

        # fork where available (no re-import of __main__; the workers only run numpy and PIL)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(min(workers, n))
        lines = pool.imap(_render_one, jobs, chunksize=4)
    else:
        lines = map(_render_one, jobs)
    if progress:
        from tqdm.auto import tqdm

        lines = tqdm(lines, desc=f"synth {size}px", unit="img", total=n)
    tmp = os.path.join(out, META_FILE + ".tmp")
    try:
        with open(tmp, "w") as meta:
            for line in lines:
                meta.write(line + "\n")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    os.replace(tmp, os.path.join(out, META_FILE))
    with open(os.path.join(out, HEADER_FILE), "w") as f:
        json.dump({"format": FORMAT_VERSION, "generator": "gkcore.data.synth", "n": n, "size": size, "seed": seed,
                   "image_format": fmt,
                   "regions": list(REGIONS), "entities": list(ENTITY_NAMES)}, f, indent=1)
    return out


def _check_int(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


class SynthCXR:
    """A folder written by :func:`generate` (or ``gkcore data synth``) as a sequence of
    :class:`~gkcore.data.sample.Sample` records.

    ``ds[i]`` gives ``Sample(path, report, entity_labels (E,) int64, region_boxes (29, 4) float32 normalised
    xyxy, study_id, finding_boxes [(entity_index, x0, y0, x1, y1), ...], region_mask (29,) bool all True)``.
    Extra per-image ground truth (finding types, regions, report sections) is in ``ds.records[i]``.
    Labels are stored by entity name, so a folder stays readable when the vocabulary grows; finding
    boxes of entities no longer in the vocabulary are dropped.
    """

    def __init__(self, root: str):
        self.root = os.fspath(root)
        meta = os.path.join(self.root, META_FILE)
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"{meta} not found: root={self.root!r} is not a SynthCXR folder "
                                    f"(write one with `gkcore data synth --out DIR --n N`)")
        hdr = os.path.join(self.root, HEADER_FILE)
        self.header = json.load(open(hdr)) if os.path.isfile(hdr) else {}
        if self.header.get("regions", list(REGIONS)) != list(REGIONS):
            raise ValueError(f"{hdr}: region list differs from gkcore.data.knowledge.REGIONS")
        self.records: List[dict] = []
        with open(meta) as f:
            for ln, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{meta}:{ln}: bad JSON ({e})") from None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int or a slice, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for SynthCXR of length {n}")
        r = self.records[int(i) % n]
        E = len(ENTITY_NAMES)
        lab = np.full(E, -1, np.int64)
        for name, v in r["labels"].items():
            if name in _NAME_SET:
                lab[entity_index(name)] = int(v)
        fb = [(entity_index(b[0]), float(b[1]), float(b[2]), float(b[3]), float(b[4]))
              for b in r.get("finding_boxes", []) if b[0] in _NAME_SET]
        return Sample(path=os.path.join(self.root, r["file"]), report=r["report"], entity_labels=lab,
                      region_boxes=np.asarray(r["region_boxes"], np.float32), study_id=int(r["study_id"]),
                      finding_boxes=fb, region_mask=np.ones(len(REGIONS), bool))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"SynthCXR(root={self.root!r}, n={len(self)})"


_NAME_SET = set(ENTITY_NAMES)
