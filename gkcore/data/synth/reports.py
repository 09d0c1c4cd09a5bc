"""The report writer: FINDINGS and IMPRESSION text for the drawn findings, with negations of what is absent,
and the statements (entity -> 1 | 0) the text makes. Each finding type's sentence writer (``say``, read from
its :class:`~gkcore.data.synth.findings.FindingSpec`) returns its FINDINGS sentence and IMPRESSION phrase."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .anatomy import SIDE
from .devices import DEVICES
from .drawers import Finding

Said = Tuple[str, Optional[str]]  # (FINDINGS sentence, IMPRESSION phrase or None)

_SIZE_WORD = ["small", "small", "moderate", "moderate to large"]


class Wording:
    """What a sentence writer needs besides the finding: the report's random stream, the finding's side as a
    word, its location phrase, and the hedges it uses when the finding is uncertain."""

    def __init__(self, fd: Finding, rng: np.random.Generator) -> None:
        self.rng = rng
        self.unc = fd.uncertain
        self.side = SIDE.get(fd.side or "", "")
        prep = "at the" if "angle" in fd.region or "junction" in fd.region else "in the"
        self.loc = f"{prep} {fd.region}"
        self.maybe = "Possible " if fd.uncertain else ""  # hedge of an IMPRESSION phrase
        self.cue = self.choose(["Possible", "Questionable", "Suspected"])  # hedge of a FINDINGS sentence

    def choose(self, xs: Sequence[str]) -> str:
        return xs[int(self.rng.integers(len(xs)))]


# ============================================================================== sentence writers
def _lesion_sentence(fd: Finding, w: Wording) -> str:
    """A focal lung finding described by one of its spec's phrases (``describe``), placed in its region."""
    mm = int(w.rng.integers(8, 19))
    d = w.choose(fd.spec.describe).format(mm=mm, cm=int(w.rng.integers(3, 6)))
    if d.startswith(f"a {mm} mm") and (mm == 8 or mm in (11, 18)):
        d = "an " + d[2:]  # "an 8 mm", "an 11 mm", "an 18 mm"
    bare = d.split(" ", 1)[1] if d.startswith(("a ", "an ")) else d  # without the article
    if w.unc:
        return f"{w.cue} {bare} {w.loc}."
    return w.choose([f"There is {d} {w.loc}.", f"{d[0].upper() + d[1:]} is seen {w.loc}.",
                     f"{d[0].upper() + d[1:]} {w.loc}.", f"Redemonstrated {bare} {w.loc}."])


def _lesion_impression(fd: Finding, w: Wording) -> str:
    where = fd.region.split(" ", 1)[1] if fd.region.startswith(w.side) else fd.region
    return f"{w.maybe}{w.side} {where} {fd.spec.noun}".replace("  ", " ").strip()


def say_lesion(fd: Finding, w: Wording) -> Said:
    return _lesion_sentence(fd, w), _lesion_impression(fd, w)


def say_consolidation(fd: Finding, w: Wording) -> Said:
    s = _lesion_sentence(fd, w)
    if "pneumonia" not in fd.entities:
        return s, _lesion_impression(fd, w)
    side = w.side.capitalize()
    imp = (f"{side} consolidation, which may represent pneumonia" if w.unc or w.rng.random() < 0.5
           else f"{side} consolidation compatible with pneumonia")
    if w.unc:
        imp = "Possible consolidation or pneumonia"
    return s, imp


def say_cavity(fd: Finding, w: Wording) -> Said:
    s = _lesion_sentence(fd, w)
    if "tuberculosis" not in fd.entities:
        return s, _lesion_impression(fd, w)
    return s, f"{w.maybe}cavity in the {fd.region}; tuberculosis cannot be excluded"


def say_granuloma(fd: Finding, w: Wording) -> Said:
    s = _lesion_sentence(fd, w)
    return s, None if w.rng.random() < 0.5 else "Calcified granuloma, a benign finding"


