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
