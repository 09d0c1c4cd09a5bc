"""Per-sample geometry and colour on the host, shared by both loader backends: the letterbox +
augmentation plan of an image, the mapping of boxes into the output frame, and the colour-jitter formula
(the rules are in the :mod:`gkcore.data.loader` docstring)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class Augment:
    """Training augmentation ranges (see the :mod:`gkcore.data.loader` docstring)."""

    crop_area: Tuple[float, float] = (0.75, 1.0)
    crop_aspect: Tuple[float, float] = (0.9, 1.1)
    rotation_deg: float = 7.0
    brightness: float = 0.1
    contrast: Tuple[float, float] = (0.8, 1.2)


@dataclass
class SamplePlan:
    """Everything the decoders need for one sample.

    - ``resize_hw``: (Hr, Wr) size of the anti-aliased pre-resize.
    - ``inv``: float32 (2, 3) affine map output pixel (x, y) -> resized-image pixel (x, y)
      (continuous coordinates, pixel centres at +0.5).
    - ``fwd``: float64 (3, 3) map original-image pixel -> output pixel (used for boxes).
    - ``contrast``/``brightness``: colour jitter (1, 0 = none).
    """

    resize_hw: Tuple[int, int]
    inv: np.ndarray
    fwd: np.ndarray
    contrast: float = 1.0
    brightness: float = 0.0


def _hw(image_size) -> Tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        return int(image_size), int(image_size)
    h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return h, w


def plan_sample(orig_wh: Tuple[int, int], out_hw: Tuple[int, int], rng: Optional[np.random.Generator],
                aug: Augment = Augment()) -> SamplePlan:
    """The geometry and colour plan for one image of size ``orig_wh`` = (W0, H0) (rng None = no aug)."""
    w0, h0 = float(orig_wh[0]), float(orig_wh[1])
    oh, ow = out_hw
    s0 = min(ow / w0, oh / h0)
    ox, oy = (ow - w0 * s0) / 2.0, (oh - h0 * s0) / 2.0
    letterbox = np.array([[s0, 0, ox], [0, s0, oy], [0, 0, 1]], np.float64)
    fwd = letterbox
    zoom = 1.0
    contrast, brightness = 1.0, 0.0
    if rng is not None:
        area = rng.uniform(*aug.crop_area)
        aspect = math.exp(rng.uniform(math.log(aug.crop_aspect[0]), math.log(aug.crop_aspect[1])))
        cw = min(ow * math.sqrt(area * aspect), ow)
        ch = min(oh * math.sqrt(area / aspect), oh)
        cx0 = rng.uniform(0.0, ow - cw)
        cy0 = rng.uniform(0.0, oh - ch)
        crop = np.array([[ow / cw, 0, -cx0 * ow / cw], [0, oh / ch, -cy0 * oh / ch], [0, 0, 1]], np.float64)
        th = math.radians(rng.uniform(-aug.rotation_deg, aug.rotation_deg))
        c, s = math.cos(th), math.sin(th)
        cx, cy = ow / 2.0, oh / 2.0
        rot = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1]], np.float64)
        fwd = rot @ crop @ letterbox
        zoom = max(ow / cw, oh / ch)
        contrast = float(rng.uniform(*aug.contrast))
        brightness = float(rng.uniform(-aug.brightness, aug.brightness))
    # pre-resize to about the output resolution (never upsample here; warp_affine does that)
    scale = min(1.0, s0 * zoom)
    wr, hr = max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale)))
    to_resized = np.array([[wr / w0, 0, 0], [0, hr / h0, 0], [0, 0, 1]], np.float64)
    inv = (to_resized @ np.linalg.inv(fwd))[:2].astype(np.float32)
    return SamplePlan((hr, wr), inv, fwd, contrast, brightness)


def transform_boxes(boxes: np.ndarray, orig_wh: Tuple[int, int], fwd: np.ndarray,
                    out_hw: Tuple[int, int], min_size_px: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """Map normalised xyxy boxes (N, 4) of the original frame into the output frame.

    Returns (boxes (N, 4) float32 normalised in the output frame, clipped; valid (N,) bool). Each box's
    four corners go through ``fwd``; the result is their axis-aligned hull.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    w0, h0 = orig_wh
    oh, ow = out_hw
    x0, y0, x1, y1 = boxes[:, 0] * w0, boxes[:, 1] * h0, boxes[:, 2] * w0, boxes[:, 3] * h0
    corners = np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1),
                        np.stack([x0, y1], -1), np.stack([x1, y1], -1)], 1)  # (N, 4, 2)
    mapped = corners @ fwd[:2, :2].T + fwd[:2, 2]
    lo, hi = mapped.min(1), mapped.max(1)
    lo = np.clip(lo, 0, [ow, oh])
    hi = np.clip(hi, 0, [ow, oh])
    valid = ((hi - lo) >= min_size_px).all(1) & np.isfinite(boxes).all(1)
    out = np.concatenate([lo / [ow, oh], hi / [ow, oh]], 1).astype(np.float32)
    out[~valid] = 0.0
    return out, valid


def jitter_offset(contrast: float, brightness: float) -> float:
    """The offset of ``y = x * contrast + offset`` = ``(x - 128) * contrast + 128 + 255 * brightness``."""
    return 128.0 - 128.0 * contrast + 255.0 * brightness


def color_jitter(img: np.ndarray, contrast: float, brightness: float) -> np.ndarray:
    """(H, W) float32 0..255 -> float32: ``clip((x - 128) * contrast + 128 + 255 * brightness, 0, 255)``."""
    if contrast == 1.0 and brightness == 0.0:
        return img
    y = img * np.float32(contrast) + np.float32(jitter_offset(contrast, brightness))
    return np.clip(y, 0.0, 255.0, out=y)

