"""The finding types, each described once in :data:`SPECS`: its prevalence, the entities it states, where it
is reported, how it is drawn (the anatomy change it makes, its drawer and, for focal lesions, the blob's
parameters), how the report phrases it and which negations it rules out. The drawer
(:func:`draw_finding`), the report writer (:func:`~gkcore.data.synth.reports.write_report`) and the labeller
(:func:`~gkcore.data.synth.labels.labels_from_statements`) read it. :func:`choose_findings` picks a
patient's findings from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import numpy as np

from .anatomy import Anatomy, Patient
from .canvas import Canvas
from .devices import DEVICES, draw_device
from .drawers import (LUNG, Finding, Scene, curve_spine, draw_aortic_rim, draw_atelectasis, draw_edema,
                      draw_effusion, draw_fracture, draw_hernia, draw_hila, draw_in_regions, draw_interstitial,
                      draw_lesion, draw_pleural_thickening, draw_pneumoperitoneum, draw_pneumothorax,
                      draw_scoliosis, enlarge_aorta, enlarge_heart, enlarge_hila, hyperinflate, lower_volumes,
                      place_device, raise_hemidiaphragm, widen_mediastinum)
from .reports import (Said, Wording, say_cardiomegaly, say_cavity, say_consolidation, say_device, say_edema,
                      say_effusion, say_elevated_hemidiaphragm, say_emphysema, say_fracture, say_granuloma,
                      say_hernia, say_hilar_enlargement, say_interstitial, say_lesion, say_low_lung_volumes,
                      say_pleural_thickening, say_pneumoperitoneum, say_pneumothorax, say_scoliosis,
                      say_tortuous_aorta, say_widened_mediastinum)

Drawer = Callable[[dict, "FindingSpec", Scene], Optional[Finding]]
Sayer = Callable[[Finding, Wording], Said]


@dataclass(frozen=True)
class Lesion:
    """A focal lung lesion drawn as a soft irregular blob (:func:`~gkcore.data.synth.drawers.draw_lesion`)."""
    radius: Tuple[float, float]  # r = radius[0] + radius[1] * v (patient frame)
    irregular: float             # wobble of the outline, as a fraction of r
    soft: float                  # width of the soft edge, as a fraction of r
    strength: float              # density added at the centre
    zone: Union[str, Callable[[float], str]] = "any"  # lung zone of the centre, or a rule on the choice's u
    airspace: bool = False       # fills airspace: may reach the lung edge, and is clipped to the lung
    mottled: bool = False        # with air bronchograms
    hollow: bool = False         # a lucent centre inside a wall (a cavity)


@dataclass(frozen=True)
class FindingSpec:
    """One finding type: how often it occurs, how it is drawn, what the report says about it."""
    name: str
    weight: float                # prevalence among abnormal images (each has 1-3 distinct types)
    draw: Drawer                 # draws it on the scene and returns what was drawn (None: no room for it)
    say: Sayer                   # its FINDINGS sentence and IMPRESSION phrase (gkcore.data.synth.reports)
    entities: Tuple[str, ...]    # entities it always states
    extra: Optional[Tuple[str, float]] = None  # (entity, p): one more entity, stated when the choice's w < p
    variants: Tuple[str, ...] = ()  # entities of which the drawer states one, first (the device kind, the bone)
    regions: Tuple[str, ...] = ()  # regions it is reported in ("{side}": its side); the drawer picks one
    lesion: Optional[Lesion] = None  # blob parameters, for draw_lesion
    reshape: Optional[Callable[[Patient, dict], None]] = None  # its change to the anatomy, before any drawing
    overlay: Optional[Callable[[Finding, Anatomy, Canvas, float], None]] = None  # drawn over the finished anatomy
    describe: Tuple[str, ...] = ()  # noun phrases of a focal finding's sentence ("{mm}", "{cm}": its size)
    noun: str = ""               # a focal finding's noun in the IMPRESSION
    forbids: Tuple[str, ...] = ()  # entities the report must not deny, besides its own: parents, look-alikes
    pathology: bool = True       # False: does not count against "no finding" (support devices)

    @property
    def all_entities(self) -> Tuple[str, ...]:
        """Every entity a finding of this type may state."""
        return self.variants + self.entities + ((self.extra[0],) if self.extra else ())

    @property
    def never_denied(self) -> FrozenSet[str]:
        """Entities the report does not negate while a finding of this type is drawn."""
        return frozenset(self.all_entities + self.forbids)

    def stated(self, choice: dict, variant: Optional[str] = None) -> List[str]:
        """The entities one drawn finding states: ``variant`` (the kind the drawer picked) first, then
        :attr:`entities`, then :attr:`extra` when the choice's w is below its threshold."""
        ents = ([variant] if variant else []) + list(self.entities)
        if self.extra is not None and choice["w"] < self.extra[1]:
            ents.append(self.extra[0])
        return ents


