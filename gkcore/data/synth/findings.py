"""Findings: which finding types a patient gets, the anatomy changes they make, and their drawers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..knowledge import REGION_INDEX
from .anatomy import Anatomy, Patient
from .canvas import Box, Canvas, area, center, contains, mask_box, seg_dist, smoothstep


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

SIDE = {"R": "right", "L": "left"}


def choose_findings(rng) -> List[dict]:
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


def apply_anatomy_findings(p: Patient, specs: List[dict], rng):
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


# ============================================================================== drawn findings, placement
@dataclass
class Finding:
    type: str
    entities: List[str]
    boxes: List[Box]
    region: str
    side: Optional[str]
    uncertain: bool
    detail: dict = field(default_factory=dict)


def _pick_point(rng, mask: np.ndarray, cv: Canvas) -> Tuple[float, float]:
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


def _blob(cv: Canvas, rng, x, y, r, irregular=0.25, soft=0.35):
    """A soft irregular blob (slice, field in [0, 1]) centred at patient (x, y), radius r."""
    sl = cv.crop((x - 1.6 * r, y - 1.6 * r, x + 1.6 * r, y + 1.6 * r))
    X, Y = cv.grid(sl)
    th = np.arctan2(Y - y, X - x)
    k = rng.uniform(0, 2 * np.pi, 3)
    rr = r * (1 + irregular * (0.5 * np.sin(2 * th + k[0]) + 0.3 * np.sin(3 * th + k[1]) + 0.2 * np.sin(5 * th + k[2])))
    d = np.hypot(X - x, Y - y) / rr
    return sl, smoothstep(1.0, 1.0 - soft, d).astype(np.float32)


def _region_for(point: Tuple[float, float], candidates: Sequence[str], boxes: np.ndarray) -> str:
    """Smallest candidate region whose box contains the image-frame point (falls back to the nearest)."""
    x, y = point
    best, best_a = None, 9.0
    for r in candidates:
        b = tuple(boxes[REGION_INDEX[r]])
        if contains(b, x, y) and area(b) < best_a:
            best, best_a = r, area(b)
    if best is None:
        d = [(abs(x - (boxes[REGION_INDEX[r]][0] + boxes[REGION_INDEX[r]][2]) / 2)
              + abs(y - (boxes[REGION_INDEX[r]][1] + boxes[REGION_INDEX[r]][3]) / 2), r) for r in candidates]
        best = min(d)[1]
    return best


def _zones(side):
    n = SIDE[side]
    return [f"{n} lung", f"{n} upper lung zone", f"{n} mid lung zone", f"{n} lower lung zone",
            f"{n} apical zone", f"{n} costophrenic angle", f"{n} hilar structures"]


# ------------------------------------------------------------------------------ finding drawers
def draw_finding(f, an: Anatomy, cv: Canvas, rng, lung_mask, boxes, vessel_block, px) -> Optional[Finding]:
    p = an.p
    t = f["type"]
    side = f["side"]
    name = SIDE[side]
    D, S = cv.D, cv.S
    unc = f["uncertain"]
    lm = lung_mask[side]

    def fin(entities, mask_or_box, candidates, **detail):
        bx = mask_box(mask_or_box) if isinstance(mask_or_box, np.ndarray) else mask_or_box
        if bx is None:
            return None
        reg = _region_for(center(bx), candidates, boxes)
        return Finding(t, list(entities), [bx], reg, side, unc, detail)

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
            inner = smoothstep(0.55 * r, 0.4 * r, np.hypot(Xs - x, Ys - y))
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
            fld = smoothstep(ym - 0.012, ym + 0.025, cv.Y) * an.lung_soft(s, cv.X, cv.Y, px, an.hf)
            # blunt the costophrenic angle: fill the lateral recess below the dome too
            D[...] += 0.5 * fld
            vessel_block |= fld > 0.5
            outs.append(mask_box(fld > 0.3))
        outs = [b for b in outs if b is not None]
        if not outs:
            return None
        reg = _region_for(center(outs[0]), [f"{SIDE[sides[0]]} costophrenic angle",
                                             f"{SIDE[sides[0]]} lower lung zone", f"{SIDE[sides[0]]} lung"], boxes)
        ent = ["pleural effusion"]
        return Finding(t, ent, outs, reg, None if len(sides) == 2 else side, unc, {"bilateral": len(sides) == 2})

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
        d, _ = seg_dist(Xs, Ys, x0, y0, x1, y1)
        fld = smoothstep(0.028, 0.012, d) * lm[sl]
        # plus a wedge of volume loss below the band
        fld = np.maximum(fld, 0.6 * smoothstep(0.045, 0.02, d) * (Ys > y) * lm[sl])
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
            fld = smoothstep(0.22, 0.06, dd) * l2
            tex = 0.8 + 0.2 * np.sin(cv.Y * 180) * np.sin(cv.X * 150)
            D[...] += 0.2 * fld * tex
            outs.append(mask_box(fld > 0.3))
        outs = [b for b in outs if b is not None]
        if not outs:
            return None
        ents = ["edema"] + (["kerley lines"] if f["w"] < 0.3 else [])
        reg = _region_for(center(outs[0]), _zones("R"), boxes)
        return Finding(t, ents, outs, reg, None, unc, {"bilateral": True})

    if t == "interstitial opacity":
        outs = []
        for s in "RL":
            l2 = _zone_mask(lung_mask[s], "lower") | _zone_mask(lung_mask[s], "mid")
            tex = ((np.sin(cv.X * 260 + 3 * np.sin(cv.Y * 70)) > 0.55)
                   | (np.sin(cv.Y * 240 + 3 * np.sin(cv.X * 60)) > 0.6))
            D[...] += 0.14 * (l2 & tex) + 0.04 * l2
            outs.append(mask_box(l2))
        ents = ["interstitial opacity"] + (["fibrosis"] if f["w"] < 0.5 else [])
        reg = _region_for(center(outs[0]), _zones("R"), boxes)
        return Finding(t, ents, outs, reg, None, unc, {"bilateral": True})

    if t == "cardiomegaly":
        return Finding(t, ["cardiomegaly"], [tuple(boxes[REGION_INDEX["cardiac silhouette"]])],
                        "cardiac silhouette", None, unc)

    if t == "widened mediastinum":
        ents = ["widened mediastinum"] + (["enlarged cardiomediastinum"] if f["w"] < 0.6 else [])
        return Finding(t, ents, [tuple(boxes[REGION_INDEX["upper mediastinum"]])], "upper mediastinum", None, unc)

    if t == "tortuous aorta":
        ax_, ay_, ar = an.aorta()
        sl = cv.crop((ax_ - 2 * ar, ay_ - 2 * ar, ax_ + 2 * ar, ay_ + 2 * ar))
        Xs, Ys = cv.grid(sl)
        rim = smoothstep(0.006, 0.002, np.abs(np.hypot(Xs - ax_, Ys - ay_) - ar * 0.92)) * (Ys < ay_)
        D[sl] += 0.3 * rim
        ents = ["tortuous aorta"] + (["aortic calcification"] if f["w"] < 0.6 else [])
        return Finding(t, ents, [tuple(boxes[REGION_INDEX["aortic arch"]])], "aortic arch", None, unc)

    if t == "hilar enlargement":
        sides = "RL" if f["bilateral"] else side
        bx = [tuple(boxes[REGION_INDEX[f"{SIDE[s]} hilar structures"]]) for s in sides]
        return Finding(t, ["hilar enlargement"], bx, f"{SIDE[sides[0]]} hilar structures",
                        None if len(sides) == 2 else side, unc, {"bilateral": len(sides) == 2})

    if t == "elevated hemidiaphragm":
        return Finding(t, ["elevated hemidiaphragm"], [tuple(boxes[REGION_INDEX[f"{name} hemidiaphragm"]])],
                        f"{name} hemidiaphragm", side, unc)

    if t == "emphysema":
        bx = [tuple(boxes[REGION_INDEX["right lung"]]), tuple(boxes[REGION_INDEX["left lung"]])]
        return Finding(t, ["emphysema", "hyperinflation"], bx, "right lung", None, unc)

    if t == "low lung volumes":
        bx = [tuple(boxes[REGION_INDEX["right lung"]]), tuple(boxes[REGION_INDEX["left lung"]])]
        return Finding(t, ["low lung volumes"], bx, "right lung", None, unc)

    if t == "scoliosis":
        return Finding(t, ["scoliosis"], [tuple(boxes[REGION_INDEX["spine"]])], "spine", None, unc,
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
        inside = smoothstep(r, r - 0.006, d)
        air = inside * (Ys < y + 0.005)
        D[sl] -= 0.3 * air
        D[sl] += 0.1 * smoothstep(0.004, 0.0, np.abs(d - r))
        m = np.zeros((S, S), bool)
        m[sl] = inside > 0.3
        return Finding(t, ["hernia"], [mask_box(m)], "cardiac silhouette", None, unc)

    if t == "fracture":
        if f["v"] < 0.5:  # clavicle
            x0, y0, x1, y1 = an.clavicle(side)
            gt = 0.45 + 0.2 * f["u"]
            xm_, ym_ = x0 + gt * (x1 - x0), y0 + gt * (y1 - y0)
            bx = cv.to_image((xm_ - 0.035, ym_ - 0.03, xm_ + 0.035, ym_ + 0.04))
            return Finding(t, ["clavicle fracture", "fracture"], [bx], f"{name} clavicle", side, unc,
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
        return Finding(t, ["rib fracture", "fracture"], [bx], _region_for(center(bx), _zones(side), boxes),
                        side, unc, {"rib": (side, k), "x": gx, "rib_number": k + 2})

    if t == "device":
        kind = ["endotracheal tube", "central venous catheter", "nasogastric tube", "pacemaker",
                "sternotomy wires", "chest tube"][int(f["u"] * 5.999)]
        fd = Finding(t, [kind, "support devices"], [], "", side, False, {"kind": kind})
        fd.boxes = [_device_box(fd, an, cv)]
        fd.region = {"endotracheal tube": "trachea", "central venous catheter": "svc",
                     "nasogastric tube": "mediastinum", "pacemaker": "cardiac silhouette",
                     "sternotomy wires": "mediastinum", "chest tube": f"{name} lung"}[kind]
        if kind == "pacemaker":
            fd.region = "cardiac silhouette"
        return fd
    raise ValueError(f"unknown finding type {t!r}")


def _device_path(fd: Finding, an: Anatomy):
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


def _device_box(fd: Finding, an: Anatomy, cv: Canvas) -> Box:
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


def draw_device(fd: Finding, an: Anatomy, cv: Canvas, px: float):
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
        d, _ = seg_dist(Xs, Ys, x0, y0, x1, y1)
        D[sl] = np.maximum(D[sl], D[sl] * 0.3 + val * smoothstep(width, width * 0.5, d))

    if path is not None:
        for (x0, y0), (x1, y1) in zip(path[:-1], path[1:]):
            seg(x0, y0, x1, y1, w, 1.3)
        return
    if k == "pacemaker":
        gx, gy = p.cx + 0.22, p.top + 0.03
        sl = cv.crop((gx - 0.05, gy - 0.04, gx + 0.05, gy + 0.04))
        Xs, Ys = cv.grid(sl)
        D[sl] = np.maximum(D[sl], 1.4 * smoothstep(1.1, 0.9, ((Xs - gx) / 0.04) ** 4 + ((Ys - gy) / 0.028) ** 4))
        seg(gx - 0.02, gy, p.cx - 0.01, p.carina + 0.02, 0.007, 1.3)
        seg(p.cx - 0.01, p.carina + 0.02, an.hx - 0.03, an.hy + 0.02, 0.007, 1.3)
        return
    for i in range(5):  # sternotomy wires
        y = p.carina - 0.02 + i * (an.hy - p.carina + 0.02) / 4.5
        sl = cv.crop((p.cx - 0.03, y - 0.03, p.cx + 0.03, y + 0.03))
        Xs, Ys = cv.grid(sl)
        ring = np.abs(np.hypot((Xs - p.cx) / 1.6, Ys - y) - 0.013)
        D[sl] = np.maximum(D[sl], 1.3 * smoothstep(0.0065, 0.003, ring))
