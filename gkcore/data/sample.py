"""The record every dataset yields (see docs/api.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np


@dataclass
class Sample:
    """One image with its report and labels.

    - ``path``: image file (PNG, JPEG or DICOM).
    - ``report``: the report text (FINDINGS + IMPRESSION where known).
    - ``entity_labels``: int8/int64 array (E,), E = len(ENTITIES); 1 present, 0 absent, -1 not mentioned.
    - ``region_boxes``: float32 array (29, 4) of normalised xyxy boxes in the original image frame, or None
      when the dataset has no boxes; ``region_mask`` (29,) bool marks the known ones (None = all known).
    - ``study_id``: int, shared by the images of one study (ITM negatives exclude same-study pairs).
    - ``finding_boxes``: list of (entity_index, x0, y0, x1, y1), normalised, where known (SynthCXR).
    """

    path: str
    report: str
    entity_labels: np.ndarray
    region_boxes: Optional[np.ndarray] = None
    study_id: int = 0
    finding_boxes: List[Tuple[int, float, float, float, float]] = field(default_factory=list)
    region_mask: Optional[np.ndarray] = None


# ---------------------------------------------------------------------------------------------- checks
#: Why a sample is left out (``loader.summary()["rejected"]`` counts samples by these).
UNREADABLE_IMAGE = "unreadable image"
UNLOADABLE_RECORD = "record cannot be loaded"
BAD_LABEL_VALUE = "bad label value"
WRONG_NUMBER_OF_LABELS = "wrong number of labels"
EMPTY_REPORT = "empty or missing report"
WRONG_NUMBER_OF_BOXES = "wrong number of boxes"
BAD_STUDY_ID = "bad study id"
#: What is repaired in a sample that is kept (``loader.summary()["repaired"]``): the box is left out
#: (its region marked unknown, a finding box dropped), never flipped or clipped into something else.
SWAPPED_BOX = "swapped box"
NON_FINITE_BOX = "non-finite box"
BAD_FINDING_BOX = "bad finding box"


class SampleRejected(ValueError):
    """A sample that cannot be trained on: ``reason`` is one of the constants above, ``detail`` says what."""

    def __init__(self, path: str, reason: str, detail: str):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{self.path}: {reason} ({detail})")


def check_sample(sample: Sample, num_entities: int, num_regions: int) -> Tuple[Sample, List[str]]:
    """Validate one record before its image is read. Returns ``(sample, repairs)``: a copy with the
    repairs applied (``region_mask`` False for a swapped or non-finite region box; such finding boxes
    dropped) and the repair reasons (each at most once); raises :class:`SampleRejected` for a record
    that cannot be used (labels not in {-1, 0, 1} or not ``num_entities`` of them, an empty or missing
    report, region boxes not of shape (``num_regions``, 4), a study id that is not an integer)."""
    path = str(getattr(sample, "path", "?"))
    try:
        labels = np.asarray(sample.entity_labels, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise SampleRejected(path, BAD_LABEL_VALUE, f"entity_labels are not numbers: {e}") from None
    if labels.shape[0] != num_entities:
        raise SampleRejected(path, WRONG_NUMBER_OF_LABELS,
                             f"{labels.shape[0]} entity labels, expected {num_entities}")
    bad = ~np.isin(labels, (-1.0, 0.0, 1.0))
    if bad.any():
        vals = sorted({float(v) for v in labels[bad]})[:3]
        raise SampleRejected(path, BAD_LABEL_VALUE, f"entity labels must be 1, 0 or -1; found {vals}")
    report = sample.report
    if not isinstance(report, str) or not report.strip():
        raise SampleRejected(path, EMPTY_REPORT, f"report is {report!r}")
    try:
        study = int(sample.study_id)
    except (TypeError, ValueError, OverflowError):
        raise SampleRejected(path, BAD_STUDY_ID, f"study_id {sample.study_id!r} is not an integer") from None
    repairs: List[str] = []
    boxes, mask = sample.region_boxes, sample.region_mask
    if boxes is not None:
        try:
            boxes = np.asarray(boxes, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise SampleRejected(path, WRONG_NUMBER_OF_BOXES, f"region_boxes are not numbers: {e}") from None
        if boxes.shape != (num_regions, 4):
            raise SampleRejected(path, WRONG_NUMBER_OF_BOXES,
                                 f"region_boxes has shape {boxes.shape}, expected ({num_regions}, 4)")
        mask = np.ones(num_regions, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
        if mask.shape != (num_regions,):
            raise SampleRejected(path, WRONG_NUMBER_OF_BOXES,
                                 f"region_mask has {mask.shape[0]} entries, expected {num_regions}")
        finite = np.isfinite(boxes).all(1)
        swapped = finite & ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
        if (mask & ~finite).any():
            repairs.append(NON_FINITE_BOX)
        if (mask & swapped).any():
            repairs.append(SWAPPED_BOX)
        mask = mask & finite & ~swapped
        boxes = np.where(mask[:, None], boxes, np.float32(0.0)).astype(np.float32)
    kept = []
    for fb in list(sample.finding_boxes or []):
        try:
            e, x0, y0, x1, y1 = int(fb[0]), float(fb[1]), float(fb[2]), float(fb[3]), float(fb[4])
        except (TypeError, ValueError, IndexError, OverflowError):
            repairs.append(BAD_FINDING_BOX)
            continue
        if not 0 <= e < num_entities:
            repairs.append(BAD_FINDING_BOX)
        elif not all(np.isfinite((x0, y0, x1, y1))):
            repairs.append(NON_FINITE_BOX)
        elif x1 < x0 or y1 < y0:
            repairs.append(SWAPPED_BOX)
        else:
            kept.append((e, x0, y0, x1, y1))
    checked = Sample(path=path, report=report, entity_labels=labels.astype(np.int64), region_boxes=boxes,
                     study_id=study, finding_boxes=kept, region_mask=mask)
    return checked, list(dict.fromkeys(repairs))