def _consolidation_zone(u: float) -> str:
    return ["lower", "mid", "upper"][int(u * 2.99) if u > 0.4 else 0]  # lower 40 %, mid 27 %, upper 33 %


_APEX = ("{side} apical zone", "{side} upper lung zone", "{side} lung")
_BOTH_LUNGS = ("right lung", "left lung")

#: finding type -> its spec; the order is the order :func:`choose_findings` draws types in
SPECS: Dict[str, FindingSpec] = {s.name: s for s in (
    FindingSpec("cardiomegaly", 0.13, draw_in_regions, say_cardiomegaly, ("cardiomegaly",),
                regions=("cardiac silhouette",), reshape=enlarge_heart, forbids=("enlarged cardiomediastinum",)),
    FindingSpec("pleural effusion", 0.13, draw_effusion, say_effusion, ("pleural effusion",),
                regions=("{side} costophrenic angle", "{side} lower lung zone", "{side} lung"),
                forbids=("hydropneumothorax",)),
    FindingSpec("consolidation", 0.12, draw_lesion, say_consolidation, ("consolidation",), extra=("pneumonia", 0.5),
                regions=LUNG, lesion=Lesion((0.08, 0.035), irregular=0.3, soft=0.45, strength=0.4,
                                            zone=_consolidation_zone, airspace=True, mottled=True),
                describe=("focal consolidation", "airspace consolidation", "patchy consolidation",
                          "dense consolidation"), noun="consolidation", forbids=("lung opacity",)),
    FindingSpec("atelectasis", 0.09, draw_atelectasis, say_lesion, ("atelectasis",), regions=LUNG,
                describe=("linear atelectasis", "plate-like atelectasis", "subsegmental atelectasis",
                          "bandlike atelectasis"), noun="atelectasis", forbids=("lung opacity",)),
    FindingSpec("pneumothorax", 0.08, draw_pneumothorax, say_pneumothorax, ("pneumothorax",), regions=_APEX,
                forbids=("hydropneumothorax",)),
    FindingSpec("nodule", 0.08, draw_lesion, say_lesion, ("nodule",), regions=LUNG,
                lesion=Lesion((0.03, 0.012), irregular=0.05, soft=0.35, strength=0.38),
                describe=("a {mm} mm nodule", "a rounded nodule", "a small well-circumscribed nodule"), noun="nodule",
                forbids=("mass", "lung lesion", "lung opacity")),
    FindingSpec("mass", 0.04, draw_lesion, say_lesion, ("mass",), regions=LUNG,
                lesion=Lesion((0.06, 0.02), irregular=0.15, soft=0.25, strength=0.38),
                describe=("a {cm} cm mass", "a lobulated mass", "a large rounded mass"), noun="mass",
                forbids=("nodule", "lung lesion", "lung opacity")),
    FindingSpec("edema", 0.06, draw_edema, say_edema, ("edema",), extra=("kerley lines", 0.3), regions=LUNG,
                forbids=("lung opacity",)),
    FindingSpec("lung opacity", 0.06, draw_lesion, say_lesion, ("lung opacity",), regions=LUNG,
                lesion=Lesion((0.08, 0.03), irregular=0.25, soft=0.8, strength=0.3, airspace=True),
                describe=("hazy opacity", "ill-defined opacity", "patchy opacity", "an area of increased opacity"),
                noun="opacity", forbids=("pneumonia",)),
    FindingSpec("widened mediastinum", 0.04, draw_in_regions, say_widened_mediastinum, ("widened mediastinum",),
                extra=("enlarged cardiomediastinum", 0.6), regions=("upper mediastinum",), reshape=widen_mediastinum,
                forbids=("lymphadenopathy",)),
    FindingSpec("device", 0.10, place_device, say_device, ("support devices",), variants=tuple(DEVICES),
                overlay=draw_device, pathology=False),
    FindingSpec("fracture", 0.04, draw_fracture, say_fracture, ("fracture",),
                variants=("clavicle fracture", "rib fracture"), regions=LUNG),
    FindingSpec("elevated hemidiaphragm", 0.03, draw_in_regions, say_elevated_hemidiaphragm,
                ("elevated hemidiaphragm",), regions=("{side} hemidiaphragm",), reshape=raise_hemidiaphragm),
    FindingSpec("emphysema", 0.03, draw_in_regions, say_emphysema, ("emphysema", "hyperinflation"),
                regions=_BOTH_LUNGS, reshape=hyperinflate),
    FindingSpec("low lung volumes", 0.02, draw_in_regions, say_low_lung_volumes, ("low lung volumes",),
                regions=_BOTH_LUNGS, reshape=lower_volumes, forbids=("atelectasis",)),
    FindingSpec("scoliosis", 0.03, draw_scoliosis, say_scoliosis, ("scoliosis",), regions=("spine",),
                reshape=curve_spine),
    FindingSpec("calcified granuloma", 0.03, draw_lesion, say_granuloma, ("calcified granuloma", "granuloma"),
                regions=LUNG, lesion=Lesion((0.014, 0.005), irregular=0.0, soft=0.3, strength=0.55),
                describe=("a calcified granuloma", "a small calcified granuloma"),
                forbids=("nodule", "lung lesion", "lung opacity")),
    FindingSpec("hilar enlargement", 0.03, draw_hila, say_hilar_enlargement, ("hilar enlargement",),
                regions=("{side} hilar structures",), reshape=enlarge_hila, forbids=("lymphadenopathy",)),
    FindingSpec("pleural thickening", 0.02, draw_pleural_thickening, say_pleural_thickening,
                ("pleural thickening",), regions=_APEX),
    FindingSpec("pneumoperitoneum", 0.015, draw_pneumoperitoneum, say_pneumoperitoneum, ("pneumoperitoneum",),
                regions=("right hemidiaphragm", "abdomen")),
    FindingSpec("cavity", 0.02, draw_lesion, say_cavity, ("cavity",), extra=("tuberculosis", 0.5), regions=LUNG,
                lesion=Lesion((0.045, 0.015), irregular=0.1, soft=0.3, strength=0.32, zone="upper", hollow=True),
                describe=("a thick-walled cavity", "a cavity"), noun="cavity",
                forbids=("consolidation", "pneumonia", "nodule", "mass", "lung lesion", "lung opacity")),
    FindingSpec("interstitial opacity", 0.03, draw_interstitial, say_interstitial, ("interstitial opacity",),
                extra=("fibrosis", 0.5), regions=LUNG, forbids=("edema", "lung opacity")),
    FindingSpec("tortuous aorta", 0.03, draw_aortic_rim, say_tortuous_aorta, ("tortuous aorta",),
                extra=("aortic calcification", 0.6), regions=("aortic arch",), reshape=enlarge_aorta,
                forbids=("widened mediastinum",)),
    FindingSpec("hernia", 0.02, draw_hernia, say_hernia, ("hernia",), regions=("cardiac silhouette",)),
)}