def say_effusion(fd: Finding, w: Wording) -> Said:
    sz, side = w.choose(_SIZE_WORD), w.side
    if fd.detail.get("bilateral"):
        s = f"{w.cue} small bilateral pleural effusions." if w.unc else w.choose(
            [f"Bilateral {sz} pleural effusions.", f"There are {sz} bilateral pleural effusions blunting "
             f"both costophrenic angles."])
        return s, f"{w.maybe}bilateral pleural effusions"
    s = f"{w.cue} {sz} {side} pleural effusion." if w.unc else w.choose(
        [f"There is a {sz} {side} pleural effusion.", f"{sz.capitalize()} {side} pleural effusion "
         f"blunting the {side} costophrenic angle.", f"A {sz} {side} effusion layers {w.loc}."])
    return s, f"{w.maybe}{sz} {side} pleural effusion"


def say_pneumothorax(fd: Finding, w: Wording) -> Said:
    sz, side = w.choose(["small", "small", "moderate", "apical"]), w.side
    s = f"{w.cue} {sz} {side} pneumothorax." if w.unc else w.choose(
        [f"There is a {sz} {side} pneumothorax.", f"{sz.capitalize()} {side} apical pneumothorax with a visible "
         f"pleural line.", f"A {side} pneumothorax is present {w.loc}."])
    return s, f"{w.maybe}{side} pneumothorax"


def say_edema(fd: Finding, w: Wording) -> Said:
    extra = " with kerley lines at the bases" if "kerley lines" in fd.entities else ""
    s = f"{w.cue} mild pulmonary edema{extra}." if w.unc else w.choose(
        [f"Perihilar haziness and vascular indistinctness consistent with pulmonary edema{extra}.",
         f"Moderate pulmonary edema{extra}.", f"Interstitial pulmonary edema is present{extra}."])
    return s, f"{w.maybe}pulmonary edema"


def say_interstitial(fd: Finding, w: Wording) -> Said:
    s = (f"{w.cue} interstitial opacity in both lower lung zones." if w.unc else
         "Reticular interstitial opacity in the mid and lower lung zones bilaterally.")
    if "fibrosis" in fd.entities:
        s += " Findings may reflect fibrosis."
    return s, None


def say_cardiomegaly(fd: Finding, w: Wording) -> Said:
    s = f"{w.cue} mild cardiomegaly." if w.unc else w.choose(
        ["The heart is enlarged.", "Cardiomegaly.", "Moderate cardiomegaly is present.",
         "Enlarged cardiac silhouette consistent with cardiomegaly."])
    return s, f"{w.maybe}cardiomegaly"


def say_widened_mediastinum(fd: Finding, w: Wording) -> Said:
    s = f"{w.cue} widened mediastinum." if w.unc else w.choose(["Widened mediastinum at the level of the aortic arch.",
                                                                "There is a widened mediastinum."])
    if "enlarged cardiomediastinum" in fd.entities:
        s += f" {'Possible enlarged' if w.unc else 'Enlarged'} cardiomediastinum contour."
    return s, f"{w.maybe}widened mediastinum"


def say_tortuous_aorta(fd: Finding, w: Wording) -> Said:
    calc = "aortic calcification" in fd.entities
    if w.unc:
        return "Possible tortuous aorta." + (" Possible aortic calcification." if calc else ""), None
    return ("Tortuous aorta with aortic calcification." if calc else "Tortuous aorta."), None


def say_hilar_enlargement(fd: Finding, w: Wording) -> Said:
    where = "bilateral" if fd.detail.get("bilateral") else w.side
    s = f"{w.cue} {where} hilar enlargement." if w.unc else f"There is {where} hilar enlargement."
    return s, f"{w.maybe}{where} hilar enlargement"


