"""gkcore.data.synth: synthetic chest X-rays, their ground truth, SynthCXR and `gkcore data synth`."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from gkcore.data import SynthCXR, synth
from gkcore.data.knowledge import ENTITY_NAMES, REGION_INDEX, REGIONS, entity_index
from gkcore.data.sample import Sample

SIZE = 96
N = 40
SEED = 11

FOCAL_LUNG = {"consolidation", "lung opacity", "nodule", "mass", "calcified granuloma", "cavity", "atelectasis"}


def _rb(sample_or_boxes, name):
    boxes = getattr(sample_or_boxes, "region_boxes", sample_or_boxes)
    return boxes[REGION_INDEX[name]]


def _center(b):
    return 0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3])


def _inside(b, x, y, pad=0.0):
    return b[0] - pad <= x <= b[2] + pad and b[1] - pad <= y <= b[3] + pad


def _overlap(a, b):
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synth.generate(str(d), N, size=SIZE, seed=SEED, progress=False)
    return d


@pytest.fixture(scope="module")
def ds(synth_dir):
    return SynthCXR(str(synth_dir))


def test_files_and_dataset_records(synth_dir, ds):
    pngs = sorted(os.listdir(synth_dir / "images"))
    assert len(pngs) == N and all(p.endswith(".png") for p in pngs)
    hdr = json.load(open(synth_dir / "synth.json"))
    assert hdr["n"] == N and hdr["size"] == SIZE and hdr["seed"] == SEED
    assert hdr["regions"] == list(REGIONS) and hdr["entities"] == list(ENTITY_NAMES)
    assert len(ds) == N
    s = ds[0]
    assert isinstance(s, Sample)
    assert os.path.isfile(s.path)
    with Image.open(s.path) as im:
        assert im.mode == "L" and im.size == (SIZE, SIZE)
        a = np.asarray(im)
    assert a.std() > 20, "the image should have real contrast"
    assert s.entity_labels.shape == (len(ENTITY_NAMES),) and s.entity_labels.dtype == np.int64
    assert set(np.unique(s.entity_labels)) <= {-1, 0, 1}
    assert s.region_boxes.shape == (29, 4) and s.region_boxes.dtype == np.float32
    assert s.region_mask.shape == (29,) and s.region_mask.all()
    assert s.report.startswith("FINDINGS: ") and "\nIMPRESSION: " in s.report
    assert ds[-1].path == ds[N - 1].path
    assert [x.path for x in ds[2:5]] == [ds[i].path for i in range(2, 5)]
    with pytest.raises(IndexError):
        ds[N]
    with pytest.raises(TypeError):
        ds["0"]
    # a healthy mix: normal studies and abnormal ones
    nf = np.array([x.entity_labels[entity_index("no finding")] for x in ds])
    assert 0.1 < nf.mean() < 0.6


def test_region_boxes_valid_and_anatomical(ds):
    lung_r_x, lung_l_x = [], []
    for s in ds:
        b = s.region_boxes
        assert np.isfinite(b).all()
        assert (b >= 0).all() and (b <= 1).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        spine_x = _center(_rb(s, "spine"))[0]
        # patient's right appears on the image's left (PA view)
        for a, bname in (("right lung", "left lung"), ("right clavicle", "left clavicle"),
                         ("right hilar structures", "left hilar structures"),
                         ("right costophrenic angle", "left costophrenic angle"),
                         ("right hemidiaphragm", "left hemidiaphragm")):
            assert _center(_rb(s, a))[0] < spine_x < _center(_rb(s, bname))[0], (a, bname)
        assert _rb(s, "right lung")[2] <= _rb(s, "left lung")[0]
        for side in ("right", "left"):
            lung = _rb(s, f"{side} lung")
            zones = [_rb(s, f"{side} {z} lung zone") for z in ("upper", "mid", "lower")]
            for z in zones + [_rb(s, f"{side} apical zone")]:
                assert _inside(lung, z[0], z[1], 1e-6) and _inside(lung, z[2], z[3], 1e-6)
            assert zones[0][1] < zones[1][1] < zones[2][1]  # upper above mid above lower
            assert _rb(s, f"{side} apical zone")[1] == pytest.approx(lung[1])
            cp = _rb(s, f"{side} costophrenic angle")
            assert _overlap(cp, zones[2]) > 0 and cp[3] >= lung[3] - 0.02  # at the lung base
            hd = _rb(s, f"{side} hemidiaphragm")
            assert _center(hd)[1] > _center(zones[2])[1]
            assert _rb(s, f"{side} clavicle")[1] < _center(zones[0])[1]
        heart = _rb(s, "cardiac silhouette")
        assert _center(heart)[0] > spine_x  # the heart lies mostly on the patient's left
        assert _center(heart)[1] > _center(_rb(s, "carina"))[1] > _center(_rb(s, "trachea"))[1]
        assert _rb(s, "trachea")[3] <= _rb(s, "carina")[3]
        assert _inside(_rb(s, "mediastinum"), *_center(_rb(s, "upper mediastinum")))
        assert _center(_rb(s, "aortic arch"))[0] > _center(_rb(s, "trachea"))[0]
        assert _rb(s, "abdomen")[1] > _rb(s, "right lung")[1] + 0.3
        assert _rb(s, "right atrium")[0] < _center(heart)[0]
        lung_r_x.append(_rb(s, "right lung")[0])
        lung_l_x.append(_rb(s, "left lung")[2])
    # boxes move with each patient's anatomy
    assert np.std(lung_r_x) > 0.01 and np.std(lung_l_x) > 0.01


def test_region_boxes_follow_the_pixels(ds):
    """Lung zones are dark (air), the heart and spine bright: the boxes sit on the drawn anatomy."""
    for s in ds[:12]:
        a = np.asarray(Image.open(s.path), np.float32)
        S = a.shape[0]

        def mean(name, shrink=0.25):
            x0, y0, x1, y1 = _rb(s, name)
            w, h = x1 - x0, y1 - y0
            x0, x1, y0, y1 = x0 + shrink * w, x1 - shrink * w, y0 + shrink * h, y1 - shrink * h
            r0, c0 = int(y0 * S), int(x0 * S)
            return a[r0:max(int(y1 * S), r0 + 1), c0:max(int(x1 * S), c0 + 1)].mean()

        lungs = min(mean("right upper lung zone"), mean("left upper lung zone"))
        assert mean("cardiac silhouette") > lungs + 25
        assert mean("spine", 0.3) > lungs + 25
        assert mean("abdomen") > lungs + 25
        # outside the body (image corner next to the shoulders) is darker than soft tissue
        assert a[S // 2, :2].mean() < mean("abdomen")


def test_findings_inside_their_regions(ds):
    n_find = 0
    for s, rec in zip(ds, ds.records):
        for f in rec["findings"]:
            n_find += 1
            assert f["region"] in REGIONS
            rbox = _rb(s, f["region"])
            assert f["boxes"]
            for b in f["boxes"]:
                assert 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1
            if f["type"] in FOCAL_LUNG:
                cx, cy = _center(f["boxes"][0])
                assert _inside(rbox, cx, cy, 1.0 / SIZE), (f, rbox)
                side = f["region"].split()[0]
                assert _inside(_rb(s, f"{side} lung"), cx, cy, 1.0 / SIZE)
            elif f["type"] != "device":
                assert _overlap(f["boxes"][0], rbox) > 0, (f, rbox)
            for e in f["entities"]:
                assert e in ENTITY_NAMES
        # finding boxes of the Sample mirror the records
        want = sorted((entity_index(e), *map(float, b)) for f in rec["findings"] for e in f["entities"]
                      for b in f["boxes"])
        got = sorted(s.finding_boxes)
        assert len(got) == len(want)
        for g, w in zip(got, want):  # pytest.approx takes flat sequences only (pytest >= 9.2)
            assert g[0] == w[0] and tuple(g[1:]) == pytest.approx(tuple(w[1:]))
    assert n_find >= N // 2


def test_specific_findings_in_plausible_places():
    for t in ("pleural effusion", "cardiomegaly", "pneumothorax", "elevated hemidiaphragm", "pneumoperitoneum"):
        for k in range(3):
            _, rec = synth.render(SIZE, [SEED, 1000 + k, 0], [SEED, 1000 + k, 2], findings=[t])
            (f,) = rec["findings"]
            boxes = rec["region_boxes"]
            b = f.boxes[0]
            if t == "pleural effusion":
                side = f.region.split()[0]
                assert f.region.endswith(("costophrenic angle", "lower lung zone", "lung"))
                lung = _rb(boxes, f"{side} lung")
                assert b[3] >= lung[3] - 0.03  # fluid at the base
                assert _overlap(b, _rb(boxes, f"{side} costophrenic angle")) > 0  # blunting the angle
            elif t == "cardiomegaly":
                heart, rl, ll = _rb(boxes, "cardiac silhouette"), _rb(boxes, "right lung"), _rb(boxes, "left lung")
                ctr = (heart[2] - heart[0]) / (ll[2] - rl[0])
                assert ctr > 0.52, ctr
            elif t == "pneumothorax":
                side = f.region.split()[0]
                lung = _rb(boxes, f"{side} lung")
                assert b[1] <= lung[1] + 0.03  # reaches the apex
            elif t == "elevated hemidiaphragm":
                side = f.region.split()[0]
                other = "left" if side == "right" else "right"
                assert _rb(boxes, f"{side} hemidiaphragm")[3] < _rb(boxes, f"{other} hemidiaphragm")[3] - 0.03
            elif t == "pneumoperitoneum":
                assert _center(b)[1] > _center(_rb(boxes, "right lower lung zone"))[1]



def test_finding_specs_name_known_entities_and_regions():
    """The table every part reads: FINDING_TYPES follows it, and it names only known entities and regions."""
    from gkcore.data.synth.findings import SPECS

    assert synth.FINDING_TYPES == {name: s.weight for name, s in SPECS.items()}
    for name, spec in SPECS.items():
        assert spec.name == name and spec.weight > 0
        for e in spec.all_entities + spec.forbids:
            assert e in ENTITY_NAMES, (name, e)
        for r in spec.regions:
            assert {r.format(side="right"), r.format(side="left")} <= set(REGIONS), (name, r)
        if spec.lesion is not None:  # a focal lesion: the report describes it with its spec's phrases
            assert spec.describe and spec.regions


@pytest.mark.parametrize("ftype", list(synth.FINDING_TYPES))
def test_each_finding_type_follows_its_spec(ftype):
    """A drawn finding states its spec's entities, and the report never denies what the spec forbids denying."""
    from gkcore.data.synth.findings import SPECS

    spec = SPECS[ftype]
    n = 0
    for k in range(3):
        _, rec = synth.render(64, [SEED, 2000 + k, 0], [SEED, 2000 + k, 2], findings=[ftype])
        for f in rec["findings"]:
            n += 1
            assert f.type == ftype and f.spec is spec
            assert set(spec.entities) <= set(f.entities) <= set(spec.all_entities), f.entities
            assert f.region in REGIONS
            for e in f.entities:
                assert rec["labels"][entity_index(e)] == 1, (e, rec["report"])
            for e in spec.never_denied:
                assert rec["labels"][entity_index(e)] != 0, (e, rec["report"])
            nf = rec["labels"][entity_index("no finding")]
            assert nf == (0 if spec.pathology else 1), rec["report"]
    assert n >= 2