#: finding type -> relative weight (its prevalence among abnormal images; 1-3 types per abnormal image)
FINDING_TYPES: Dict[str, float] = {name: s.weight for name, s in SPECS.items()}


def _choice(name: str, rng: np.random.Generator, may_hedge: bool = True) -> dict:
    """One finding of type ``name``: its side, whether it is bilateral and hedged, and three numbers in [0, 1)
    that vary its look (size, position, variant)."""
    side = "R" if rng.random() < 0.5 else "L"
    bilateral = bool(rng.random() < 0.25)
    uncertain = bool(rng.random() < 0.12) if may_hedge else False
    return {"type": name, "side": side, "bilateral": bilateral, "uncertain": uncertain, "u": float(rng.random()),
            "v": float(rng.random()), "w": float(rng.random())}


def choose_findings(rng: np.random.Generator, forced: Optional[Sequence[str]] = None) -> List[dict]:
    """A patient's findings (:func:`_choice` dicts): none (about 28 %) or 1-3 distinct types. ``forced``
    (names from :data:`FINDING_TYPES`) replaces the types; their details then come from a stream of their own,
    so ``rng`` is left where the random choice leaves it."""
    if forced is not None:
        unknown = [f for f in forced if f not in FINDING_TYPES]
        if unknown:
            raise ValueError(f"findings: unknown finding types {unknown}; expected names from {list(FINDING_TYPES)}")
    choices = []
    if rng.random() >= 0.28:
        k = 1 + int(rng.random() < 0.45) + int(rng.random() < 0.2)
        names = list(FINDING_TYPES)
        w = np.array([FINDING_TYPES[n] for n in names])
        pick = rng.choice(len(names), size=k, replace=False, p=w / w.sum())
        chosen = [names[i] for i in sorted(pick)]
        if "emphysema" in chosen and "low lung volumes" in chosen:  # contradictory
            chosen.remove("low lung volumes")
        choices = [_choice(name, rng) for name in chosen]
    seed = rng.integers(2**63)  # drawn in both cases, so what follows in rng does not depend on ``forced``
    if forced is None:
        return choices
    frng = np.random.default_rng(seed)
    return [_choice(t, frng, may_hedge=False) for t in dict.fromkeys(forced)]


def reshape_patient(p: Patient, choices: Sequence[dict]) -> None:
    """Apply the chosen findings' anatomy changes (an enlarged heart, a raised hemidiaphragm, ...) in order."""
    for c in choices:
        spec = SPECS[c["type"]]
        if spec.reshape is not None:
            spec.reshape(p, c)


def draw_finding(choice: dict, sc: Scene) -> Optional[Finding]:
    """Draw one chosen finding on the scene through its spec's drawer."""
    spec = SPECS[choice["type"]]
    return spec.draw(choice, spec, sc)