def say_elevated_hemidiaphragm(fd: Finding, w: Wording) -> Said:
    s = f"{w.cue} elevated {w.side} hemidiaphragm." if w.unc else w.choose(
        [f"Elevated {w.side} hemidiaphragm.", f"The {w.side} hemidiaphragm is elevated."])
    return s, None


def say_emphysema(fd: Finding, w: Wording) -> Said:
    if w.unc:  # one polarity per sentence
        return "Possible hyperinflation. Possible emphysema.", "Possible emphysema"
    return w.choose(["Hyperinflation with flattened hemidiaphragms, consistent with emphysema.",
                     "Emphysema with hyperinflation of both lungs."]), "emphysema"


def say_low_lung_volumes(fd: Finding, w: Wording) -> Said:
    return ("Low lung volumes." if not w.unc else "Possible low lung volumes."), None


def say_scoliosis(fd: Finding, w: Wording) -> Said:
    conv = fd.detail.get("convex", "right")
    return (f"{w.cue} scoliosis." if w.unc else f"Thoracic scoliosis, convex to the {conv}."), None


def say_pleural_thickening(fd: Finding, w: Wording) -> Said:
    side = w.side
    s = f"{w.cue} {side} apical pleural thickening." if w.unc else f"{side.capitalize()} apical pleural thickening."
    return s, None


def say_pneumoperitoneum(fd: Finding, w: Wording) -> Said:
    s = ("Possible free air under the right hemidiaphragm, suspicious for pneumoperitoneum." if w.unc else
         "Free air under the right hemidiaphragm consistent with pneumoperitoneum.")
    return s, f"{w.maybe}pneumoperitoneum"


def say_hernia(fd: Finding, w: Wording) -> Said:
    s = ("Retrocardiac air-fluid level, possibly a hiatal hernia." if w.unc else
         "Retrocardiac air-fluid level consistent with a hiatal hernia.")
    return s, None


def say_fracture(fd: Finding, w: Wording) -> Said:
    side = w.side
    if "clavicle fracture" in fd.entities:
        s = f"{w.cue} {side} clavicle fracture." if w.unc else w.choose(
            [f"Displaced {side} clavicle fracture.", f"There is an acute {side} clavicle fracture."])
        return s, f"{w.maybe}{side} clavicle fracture"
    n = fd.detail.get("rib_number", 5)
    sfx = {1: "st", 2: "nd", 3: "rd"}.get(n if n < 20 else n % 10, "th")
    s = f"{w.cue} {side} {n}{sfx} rib fracture." if w.unc else f"Acute {side} {n}{sfx} posterior rib fracture."
    return s, f"{w.maybe}{side} rib fracture"


def say_device(fd: Finding, w: Wording) -> Said:
    d = w.choose(DEVICES[fd.detail["kind"]].phrases).format(n=int(w.rng.integers(3, 6)), side=w.side)
    return w.choose([f"Support devices: {d}.", f"Support devices in place: {d}."]), None


def _say(fd: Finding, rng: np.random.Generator) -> Said:
    return fd.spec.say(fd, Wording(fd, rng))


# ============================================================================== the report
#: negatable statements: (phrase, entity); a report denies only entities no drawn finding forbids denying
_NEGATABLE = [
    ("pleural effusion", "pleural effusion"), ("pneumothorax", "pneumothorax"),
    ("focal consolidation", "consolidation"), ("pulmonary edema", "edema"), ("cardiomegaly", "cardiomegaly"),
    ("pneumonia", "pneumonia"), ("fracture", "fracture"), ("pulmonary nodule", "nodule"), ("mass", "mass"),
    ("atelectasis", "atelectasis"), ("pneumoperitoneum", "pneumoperitoneum"),
    ("widened mediastinum", "widened mediastinum"), ("pneumomediastinum", "pneumomediastinum"),
    ("hilar enlargement", "hilar enlargement"), ("lymphadenopathy", "lymphadenopathy"),
    ("hydropneumothorax", "hydropneumothorax"), ("emphysema", "emphysema"), ("scoliosis", "scoliosis"),
    ("support devices", "support devices"), ("focal lung lesion", "lung lesion"),
]
#: phrases of positive sentences that state one more entity
_EXTRA = (("blunting", "blunted costophrenic angle"),)


