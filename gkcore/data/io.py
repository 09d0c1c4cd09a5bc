"""Image reading for the data pipeline: PNG / JPEG (grey, or grey stored as RGB) and DICOM (pydicom).

Every reader returns a 2-D ``uint8`` array (H, W) of grey values, 0 = black (air on a radiograph):

- PNG / JPEG through PIL. RGB (or palette / LA / RGBA) images are converted to grey with the ITU-R 601
  luma weights (PIL's ``convert("L")``). 16-bit PNGs (mode ``I;16`` / ``I``) are mapped 0..65535 -> 0..255.
- DICOM through pydicom: the modality LUT (RescaleSlope / RescaleIntercept) and the VOI LUT or window
  (WindowCenter / WindowWidth) are applied when present, then the result is min-max scaled to 0..255;
  ``MONOCHROME1`` (bright = low values) is inverted so the output is always MONOCHROME2-like.

Failures raise :class:`ImageReadError` (a ``ValueError``) naming the path and the reason; the adapters and
the loader catch it, report it and skip the sample.
"""
from __future__ import annotations

import io
import os
from typing import Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


class ImageReadError(ValueError):
    """An image file could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def sniff_format(path: PathLike, head: bytes | None = None) -> str:
    """``"png"``, ``"jpeg"``, ``"dicom"`` or ``"other"`` from the file's first bytes (not its extension).

    DICOM part-10 files carry ``DICM`` at byte 128; files without the preamble are recognised by the
    extension ``.dcm`` / ``.dicom``.
    """
    if head is None:
        with open(path, "rb") as fh:
            head = fh.read(132)
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if str(path).lower().endswith((".dcm", ".dicom")):
        return "dicom"
    return "other"


def is_dicom(path: PathLike) -> bool:
    try:
        return sniff_format(path) == "dicom"
    except OSError:
        return str(path).lower().endswith((".dcm", ".dicom"))


def _to_grey_uint8(im, path) -> np.ndarray:
    """A PIL image (any mode) -> (H, W) uint8 grey."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.int64 if mode == "I" else np.uint16).astype(np.float64)
        top = 65535.0 if mode != "I" or a.max() > 255 else 255.0
        return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        return np.zeros(a.shape, np.uint8) if hi <= lo else np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("1", "P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "RGB", "RGBX", "LAB", "HSV"):
        if mode in ("P", "PA"):
            im = im.convert("RGBA")
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    raise ImageReadError(path, f"unsupported PIL image mode {mode!r}")


def read_pil(path: PathLike) -> np.ndarray:
    """Decode a PNG or JPEG (or any PIL-readable image) to (H, W) uint8 grey."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return _to_grey_uint8(im, path)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt streams
        raise ImageReadError(path, f"corrupt image data ({e})") from None


def dicom_to_uint8(ds, path: PathLike = "<dicom>") -> np.ndarray:
    """A pydicom dataset -> (H, W) uint8 grey: modality LUT, VOI LUT/window, MONOCHROME1 inverted.

    Multi-frame files use the first frame; colour DICOMs are converted with luma weights.
    """
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing decoder plugin, corrupt pixel data
        raise ImageReadError(path, f"DICOM pixel data cannot be decoded ({type(e).__name__}: {e})") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if arr.ndim == 3:  # colour: (H, W, 3)
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        a = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        photometric = "MONOCHROME2"
    elif arr.ndim != 2:
        raise ImageReadError(path, f"DICOM pixel array has unsupported shape {arr.shape}")
    else:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        a = apply_modality_lut(arr, ds)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            a = apply_voi_lut(a, ds)
        a = np.asarray(a, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageReadError(path, "DICOM pixel values are not finite")
    out = np.zeros(a.shape, np.float64) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
    if photometric == "MONOCHROME1":
        out = 255.0 - out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_dicom(path: PathLike) -> np.ndarray:
    """Decode a DICOM file with pydicom to (H, W) uint8 grey (see :func:`dicom_to_uint8`)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except InvalidDicomError as e:
        raise ImageReadError(path, f"not a valid DICOM file ({e})") from None
    except Exception as e:
        raise ImageReadError(path, f"corrupt DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM file has no pixel data")
    return dicom_to_uint8(ds, path)


def read_image(path: PathLike) -> np.ndarray:
    """Read any supported image to a (H, W) uint8 grey array; raises :class:`ImageReadError`."""
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise ImageReadError(path, "empty file")
    kind = sniff_format(path)
    if kind == "dicom":
        return read_dicom(path)
    return read_pil(path)


def image_size(path: PathLike) -> Tuple[int, int]:
    """(width, height) from the header only (PIL lazily; DICOM Rows/Columns); raises ImageReadError."""
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    kind = sniff_format(path)
    if kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        except Exception as e:
            raise ImageReadError(path, f"corrupt DICOM header ({type(e).__name__}: {e})") from None
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise ImageReadError(path, f"not a readable image ({type(e).__name__}: {e})") from None


def encode_png(grey: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes (fast, lossless); used to hand DICOM pixels to a PNG/JPEG decoder."""
    from PIL import Image

    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError(f"encode_png: grey must be a 2-D uint8 array, got {grey.dtype} {grey.shape}")
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buf, format="PNG", compress_level=0)
    return buf.getvalue()
