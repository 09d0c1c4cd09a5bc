"""Drawing primitives: the canvas (density map in patient coordinates), smooth steps, segment distances,
low-frequency noise and normalised-box helpers."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

Box = Tuple[float, float, float, float]
ArrayOrFloat = Union[np.ndarray, float]
Slices = Tuple[slice, slice]


def smoothstep(e0: ArrayOrFloat, e1: ArrayOrFloat, x: ArrayOrFloat) -> np.ndarray:
    """0 at e0, 1 at e1 (either order), a cubic in between."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def seg_dist(X: np.ndarray, Y: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> Tuple[np.ndarray, np.ndarray]:
    """Distance of every grid point to the segment (x0,y0)-(x1,y1), and the position t in [0,1] along it."""
    dx, dy = x1 - x0, y1 - y0
    L2 = dx * dx + dy * dy + 1e-12
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / L2, 0.0, 1.0)
    return np.hypot(X - (x0 + t * dx), Y - (y0 + t * dy)), t


def smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise (H, W) in about [-1, 1]: a (cells x cells) normal grid, bilinearly upsampled."""
    from PIL import Image

    g = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    z = np.asarray(Image.fromarray(g, mode="F").resize((shape[1], shape[0]), Image.BILINEAR))
    return z / 1.5


class Canvas:
    """The density map being drawn, in patient coordinates.

    ``X``, ``Y`` (S, S) are the patient-frame coordinates of each pixel centre (the acquisition maps
    patient coordinates p to image coordinates u = (p - 0.5) * scale + 0.5 + shift). ``crop(box)``
    gives the pixel slices covering a patient-frame box so local shapes are drawn on a window only.
    """

    def __init__(self, size: int, scale: float, shift: Tuple[float, float]) -> None:
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

    def crop(self, box: Sequence[float]) -> Slices:
        """The (rows, columns) slices of the pixels covering a patient-frame box (at least one pixel)."""
        x0, y0, x1, y1 = box
        c0, c1 = np.searchsorted(self.xs, [x0, x1])
        r0, r1 = np.searchsorted(self.ys, [y0, y1])
        return slice(int(r0), int(max(r1, r0 + 1))), slice(int(c0), int(max(c1, c0 + 1)))

    def grid(self, sl: Slices) -> Tuple[np.ndarray, np.ndarray]:
        """Patient-frame (X, Y) of the pixels in ``sl``."""
        return self.X[sl], self.Y[sl]


def mask_box(mask: np.ndarray) -> Optional[Box]:
    """Image-frame normalised box of the True pixels of an (S, S) mask, or None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    S = mask.shape[0]
    return (cols[0] / S, rows[0] / S, (cols[-1] + 1) / S, (rows[-1] + 1) / S)


def box_union(*boxes: Box) -> Box:
    b = np.array(boxes, np.float64)
    return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))


def contains(box: Box, x: float, y: float, pad: float = 0.0) -> bool:
    return box[0] - pad <= x <= box[2] + pad and box[1] - pad <= y <= box[3] + pad


def area(b: Box) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def center(b: Box) -> Tuple[float, float]:
    return (0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3]))
