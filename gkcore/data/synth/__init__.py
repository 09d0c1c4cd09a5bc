"""Synthetic chest X-rays with known ground truth (the built-in demo data).

:func:`generate` draws PA-view radiograph-like grey images with numpy: body outline, lungs with vessel
markings, heart, mediastinum, trachea and carina, aortic knob, spine, ribs, clavicles, hemidiaphragms,
a gastric bubble; then per-patient findings from the entity vocabulary (:mod:`gkcore.data.knowledge`)
placed in plausible regions; then acquisition effects (contrast, gamma, brightness, low-frequency
illumination, blur, noise). For every image it records

- the 29 Chest ImaGenome region boxes, derived from the anatomy actually drawn (they move with each
  patient's anatomy and with the acquisition shift/scale),
- the findings with their boxes (normalised xyxy, image frame),
- a report (FINDINGS + IMPRESSION) written from the findings, with varied phrasing, negations,
  uncertainty and region mentions, and
- entity labels 1 / 0 / -1 (present / absent / not mentioned) for what that report states
  (:func:`labels_from_statements`): drawn findings are 1 even where the report hedges ("possible ...";
  CheXpert's U-ones convention, as :func:`gkcore.data.reports.label_report` does by default), parents
  follow their children (consolidation -> lung opacity, rib fracture -> fracture, a catheter -> support
  devices, ...), negated findings are 0, and "no finding" is 1 when no pathology is present. The
  phrasing is kept plain enough that the rule-based labeller of :mod:`gkcore.data.reports` gives the
  same labels (checked in tests/test_synth.py).

Conventions: image coordinates x to the right, y down, normalised to [0, 1]; a PA view, so the patient's
right lung is on the image's left. Output: ``images/NNNNNNN.png`` (8-bit grey) plus ``metadata.jsonl``
(one JSON record per image) and ``synth.json`` (the generator settings and vocabularies).

Determinism: every image has its own random streams seeded by ``(seed, index)``, so image ``i`` is the
same whatever ``n`` is (a set of ``n`` images is a prefix of a larger set with the same seed). About one
image in ten is a second view of the previous image's study (same patient, findings and report, a
different acquisition); both carry the same ``study_id``.

:class:`SynthCXR` reads such a folder as a sequence of :class:`~gkcore.data.sample.Sample` records.

Modules, by role: :mod:`.labels` (label rules), :mod:`.canvas` (drawing primitives), :mod:`.anatomy` (the
patient, the 29 region boxes and the drawing of the normal anatomy), :mod:`.findings` (the finding types, one
spec each), :mod:`.drawers` (how each type is drawn), :mod:`.devices` (the support devices), :mod:`.reports`
(the report writer), :mod:`.image` (:func:`render`), :mod:`.files` (:func:`generate` and the file layout)
and :mod:`.dataset` (:class:`SynthCXR`).
"""
from __future__ import annotations

from .dataset import SynthCXR
from .files import MAX_SIZE, MIN_SIZE, generate, study_starts
from .findings import FINDING_TYPES
from .image import render
from .labels import PARENTS, labels_from_statements

__all__ = ["generate", "render", "SynthCXR", "labels_from_statements", "study_starts", "PARENTS", "FINDING_TYPES",
           "MIN_SIZE", "MAX_SIZE"]
