"""How each finding type is drawn: the anatomy changes made before drawing (``reshape``), and the drawers that
add a finding to the density map and return what was drawn (a :class:`Finding` with its boxes and region).
:data:`gkcore.data.synth.findings.SPECS` says which type uses which; every drawer has the signature
``draw(choice, spec, scene)``, where ``choice`` is the patient's random pick of the type (side, bilateral,
uncertain and three numbers u, v, w in [0, 1) that vary its look)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..knowledge import REGION_INDEX
from .anatomy import SIDE, Anatomy, Patient
from .canvas import Box, Canvas, area, center, contains, mask_box, seg_dist, smoothstep
from .devices import DEVICES, device_box

if TYPE_CHECKING:
    from .findings import FindingSpec

#: the lung regions of one side ("{side}" is "right" or "left"): where a lung finding may be reported
LUNG: Tuple[str, ...] = ("{side} lung", "{side} upper lung zone", "{side} mid lung zone", "{side} lower lung zone",
                         "{side} apical zone", "{side} costophrenic angle", "{side} hilar structures")


@dataclass
class Finding:
    """A drawn finding: its type, the entities it states, its boxes (normalised xyxy, image frame), the region
    the report names, its side ("R", "L" or None when bilateral or central), whether the report hedges, and
    drawing details other steps need (the broken rib, the device kind, ...)."""
    type: str
    entities: List[str]
    boxes: List[Box]
    region: str
    side: Optional[str]
    uncertain: bool
    detail: dict = field(default_factory=dict)
    spec: Optional[FindingSpec] = field(default=None, repr=False, compare=False)


@dataclass
class Scene:
    """What the drawers work on: the anatomy, the canvas, the patient's random stream, the lung masks, the
    region boxes, the mask of pixels where vessels are not drawn (fluid, air), and the pixel size."""
    an: Anatomy
    cv: Canvas
    rng: np.random.Generator
    lung_mask: Dict[str, np.ndarray]
    boxes: np.ndarray
    vessel_block: np.ndarray
    px: float

    def box(self, region: str) -> Box:
        return tuple(self.boxes[REGION_INDEX[region]])


# ============================================================================== placement helpers
def _pick_point(rng: np.random.Generator, mask: np.ndarray, cv: Canvas) -> Tuple[float, float]:
    """A random pixel of ``mask`` -> its patient-frame (x, y)."""
    idx = np.flatnonzero(mask.ravel())
    if idx.size == 0:
        raise RuntimeError("internal: empty placement mask")
    k = int(idx[rng.integers(idx.size)])
    r, c = divmod(k, cv.S)
    return float(cv.xs[c]), float(cv.ys[r])


def _zone_mask(lm: np.ndarray, zone: str) -> np.ndarray:
    """The rows of lung mask ``lm`` in one zone ("upper", "mid", "lower" or "any": all but the ends)."""
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


def region_for(point: Tuple[float, float], candidates: Sequence[str], boxes: np.ndarray) -> str:
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


def _regions(templates: Sequence[str], side: str) -> List[str]:
    return [r.format(side=SIDE[side]) for r in templates]


def _found(c: dict, spec: FindingSpec, sc: Scene, entities: List[str], mask_or_box: Union[np.ndarray, Box],
           candidates: Sequence[str], **detail) -> Optional[Finding]:
    """A one-box finding from its mask (or box), reported in the smallest candidate region holding its centre."""
    bx = mask_box(mask_or_box) if isinstance(mask_or_box, np.ndarray) else mask_or_box
    if bx is None:
        return None
    reg = region_for(center(bx), candidates, sc.boxes)
    return Finding(spec.name, list(entities), [bx], reg, c["side"], c["uncertain"], detail, spec)


# ============================================================================== drawers
def draw_lesion(c: dict, spec: FindingSpec, sc: Scene) -> Optional[Finding]:
    """A focal lung lesion: a soft irregular blob (``spec.lesion``) at a random point of its lung zone."""
    les = spec.lesion
    cv, S, rng = sc.cv, sc.cv.S, sc.rng
    lm = sc.lung_mask[c["side"]]
    zone = les.zone(c["u"]) if callable(les.zone) else les.zone
    r = les.radius[0] + les.radius[1] * c["v"]
    er = int(round(r * S * (0.6 if les.airspace else 1.05)))  # keep the centre this far inside the lung
    place = _zone_mask(_erode(lm, max(1, er)), zone)
    if not place.any():
        place = _zone_mask(lm, zone)
    if not place.any():
        return None
    x, y = _pick_point(rng, place, cv)
    sl, fld = _blob(cv, rng, x, y, r, les.irregular, les.soft)
    lmc = lm[sl] if les.airspace else np.ones_like(fld, bool)
    fld = fld * lmc
    if les.mottled:  # air bronchograms
        Xs, Ys = cv.grid(sl)
        tex = 0.85 + 0.15 * np.sin(Xs * 140 + 2 * np.sin(Ys * 90)) * np.cos(Ys * 120)
        fld = fld * tex
    if les.hollow:  # a lucent centre inside the wall
        Xs, Ys = cv.grid(sl)
        inner = smoothstep(0.55 * r, 0.4 * r, np.hypot(Xs - x, Ys - y))
        fld = fld - 1.1 * inner * fld
    cv.D[sl] += les.strength * fld
    m = np.zeros((S, S), bool)
    m[sl] = fld > 0.2 if not les.hollow else (np.abs(fld) > 0.2) | (_blob(cv, rng, x, y, r, 0, 0.01)[1] > 0.5)
    return _found(c, spec, sc, spec.stated(c), m, _regions(spec.regions, c["side"]))


def draw_effusion(c: dict, spec: FindingSpec, sc: Scene) -> Optional[Finding]:
    """Fluid layering at the base of one or both lungs, with a meniscus rising laterally."""
    an, cv, p = sc.an, sc.cv, sc.an.p
    sides = "RL" if c["bilateral"] else c["side"]
    outs = []
    for s in sides:
        sg = p.side_sign(s)
        xl = p.cx + sg * p.tw
        W = p.tw - p.mw
        h = (0.16 + 0.14 * c["u"]) * (p.base[s] - p.top)
        uu = np.clip(np.abs(cv.X - xl) / W, 0, 1)
        ym = p.base[s] - p.dome[s] * 0.4 - h * (1.0 - 0.55 * uu) - 0.02
        fld = smoothstep(ym - 0.012, ym + 0.025, cv.Y) * an.lung_soft(s, cv.X, cv.Y, sc.px, an.hf)
        # blunt the costophrenic angle: fill the lateral recess below the dome too
        cv.D[...] += 0.5 * fld
        sc.vessel_block |= fld > 0.5
        outs.append(mask_box(fld > 0.3))
    outs = [b for b in outs if b is not None]
    if not outs:
        return None
    reg = region_for(center(outs[0]), _regions(spec.regions, sides[0]), sc.boxes)
    return Finding(spec.name, spec.stated(c), outs, reg, None if len(sides) == 2 else c["side"], c["uncertain"],
                   {"bilateral": len(sides) == 2}, spec)


def draw_pneumothorax(c: dict, spec: FindingSpec, sc: Scene) -> Optional[Finding]:
    """A lucent rim without vessels along the lateral wall and the apex, and the visceral pleural line."""
    an, cv, p, D = sc.an, sc.cv, sc.an.p, sc.cv.D
    side = c["side"]
    lm = sc.lung_mask[side]
    sg = p.side_sign(side)
    tt, a, b = an.lung_edges(side, cv.Y)
    outer = b if sg > 0 else a
    depth = 0.055 + 0.04 * c["u"]
    dist_lat = np.abs(outer - cv.X)
    # the rim along the lateral wall and the apex, fading out towards the base
    span = np.clip(1.0 - (tt - 0.05) / 0.65, 0.0, 1.0)
    d_eff = depth * np.sqrt(span)
    apex = (tt < 0.06 + depth)
    rim = lm & ((dist_lat < d_eff) | apex) & (span > 0)
    D[rim] -= 0.15
    D[lm & ~rim] += 0.12  # the partly collapsed lung is denser
    sc.vessel_block |= rim
    # visceral pleural line
    from scipy.ndimage import binary_dilation

    edge = binary_dilation(rim, iterations=1) & lm & ~rim
    D[edge] += 0.2
    return _found(c, spec, sc, spec.stated(c), rim, _regions(spec.regions, side))


def draw_atelectasis(c: dict, spec: FindingSpec, sc: Scene) -> Optional[Finding]:
    """A dense near-horizontal band in the lower zone, with a wedge of volume loss below it."""
    cv, S, rng = sc.cv, sc.cv.S, sc.rng
    lm = sc.lung_mask[c["side"]]
    place = _zone_mask(_erode(lm, max(1, int(0.05 * S))), "lower")
    if not place.any():
        return None
    x, y = _pick_point(rng, place, cv)
    L = 0.07 + 0.04 * c["v"]
    ang = rng.uniform(-0.25, 0.25)
    x0, y0, x1, y1 = x - L * np.cos(ang), y - L * np.sin(ang), x + L * np.cos(ang), y + L * np.sin(ang)
    sl = cv.crop((min(x0, x1) - 0.05, min(y0, y1) - 0.05, max(x0, x1) + 0.05, max(y0, y1) + 0.05))
    Xs, Ys = cv.grid(sl)
    d, _ = seg_dist(Xs, Ys, x0, y0, x1, y1)
    fld = smoothstep(0.028, 0.012, d) * lm[sl]
    fld = np.maximum(fld, 0.6 * smoothstep(0.045, 0.02, d) * (Ys > y) * lm[sl])
    cv.D[sl] += 0.4 * fld
    m = np.zeros((S, S), bool)
    m[sl] = fld > 0.25
    return _found(c, spec, sc, spec.stated(c), m, _regions(spec.regions, c["side"]))


def draw_edema(c: dict, spec: FindingSpec, sc: Scene) -> Optional[Finding]:
    """Bilateral perihilar haze with a fine texture ("bat wing")."""
    an, cv = sc.an, sc.cv
    outs = []
    for s in "RL":
        hx, hy = an.hilum(s)
        dd = np.hypot((cv.X - hx) / 1.3, (cv.Y - hy - 0.08) / 1.5)
        fld = smoothstep(0.22, 0.06, dd) * sc.lung_mask[s]
        tex = 0.8 + 0.2 * np.sin(cv.Y * 180) * np.sin(cv.X * 150)
        cv.D[...] += 0.2 * fld * tex
        outs.append(mask_box(fld > 0.3))
    outs = [b for b in outs if b is not None]
    if not outs:
        return None
    reg = region_for(center(outs[0]), _regions(spec.regions, "R"), sc.boxes)  # named after the right lung
    return Finding(spec.name, spec.stated(c), outs, reg, None, c["uncertain"], {"bilateral": True}, spec)


def draw_interstitial(c: dict, spec: FindingSpec, sc: Scene) -> Optional[Finding]:
    """A reticular pattern over the mid and lower zones of both lungs."""
    cv = sc.cv
    outs = []
    for s in "RL":
        l2 = _zone_mask(sc.lung_mask[s], "lower") | _zone_mask(sc.lung_mask[s], "mid")
        tex = ((np.sin(cv.X * 260 + 3 * np.sin(cv.Y * 70)) > 0.55)
               | (np.sin(cv.Y * 240 + 3 * np.sin(cv.X * 60)) > 0.6))
        cv.D[...] += 0.14 * (l2 & tex) + 0.04 * l2
        outs.append(mask_box(l2))
    reg = region_for(center(outs[0]), _regions(spec.regions, "R"), sc.boxes)  # named after the right lung
    return Finding(spec.name, spec.stated(c), outs, reg, None, c["uncertain"], {"bilateral": True}, spec)


def draw_in_regions(c: dict, spec: FindingSpec, sc: Scene, **detail) -> Finding:
    """A finding its anatomy change already drew: the boxes of its regions, reported in the first; one-sided
    when its regions name a side."""
    regs = _regions(spec.regions, c["side"])
    side = c["side"] if "{side}" in spec.regions[0] else None
    return Finding(spec.name, spec.stated(c), [sc.box(r) for r in regs], regs[0], side, c["uncertain"], detail,
                   spec)


def draw_scoliosis(c: dict, spec: FindingSpec, sc: Scene) -> Finding:
    return draw_in_regions(c, spec, sc, convex="right" if sc.an.p.scoliosis < 0 else "left")


def draw_aortic_rim(c: dict, spec: FindingSpec, sc: Scene) -> Finding:
    """The enlarged arch (drawn by its anatomy change) with a calcified rim on its upper half."""
    cv = sc.cv
    ax_, ay_, ar = sc.an.aorta()
    sl = cv.crop((ax_ - 2 * ar, ay_ - 2 * ar, ax_ + 2 * ar, ay_ + 2 * ar))
    Xs, Ys = cv.grid(sl)
    rim = smoothstep(0.006, 0.002, np.abs(np.hypot(Xs - ax_, Ys - ay_) - ar * 0.92)) * (Ys < ay_)
    cv.D[sl] += 0.3 * rim
    return draw_in_regions(c, spec, sc)


def draw_hila(c: dict, spec: FindingSpec, sc: Scene) -> Finding:
    """Enlarged hila (drawn by the anatomy change): the hilar boxes of one or both sides."""
    sides = "RL" if c["bilateral"] else c["side"]
    regs = [_regions(spec.regions, s)[0] for s in sides]
    return Finding(spec.name, spec.stated(c), [sc.box(r) for r in regs], regs[0],
                   None if len(sides) == 2 else c["side"], c["uncertain"], {"bilateral": len(sides) == 2}, spec)


def draw_pleural_thickening(c: dict, spec: FindingSpec, sc: Scene) -> Optional[Finding]:
    """A dense apical cap continuing down the lateral wall."""
    an, cv, p = sc.an, sc.cv, sc.an.p
    side = c["side"]
    lm = sc.lung_mask[side]
    tt, a, b = an.lung_edges(side, cv.Y)
    sg = p.side_sign(side)
    outer = b if sg > 0 else a
    capm = lm & ((tt < 0.12) | ((np.abs(outer - cv.X) < 0.014) & (tt < 0.45)))
    cv.D[capm] += 0.25
    return _found(c, spec, sc, spec.stated(c), capm, _regions(spec.regions, side))


def draw_pneumoperitoneum(c: dict, spec: FindingSpec, sc: Scene) -> Optional[Finding]:
    """A lucent crescent of free air under the right hemidiaphragm (whatever side was picked)."""
    an, cv, p = sc.an, sc.cv, sc.an.p
    xl, xm = p.cx - p.tw, p.cx - p.mw
    dy = an.diaphragm_y("R", cv.X)
    thick = 0.022 * np.sin(np.pi * np.clip((cv.X - xl - 0.03) / (xm - xl - 0.06), 0, 1))
    cres = (cv.X > xl + 0.03) & (cv.X < xm - 0.03) & (cv.Y > dy + 0.008) & (cv.Y < dy + 0.008 + thick)
    cv.D[cres] -= 0.4
    fd = _found(c, spec, sc, spec.stated(c), cres, _regions(spec.regions, "R"))
    if fd is not None:
        fd.side = "R"
    return fd


def draw_hernia(c: dict, spec: FindingSpec, sc: Scene) -> Finding:
    """A hiatal hernia: a retrocardiac round air-fluid level."""
    an, cv, S, D = sc.an, sc.cv, sc.cv.S, sc.cv.D
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
    return Finding(spec.name, spec.stated(c), [mask_box(m)], spec.regions[0], None, c["uncertain"], {}, spec)


def draw_fracture(c: dict, spec: FindingSpec, sc: Scene) -> Finding:
    """A clavicle (v < 0.5) or posterior rib fracture. Only its place is decided here: the bones, drawn later
    (:func:`~gkcore.data.synth.anatomy.draw_ribs_and_clavicles`), show the gap from ``detail``."""
    an, cv, p = sc.an, sc.cv, sc.an.p
    side = c["side"]
    if c["v"] < 0.5:
        x0, y0, x1, y1 = an.clavicle(side)
        gt = 0.45 + 0.2 * c["u"]
        xm_, ym_ = x0 + gt * (x1 - x0), y0 + gt * (y1 - y0)
        bx = cv.to_image((xm_ - 0.035, ym_ - 0.03, xm_ + 0.035, ym_ + 0.04))
        return Finding(spec.name, spec.stated(c, "clavicle fracture"), [bx], f"{SIDE[side]} clavicle", side,
                       c["uncertain"], {"clavicle": side, "t": gt}, spec)
    k = 3 + int(c["u"] * 4.99)  # rib k + 2 (the 5th to the 9th) on the ribs drawer's count
    sg = p.side_sign(side)
    dxf = 0.18 + 0.12 * c["w"]
    H = p.base["L"] - p.top
    y0r = p.top - 0.01 + k * H / 9.5
    yc = y0r - 0.2 * dxf + 0.95 * dxf * dxf
    gx = p.cx + sg * dxf
    D_ = 0.03
    bx = cv.to_image((gx - D_, yc - D_, gx + D_, yc + D_))
    return Finding(spec.name, spec.stated(c, "rib fracture"), [bx],
                   region_for(center(bx), _regions(spec.regions, side), sc.boxes), side, c["uncertain"],
                   {"rib": (side, k), "x": gx, "rib_number": k + 2}, spec)


def place_device(c: dict, spec: FindingSpec, sc: Scene) -> Finding:
    """A support device of the kind u picks (:data:`~gkcore.data.synth.devices.DEVICES`); it is drawn last,
    over the anatomy (``spec.overlay``). Devices are never hedged."""
    kind = list(DEVICES)[int(c["u"] * 5.999)]  # 6 kinds
    side = c["side"]
    return Finding(spec.name, spec.stated(c, kind), [device_box(kind, side, sc.an, sc.cv)],
                   _regions([DEVICES[kind].region], side)[0], side, False, {"kind": kind}, spec)


# ============================================================================== anatomy changes
def enlarge_heart(p: Patient, c: dict) -> None:
    p.ctr = 0.58 + 0.1 * c["u"]
    p.heart_h *= 1.12


def hyperinflate(p: Patient, c: dict) -> None:
    p.hyper = True
    p.top -= 0.02
    for s in "RL":
        p.base[s] += 0.05
        p.dome[s] = 0.02


def lower_volumes(p: Patient, c: dict) -> None:
    for s in "RL":
        p.base[s] -= 0.07
        p.dome[s] += 0.01


def curve_spine(p: Patient, c: dict) -> None:
    p.scoliosis = (0.035 + 0.03 * c["u"]) * (1 if c["v"] < 0.5 else -1)


def raise_hemidiaphragm(p: Patient, c: dict) -> None:
    p.base[c["side"]] -= 0.08 + 0.04 * c["u"]
    p.dome[c["side"]] += 0.02


def widen_mediastinum(p: Patient, c: dict) -> None:
    p.mw += 0.035 + 0.02 * c["u"]


def enlarge_aorta(p: Patient, c: dict) -> None:
    p.aorta_r = 0.045 + 0.01 * c["u"]


def enlarge_hila(p: Patient, c: dict) -> None:
    for s in ("RL" if c["bilateral"] else c["side"]):
        p.hilum_r[s] = 0.055 + 0.015 * c["u"]
