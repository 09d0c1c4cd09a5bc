"""The report writer: FINDINGS and IMPRESSION text for the drawn findings, with negations of what is absent,
and the statements (entity -> 1 | 0) the text makes."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .anatomy import SIDE
from .drawers import Finding


_DESC = {
    "consolidation": ["focal consolidation", "airspace consolidation", "patchy consolidation", "dense consolidation"],
    "lung opacity": ["hazy opacity", "ill-defined opacity", "patchy opacity", "an area of increased opacity"],
    "nodule": ["a {mm} mm nodule", "a rounded nodule", "a small well-circumscribed nodule"],
    "mass": ["a {cm} cm mass", "a lobulated mass", "a large rounded mass"],
    "calcified granuloma": ["a calcified granuloma", "a small calcified granuloma"],
    "cavity": ["a thick-walled cavity", "a cavity"],
    "atelectasis": ["linear atelectasis", "plate-like atelectasis", "subsegmental atelectasis",
                    "bandlike atelectasis"],
}

_SIZE_WORD = ["small", "small", "moderate", "moderate to large"]


def _loc(region: str, rng) -> str:
    prep = "at the" if "angle" in region or "junction" in region else "in the"
    return f"{prep} {region}"


def _pos_sentence(fd: Finding, rng) -> Tuple[str, Optional[str]]:
    """(FINDINGS sentence, IMPRESSION phrase) for one finding; phrasing follows ``fd.uncertain``."""
    t = fd.type
    ch = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    loc = _loc(fd.region, rng)
    unc = fd.uncertain
    side = SIDE.get(fd.side or "", "")
    cue = ch(["Possible", "Questionable", "Suspected"])
    if t in _DESC:
        mm = int(rng.integers(8, 19))
        d = ch(_DESC[t]).format(mm=mm, cm=int(rng.integers(3, 6)))
        if d.startswith(f"a {mm} mm") and (mm == 8 or mm in (11, 18)):
            d = "an " + d[2:]  # "an 8 mm", "an 11 mm", "an 18 mm"
        bare = d.split(" ", 1)[1] if d.startswith(("a ", "an ")) else d  # without the article
        if unc:
            s = f"{cue} {bare} {loc}."
        else:
            s = ch([f"There is {d} {loc}.", f"{d[0].upper() + d[1:]} is seen {loc}.",
                    f"{d[0].upper() + d[1:]} {loc}.", f"Redemonstrated {bare} {loc}."])
        if t == "consolidation" and "pneumonia" in fd.entities:
            imp = (f"{side.capitalize()} consolidation, which may represent pneumonia" if unc or rng.random() < 0.5
                   else f"{side.capitalize()} consolidation compatible with pneumonia")
            if unc:
                imp = "Possible consolidation or pneumonia"
            return s, imp
        if t == "cavity" and "tuberculosis" in fd.entities:
            return s, f"{'Possible ' if unc else ''}cavity in the {fd.region}; tuberculosis cannot be excluded"
        if t == "calcified granuloma":
            return s, None if rng.random() < 0.5 else "Calcified granuloma, a benign finding"
        noun = {"consolidation": "consolidation", "lung opacity": "opacity", "nodule": "nodule", "mass": "mass",
                "cavity": "cavity", "atelectasis": "atelectasis"}[t]
        where = fd.region.split(" ", 1)[1] if fd.region.startswith(side) else fd.region
        return s, f"{'Possible ' if unc else ''}{side} {where} {noun}".replace("  ", " ").strip()
    if t == "pleural effusion":
        sz = ch(_SIZE_WORD)
        if fd.detail.get("bilateral"):
            s = f"{cue} small bilateral pleural effusions." if unc else ch(
                [f"Bilateral {sz} pleural effusions.", f"There are {sz} bilateral pleural effusions blunting "
                 f"both costophrenic angles."])
            return s, f"{'Possible ' if unc else ''}bilateral pleural effusions"
        s = f"{cue} {sz} {side} pleural effusion." if unc else ch(
            [f"There is a {sz} {side} pleural effusion.", f"{sz.capitalize()} {side} pleural effusion "
             f"blunting the {side} costophrenic angle.", f"A {sz} {side} effusion layers {loc}."])
        return s, f"{'Possible ' if unc else ''}{sz} {side} pleural effusion"
    if t == "pneumothorax":
        sz = ch(["small", "small", "moderate", "apical"])
        s = f"{cue} {sz} {side} pneumothorax." if unc else ch(
            [f"There is a {sz} {side} pneumothorax.", f"{sz.capitalize()} {side} apical pneumothorax with a visible "
             f"pleural line.", f"A {side} pneumothorax is present {loc}."])
        return s, f"{'Possible ' if unc else ''}{side} pneumothorax"
    if t == "edema":
        extra = " with kerley lines at the bases" if "kerley lines" in fd.entities else ""
        s = f"{cue} mild pulmonary edema{extra}." if unc else ch(
            [f"Perihilar haziness and vascular indistinctness consistent with pulmonary edema{extra}.",
             f"Moderate pulmonary edema{extra}.", f"Interstitial pulmonary edema is present{extra}."])
        return s, f"{'Possible ' if unc else ''}pulmonary edema"
    if t == "interstitial opacity":
        fib = "fibrosis" in fd.entities
        s = (f"{cue} interstitial opacity in both lower lung zones." if unc else
             "Reticular interstitial opacity in the mid and lower lung zones bilaterally.")
        if fib:
            s += " Findings may reflect fibrosis."
        return s, None
    if t == "cardiomegaly":
        s = f"{cue} mild cardiomegaly." if unc else ch(
            ["The heart is enlarged.", "Cardiomegaly.", "Moderate cardiomegaly is present.",
             "Enlarged cardiac silhouette consistent with cardiomegaly."])
        return s, f"{'Possible ' if unc else ''}cardiomegaly"
    if t == "widened mediastinum":
        ecm = "enlarged cardiomediastinum" in fd.entities
        s = f"{cue} widened mediastinum." if unc else ch(["Widened mediastinum at the level of the aortic arch.",
                                                            "There is a widened mediastinum."])
        if ecm:
            s += f" {'Possible enlarged' if unc else 'Enlarged'} cardiomediastinum contour."
        return s, f"{'Possible ' if unc else ''}widened mediastinum"
    if t == "tortuous aorta":
        s = ("Tortuous aorta with aortic calcification." if "aortic calcification" in fd.entities
             else "Tortuous aorta.")
        if unc:
            s = "Possible tortuous aorta." + (" Possible aortic calcification." if "aortic calcification" in fd.entities
                                              else "")
        return s, None
    if t == "hilar enlargement":
        where = "bilateral" if fd.detail.get("bilateral") else side
        s = f"{cue} {where} hilar enlargement." if unc else f"There is {where} hilar enlargement."
        return s, f"{'Possible ' if unc else ''}{where} hilar enlargement"
    if t == "elevated hemidiaphragm":
        s = f"{cue} elevated {side} hemidiaphragm." if unc else ch(
            [f"Elevated {side} hemidiaphragm.", f"The {side} hemidiaphragm is elevated."])
        return s, None
    if t == "emphysema":
        s = ("Hyperinflation with flattened hemidiaphragms; possible emphysema." if unc else
             ch(["Hyperinflation with flattened hemidiaphragms, consistent with emphysema.",
                 "Emphysema with hyperinflation of both lungs."]))
        if unc:  # one polarity per sentence
            s = "Possible hyperinflation. Possible emphysema."
        return s, f"{'Possible ' if unc else ''}emphysema"
    if t == "low lung volumes":
        return ("Low lung volumes." if not unc else "Possible low lung volumes."), None
    if t == "scoliosis":
        conv = fd.detail.get("convex", "right")
        return (f"{cue} scoliosis." if unc else f"Thoracic scoliosis, convex to the {conv}."), None
    if t == "pleural thickening":
        s = f"{cue} {side} apical pleural thickening." if unc else f"{side.capitalize()} apical pleural thickening."
        return s, None
    if t == "pneumoperitoneum":
        s = ("Possible free air under the right hemidiaphragm, suspicious for pneumoperitoneum." if unc else
             "Free air under the right hemidiaphragm consistent with pneumoperitoneum.")
        return s, f"{'Possible ' if unc else ''}pneumoperitoneum"
    if t == "hernia":
        s = ("Retrocardiac air-fluid level, possibly a hiatal hernia." if unc else
             "Retrocardiac air-fluid level consistent with a hiatal hernia.")
        return s, None
    if t == "fracture":
        if "clavicle fracture" in fd.entities:
            s = f"{cue} {side} clavicle fracture." if unc else ch(
                [f"Displaced {side} clavicle fracture.", f"There is an acute {side} clavicle fracture."])
            return s, f"{'Possible ' if unc else ''}{side} clavicle fracture"
        n = fd.detail.get("rib_number", 5)
        sfx = {1: "st", 2: "nd", 3: "rd"}.get(n if n < 20 else n % 10, "th")
        s = f"{cue} {side} {n}{sfx} rib fracture." if unc else f"Acute {side} {n}{sfx} posterior rib fracture."
        return s, f"{'Possible ' if unc else ''}{side} rib fracture"
    if t == "device":
        k = fd.detail["kind"]
        txt = {"endotracheal tube": ["an endotracheal tube terminates about {n} cm above the carina"],
               "central venous catheter": ["a right central venous catheter with tip in the svc",
                                           "a central venous catheter terminates at the cavoatrial junction"],
               "nasogastric tube": ["a nasogastric tube courses below the diaphragm into the stomach"],
               "pacemaker": ["a left-sided pacemaker with leads in the right atrium and ventricle",
                             "a pacemaker generator projects over the left chest"],
               "sternotomy wires": ["median sternotomy wires are intact", "sternotomy wires are seen"],
               "chest tube": [f"a {side} chest tube is in place"]}[k]
        d = ch(txt).format(n=int(rng.integers(3, 6)))
        s = ch([f"Support devices: {d}.", f"Support devices in place: {d}."])
        return s, None
    raise ValueError(t)


# negatable statements: (phrase, entity, finding types that forbid negating it)
_NEGATABLE = [
    ("pleural effusion", "pleural effusion", {"pleural effusion"}),
    ("pneumothorax", "pneumothorax", {"pneumothorax"}),
    ("focal consolidation", "consolidation", {"consolidation", "cavity"}),
    ("pulmonary edema", "edema", {"edema", "interstitial opacity"}),
    ("cardiomegaly", "cardiomegaly", {"cardiomegaly"}),
    ("pneumonia", "pneumonia", {"consolidation", "lung opacity", "cavity"}),
    ("fracture", "fracture", {"fracture"}),
    ("pulmonary nodule", "nodule", {"nodule", "calcified granuloma", "mass", "cavity"}),
    ("mass", "mass", {"mass", "nodule", "cavity"}),
    ("atelectasis", "atelectasis", {"atelectasis", "low lung volumes"}),
    ("pneumoperitoneum", "pneumoperitoneum", {"pneumoperitoneum"}),
    ("widened mediastinum", "widened mediastinum", {"widened mediastinum", "tortuous aorta"}),
    ("pneumomediastinum", "pneumomediastinum", set()),
    ("hilar enlargement", "hilar enlargement", {"hilar enlargement"}),
    ("lymphadenopathy", "lymphadenopathy", {"hilar enlargement", "widened mediastinum"}),
    ("hydropneumothorax", "hydropneumothorax", {"pneumothorax", "pleural effusion"}),
    ("emphysema", "emphysema", {"emphysema"}),
    ("scoliosis", "scoliosis", {"scoliosis"}),
    ("support devices", "support devices", {"device"}),
    ("focal lung lesion", "lung lesion", {"nodule", "mass", "cavity", "calcified granuloma"}),
]
_ALWAYS_OPACITY_CONFLICT = {"consolidation", "lung opacity", "atelectasis", "nodule", "mass", "edema",
                            "interstitial opacity", "cavity", "calcified granuloma"}
#: phrases of positive sentences that state one more entity
_EXTRA = (("blunting", "blunted costophrenic angle"),)


def _join(items: List[str]) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} or {items[1]}"
    return ", ".join(items[:-1]) + f", or {items[-1]}"


def write_report(findings: List[Finding], rng) -> dict:
    """FINDINGS + IMPRESSION text for the drawn findings, and ``statements`` {entity: 1 | 0}: what the text
    affirms (uncertain phrasing included) or negates."""
    ch = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    types = {f.type for f in findings}
    said: Dict[str, int] = {}

    def state(ents, v, sentence=""):
        for e in ents:
            said[e] = max(said.get(e, v), v)
        for phrase, e in _EXTRA:
            if v == 1 and phrase in sentence:
                said[e] = 1

    pos, imp = [], []
    for f in findings:
        s, i = _pos_sentence(f, rng)
        state(f.entities, 1, s)
        pos.append(s)
        if i:
            state(f.entities, 1, i)
            imp.append(i[0].upper() + i[1:])
    # negations: 2-5 statements about things not drawn
    cands = [(ph, e) for ph, e, bad in _NEGATABLE if not (bad & types)]
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
    if not (types & _ALWAYS_OPACITY_CONFLICT) and rng.random() < 0.5:
        neg_sents.append(ch(["No focal airspace opacity.", "The lungs are clear without focal opacity."]))
        state(["lung opacity"], 0)
    if ("cardiomegaly" not in types and "widened mediastinum" not in types and rng.random() < 0.5
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
    patho = [f for f in findings if f.type != "device"]
    if not imp:
        if patho:
            s = _pos_sentence(patho[0], rng)[0]
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