def _join(items: List[str]) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} or {items[1]}"
    return ", ".join(items[:-1]) + f", or {items[-1]}"


def write_report(findings: List[Finding], rng: np.random.Generator) -> dict:
    """FINDINGS + IMPRESSION text for the drawn findings, and ``statements`` {entity: 1 | 0}: what the text
    affirms (uncertain phrasing included) or negates."""
    ch = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    never_denied = set().union(*(f.spec.never_denied for f in findings))  # see FindingSpec.forbids
    said: Dict[str, int] = {}

    def state(ents, v, sentence=""):
        for e in ents:
            said[e] = max(said.get(e, v), v)
        for phrase, e in _EXTRA:
            if v == 1 and phrase in sentence:
                said[e] = 1

    pos, imp = [], []
    for f in findings:
        s, i = _say(f, rng)
        state(f.entities, 1, s)
        pos.append(s)
        if i:
            state(f.entities, 1, i)
            imp.append(i[0].upper() + i[1:])
    # negations: 2-5 statements about things not drawn
    cands = [(ph, e) for ph, e in _NEGATABLE if e not in never_denied]
    k = min(len(cands), int(rng.integers(2, 6)))
    negs = [cands[i] for i in sorted(rng.choice(len(cands), size=k, replace=False))]
    neg_sents = []
    while negs:
        m = min(len(negs), int(rng.integers(1, 4)))
        grp, negs = negs[:m], negs[m:]
        state([e for _, e in grp], 0)
        tpl = ["No {}.", "No evidence of {}.", "Negative for {}."]
        if not any(ph.endswith("devices") for ph, _ in grp):
            tpl.append("There is no {}.")
        neg_sents.append(ch(tpl).format(_join([ph for ph, _ in grp])))
    if "lung opacity" not in never_denied and rng.random() < 0.5:
        neg_sents.append(ch(["No focal airspace opacity.", "The lungs are clear without focal opacity."]))
        state(["lung opacity"], 0)
    if (not {"cardiomegaly", "enlarged cardiomediastinum"} & never_denied and rng.random() < 0.5
            and "cardiomegaly" not in said):
        if rng.random() < 0.5:
            neg_sents.append("Heart size is normal without cardiomegaly.")
            state(["cardiomegaly"], 0)
        else:
            neg_sents.append(ch(["Normal cardiomediastinal silhouette.",
                                 "The cardiomediastinal silhouette is normal."]))
            state(["cardiomegaly", "enlarged cardiomediastinum"], 0)
    order = pos + neg_sents
    if rng.random() < 0.5 and pos:
        # sometimes a negative first, as in many reports
        order = neg_sents[:1] + pos + neg_sents[1:]
    if rng.random() < 0.3:
        order.append(ch(["The osseous structures are unremarkable.", "Visualized upper abdomen is unremarkable."]))
    findings_text = " ".join(order)
    patho = [f for f in findings if f.spec.pathology]
    if not imp:
        if patho:
            s = _say(patho[0], rng)[0]
            state(patho[0].entities, 1, s)
            imp = [s.rstrip(".")]
        else:
            imp = [ch(["No acute cardiopulmonary process", "No acute cardiopulmonary abnormality"]
                      + ([] if findings else ["Normal chest radiograph"]))]
    if len(imp) > 1 and rng.random() < 0.6:
        impression_text = " ".join(f"{i + 1}. {x}." for i, x in enumerate(imp))
    else:
        impression_text = " ".join(f"{x}." for x in imp)
    report = f"FINDINGS: {findings_text}\nIMPRESSION: {impression_text}"
    return {"findings_text": findings_text, "impression_text": impression_text, "report": report,
            "statements": said}
