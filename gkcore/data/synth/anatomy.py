"""One patient's anatomy: the random patient, the geometry of lungs, heart, diaphragm and bones, and the 29
Chest ImaGenome region boxes derived from what is drawn."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np

from ..knowledge import REGIONS
from .canvas import Box, Canvas, box_union, mask_box, smoothstep

SIDE = {"R": "right", "L": "left"}


@dataclass
class Patient:
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


def draw_patient(rng) -> Patient:
    base_l = rng.uniform(0.74, 0.80)
    return Patient(
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


class Anatomy:
    """Geometry of one patient (patient frame): lung masks, heart, diaphragm, bones, and region boxes."""

    def __init__(self, p: Patient):
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
        m = smoothstep(-e, e, X - a) * smoothstep(-e, e, b - X)
        m = m * smoothstep(-e, e, self.diaphragm_y(side, X) - Y) * (t >= 0)
        hf = self.heart_field(X, Y) if hf is None else hf
        return (m * smoothstep(1.0, 1.08, hf)).astype(np.float32)

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
def region_boxes(an: Anatomy, cv: Canvas, lung_masks: Dict[str, np.ndarray]) -> np.ndarray:
    """(29, 4) float32 normalised xyxy in the image frame, in REGIONS order."""
    p = an.p
    S = cv.S
    out: Dict[str, Box] = {}
    for side, name in (("R", "right"), ("L", "left")):
        m = lung_masks[side]
        lb = mask_box(m)
        out[f"{name} lung"] = lb
        y0, y1 = lb[1], lb[3]
        h = y1 - y0
        rows = (np.arange(S) + 0.5) / S

        def band(a, b, m=m):
            sel = (rows >= a) & (rows < b)
            mm = m & sel[:, None]
            bx = mask_box(mm)
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
    out["mediastinum"] = cv.to_image(box_union(um, (min(hb[0], um[0]), um[1], max(hb[2], um[2]), hb[3])))
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
