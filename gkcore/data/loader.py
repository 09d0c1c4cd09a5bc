"""The training/evaluation loader: images + reports + entity labels + region boxes -> batch dicts.

``build_loader(dataset, batch_size, image_size, ...)`` returns an iterable of batch dicts following
docs/api.md:

=================  ========================================================================
key                type / shape
=================  ========================================================================
image              float32 (B, C, H, W) on the training device, (x / 255 - mean) / std
input_ids          int64 (B, L), L = ``max_length`` (CLS ... SEP, padded)
attention_mask     int64 (B, L)
entity_labels      int64 (B, E), 1 present / 0 absent / -1 not mentioned
region_boxes       float32 (B, 29, 4), normalised xyxy in the output (augmented, resized, padded) frame
region_mask        bool (B, 29), False where a region is unknown or left the image after augmentation
study_id           int64 (B,)
report             list[str] (B)
finding_boxes      list (B) of list of (entity_index, x0, y0, x1, y1), normalised, output frame
path               list[str] (B)
=================  ========================================================================

Geometry (identical in both backends, computed per sample on the host):

1. the image is first resized (anti-aliased, bilinear) to about the output resolution;
2. one affine map takes the output pixel grid to that resized image: letterbox (keep the aspect ratio,
   centre, pad with black) then, in training, a random resized crop of the letterboxed frame (area
   0.75..1, aspect 0.9..1.1) and a small rotation (+-7 degrees) about the output centre;
3. the same forward map is applied on the host to the corners of every region and finding box, the
   axis-aligned hull of the mapped corners is clipped to the image and normalised; a box that leaves
   the image (under 1 px wide or high after clipping) gets ``region_mask`` False / is dropped.

Training also applies brightness (+-0.1 of full range) and contrast (0.8..1.2 about mid-grey) to the
resized image (before the warp, so padding stays black): ``y = clip((x - 128) * c + 128 + 255 * b, 0, 255)``.
Random numbers come from ``numpy.random.default_rng([seed, epoch, index])`` per sample, so a batch
does not depend on the backend, the worker count or the rank.

Backends: ``"dali"`` (NVIDIA DALI: decode ``device="mixed"`` on a GPU, ``"cpu"`` otherwise; DICOM
files are read with pydicom on the host and handed over losslessly as PNG bytes through
``external_source``) and ``"pil"`` (PIL + numpy, optionally with torch DataLoader worker processes).
``"auto"`` picks DALI when it imports, else PIL.

Sharding: each epoch the sample order is a permutation seeded by ``(seed, epoch)`` (identity when
``train=False``), the same on every rank; rank ``r`` takes positions ``r, r + W, r + 2W, ...``.
In training the order is first cut to a multiple of ``world_size`` so ranks are disjoint and equal;
in evaluation it is padded by repeating its first entries so every sample is seen.

Bad samples: every record is checked before its image is read (:func:`gkcore.data.sample.check_sample`).
A record that cannot be used (unreadable image, a record the dataset cannot load, a label value other
than 1/0/-1, a wrong number of labels, an empty or missing report, region boxes not of shape (29, 4), a
bad study id) is left out; a record with a swapped or non-finite box is kept with that box left out (its
region marked unknown, a finding box dropped; never flipped). Each is reported once (``warnings``) and
counted by reason: ``loader.summary()["rejected"]`` and ``["repaired"]`` map each reason to the number of
distinct samples (``loader.skipped`` keeps every (path, reason) occurrence).

Full batches (``refill``, on by default in training): a batch slot that loses samples takes the next
usable samples of the epoch order after it (wrapping around), so every batch has its nominal size
whatever the number of bad samples; the refill samples also appear in their own slot. A slot depends
only on (seed, epoch, slot), so resuming is unchanged. In evaluation (``refill=False``) every sample is
seen once and a batch that lost samples is smaller; a batch with nothing left is not yielded.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from .io import ImageReadError, encode_png, image_size, read_image, sniff_format
from .knowledge import NUM_REGIONS
from .sample import UNLOADABLE_RECORD, UNREADABLE_IMAGE, SampleRejected, check_sample

MEAN = 0.471
STD = 0.302


# ----------------------------------------------------------------------------------------------------
# geometry

@dataclass(frozen=True)
class Augment:
    """Training augmentation ranges (see the module docstring)."""

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


def pil_render(img: np.ndarray, plan: SamplePlan, out_hw: Tuple[int, int]) -> np.ndarray:
    """(H0, W0) uint8 -> (H, W) float32 in 0..255, following ``plan`` with PIL (the reference path)."""
    from PIL import Image

    im = Image.fromarray(img)
    hr, wr = plan.resize_hw
    if (wr, hr) != im.size:
        im = im.resize((wr, hr), Image.Resampling.BILINEAR, reducing_gap=None)
    imf = im.convert("F")
    if plan.contrast != 1.0 or plan.brightness != 0.0:
        imf = Image.fromarray(color_jitter(np.asarray(imf, np.float32).copy(), plan.contrast, plan.brightness))
    oh, ow = out_hw
    a = plan.inv.astype(np.float64).ravel().tolist()
    out = imf.transform((ow, oh), Image.Transform.AFFINE, data=a, resample=Image.Resampling.BILINEAR,
                        fillcolor=0.0)
    return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------------------------------
# sample -> host record

def _sample_boxes(sample, plan: SamplePlan, orig_wh, out_hw):
    rb = getattr(sample, "region_boxes", None)
    if rb is None:
        boxes = np.zeros((NUM_REGIONS, 4), np.float32)
        mask = np.zeros(NUM_REGIONS, bool)
    else:
        rb = np.asarray(rb, np.float32)
        if rb.shape != (NUM_REGIONS, 4):
            raise ValueError(f"sample {sample.path}: region_boxes must be ({NUM_REGIONS}, 4), got {rb.shape}")
        known = np.ones(NUM_REGIONS, bool) if getattr(sample, "region_mask", None) is None \
            else np.asarray(sample.region_mask, bool)
        boxes, valid = transform_boxes(rb, orig_wh, plan.fwd, out_hw)
        mask = known & valid
        boxes[~mask] = 0.0
    fb_out = []
    fbs = list(getattr(sample, "finding_boxes", None) or [])
    if fbs:
        arr = np.array([f[1:5] for f in fbs], np.float64)
        tb, ok = transform_boxes(arr, orig_wh, plan.fwd, out_hw)
        for f, b, k in zip(fbs, tb, ok):
            if k:
                fb_out.append((int(f[0]), float(b[0]), float(b[1]), float(b[2]), float(b[3])))
    return boxes, mask, fb_out


class _Common:
    """Dataset access, ordering, sharding, RNG, collation shared by both backends."""

    def __init__(self, dataset, batch_size, image_size, *, tokenizer, max_length, channels, train, device,
                 rank, world_size, num_threads, seed, drop_last, augment, progress, refill=None):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must be a sequence of Sample records, got {type(dataset).__name__}")
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if world_size < 1 or not (0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.out_hw = _hw(image_size)
        self._tokenizer = tokenizer
        self.max_length = int(max_length)
        self.channels = int(channels)
        self.train = bool(train)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available; use device='cpu'")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_threads = max(0, int(num_threads))
        self.seed = int(seed)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.augment = augment if augment is not None else Augment()
        self.progress = progress
        self.epoch = 0
        self._start = 0  # batch slot the next iter() starts at (set_position)
        self.position: Optional[Tuple[int, int]] = None  # (epoch, slot + 1) of the last yielded batch
        self.refill = self.train if refill is None else bool(refill)
        self.skipped: List[Tuple[str, str]] = []
        self._skipped_set = set()
        self._notes: Dict[Tuple[str, str], str] = {}  # (path, reason) -> "rejected" | "repaired"
        self.batches_seen = 0
        self.samples_seen = 0
        from .knowledge import ENTITY_NAMES

        self.num_entities = len(ENTITY_NAMES)

    # -- tokenizer (lazy: loading it is ~0.1 s)
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .reports import default_tokenizer

            self._tokenizer = default_tokenizer()
        return self._tokenizer

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shuffling and augmentation seeds); iterating advances it by one."""
        self.epoch = int(epoch)
        self._start = 0

    def set_position(self, epoch: int, batch: int) -> None:
        """The next ``iter()`` runs epoch ``epoch`` from its batch slot ``batch`` (0-based) on, without
        reading the earlier batches; the order and the augmentation are those of a full pass (they depend
        only on the seed, the epoch and the sample index). ``position`` after each yielded batch is the
        ``(epoch, slot + 1)`` to pass here to continue after it."""
        n = len(self)
        if not 0 <= int(batch) <= n:
            raise ValueError(f"batch must be in [0, {n}] (batches per epoch), got {batch}")
        self.epoch = int(epoch)
        self._start = int(batch)

    def _take_start(self) -> int:
        start, self._start = self._start, 0
        return start

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if self.train:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        w = self.world_size
        if w > 1:
            if self.train:
                order = order[: (n // w) * w]
            elif n % w:
                order = np.concatenate([order, order[: w - n % w]])
        return order[self.rank::w]

    def _batches(self, epoch: int) -> List[np.ndarray]:
        idx = self._order(epoch)
        b = self.batch_size
        nb = len(idx) // b if self.drop_last else -(-len(idx) // b)
        return [idx[i * b:(i + 1) * b] for i in range(nb)]

    def _slots(self, epoch: int, start: int):
        """(order, [(slot, nominal size), ...]) of the epoch from batch slot ``start`` on."""
        order = self._order(epoch)
        return order, [(start + k, len(b)) for k, b in enumerate(self._batches(epoch)[start:])]

    def __len__(self) -> int:
        n = len(self._order(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _rng(self, epoch: int, index: int) -> Optional[np.random.Generator]:
        return np.random.default_rng([self.seed, epoch, int(index)]) if self.train else None

    def _report_skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))
        if (path, reason) not in self._skipped_set:
            self._skipped_set.add((path, reason))
            warnings.warn(f"gkcore.data: skipping {path}: {reason}", RuntimeWarning, stacklevel=3)

    def _note(self, kind: str, path: str, reason: str, detail: str) -> None:
        """Count a rejected (left out) or repaired sample once per (path, reason)."""
        if kind == "rejected":
            self._report_skip(path, f"{reason} ({detail})" if detail else reason)
        elif (path, reason) not in self._notes:
            warnings.warn(f"gkcore.data: {path}: {reason}: the box is left out", RuntimeWarning, stacklevel=3)
        self._notes.setdefault((path, reason), kind)

    def counts(self) -> Dict[str, Dict[str, int]]:
        """``{"rejected": {reason: samples}, "repaired": {reason: samples}}``, distinct samples per reason."""
        out: Dict[str, Dict[str, int]] = {"rejected": {}, "repaired": {}}
        for (_, reason), kind in self._notes.items():
            out[kind][reason] = out[kind].get(reason, 0) + 1
        return {k: dict(sorted(v.items())) for k, v in out.items()}

    def restore_counts(self, counts: Dict[str, Dict[str, Any]]) -> None:
        """Take over the distinct (path, reason) notes of an earlier run (a resumed training run)."""
        for kind, items in (counts or {}).get("notes", {}).items():
            for path, reason in items:
                self._notes.setdefault((path, reason), kind)

    def state_counts(self) -> Dict[str, Any]:
        """The notes as JSON-able data, for :meth:`restore_counts`."""
        notes: Dict[str, List[List[str]]] = {"rejected": [], "repaired": []}
        for (path, reason), kind in sorted(self._notes.items()):
            notes[kind].append([path, reason])
        return {"notes": notes}

    def summary(self) -> Dict[str, Any]:
        """Counts: batches and samples yielded, skipped samples (unique paths) and their reasons, and the
        rejected / repaired samples by reason (:meth:`counts`)."""
        paths = sorted({p for p, _ in self.skipped})
        return dict(batches=self.batches_seen, samples=self.samples_seen, skipped=len(self.skipped),
                    skipped_unique=len(paths), skipped_paths=paths,
                    dataset_skipped=len(getattr(self.dataset, "skipped", []) or []), **self.counts())

    def _finish(self, recs: List[Dict[str, Any]], images: torch.Tensor) -> Dict[str, Any]:
        """Assemble the batch dict; ``images`` (B, 1, H, W) float32 (already normalised)."""
        tok = self.tokenizer([r["report"] for r in recs], padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        dev = self.device
        nb = dev.type == "cuda"
        if self.channels == 3:
            images = images.expand(-1, 3, -1, -1)
        out = {
            "image": images.to(dev, non_blocking=nb).contiguous(),
            "input_ids": tok["input_ids"].to(torch.int64).to(dev, non_blocking=nb),
            "attention_mask": tok["attention_mask"].to(torch.int64).to(dev, non_blocking=nb),
            "entity_labels": torch.from_numpy(np.stack([r["labels"] for r in recs])).to(dev, non_blocking=nb),
            "region_boxes": torch.from_numpy(np.stack([r["boxes"] for r in recs])).to(dev, non_blocking=nb),
            "region_mask": torch.from_numpy(np.stack([r["mask"] for r in recs])).to(dev, non_blocking=nb),
            "study_id": torch.tensor([r["study_id"] for r in recs], dtype=torch.int64).to(dev, non_blocking=nb),
            "report": [r["report"] for r in recs],
            "finding_boxes": [r["finding_boxes"] for r in recs],
            "path": [r["path"] for r in recs],
        }
        self.batches_seen += 1
        self.samples_seen += len(recs)
        return out

    def _record(self, sample, plan, orig_wh) -> Dict[str, Any]:
        boxes, mask, fbs = _sample_boxes(sample, plan, orig_wh, self.out_hw)
        labels = np.asarray(sample.entity_labels).astype(np.int64).reshape(-1)
        if labels.shape[0] != self.num_entities:
            raise ValueError(f"sample {sample.path}: entity_labels has {labels.shape[0]} entries, expected "
                             f"E = len(ENTITIES) = {self.num_entities}")
        return dict(path=str(sample.path), report=str(sample.report or ""), labels=labels, boxes=boxes,
                    mask=mask, finding_boxes=fbs, study_id=int(sample.study_id))

    def _wrap(self, it, total):
        if self.progress:
            from tqdm.auto import tqdm

            return tqdm(it, total=total, desc=f"data epoch {self.epoch}", unit="batch", leave=False)
        return it


def _normalise_uint8_range(img255: torch.Tensor) -> torch.Tensor:
    return (img255 * (1.0 / 255.0) - MEAN) / STD


# ----------------------------------------------------------------------------------------------------
# PIL backend

def _slot_candidates(order: np.ndarray, slot: int, batch_size: int, refill: bool) -> Iterator[int]:
    """Dataset indices batch slot ``slot`` draws from, in order: its own samples, then (``refill``) the
    rest of the epoch order after it, wrapping around."""
    n, s0 = len(order), slot * batch_size
    if not refill:
        yield from (int(i) for i in order[s0:s0 + batch_size])
        return
    for j in range(n):
        yield int(order[(s0 + j) % n])


def _checked(dataset, i: int, num_entities: int):
    """``(sample, repairs, None)`` for a usable record, else ``(None, [], note)``; a note is
    (kind, path, reason, detail)."""
    try:
        raw = dataset[int(i)]
    except Exception as e:  # a broken record
        return None, [], ("rejected", f"{type(dataset).__name__}[{int(i)}]", UNLOADABLE_RECORD, str(e))
    try:
        sample, repairs = check_sample(raw, num_entities, NUM_REGIONS)
    except SampleRejected as e:
        return None, [], ("rejected", e.path, e.reason, e.detail)
    return sample, [("repaired", sample.path, r, "") for r in repairs], None


def _pil_prepare(common_state: Dict[str, Any], dataset, cands, need: int, epoch: int):
    """Decode and transform one batch on the host (runs in a worker process or inline): the first
    ``need`` usable samples of the indices ``cands``.

    Returns (records, images float32 (B, 1, H, W) normalised, notes [(kind, path, reason, detail)]).
    """
    out_hw, seed, train, aug = common_state["out_hw"], common_state["seed"], common_state["train"], \
        common_state["augment"]
    recs, imgs, notes = [], [], []
    for i in cands:
        if len(recs) >= need:
            break
        sample, repairs, note = _checked(dataset, i, common_state["num_entities"])
        if note is not None:
            notes.append(note)
            continue
        try:
            grey = read_image(sample.path)
        except ImageReadError as e:
            notes.append(("rejected", e.path, UNREADABLE_IMAGE, e.reason))
            continue
        notes.extend(repairs)
        rng = np.random.default_rng([seed, epoch, int(i)]) if train else None
        orig_wh = (grey.shape[1], grey.shape[0])
        plan = plan_sample(orig_wh, out_hw, rng, aug)
        imgs.append(pil_render(grey, plan, out_hw))
        recs.append((sample, plan, orig_wh))
    if imgs:
        arr = torch.from_numpy(np.stack(imgs))[:, None]
        arr = _normalise_uint8_range(arr)
    else:
        arr = torch.zeros((0, 1) + tuple(out_hw), dtype=torch.float32)
    return recs, arr, notes


class _BatchSet(torch.utils.data.Dataset):
    def __init__(self, state, dataset, order, slots, epoch):
        self.state, self.dataset, self.order, self.slots, self.epoch = state, dataset, order, slots, epoch

    def __len__(self):
        return len(self.slots)

    def __getitem__(self, k):
        slot, need = self.slots[k]
        st = self.state
        cands = _slot_candidates(self.order, slot, st["batch_size"], st["refill"])
        return _pil_prepare(st, self.dataset, cands, need, self.epoch)


class PILLoader(_Common):
    """PIL + numpy loader; ``num_threads`` > 0 runs batches in that many torch DataLoader workers."""

    backend = "pil"

    def _state(self):
        return dict(out_hw=self.out_hw, seed=self.seed, train=self.train, augment=self.augment,
                    num_entities=self.num_entities, batch_size=self.batch_size, refill=self.refill)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.epoch
        self.epoch += 1
        start = self._take_start()
        order, slots = self._slots(epoch, start)
        bs = _BatchSet(self._state(), self.dataset, order, slots, epoch)
        if self.num_threads > 0 and len(slots) > 1:
            dl = torch.utils.data.DataLoader(bs, batch_size=None, shuffle=False, num_workers=self.num_threads,
                                             pin_memory=self.device.type == "cuda",
                                             persistent_workers=False, prefetch_factor=2)
            it = iter(dl)
        else:
            it = (bs[k] for k in range(len(bs)))
        for k, (recs, imgs, notes) in enumerate(self._wrap(it, len(slots))):
            for note in notes:
                self._note(*note)
            if not recs:
                continue
            self.position = (epoch, start + k + 1)
            yield self._finish([self._record(s, p, wh) for s, p, wh in recs], imgs)


# ----------------------------------------------------------------------------------------------------
# DALI backend

def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


class DALILoader(_Common):
    """NVIDIA DALI loader: the host reads the file bytes and plans the geometry; DALI decodes (mixed on
    a GPU, cpu otherwise), jitters colour, resizes (anti-aliased), warps and normalises."""

    backend = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not dali_available():
            raise RuntimeError("backend='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130)")
        self.gpu = self.device.type == "cuda"
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath

        gpu, train = self.gpu, self.train
        oh, ow = self.out_hw

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.num_threads),
                      device_id=self.device.index if gpu else None, exec_pipelined=False, exec_async=False,
                      prefetch_queue_depth=1, seed=self.seed)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1, no_copy=False)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            mat = fn.external_source(name="mat", dtype=types.FLOAT, ndim=2)
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.GRAY)
            img = fn.resize(img, size=size, antialias=True, interp_type=types.INTERP_LINEAR,
                            dtype=types.FLOAT)
            if train:  # colour jitter on the resized image: y = clip(x * gain + offset, 0, 255)
                gain = fn.external_source(name="gain", dtype=types.FLOAT, ndim=0, device="gpu" if gpu else "cpu")
                off = fn.external_source(name="offset", dtype=types.FLOAT, ndim=0, device="gpu" if gpu else "cpu")
                img = dmath.clamp(img * gain + off, 0.0, 255.0)
            img = fn.warp_affine(img, matrix=mat, size=[float(oh), float(ow)], fill_value=0.0,
                                 inverse_map=True, interp_type=types.INTERP_LINEAR)
            img = (img * (1.0 / 255.0) - MEAN) * (1.0 / STD)
            return fn.transpose(img, perm=[2, 0, 1])

        p = pipe()
        p.build()
        return p

    def _host(self, cands: Iterator[int], epoch: int, need: int):
        """Read bytes and plan the next ``need`` usable samples of ``cands``; returns (items, notes)."""
        items, skipped = [], []
        if need <= 0:
            return items, skipped
        for i in cands:
            sample, repairs, note = _checked(self.dataset, i, self.num_entities)
            if note is not None:
                skipped.append(note)
                continue
            path = str(sample.path)
            try:
                if not os.path.exists(path):
                    raise ImageReadError(path, "file not found")
                kind = sniff_format(path)
                if kind == "dicom":
                    grey = read_image(path)
                    data = np.frombuffer(encode_png(grey), np.uint8)
                    wh = (grey.shape[1], grey.shape[0])
                elif kind in ("png", "jpeg"):
                    data = np.fromfile(path, np.uint8)
                    wh = image_size(path)
                else:
                    # formats DALI's decoder may not know (TIFF, BMP...): decode with PIL, hand over as PNG
                    grey = read_image(path)
                    data = np.frombuffer(encode_png(grey), np.uint8)
                    wh = (grey.shape[1], grey.shape[0])
            except ImageReadError as e:
                skipped.append(("rejected", e.path, UNREADABLE_IMAGE, e.reason))
                continue
            plan = plan_sample(wh, self.out_hw, self._rng(epoch, i), self.augment)
            items.append((sample, plan, wh, data, repairs))
            if len(items) >= need:
                break
        return items, skipped

    def _run(self, items):
        if self._pipe is None:
            self._pipe = self._build()
        p = self._pipe
        p.feed_input("enc", [it[3] for it in items])
        p.feed_input("size", [np.array(it[1].resize_hw, np.float32) for it in items])
        p.feed_input("mat", [it[1].inv for it in items])
        if self.train:
            p.feed_input("gain", [np.array(it[1].contrast, np.float32) for it in items])
            p.feed_input("offset", [np.array(jitter_offset(it[1].contrast, it[1].brightness), np.float32)
                                    for it in items])
        (out,) = p.run()
        oh, ow = self.out_hw
        dst = torch.empty((len(items), 1, oh, ow), dtype=torch.float32,
                          device=self.device if self.gpu else "cpu")
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self.gpu:
            feed_ndarray(out.as_tensor(), dst, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            feed_ndarray(out.as_tensor(), dst)
        return dst

    def _decode_safely(self, items):
        """Run DALI; if the batch fails (a corrupt stream the header check missed), find the bad files
        with PIL, report them and rerun without them."""
        try:
            return items, self._run(items), []
        except Exception as e:  # DALI raises RuntimeError with the decoder's message
            self._pipe = None  # a failed pipeline is not reused
            good, bad = [], []
            for it in items:
                try:
                    read_image(it[0].path)
                    good.append(it)
                except ImageReadError as err:
                    bad.append(("rejected", err.path, UNREADABLE_IMAGE, err.reason))
            if not bad:
                raise RuntimeError(f"DALI failed on a batch whose files all decode with PIL: {e}") from e
            if not good:
                return [], None, bad
            return good, self._run(good), bad

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.epoch
        self.epoch += 1
        start = self._take_start()
        order, slots = self._slots(epoch, start)
        for k, (slot, need) in enumerate(self._wrap(slots, len(slots))):
            cands = _slot_candidates(order, slot, self.batch_size, self.refill)
            items: List[Any] = []
            imgs = None
            while True:  # top up to ``need`` usable samples; a file DALI cannot decode is dropped and replaced
                more, notes = self._host(cands, epoch, need - len(items))
                for note in notes:
                    self._note(*note)
                items += more
                if not items:
                    break
                items, imgs, bad = self._decode_safely(items)
                for note in bad:
                    self._note(*note)
                if not bad or not more:
                    break
            if not items:
                continue
            for it in items:
                for note in it[4]:
                    self._note(*note)
            self.position = (epoch, slot + 1)
            yield self._finish([self._record(s, p, wh) for s, p, wh, _, _ in items], imgs)


# ----------------------------------------------------------------------------------------------------

def build_loader(dataset, batch_size: int, image_size: Union[int, Tuple[int, int]], *, tokenizer=None,
                 max_length: int = 128, channels: int = 1, train: bool = True, device="auto", rank: int = 0,
                 world_size: int = 1, num_threads: int = 2, seed: int = 0, drop_last: Optional[bool] = None,
                 backend: str = "auto", augment: Optional[Augment] = None, progress: bool = False,
                 refill: Optional[bool] = None):
    """An iterable of batch dicts (module docstring / docs/api.md); ``len()`` = batches per epoch.

    - ``dataset``: a sequence of :class:`gkcore.data.Sample` (SynthCXR, MimicCXR, IUXray) or a spec
      string for :func:`gkcore.data.open_dataset` (``"synth:PATH"``, ``"mimic:PATH"``, ``"iu:PATH"``).
    - ``image_size``: int S (output S x S) or (H, W).
    - ``tokenizer``: a Hugging Face (fast) tokenizer; None = :func:`gkcore.data.default_tokenizer`.
    - ``channels``: 1 or 3 (grey replicated). ``device``: "auto" (cuda if available), "cpu", "cuda[:i]".
    - ``num_threads``: DALI CPU threads / PIL DataLoader worker processes (0 = inline).
    - ``drop_last``: None = ``train``. ``backend``: "auto" | "dali" | "pil".
    - ``augment``: :class:`Augment` ranges for training; ``progress``: a tqdm bar per epoch.
    - ``refill``: None = ``train``; keep every batch full by taking the next usable samples in place of
      the bad ones (module docstring).
    """
    if isinstance(dataset, (str, os.PathLike)):
        from .adapters import open_dataset

        dataset = open_dataset(str(dataset))
    if backend not in ("auto", "dali", "pil"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'pil', got {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() else "pil"
    cls = DALILoader if backend == "dali" else PILLoader
    return cls(dataset, batch_size, image_size, tokenizer=tokenizer, max_length=max_length, channels=channels,
               train=train, device=device, rank=rank, world_size=world_size, num_threads=num_threads, seed=seed,
               drop_last=drop_last, augment=augment, progress=progress, refill=refill)
