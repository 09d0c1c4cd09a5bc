"""render(): one image, from the patient's anatomy and findings to the acquisition effects and the report."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .anatomy import (Anatomy, draw_body, draw_lung_markings, draw_lungs, draw_mediastinum, draw_patient,
                      draw_ribs_and_clavicles, draw_spine, region_boxes)
from .canvas import Canvas, smooth_noise
from .drawers import Finding, Scene
from .findings import choose_findings, draw_finding, reshape_patient
from .labels import labels_from_statements
from .reports import write_report

#: a seed of one random stream: anything ``np.random.default_rng`` accepts
Seed = Union[int, Sequence[int], np.random.SeedSequence]


def render(size: int, patient_seed: Seed, acq_seed: Seed,
           findings: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, dict]:
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
    draw_rng = np.random.default_rng(prng.integers(2**63))  # patient-specific texture details

    draw_body(an, cv)
    lung_soft, lungs = draw_lungs(an, cv, px)
    lung_mask = {s: lung_soft[s] > 0.5 for s in "RL"}
    boxes = region_boxes(an, cv, lung_mask)

    # findings before the vessels, so that fluid and air can block them
    findings: List[Finding] = []
    vessel_block = np.zeros((S, S), bool)
    scene = Scene(an, cv, prng, lung_mask, boxes, vessel_block, px)
    for c in choices:
        fd = draw_finding(c, scene)
        if fd is not None:
            findings.append(fd)

    draw_lung_markings(an, cv, draw_rng, lung_soft, lungs, vessel_block, px)
    draw_mediastinum(an, cv)
    draw_spine(an, cv)
    draw_ribs_and_clavicles(an, cv, [f.detail for f in findings if f.type == "fracture"])
    for f in findings:  # overlays last: devices are radio-opaque, over everything
        if f.spec.overlay is not None:
            f.spec.overlay(f, an, cv, px)
    img8 = _acquire(cv.D, arng)

    report = write_report(findings, prng)
    labels = labels_from_statements(report.pop("statements"))
    return img8, {"region_boxes": boxes, "findings": findings, "labels": labels, **report}


def _acquire(D: np.ndarray, arng: np.random.Generator) -> np.ndarray:
    """The film: contrast, gamma, brightness, low-frequency illumination, blur and noise -> uint8."""
    S = D.shape[0]
    img = np.clip(D, 0.0, None)
    gamma = arng.uniform(0.8, 1.25)
    img = np.power(img / 1.2, gamma)
    img = img * arng.uniform(0.85, 1.15) + arng.uniform(-0.05, 0.06)
    img += 0.035 * smooth_noise(arng, (S, S), 4)
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(img, sigma=max(0.5, 0.7 * S / 256.0))
    img += arng.normal(0.0, arng.uniform(0.008, 0.025), size=(S, S)).astype(np.float32)
    img8 = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return img8
