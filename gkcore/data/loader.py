"""The training/evaluation loader: images + reports + entity labels + region boxes -> batch dicts.

This module holds :func:`build_loader` and the contract below; the parts live next to it and their public
names are importable from here too: :mod:`gkcore.data.geometry` (the per-sample geometry and colour plan),
:mod:`gkcore.data.loader_base` (order, sharding, bad-sample accounting, collation), and the two backends,
:mod:`gkcore.data.loader_pil` and :mod:`gkcore.data.loader_dali`.

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

import os
from typing import Optional, Tuple, Union

# the loader's parts, importable from here as before
from .geometry import Augment, SamplePlan, color_jitter, jitter_offset, plan_sample, transform_boxes  # noqa: F401
from .loader_base import MEAN, STD  # noqa: F401
from .loader_dali import DALILoader, dali_available
from .loader_pil import PILLoader, pil_render  # noqa: F401


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