def _sentences(text):
    return [x.strip().lower() for x in re.split(r"(?<!\d)[.;\n](?!\d)", text) if x.strip()]


_NEG = re.compile(r"\b(no|without|negative for|normal)\b")


def test_labels_consistent_with_report_text(ds):
    for s, rec in zip(ds, ds.records):
        lab = s.entity_labels
        sents = _sentences(rec["report"])
        drawn = {e for f in rec["findings"] for e in f["entities"]}
        for e in drawn:
            assert lab[entity_index(e)] == 1, (e, rec["report"])
        for (ei, *_b) in s.finding_boxes:
            assert lab[ei] == 1
        pathology = [f for f in rec["findings"] if f["type"] != "device"]
        assert lab[entity_index("no finding")] == (0 if pathology else 1), rec["report"]
        for i in np.flatnonzero(lab == 0):
            name = ENTITY_NAMES[i]
            if name == "no finding":
                continue
            keys = {"lung opacity": ("opacity",), "enlarged cardiomediastinum": ("cardiomediastinal",),
                    "cardiomegaly": ("cardiomegaly", "cardiomediastinal")}.get(name, (name,))
            assert any(k in x and _NEG.search(x) for x in sents for k in keys), (name, rec["report"])
            assert name not in drawn
        # every drawn finding is mentioned in the report
        words = {"device": "support devices", "pleural effusion": "effusion", "lung opacity": "opacity",
                 "emphysema": "hyperinflation", "interstitial opacity": "interstitial opacity",
                 "elevated hemidiaphragm": r"elevated (?:left |right )?hemidiaphragm|hemidiaphragm is elevated",
                 "cardiomegaly": "cardiomegaly|heart is enlarged", "fracture": "fracture"}
        for f in rec["findings"]:
            key = words.get(f["type"], f["type"])
            assert re.search(key, rec["report"].lower()), (key, rec["report"])
        # sentences that affirm a finding carry no negation cue
        for f in pathology:
            kw = words.get(f["type"], f["type"])
            hits = [x for x in sents if re.search(kw, x)]
            assert hits, (kw, rec["report"])
            assert any(not re.search(r"\b(no|without|negative for)\b", x) for x in hits), (kw, rec["report"])


