"""render(): one image, from the patient's anatomy and findings to the acquisition effects and the report."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .anatomy import Anatomy, draw_patient, region_boxes
from .canvas import Canvas, seg_dist, smooth_noise, smoothstep
from .drawers import Finding, Scene
from .findings import choose_findings, draw_finding, reshape_patient
from .labels import labels_from_statements
from .reports import write_report


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
    p = draw_patient(prng)
    choices = choose_findings(prng, findings)
    reshape_patient(p, choices)
    an = Anatomy(p)
    scale = arng.uniform(0.93, 1.04)
    shift = (arng.normal(0, 0.015), arng.normal(0, 0.02))
    cv = Canvas(S, scale, shift)
    px = 1.0 / (S * scale)
    X, Y = cv.X, cv.Y
    D = cv.D
    draw_rng = np.random.default_rng(prng.integers(2**63))  # patient-specific texture details

    # ---- body, neck and shoulders
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

    boxes = region_boxes(an, cv, lung_mask)

    # ---- findings (drawn before the vessels so a pneumothorax can clear them)
    findings: List[Finding] = []
    vessel_block = np.zeros((S, S), bool)
    scene = Scene(an, cv, prng, lung_mask, boxes, vessel_block, px)
    for c in choices:
        fd = draw_finding(c, scene)
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
            d, t = seg_dist(Xs, Ys, hx, hy, x1, y1)
            wdt = 0.0065 * (1 - 0.7 * t) + 0.6 * px
            v = smoothstep(wdt, 0.3 * wdt, d) * (1 - 0.6 * t)
            D[sl] += 0.09 * v * lung_soft[s][sl] * ~vessel_block[sl]
        r = p.hilum_r[s]
        sl = cv.crop((hx - 2.5 * r, hy - 2.5 * r, hx + 2.5 * r, hy + 2.5 * r))
        Xs, Ys = cv.grid(sl)
        D[sl] += (0.09 + 0.08 * (r > 0.04)) * smoothstep(1.6 * r, 0.2 * r, np.hypot((Xs - hx) * 1.3, Ys - hy))
    tex = smooth_noise(draw_rng, (S, S), max(8, S // 10))
    D += 0.03 * tex * lungs * ~vessel_block

    # ---- heart and mediastinum
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

    # ---- trachea and main bronchi (air: darker)
    tx = float(an.spine_x(p.carina * 0.5))
    sl = cv.crop((tx - 0.03, 0.0, tx + 0.03, p.carina))
    Xs, Ys = cv.grid(sl)
    D[sl] -= 0.14 * smoothstep(0.017, 0.011, np.abs(Xs - tx)) * smoothstep(0.0, 0.05, Ys)
    for s in "RL":
        sl = cv.crop((tx - 0.1, p.carina - 0.02, tx + 0.1, p.carina + 0.09))
        Xs, Ys = cv.grid(sl)
        d, _ = seg_dist(Xs, Ys, tx, p.carina, tx + p.side_sign(s) * 0.06, p.carina + 0.065)
        D[sl] -= 0.1 * smoothstep(0.011, 0.006, d)

    # ---- spine with vertebral end plates
    sl = cv.crop((p.cx - abs(p.scoliosis) - 0.05, -1.0, p.cx + abs(p.scoliosis) + 0.05, 2.0))
    Xs, Ys = cv.grid(sl)
    sp = smoothstep(0.036, 0.028, np.abs(Xs - an.spine_x(Ys)))
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
            band = smoothstep(th, th * 0.55, dist)
            edge = smoothstep(th * 0.35, 0.0, np.abs(dist - th * 0.8))
            fr = [f for f in findings if f.type == "fracture" and f.detail.get("rib") == (s, k)]
            if fr:  # a gap with a step: the lateral fragment displaced downwards
                gx = fr[0].detail["x"]
                gap = smoothstep(0.005, 0.011, np.abs(Xs - gx))
                lat = (Xs - gx) * sg > 0
                dist2 = np.abs(Ys - yc - 0.014)
                band = np.where(lat, smoothstep(th, th * 0.55, dist2), band) * gap
                edge = np.where(lat, smoothstep(th * 0.35, 0.0, np.abs(dist2 - th * 0.8)), edge) * gap
            D[sl] += (0.065 * band + 0.03 * edge) * in_side * (1.0 - 0.6 * smoothstep(1.1, 0.8, hf[sl]))
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
                dd, _ = seg_dist(Xs, Ys, a, b, c, d_)
                D[sl] += 0.24 * smoothstep(0.013, 0.008, dd)
        else:
            dd, _ = seg_dist(Xs, Ys, x0, y0, x1, y1)
            D[sl] += 0.24 * smoothstep(0.013, 0.008, dd)

    # ---- overlays drawn last: devices are radio-opaque, over everything
    for f in findings:
        if f.spec.overlay is not None:
            f.spec.overlay(f, an, cv, px)

    # ---- acquisition: contrast, gamma, illumination, blur, noise
    img = np.clip(D, 0.0, None)
    gamma = arng.uniform(0.8, 1.25)
    img = np.power(img / 1.2, gamma)
    img = img * arng.uniform(0.85, 1.15) + arng.uniform(-0.05, 0.06)
    img += 0.035 * smooth_noise(arng, (S, S), 4)
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(img, sigma=max(0.5, 0.7 * S / 256.0))
    img += arng.normal(0.0, arng.uniform(0.008, 0.025), size=(S, S)).astype(np.float32)
    img8 = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    report = write_report(findings, prng)
    labels = labels_from_statements(report.pop("statements"))
    return img8, {"region_boxes": boxes, "findings": findings, "labels": labels, **report}
