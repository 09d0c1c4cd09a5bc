"""One patient's anatomy: the random patient, the geometry of lungs, heart, diaphragm and bones, the 29
Chest ImaGenome region boxes derived from what is drawn, and the drawing of the normal anatomy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..knowledge import REGIONS
from .canvas import ArrayOrFloat, Box, Canvas, box_union, mask_box, seg_dist, smooth_noise, smoothstep

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


def draw_patient(rng: np.random.Generator) -> Patient:
    """A random patient's anatomy (before any finding changes it)."""
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

    def __init__(self, p: Patient) -> None:
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
    def lung_edges(self, side: str, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    def diaphragm_y(self, side: str, x: ArrayOrFloat) -> np.ndarray:
        """The hemidiaphragm contour (patient frame) over x."""
        p = self.p
        s = p.side_sign(side)
        xl = p.cx + s * p.tw
        W = abs(p.tw - p.mw)
        u = np.clip(np.abs(x - xl) / W, 0.0, 1.0)  # 0 lateral (costophrenic angle) .. 1 medial
        return p.base[side] - p.dome[side] * np.sin(0.5 * np.pi * np.clip(u / 0.6, 0.0, 1.0))

    def heart_field(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Heart ellipse field: < 1 inside."""
        dx = (X - self.hx) / self.hw
        dy = (Y - self.hy) / self.hh
        return dx * dx + dy * dy

    def lung_mask(self, side: str, X: np.ndarray, Y: np.ndarray, hf: Optional[np.ndarray] = None) -> np.ndarray:
        """Boolean mask of one lung (outside the heart field ``hf``, computed when not given)."""
        t, a, b = self.lung_edges(side, Y)
        m = (t >= 0) & (X >= a) & (X <= b) & (Y <= self.diaphragm_y(side, X))
        return m & ((self.heart_field(X, Y) if hf is None else hf) > 1.0)

    def lung_soft(self, side: str, X: np.ndarray, Y: np.ndarray, px: float,
                  hf: Optional[np.ndarray] = None) -> np.ndarray:
        """Lung mask with about one-pixel soft edges (float32 in [0, 1])."""
        t, a, b = self.lung_edges(side, Y)
        e = 1.2 * px
        m = smoothstep(-e, e, X - a) * smoothstep(-e, e, b - X)
        m = m * smoothstep(-e, e, self.diaphragm_y(side, X) - Y) * (t >= 0)
        hf = self.heart_field(X, Y) if hf is None else hf
        return (m * smoothstep(1.0, 1.08, hf)).astype(np.float32)

    def hilum(self, side: str) -> Tuple[float, float]:
        """Centre (x, y) of one hilum."""
        p = self.p
        s = p.side_sign(side)
        y = p.top + 0.42 * (p.base[side] - p.top)
        return p.cx + s * (p.mw + 0.035), y

    def spine_x(self, y: ArrayOrFloat) -> np.ndarray:
        """x of the spine's midline at heights y (curved by scoliosis)."""
        p = self.p
        return p.cx + p.scoliosis * np.sin(np.pi * (y - 0.1) / 0.8)

    def clavicle(self, side: str) -> Tuple[float, float, float, float]:
        """The clavicle as a segment (medial x, y, lateral x, y)."""
        p = self.p
        s = p.side_sign(side)
        return (p.cx + s * 0.035, p.top + 0.055, p.cx + s * (p.tw * 0.78), p.top - 0.03)

    def aorta(self) -> Tuple[float, float, float]:
        """The aortic knob: centre x, y and radius."""
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


# ============================================================================== drawing the normal anatomy
# Each step adds to the canvas's density map cv.D, in the order render() calls them.
def draw_body(an: Anatomy, cv: Canvas) -> None:
    """Soft tissue of the trunk, neck and shoulders; the denser abdomen below the diaphragm, and the gastric
    bubble under the left hemidiaphragm."""
    p, X, Y, D = an.p, cv.X, cv.Y, cv.D
    bw = p.tw + 0.085
    ax = np.abs(X - p.cx)
    torso = smoothstep(bw + 0.01, bw - 0.01, ax) * smoothstep(p.top - 0.1, p.top - 0.04, Y)
    shoulder = smoothstep(1.05, 0.95, (ax / (bw + 0.04)) ** 2 + ((p.top + 0.02 - Y) / 0.16) ** 2)
    shoulder *= Y < p.top + 0.02
    neck = smoothstep(0.09, 0.075, ax)
    body = np.maximum(np.maximum(torso, shoulder), neck)
    D += 0.52 * body
    # abdomen below the diaphragm (denser), gastric bubble under the left hemidiaphragm
    dia = np.where(X < p.cx, an.diaphragm_y("R", X), an.diaphragm_y("L", X))
    D += 0.1 * smoothstep(0.0, 0.04, Y - dia) * body
    gx, gy = p.cx + 0.5 * p.tw, p.base["L"] - 0.3 * p.dome["L"] + 0.05
    sl = cv.crop((gx - 0.08, gy - 0.05, gx + 0.08, gy + 0.05))
    Xs, Ys = cv.grid(sl)
    D[sl] -= 0.16 * smoothstep(1.1, 0.8, ((Xs - gx) / 0.055) ** 2 + ((Ys - gy) / 0.03) ** 2) * (Ys > dia[sl] + 0.01)


def draw_lungs(an: Anatomy, cv: Canvas, px: float) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """The lungs' air: (soft lung masks per side, their sum). Sets ``an.hf``, the heart field later steps use."""
    p, X, Y, D = an.p, cv.X, cv.Y, cv.D
    hf = an.heart_field(X, Y)
    an.hf = hf
    lung_soft = {s: an.lung_soft(s, X, Y, px, hf) for s in "RL"}
    dark = 0.37 if not p.hyper else 0.43
    lungs = lung_soft["R"] + lung_soft["L"]
    D -= dark * lungs
    # lungs slightly denser towards the bases and medially (soft tissue overlap)
    D += 0.05 * lungs * np.clip((Y - p.top) / 0.6, 0, 1)
    return lung_soft, lungs


def draw_lung_markings(an: Anatomy, cv: Canvas, rng: np.random.Generator, lung_soft: Dict[str, np.ndarray],
                       lungs: np.ndarray, vessel_block: np.ndarray, px: float) -> None:
    """Vessels branching from each hilum, the hilar shadows and a fine texture; none where ``vessel_block``
    (fluid or air a finding drew)."""
    p, S, D = an.p, cv.S, cv.D
    for s in "RL":
        hx, hy = an.hilum(s)
        sg = p.side_sign(s)
        for k in range(9):
            ang = np.deg2rad(-70 + 140 * (k + rng.uniform(-0.3, 0.3)) / 8)
            L = rng.uniform(0.12, 0.24)
            x1 = hx + sg * L * np.cos(ang)
            y1 = hy + L * np.sin(ang) * 1.2
            sl = cv.crop((min(hx, x1) - 0.02, min(hy, y1) - 0.02, max(hx, x1) + 0.02, max(hy, y1) + 0.02))
            Xs, Ys = cv.grid(sl)
            d, t = seg_dist(Xs, Ys, hx, hy, x1, y1)
            wdt = 0.0065 * (1 - 0.7 * t) + 0.6 * px
            v = smoothstep(wdt, 0.3 * wdt, d) * (1 - 0.6 * t)
            D[sl] += 0.09 * v * lung_soft[s][sl] * ~vessel_block[sl]
        r = p.hilum_r[s]
        sl = cv.crop((hx - 2.5 * r, hy - 2.5 * r, hx + 2.5 * r, hy + 2.5 * r))
        Xs, Ys = cv.grid(sl)
        D[sl] += (0.09 + 0.08 * (r > 0.04)) * smoothstep(1.6 * r, 0.2 * r, np.hypot((Xs - hx) * 1.3, Ys - hy))
    tex = smooth_noise(rng, (S, S), max(8, S // 10))
    D += 0.03 * tex * lungs * ~vessel_block


def draw_mediastinum(an: Anatomy, cv: Canvas) -> None:
    """Heart, mediastinum and aortic knob (dense), trachea and main bronchi (air)."""
    p, D, hf = an.p, cv.D, an.hf
    D += 0.3 * smoothstep(1.06, 0.94, hf)
    ytop = p.top - 0.08
    sl = cv.crop((p.cx - p.mw - 0.02, ytop, p.cx + p.mw + 0.02, an.hy))
    Xs, Ys = cv.grid(sl)
    med = smoothstep(p.mw + 0.008, p.mw - 0.008, np.abs(Xs - p.cx)) * smoothstep(ytop, ytop + 0.04, Ys)
    D[sl] += 0.26 * med * (1 - smoothstep(1.3, 0.9, hf[sl]))
    axo, ayo, ar = an.aorta()
    sl = cv.crop((axo - 2 * ar, ayo - 2 * ar, axo + 2 * ar, ayo + 2 * ar))
    Xs, Ys = cv.grid(sl)
    D[sl] += 0.2 * smoothstep(ar, ar - 0.006, np.hypot(Xs - axo, Ys - ayo))

    # trachea and main bronchi (air: darker)
    tx = float(an.spine_x(p.carina * 0.5))
    sl = cv.crop((tx - 0.03, 0.0, tx + 0.03, p.carina))
    Xs, Ys = cv.grid(sl)
    D[sl] -= 0.14 * smoothstep(0.017, 0.011, np.abs(Xs - tx)) * smoothstep(0.0, 0.05, Ys)
    for s in "RL":
        sl = cv.crop((tx - 0.1, p.carina - 0.02, tx + 0.1, p.carina + 0.09))
        Xs, Ys = cv.grid(sl)
        d, _ = seg_dist(Xs, Ys, tx, p.carina, tx + p.side_sign(s) * 0.06, p.carina + 0.065)
        D[sl] -= 0.1 * smoothstep(0.011, 0.006, d)


def draw_spine(an: Anatomy, cv: Canvas) -> None:
    """The spine (following any scoliosis) with vertebral end plates."""
    p, D = an.p, cv.D
    sl = cv.crop((p.cx - abs(p.scoliosis) - 0.05, -1.0, p.cx + abs(p.scoliosis) + 0.05, 2.0))
    Xs, Ys = cv.grid(sl)
    sp = smoothstep(0.036, 0.028, np.abs(Xs - an.spine_x(Ys)))
    plates = 0.75 + 0.25 * np.cos(2 * np.pi * (Ys - p.top) / 0.048)
    D[sl] += 0.13 * sp * plates


def draw_ribs_and_clavicles(an: Anatomy, cv: Canvas, fractures: Sequence[dict]) -> None:
    """Posterior rib arcs and clavicles; ``fractures`` (the fracture findings' details) say which bone is
    broken and where."""
    p, D, hf = an.p, cv.D, an.hf
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
            band = smoothstep(th, th * 0.55, dist)
            edge = smoothstep(th * 0.35, 0.0, np.abs(dist - th * 0.8))
            fr = [d for d in fractures if d.get("rib") == (s, k)]
            if fr:  # a gap with a step: the lateral fragment displaced downwards
                gx = fr[0]["x"]
                gap = smoothstep(0.005, 0.011, np.abs(Xs - gx))
                lat = (Xs - gx) * sg > 0
                dist2 = np.abs(Ys - yc - 0.014)
                band = np.where(lat, smoothstep(th, th * 0.55, dist2), band) * gap
                edge = np.where(lat, smoothstep(th * 0.35, 0.0, np.abs(dist2 - th * 0.8)), edge) * gap
            D[sl] += (0.065 * band + 0.03 * edge) * in_side * (1.0 - 0.6 * smoothstep(1.1, 0.8, hf[sl]))
        x0, y0, x1, y1 = an.clavicle(s)
        sl = cv.crop((min(x0, x1) - 0.03, min(y0, y1) - 0.03, max(x0, x1) + 0.03, max(y0, y1) + 0.03))
        Xs, Ys = cv.grid(sl)
        fr = [d for d in fractures if d.get("clavicle") == s]
        if fr:
            gt = fr[0]["t"]
            xm_, ym_ = x0 + gt * (x1 - x0), y0 + gt * (y1 - y0)
            # two fragments with a gap, the lateral one displaced downwards
            frags = ((x0, y0, xm_ - sg * 0.006, ym_), (xm_ + sg * 0.006, ym_ + 0.012, x1, y1 + 0.012))
            for (a, b, c, d_) in frags:
                dd, _ = seg_dist(Xs, Ys, a, b, c, d_)
                D[sl] += 0.24 * smoothstep(0.013, 0.008, dd)
        else:
            dd, _ = seg_dist(Xs, Ys, x0, y0, x1, y1)
            D[sl] += 0.24 * smoothstep(0.013, 0.008, dd)
