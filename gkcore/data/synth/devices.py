"""Support devices, one entry per kind: where a tube or line runs (or how a pacemaker or sternotomy wires are
drawn), its box, the region it is reported in and the report's phrases. Devices are radio-opaque: they are
drawn over everything else (:func:`draw_device`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import numpy as np

from .anatomy import Anatomy
from .canvas import Box, Canvas, seg_dist, smoothstep

if TYPE_CHECKING:
    from .drawers import Finding

Point = Tuple[float, float]


@dataclass(frozen=True)
class DeviceKind:
    region: str                 # region of the record; "{side}" is the finding's side
    phrases: Tuple[str, ...]    # report phrases; "{n}" is a distance in cm, "{side}" the finding's side
    path: Optional[Callable[[Anatomy, str], List[Point]]] = None  # a tube or line: its polyline (patient frame)
    width: float = 0.008        # line width of a tube or line
    box: Optional[Callable[[Anatomy, Canvas], Box]] = None  # other devices: their box ...
    draw: Optional[Callable[[Anatomy, Canvas], None]] = None  # ... and how they are drawn


def _line(cv: Canvas, x0: float, y0: float, x1: float, y1: float, width: float, val: float) -> None:
    """A radio-opaque segment: the density rises to ``val`` (keeping 30 % of what is under it)."""
    D = cv.D
    sl = cv.crop((min(x0, x1) - 2 * width - 0.01, min(y0, y1) - 2 * width - 0.01,
                  max(x0, x1) + 2 * width + 0.01, max(y0, y1) + 2 * width + 0.01))
    Xs, Ys = cv.grid(sl)
    d, _ = seg_dist(Xs, Ys, x0, y0, x1, y1)
    D[sl] = np.maximum(D[sl], D[sl] * 0.3 + val * smoothstep(width, width * 0.5, d))


def _trachea_x(an: Anatomy) -> float:
    return float(an.spine_x(an.p.carina * 0.5))


def _endotracheal_path(an: Anatomy, side: str) -> List[Point]:
    tx = _trachea_x(an)
    return [(tx, 0.0), (tx, an.p.carina - 0.05)]


def _central_venous_path(an: Anatomy, side: str) -> List[Point]:
    p = an.p
    return [(p.cx - p.tw * 0.7, p.top - 0.01), (p.cx - p.mw * 0.6, p.top + 0.05),
            (p.cx - p.mw * 0.55, an.htop + 0.02)]


def _nasogastric_path(an: Anatomy, side: str) -> List[Point]:
    p = an.p
    tx = _trachea_x(an)
    return [(tx + 0.01, 0.0), (tx + 0.012, p.carina), (p.cx + 0.02, an.hbot), (p.cx + 0.12, an.hbot + 0.09)]


def _chest_tube_path(an: Anatomy, side: str) -> List[Point]:
    p = an.p
    s = p.side_sign(side)
    return [(p.cx + s * (p.tw + 0.07), p.base[side] - 0.12), (p.cx + s * (p.tw - 0.03), p.base[side] - 0.18),
            (p.cx + s * (p.tw - 0.1), p.top + 0.1)]


def _generator(an: Anatomy) -> Point:
    """Centre of the pacemaker generator (left upper chest)."""
    return an.p.cx + 0.22, an.p.top + 0.03


def _pacemaker_box(an: Anatomy, cv: Canvas) -> Box:
    gx, gy = _generator(an)
    return cv.to_image((min(gx - 0.05, an.hx - 0.05), gy - 0.035, gx + 0.05, an.hy + 0.02))


def _draw_pacemaker(an: Anatomy, cv: Canvas) -> None:
    """The generator (a rounded rectangle) and a lead through the svc into the heart."""
    p, D = an.p, cv.D
    gx, gy = _generator(an)
    sl = cv.crop((gx - 0.05, gy - 0.04, gx + 0.05, gy + 0.04))
    Xs, Ys = cv.grid(sl)
    D[sl] = np.maximum(D[sl], 1.4 * smoothstep(1.1, 0.9, ((Xs - gx) / 0.04) ** 4 + ((Ys - gy) / 0.028) ** 4))
    _line(cv, gx - 0.02, gy, p.cx - 0.01, p.carina + 0.02, 0.007, 1.3)
    _line(cv, p.cx - 0.01, p.carina + 0.02, an.hx - 0.03, an.hy + 0.02, 0.007, 1.3)


def _wires_box(an: Anatomy, cv: Canvas) -> Box:
    p = an.p
    return cv.to_image((p.cx - 0.025, p.carina - 0.04, p.cx + 0.025, an.hy + 0.04))


def _draw_wires(an: Anatomy, cv: Canvas) -> None:
    """Five wire loops down the sternum."""
    p, D = an.p, cv.D
    for i in range(5):
        y = p.carina - 0.02 + i * (an.hy - p.carina + 0.02) / 4.5
        sl = cv.crop((p.cx - 0.03, y - 0.03, p.cx + 0.03, y + 0.03))
        Xs, Ys = cv.grid(sl)
        ring = np.abs(np.hypot((Xs - p.cx) / 1.6, Ys - y) - 0.013)
        D[sl] = np.maximum(D[sl], 1.3 * smoothstep(0.0065, 0.003, ring))


#: device kind -> its description; the order is the order a finding's u picks from
DEVICES: Dict[str, DeviceKind] = {
    "endotracheal tube": DeviceKind(
        "trachea", ("an endotracheal tube terminates about {n} cm above the carina",),
        path=_endotracheal_path, width=0.011),
    "central venous catheter": DeviceKind(
        "svc", ("a right central venous catheter with tip in the svc",
                "a central venous catheter terminates at the cavoatrial junction"),
        path=_central_venous_path),
    "nasogastric tube": DeviceKind(
        "mediastinum", ("a nasogastric tube courses below the diaphragm into the stomach",),
        path=_nasogastric_path),
    "pacemaker": DeviceKind(
        "cardiac silhouette", ("a left-sided pacemaker with leads in the right atrium and ventricle",
                               "a pacemaker generator projects over the left chest"),
        box=_pacemaker_box, draw=_draw_pacemaker),
    "sternotomy wires": DeviceKind(
        "mediastinum", ("median sternotomy wires are intact", "sternotomy wires are seen"),
        box=_wires_box, draw=_draw_wires),
    "chest tube": DeviceKind(
        "{side} lung", ("a {side} chest tube is in place",), path=_chest_tube_path, width=0.011),
}


def device_box(kind: str, side: str, an: Anatomy, cv: Canvas) -> Box:
    """Image-frame box of a device of ``kind`` (a tube or line: its path, padded)."""
    dk = DEVICES[kind]
    if dk.path is None:
        return dk.box(an, cv)
    a = np.array(dk.path(an, side))
    return cv.to_image((a[:, 0].min() - 0.012, a[:, 1].min() - 0.012, a[:, 0].max() + 0.012, a[:, 1].max() + 0.012))


def draw_device(fd: Finding, an: Anatomy, cv: Canvas, px: float) -> None:
    """Draw a device finding over the image (after the anatomy: devices are radio-opaque)."""
    dk = DEVICES[fd.detail["kind"]]
    if dk.path is None:
        dk.draw(an, cv)
        return
    path = dk.path(an, fd.side)
    w = max(dk.width, 0.8 * px)  # at least about a pixel wide
    for (x0, y0), (x1, y1) in zip(path[:-1], path[1:]):
        _line(cv, x0, y0, x1, y1, w, 1.3)
