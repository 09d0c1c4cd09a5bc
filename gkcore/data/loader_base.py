"""What both loader backends share: dataset access, the epoch order, sharding and batch slots (with
the resume position), the check of each record and the accounting of bad samples, and collation into the
batch dict (see the :mod:`gkcore.data.loader` docstring)."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .geometry import Augment, SamplePlan, _hw, transform_boxes
from .knowledge import NUM_REGIONS
from .sample import UNLOADABLE_RECORD, SampleRejected, check_sample

MEAN = 0.471
STD = 0.302


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
# the candidates of a batch slot, checked

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
