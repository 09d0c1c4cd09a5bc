"""SynthCXR: a folder written by generate() read as a sequence of Sample records."""
from __future__ import annotations

import json
import os
from typing import Iterator, List, Union

import numpy as np

from ..knowledge import ENTITY_NAMES, REGIONS, entity_index
from ..sample import Sample
from .files import HEADER_FILE, META_FILE


class SynthCXR:
    """A folder written by :func:`generate` (or ``gkcore data synth``) as a sequence of
    :class:`~gkcore.data.sample.Sample` records.

    ``ds[i]`` gives ``Sample(path, report, entity_labels (E,) int64, region_boxes (29, 4) float32 normalised
    xyxy, study_id, finding_boxes [(entity_index, x0, y0, x1, y1), ...], region_mask (29,) bool all True)``.
    Extra per-image ground truth (finding types, regions, report sections) is in ``ds.records[i]``.
    Labels are stored by entity name, so a folder stays readable when the vocabulary grows; finding
    boxes of entities no longer in the vocabulary are dropped.
    """

    def __init__(self, root: Union[str, os.PathLike]) -> None:
        self.root = os.fspath(root)
        meta = os.path.join(self.root, META_FILE)
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"{meta} not found: root={self.root!r} is not a SynthCXR folder "
                                    f"(write one with `gkcore data synth --out DIR --n N`)")
        hdr = os.path.join(self.root, HEADER_FILE)
        self.header = json.load(open(hdr)) if os.path.isfile(hdr) else {}
        if self.header.get("regions", list(REGIONS)) != list(REGIONS):
            raise ValueError(f"{hdr}: region list differs from gkcore.data.knowledge.REGIONS")
        self.records: List[dict] = []
        with open(meta) as f:
            for ln, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{meta}:{ln}: bad JSON ({e})") from None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: Union[int, slice]) -> Union[Sample, List[Sample]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int or a slice, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for SynthCXR of length {n}")
        r = self.records[int(i) % n]
        E = len(ENTITY_NAMES)
        lab = np.full(E, -1, np.int64)
        for name, v in r["labels"].items():
            if name in _NAME_SET:
                lab[entity_index(name)] = int(v)
        fb = [(entity_index(b[0]), float(b[1]), float(b[2]), float(b[3]), float(b[4]))
              for b in r.get("finding_boxes", []) if b[0] in _NAME_SET]
        return Sample(path=os.path.join(self.root, r["file"]), report=r["report"], entity_labels=lab,
                      region_boxes=np.asarray(r["region_boxes"], np.float32), study_id=int(r["study_id"]),
                      finding_boxes=fb, region_mask=np.ones(len(REGIONS), bool))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"SynthCXR(root={self.root!r}, n={len(self)})"


_NAME_SET = set(ENTITY_NAMES)