def test_labels_agree_with_rule_based_labeller(ds):
    reports = pytest.importorskip("gkcore.data.reports", reason="the report labeller (gkcore.data.reports) is absent")
    agree, total, bad = 0, 0, []
    for s in ds:
        got = reports.label_report(s.report)
        total += got.size
        agree += int((got == s.entity_labels).sum())
        if (got != s.entity_labels).any():
            bad.append((s.report, {ENTITY_NAMES[i]: (int(s.entity_labels[i]), int(got[i]))
                                   for i in np.flatnonzero(got != s.entity_labels)}))
    assert agree / total >= 0.99, bad[:3]
    assert len(bad) <= max(1, len(ds) // 20), bad[:3]


def test_deterministic_and_prefix_stable(tmp_path):
    a, b, c, d = (str(tmp_path / k) for k in "abcd")
    synth.generate(a, 5, size=64, seed=3, progress=False)
    synth.generate(b, 5, size=64, seed=3, progress=False, workers=2)  # parallel: same output
    synth.generate(c, 3, size=64, seed=3, progress=False)
    synth.generate(d, 3, size=64, seed=4, progress=False)
    ra, rb = (open(os.path.join(x, "metadata.jsonl")).read().splitlines() for x in (a, b))
    rc, rd = (open(os.path.join(x, "metadata.jsonl")).read().splitlines() for x in (c, d))
    assert ra == rb and len(ra) == 5
    assert rc == ra[:3]  # image i does not depend on n
    assert rd != rc
    for i in range(5):
        f = f"images/{i:07d}.png"
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()
        if i < 3:
            assert open(os.path.join(a, f), "rb").read() == open(os.path.join(c, f), "rb").read()
            assert not np.array_equal(np.asarray(Image.open(os.path.join(c, f))),
                                      np.asarray(Image.open(os.path.join(d, f))))


def test_studies_group_second_views():
    st = synth.study_starts(SEED, 300)
    assert st == synth.study_starts(SEED, 400)[:300]
    follow = [i for i, s in enumerate(st) if s != i]
    assert 10 <= len(follow) <= 60
    for i in follow:
        assert st[i] == i - 1 and st[i - 1] == i - 1  # second view of the previous study, never a third
    i = follow[0]
    im1, r1 = synth.render(64, [SEED, i - 1, 0], [SEED, i - 1, 2])
    im2, r2 = synth.render(64, [SEED, i - 1, 0], [SEED, i, 2])  # what generate draws for image i
    assert r1["report"] == r2["report"]
    assert np.array_equal(r1["labels"], r2["labels"])
    assert not np.array_equal(im1, im2)


MAIN_TYPES = ["consolidation", "pleural effusion", "cardiomegaly", "pneumothorax", "nodule", "atelectasis",
              "edema", "lung opacity", "mass", "device", "widened mediastinum", "elevated hemidiaphragm"]


@pytest.mark.parametrize("ftype", MAIN_TYPES)
def test_visible_finding_changes_pixels_in_its_box(ftype):
    S = SIZE
    for k in range(2):
        ps, acq = [SEED, 500 + k, 0], [SEED, 500 + k, 2]
        base, _ = synth.render(S, ps, acq, findings=[])
        img, rec = synth.render(S, ps, acq, findings=[ftype])
        (f,) = rec["findings"]
        m = np.zeros((S, S), bool)
        for b in f.boxes:
            m[int(b[1] * S):int(np.ceil(b[3] * S)), int(b[0] * S):int(np.ceil(b[2] * S))] = True
        diff = img.astype(np.float32) - base.astype(np.float32)
        inside, outside = np.abs(diff[m]).mean(), np.abs(diff[~m]).mean()
        if ftype == "device":  # a thin radio-opaque line or a small generator: bright but sparse
            assert np.percentile(diff[m], 98) > 60, ftype
        else:
            assert inside > 6.0, (ftype, inside)
        assert inside > 5 * outside, (ftype, inside, outside)
        if ftype in ("consolidation", "pleural effusion", "nodule", "mass", "atelectasis", "lung opacity",
                     "cardiomegaly", "edema", "device"):
            assert diff[m].mean() > 4.0, (ftype, diff[m].mean())  # denser -> brighter
        if ftype == "pneumothorax":  # a lucent rim: its darkest part gets darker
            assert np.percentile(diff[m], 10) < -4.0


def test_sizes_and_resolution_independent_boxes():
    ps, acq = [SEED, 7, 0], [SEED, 7, 2]
    small, r1 = synth.render(224, ps, acq)
    big, r2 = synth.render(1024, ps, acq)
    assert small.shape == (224, 224) and big.shape == (1024, 1024) and big.dtype == np.uint8
    assert np.abs(r1["region_boxes"] - r2["region_boxes"]).max() < 3.0 / 224
    assert r1["report"] == r2["report"]
    # the large image downsampled looks like the small one
    down = np.asarray(Image.fromarray(big).resize((224, 224), Image.BILINEAR), np.float32)
    assert np.abs(down - small.astype(np.float32)).mean() < 12


def test_cli_writes_n_files_with_progress(tmp_path, capsys):
    from gkcore.cli import main

    out = tmp_path / "cli"
    rc = main(["data", "synth", "--out", str(out), "--n", "6", "--size", "64", "--seed", "2"])
    cap = capsys.readouterr()
    assert rc == 0
    assert len(os.listdir(out / "images")) == 6
    assert len(open(out / "metadata.jsonl").read().splitlines()) == 6
    assert "6/6" in cap.err  # the tqdm progress bar
    assert "wrote 6 images" in cap.out
    ds = SynthCXR(str(out))
    assert len(ds) == 6
    rc = main(["data", "synth", "--out", str(tmp_path / "bad"), "--n", "2", "--size", "10"])
    assert rc == 2 and "size must be" in capsys.readouterr().err


def test_jpeg_output(tmp_path):
    from gkcore.cli import main

    out = tmp_path / "jpg"
    assert main(["data", "synth", "--out", str(out), "--n", "3", "--size", "64", "--format", "jpg",
                 "--no-progress"]) == 0
    files = sorted(os.listdir(out / "images"))
    assert files == [f"{i:07d}.jpg" for i in range(3)]
    ds = SynthCXR(str(out))
    with Image.open(ds[1].path) as im:
        assert im.format == "JPEG" and im.mode == "L" and im.size == (64, 64)
        jpg = np.asarray(im, np.float32)
    st = synth.study_starts(0, 2)[1]  # image 1's study (its patient)
    png, _ = synth.render(64, [0, st, 0], [0, 1, 2])
    assert np.abs(jpg - png).mean() < 3  # quality 95: close to the lossless image


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        synth.generate(str(tmp_path / "x"), 0)
    with pytest.raises(ValueError, match="size must be"):
        synth.generate(str(tmp_path / "x"), 2, size=32)
    with pytest.raises(TypeError, match="n must be an int"):
        synth.generate(str(tmp_path / "x"), 2.5)
    with pytest.raises(FileNotFoundError, match="not a SynthCXR folder"):
        SynthCXR(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="fmt must be"):
        synth.generate(str(tmp_path / "x"), 2, fmt="bmp")
    with pytest.raises(ValueError, match="unknown finding types"):
        synth.render(64, [0], [1], findings=["broken heart"])
