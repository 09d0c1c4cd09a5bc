"""Entity labels from what a report states: the parent rules and the "no finding" rule (which reads the finding
types' table for what is not pathology)."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..knowledge import ENTITY_NAMES, entity_index
from .devices import DEVICES
from .findings import SPECS

#: child -> (parent, whether a negated child also negates the parent): a finding also labels its parent
#: observation (as CheXpert's hierarchy and :func:`gkcore.data.reports.label_report` do).
PARENTS: Tuple[Tuple[str, str, bool], ...] = (
    ("rib fracture", "fracture", True), ("clavicle fracture", "fracture", True),
    ("nodule", "lung lesion", False), ("mass", "lung lesion", False), ("cavity", "lung lesion", False),
    ("consolidation", "lung opacity", False), ("atelectasis", "lung opacity", False),
    ("edema", "lung opacity", False), ("pneumonia", "lung opacity", False),
    ("infiltration", "lung opacity", False), ("interstitial opacity", "lung opacity", False),
    ("ground glass opacity", "lung opacity", False),
    ("cardiomegaly", "enlarged cardiomediastinum", False), ("widened mediastinum", "enlarged cardiomediastinum", False),
    ("calcified granuloma", "granuloma", True), ("pleural thickening", "pleural other", False),
    ("hydropneumothorax", "pneumothorax", False), ("hydropneumothorax", "pleural effusion", False),
    *((kind, "support devices", False) for kind in DEVICES),  # every device kind
)
#: entities that do not count against "no finding": those of the finding types that are not pathology
_NOT_PATHOLOGY = {"no finding", *(e for s in SPECS.values() if not s.pathology for e in s.all_entities)}


def labels_from_statements(statements: Dict[str, int]) -> np.ndarray:
    """Entity labels (E,) int64 from what a report states: ``statements`` maps entity name -> 1 (affirmed,
    including uncertain mentions: the "U-ones" convention, since -1 means "not mentioned") or 0 (negated).
    Parents are added (:data:`PARENTS`: affirmed children always, negated ones where marked); affirmed wins
    over negated; "no finding" is 1 when no pathology (support devices aside) is affirmed, else 0."""
    state: Dict[str, set] = {k: {int(v)} for k, v in statements.items()}
    for child, parent, neg in PARENTS:
        if child in state:
            st = set(state[child]) if neg else state[child] - {0}
            if st:
                state.setdefault(parent, set()).update(st)
    lab = np.full(len(ENTITY_NAMES), -1, np.int64)
    for name, st in state.items():
        lab[entity_index(name)] = 1 if 1 in st else 0
    lab[entity_index("no finding")] = 0 if any(
        lab[i] == 1 for i, n in enumerate(ENTITY_NAMES) if n not in _NOT_PATHOLOGY) else 1
    return lab
