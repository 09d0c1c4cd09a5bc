"""Image reading, the loader (PIL and DALI backends) and the dataset adapters, on the real chest
radiographs in ../shared/data/cxr (PNG, RGB-encoded JPEG, DICOM MONOCHROME1/2, a real lung mask)."""
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gkcore.data.io import ImageReadError, image_size, read_image
from gkcore.data.knowledge import ENTITY_NAMES, REGIONS, entity_index
from gkcore.data.loader import MEAN, STD, build_loader, dali_available, plan_sample, transform_boxes
from gkcore.data.sample import Sample

E = len(ENTITY_NAMES)
BACKENDS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="DALI not installed"))]
PNG1, PNG2 = "00000001_000.png", "00027426_000.png"
JPG, MASK, BIG = "16747_3_1.jpg", "16747_3_1_lungmask.jpg", "covid-19-pneumonia-58-prior.jpg"
DCM2, DCM1 = "siim_acr_1517875201_850819.dcm", "siim_acr_1517875201_850819_monochrome1.dcm"
# README: patient-right lung ~ (86,21,454,733), patient-left lung ~ (550,10,990,759) pixels in 1036x885
LUNG_R, LUNG_L = (86, 21, 454, 733), (550, 10, 990, 759)


def _sample(path, i=0, boxes=None, mask=None, fb=(), report="FINDINGS: No pleural effusion. IMPRESSION: Normal."):
    lab = np.full(E, -1, np.int64)
    lab[entity_index("pleural effusion")] = 0
    return Sample(path=str(path), report=report, entity_labels=lab, region_boxes=boxes, study_id=i,
                  finding_boxes=list(fb), region_mask=mask)


def _denorm(img):
    return (img * STD + MEAN) * 255.0


def _quiet(loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return list(loader)


# ----------------------------------------------------------------------------------------------------
# io

def test_read_png_and_rgb_jpeg_match_pil(cxr_dir):
    a = read_image(cxr_dir / PNG1)
    assert a.shape == (512, 512) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, np.asarray(Image.open(cxr_dir / PNG1)))
    j = read_image(cxr_dir / JPG)  # RGB-encoded grey -> luma
    assert j.shape == (885, 1036)
    np.testing.assert_array_equal(j, np.asarray(Image.open(cxr_dir / JPG).convert("L")))
    rgb = np.asarray(Image.open(cxr_dir / JPG)).astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() <= 8  # really grey stored as RGB
    assert image_size(cxr_dir / JPG) == (1036, 885) and image_size(cxr_dir / DCM2) == (1024, 1024)


def test_read_dicom_both_photometric_interpretations(cxr_dir):
    import pydicom

    m2 = read_image(cxr_dir / DCM2)
    m1 = read_image(cxr_dir / DCM1)
    assert m2.shape == (1024, 1024) and m2.dtype == np.uint8
    raw = pydicom.dcmread(cxr_dir / DCM2).pixel_array.astype(np.float64)
    expect = np.rint((raw - raw.min()) * 255.0 / (raw.max() - raw.min()))
    np.testing.assert_array_equal(m2, expect.astype(np.uint8))
    # MONOCHROME1 holds the same pixel data re-tagged: the reader must invert it
    np.testing.assert_array_equal(m1.astype(int), 255 - m2.astype(int))
    # MONOCHROME2 read as stored: air-filled lung darker than the spine; the re-tagged MONOCHROME1 copy,
    # correctly inverted, shows the opposite (the file's pixels were not inverted when it was re-tagged)
    assert m2[400:600, 250:350].mean() + 50 < m2[400:600, 490:530].mean()
    assert m1[400:600, 250:350].mean() > m1[400:600, 490:530].mean() + 50


def test_read_dicom_rescale_and_16bit(tmp_path, cxr_dir):
    import pydicom

    ds = pydicom.dcmread(cxr_dir / DCM2)
    arr = ds.pixel_array.astype(np.uint16) * 100  # 0..25500, 16-bit
    ds.PixelData = arr.tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 15, 14
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    ds.WindowCenter, ds.WindowWidth = 12750 * 2 - 1000, 25500 * 2
    p = tmp_path / "w.dcm"
    ds.save_as(p, enforce_file_format=True)
    out = read_image(p)
    ref = read_image(cxr_dir / DCM2)
    assert out.shape == ref.shape
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 2  # window covers the range: same picture


@pytest.fixture(scope="module")
def rg1_uncr():
    """pydicom-data's RG1_UNCR.dcm (a real 1955x1841 15-bit MONOCHROME1 PA chest radiograph with a VOI
    window), read from the package wheel fetched with ``pip download`` into ~/.cache/gkcore-test."""
    import subprocess
    import sys
    import zipfile

    cache = __import__("pathlib").Path(os.environ.get("GKCORE_TEST_CACHE",
                                                      os.path.expanduser("~/.cache/gkcore-test")))
    out = cache / "RG1_UNCR.dcm"
    if not out.exists():
        whl = cache / "pydicom_data-1.0.0-py3-none-any.whl"
        if not whl.exists():
            cache.mkdir(parents=True, exist_ok=True)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "pydicom-data==1.0.0",
                                "-d", str(cache)], capture_output=True, text=True, timeout=600)
            if r.returncode != 0 or not whl.exists():
                pytest.skip(f"cannot download pydicom-data 1.0.0: {r.stderr[-300:]}")
        with zipfile.ZipFile(whl) as z:
            out.write_bytes(z.read("data_store/data/RG1_UNCR.dcm"))
    return out


def test_read_real_15bit_monochrome1_with_window(rg1_uncr):
    import pydicom

    ds = pydicom.dcmread(rg1_uncr)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    g = read_image(rg1_uncr)
    assert g.shape == (1955, 1841) and g.dtype == np.uint8
    # the window (centre c, width w) by hand, DICOM's linear VOI function, then scaled and inverted
    x = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    v = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    ref = 255.0 - (v - v.min()) * 255.0 / (v.max() - v.min())
    assert np.abs(g - ref).max() <= 1.0
    # anatomy: after the inversion the right lung (image left) is darker than the spine
    lung, spine = g[400:750, 380:690].mean(), g[760:1150, 880:960].mean()
    assert lung + 40 < spine, (lung, spine)


def test_read_errors_name_path_and_reason(tmp_path, cxr_dir):
    b = (cxr_dir / JPG).read_bytes()
    (tmp_path / "t.jpg").write_bytes(b[: len(b) // 2])
    (tmp_path / "g.png").write_bytes(b"not an image at all" * 4)
    (tmp_path / "e.png").write_bytes(b"")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 50)
    for name, why in [("t.jpg", "truncated"), ("g.png", "not a recognised image format"), ("e.png", "empty file"),
                      ("missing.png", "file not found"), ("bad.dcm", "DICOM")]:
        with pytest.raises(ImageReadError, match=why) as ei:
            read_image(tmp_path / name)
        assert ei.value.path == str(tmp_path / name)


# ----------------------------------------------------------------------------------------------------
# geometry

def test_plan_letterbox_and_box_transform():
    plan = plan_sample((200, 100), (64, 64), None)  # wide image -> padded top and bottom
    b, ok = transform_boxes(np.array([[0, 0, 1, 1], [0.5, 0.5, 0.5, 0.6]]), (200, 100), plan.fwd, (64, 64))
    np.testing.assert_allclose(b[0], [0, 0.25, 1, 0.75], atol=1e-6)
    assert ok.tolist() == [True, False]  # a zero-width box is dropped
    assert plan.resize_hw == (32, 64)
    rng = np.random.default_rng(0)
    p2 = plan_sample((200, 100), (64, 64), rng)
    # inv maps output -> resized frame; fwd maps original -> output: their product is the pre-resize
    inv3 = np.vstack([p2.inv.astype(np.float64), [0, 0, 1]])
    comp = inv3 @ p2.fwd
    sx, sy = p2.resize_hw[1] / 200, p2.resize_hw[0] / 100
    np.testing.assert_allclose(comp, np.diag([sx, sy, 1]), atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# box consistency under augmentation

def _bright_pixels_vs_box(img255, box, hw):
    h, w = hw
    ys, xs = np.nonzero(img255 > 127)
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    inside = (xs + 0.5 >= x0 - 1.5) & (xs + 0.5 <= x1 + 1.5) & (ys + 0.5 >= y0 - 1.5) & (ys + 0.5 <= y1 + 1.5)
    return inside.mean() if len(xs) else 0.0, len(xs), (x1 - x0) * (y1 - y0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bright_box_stays_covered_under_augmentation(tmp_path, backend):
    img = np.full((300, 400), 20, np.uint8)
    img[90:180, 250:330] = 255  # bright rectangle x 250..330, y 90..180
    Image.fromarray(img).save(tmp_path / "box.png")
    boxes = np.zeros((29, 4), np.float32)
    boxes[0] = [250 / 400, 90 / 300, 330 / 400, 180 / 300]
    mask = np.zeros(29, bool)
    mask[0] = True
    fb = [(entity_index("nodule"), 250 / 400, 90 / 300, 330 / 400, 180 / 300)]
    ds = [_sample(tmp_path / "box.png", i, boxes, mask, fb) for i in range(6)]
    loader = build_loader(ds, 6, 96, train=True, backend=backend, num_threads=0, seed=3)
    batch = next(iter(loader))
    assert batch["region_mask"][:, 0].all() and not batch["region_mask"][:, 1:].any()
    for k in range(6):
        im = _denorm(batch["image"][k, 0].numpy())
        box = batch["region_boxes"][k, 0].numpy()
        frac, n, area = _bright_pixels_vs_box(im, box, (96, 96))
        assert n > 50 and frac > 0.995, (k, frac, n)
        # the hull of a rectangle rotated by <= 7 degrees is not much bigger than the rectangle itself
        assert n / area > 0.7, (k, n, area)
        f = batch["finding_boxes"][k]
        assert len(f) == 1 and f[0][0] == entity_index("nodule")
        np.testing.assert_allclose(f[0][1:], box, atol=1e-6)
    # augmentation did something: the boxes differ between samples
    assert batch["region_boxes"][:, 0].std(0).max() > 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_lung_boxes_stay_on_the_lungs(cxr_dir, backend):
    """The real lung mask goes through the augmenting loader; each transformed lung box must hold its
    lung's bright pixels."""
    w, h = 1036, 885
    boxes = np.zeros((29, 4), np.float32)
    boxes[REGIONS.index("right lung")] = np.array(LUNG_R) / [w, h, w, h]
    boxes[REGIONS.index("left lung")] = np.array(LUNG_L) / [w, h, w, h]
    mask = np.zeros(29, bool)
    mask[[REGIONS.index("right lung"), REGIONS.index("left lung")]] = True
    ds = [_sample(cxr_dir / MASK, i, boxes, mask) for i in range(4)]
    batch = next(iter(build_loader(ds, 4, 128, train=True, backend=backend, num_threads=0, seed=11)))
    for k in range(4):
        im = _denorm(batch["image"][k, 0].numpy())
        ys, xs = np.nonzero(im > 127)
        assert len(xs) > 500
        rb = batch["region_boxes"][k, REGIONS.index("right lung")].numpy() * 128
        lb = batch["region_boxes"][k, REGIONS.index("left lung")].numpy() * 128
        assert rb[2] < lb[2] and rb[0] < lb[0]  # patient's right lung on the image's left
        tol = 2.0
        in_r = (xs + .5 >= rb[0] - tol) & (xs + .5 <= rb[2] + tol) & (ys + .5 >= rb[1] - tol) & (ys + .5 <= rb[3] + tol)
        in_l = (xs + .5 >= lb[0] - tol) & (xs + .5 <= lb[2] + tol) & (ys + .5 >= lb[1] - tol) & (ys + .5 <= lb[3] + tol)
        assert (in_r | in_l).mean() > 0.995
        left_half = xs < (rb[2] + lb[0]) / 2
        assert in_r[left_half].mean() > 0.99 and in_l[~left_half].mean() > 0.99


# ----------------------------------------------------------------------------------------------------
# batch contract, backends agreeing

def _real_ds(cxr_dir):
    names = [PNG1, PNG2, JPG, DCM2, DCM1]
    boxes = np.tile(np.array([[0.1, 0.2, 0.6, 0.9]], np.float32), (29, 1))
    return [_sample(cxr_dir / n, i // 2, boxes if i % 2 == 0 else None) for i, n in enumerate(names)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_batch_contract(cxr_dir, backend, channels):
    ds = _real_ds(cxr_dir)
    loader = build_loader(ds, 2, 64, channels=channels, max_length=24, train=False, backend=backend,
                          num_threads=0, device="cpu")
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3 and [len(b["path"]) for b in batches] == [2, 2, 1]
    b = batches[0]
    assert set(b) == {"image", "input_ids", "attention_mask", "entity_labels", "region_boxes", "region_mask",
                      "study_id", "report", "finding_boxes", "path"}
    assert b["image"].shape == (2, channels, 64, 64) and b["image"].dtype == torch.float32
    assert b["input_ids"].shape == (2, 24) and b["input_ids"].dtype == torch.int64
    assert b["attention_mask"].dtype == torch.int64 and b["attention_mask"].sum(1).min() > 2
    assert b["entity_labels"].shape == (2, E) and b["entity_labels"].dtype == torch.int64
    assert b["region_boxes"].shape == (2, 29, 4) and b["region_boxes"].dtype == torch.float32
    assert b["region_mask"].dtype == torch.bool and b["region_mask"][0].all() and not b["region_mask"][1].any()
    assert b["study_id"].tolist() == [0, 0] and b["study_id"].dtype == torch.int64
    assert b["path"] == [str(cxr_dir / PNG1), str(cxr_dir / PNG2)] and len(b["report"]) == 2
    # square 512 image: boxes keep their coordinates (letterbox is the identity up to scale)
    np.testing.assert_allclose(b["region_boxes"][0, 0].numpy(), [0.1, 0.2, 0.6, 0.9], atol=1e-6)
    # normalised image: padding-free square image of a chest has mean near 0 and values in range
    im = b["image"]
    assert -1.6 <= im.min() and im.max() <= (1 - MEAN) / STD + 1e-4 and abs(im.mean()) < 1.0
    if channels == 3:
        assert torch.equal(im[:, 0], im[:, 2])
    # the wide JPEG is letterboxed: its top rows are padding (black)
    j = batches[1]["image"][0, 0]
    assert torch.allclose(j[0], torch.full_like(j[0], -MEAN / STD), atol=1e-4)
    # DICOM MONOCHROME1 comes out as the inverse of MONOCHROME2 (same picture, inverted photometry)
    d2, d1 = _denorm(batches[1]["image"][1, 0]), _denorm(batches[2]["image"][0, 0])
    assert (d1 + d2 - 255).abs().mean() < 2.0


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_cpu_matches_pil(cxr_dir, train):
    ds = _real_ds(cxr_dir) + [_sample(cxr_dir / BIG, 9)]
    pil = list(build_loader(ds, 3, 96, train=train, backend="pil", num_threads=0, seed=5, drop_last=False))
    dali = list(build_loader(ds, 3, 96, train=train, backend="dali", device="cpu", num_threads=2, seed=5,
                             drop_last=False))
    assert len(pil) == len(dali) == 2
    for a, b in zip(pil, dali):
        assert a["path"] == b["path"]
        for k in ("region_boxes", "region_mask", "entity_labels", "input_ids", "study_id"):
            assert torch.equal(a[k], b[k]), k
        d = (a["image"] - b["image"]).abs()
        # different decoders (PIL vs DALI/libjpeg-turbo), resize filters: a few grey levels on average
        assert d.flatten(1).mean(1).max() < 0.05, d.flatten(1).mean(1)
        assert torch.quantile(d.flatten(), 0.99) < 0.3


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
def test_dali_decode_matches_pil_at_full_size(cxr_dir):
    """At the original size and without augmentation the geometry is the identity: DALI's decoded grey
    values against PIL's."""
    for name, hw in [(JPG, (885, 1036)), (PNG1, (512, 512)), (DCM1, (1024, 1024))]:
        ds = [_sample(cxr_dir / name)]
        b = next(iter(build_loader(ds, 1, hw, train=False, backend="dali", num_threads=1)))
        got = _denorm(b["image"][0, 0].numpy())
        ref = read_image(cxr_dir / name).astype(np.float32)
        assert got.shape == ref.shape
        diff = np.abs(got - ref)
        assert diff.mean() < 1.0 and np.quantile(diff, 0.999) <= 8.5, (name, diff.mean(), diff.max())


def test_pil_workers_match_inline(cxr_dir):
    ds = _real_ds(cxr_dir)
    a = list(build_loader(ds, 2, 48, train=True, backend="pil", num_threads=0, seed=1))
    b = list(build_loader(ds, 2, 48, train=True, backend="pil", num_threads=2, seed=1))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["path"] == y["path"] and torch.equal(x["image"], y["image"])
        assert torch.equal(x["region_boxes"], y["region_boxes"])


# ----------------------------------------------------------------------------------------------------
# sharding, shuffling, epochs

@pytest.fixture
def tiny_ds(tmp_path):
    ds = []
    for i in range(11):
        p = tmp_path / f"t{i:02d}.png"
        Image.fromarray(np.full((20, 24), i * 20, np.uint8)).save(p)
        ds.append(_sample(p, i))
    return ds


def test_sharding_disjoint_and_epoch_shuffle(tiny_ds):
    W = 3
    seen = []
    for r in range(W):
        L = build_loader(tiny_ds, 2, 16, train=True, backend="pil", num_threads=0, rank=r, world_size=W, seed=7)
        L.set_epoch(4)
        paths = [p for b in L for p in b["path"]]
        assert len(L) == 1 and len(paths) == 2  # 11 // 3 = 3 per rank, drop_last in training
        seen.append(paths)
    flat = [p for s in seen for p in s]
    assert len(set(flat)) == len(flat) == 6
    # a full epoch of rank shards without drop_last covers 9 distinct samples
    full = [p for r in range(W) for b in build_loader(tiny_ds, 2, 16, train=True, backend="pil", num_threads=0,
                                                      rank=r, world_size=W, seed=7, drop_last=False)
            for p in b["path"]]
    assert len(full) == len(set(full)) == 9
    L = build_loader(tiny_ds, 11, 16, train=True, backend="pil", num_threads=0, seed=7, drop_last=False)
    e0 = [p for b in L for p in b["path"]]
    e1 = [p for b in L for p in b["path"]]  # iterating advances the epoch
    L.set_epoch(0)
    e0b = [p for b in L for p in b["path"]]
    assert e0 == e0b and e0 != e1 and sorted(e0) == sorted(e1)
    # evaluation: no shuffle, padded so every sample is seen
    ev = [p for r in range(W) for b in build_loader(tiny_ds, 4, 16, train=False, backend="pil", num_threads=0,
                                                    rank=r, world_size=W) for p in b["path"]]
    assert len(ev) == 12 and len(set(ev)) == 11


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_position_continues_an_epoch_without_reading_the_batches_before(tiny_ds, backend):
    """set_position(epoch, k): the batches of a full pass from slot k on, identical (order and
    augmentation), and only their samples are read; ``position`` after a batch is the slot to continue
    from; the next epoch is whole."""
    kw = dict(train=True, backend=backend, num_threads=0, seed=3, drop_last=False)
    L = build_loader(tiny_ds, 3, 16, **kw)
    L.set_epoch(2)
    full = list(L)
    assert len(full) == 4
    L.set_epoch(2)
    it = iter(L)
    next(it)
    assert L.position == (2, 1)

    read = []

    class Recording(list):
        def __getitem__(self, i):
            read.append(i)
            return list.__getitem__(self, i)

    M = build_loader(Recording(tiny_ds), 3, 16, **kw)
    M.set_position(2, 2)
    read.clear()
    rest = list(M)
    assert len(rest) == 2 and M.position == (2, 4)
    want = [str(p) for b in full[2:] for p in b["path"]]
    assert sorted({str(tiny_ds[i].path) for i in read}) == sorted(want)
    for a, b in zip(full[2:], rest):
        assert a["path"] == b["path"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["region_boxes"], b["region_boxes"])
    nxt = list(M)  # iterating advances to the next epoch, from its start
    L.set_epoch(3)
    assert [b["path"] for b in nxt] == [b["path"] for b in L]
    M.set_position(5, 4)  # at the end: an empty pass
    assert list(M) == []
    with pytest.raises(ValueError, match=r"batch must be in \[0, 4\]"):
        M.set_position(0, 5)


def test_position_counts_batches_dropped_as_unreadable(tmp_path, cxr_dir):
    """A batch whose files are all unreadable is not yielded but still takes its slot, so resuming at
    ``position`` continues after the right batch."""
    (tmp_path / "junk1.png").write_bytes(b"junk" * 40)
    (tmp_path / "junk2.png").write_bytes(b"junk" * 40)
    names = [cxr_dir / PNG1, tmp_path / "junk1.png", tmp_path / "junk2.png", cxr_dir / PNG2]
    ds = [_sample(n, i) for i, n in enumerate(names)]
    L = build_loader(ds, 1, 32, train=False, backend="pil", num_threads=0)
    it = iter(L)
    with pytest.warns(RuntimeWarning, match="skipping"):
        first = next(it)
        second = next(it)  # slots 1 and 2 are dropped
    assert first["path"] == [str(cxr_dir / PNG1)] and second["path"] == [str(cxr_dir / PNG2)]
    assert L.position == (0, 4)


def test_bad_arguments(tiny_ds):
    with pytest.raises(ValueError, match="channels"):
        build_loader(tiny_ds, 2, 16, channels=2)
    with pytest.raises(ValueError, match="rank"):
        build_loader(tiny_ds, 2, 16, rank=3, world_size=2)
    with pytest.raises(ValueError, match="backend"):
        build_loader(tiny_ds, 2, 16, backend="opencv")
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(tiny_ds, 0, 16)
    with pytest.raises(TypeError, match="dataset"):
        build_loader(42, 2, 16)
    # a record with the wrong number of labels is bad data, not a bad argument: left out and counted
    bad = [Sample(tiny_ds[0].path, "x", np.zeros(3, np.int64))]
    L = build_loader(bad, 1, 16, backend="pil", num_threads=0)
    with pytest.warns(RuntimeWarning, match=f"skipping {tiny_ds[0].path}: wrong number of labels"):
        assert list(L) == []
    assert L.summary()["rejected"] == {"wrong number of labels": 1}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            build_loader(tiny_ds, 2, 16, device="cuda")


# ----------------------------------------------------------------------------------------------------
# corrupt files

@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_files_reported_and_skipped(tmp_path, cxr_dir, backend):
    b = (cxr_dir / JPG).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(b[: len(b) // 2])
    (tmp_path / "junk.png").write_bytes(b"junk" * 40)
    p = (cxr_dir / PNG1).read_bytes()
    (tmp_path / "trunc.png").write_bytes(p[: len(p) // 3])
    names = [cxr_dir / PNG1, tmp_path / "trunc.jpg", tmp_path / "junk.png", tmp_path / "missing.jpg",
             cxr_dir / PNG2, tmp_path / "trunc.png"]
    ds = [_sample(n, i) for i, n in enumerate(names)]
    L = build_loader(ds, 3, 32, train=False, backend=backend, num_threads=0)
    with pytest.warns(RuntimeWarning, match="skipping"):
        batches = list(L)
    got = [p for bt in batches for p in bt["path"]]
    assert got == [str(cxr_dir / PNG1), str(cxr_dir / PNG2)]
    reasons = dict(L.skipped)
    assert set(reasons) == {str(n) for n in names[1:4]} | {str(names[5])}
    assert "truncated" in reasons[str(tmp_path / "trunc.jpg")]
    assert "file not found" in reasons[str(tmp_path / "missing.jpg")]
    assert "not a recognised image format" in reasons[str(tmp_path / "junk.png")]
    s = L.summary()
    assert s["skipped_unique"] == 4 and s["samples"] == 2 and s["batches"] == 2


# ----------------------------------------------------------------------------------------------------
# adapters on small fake layouts built from the real images

def _mimic_tree(root, cxr_dir):
    s1 = root / "files" / "p10" / "p10000032" / "s50414267"
    s2 = root / "files" / "p10" / "p10000032" / "s53189527"
    s3 = root / "files" / "p11" / "p11000011" / "s51111111"
    for d in (s1, s2, s3):
        d.mkdir(parents=True)
    shutil.copy(cxr_dir / JPG, s1 / "aaaa-1111.jpg")
    shutil.copy(cxr_dir / PNG1, s1 / "bbbb-2222.png")
    shutil.copy(cxr_dir / PNG2, s2 / "cccc-3333.jpg")  # a PNG stream under .jpg: content is sniffed
    (s3 / "dddd-4444.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 20)  # corrupt; s3 also has no report
    shutil.copy(cxr_dir / JPG, s2 / "eeee-5555.jpg")
    (s2 / "eeee-5555.jpg").write_bytes((cxr_dir / JPG).read_bytes()[:100])  # truncated header region
    (root / "files" / "p10" / "p10000032" / "s50414267.txt").write_text(
        "FINAL REPORT\n INDICATION: cough.\n FINDINGS: Moderate cardiomegaly. No pneumothorax.\n"
        " IMPRESSION: Cardiomegaly, possible mild edema.\n")
    (root / "files" / "p10" / "p10000032" / "s53189527.txt").write_text(
        "FINDINGS: Lungs are clear. No effusion.\nIMPRESSION: No acute cardiopulmonary process.")
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(
        "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
        "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices\n"
        "10000032,50414267,,1.0,,-1.0,,,,,,,,,0.0,\n")
    sg = root / "imagenome" / "scene_graph"
    sg.mkdir(parents=True)
    objs = [dict(object_id="aaaa-1111_right lung", bbox_name="right lung", original_x1=LUNG_R[0],
                 original_y1=LUNG_R[1], original_x2=LUNG_R[2], original_y2=LUNG_R[3], x1=0, y1=0, x2=1, y2=1),
            dict(object_id="aaaa-1111_left lung", bbox_name="left lung", original_x1=LUNG_L[0],
                 original_y1=LUNG_L[1], original_x2=LUNG_L[2], original_y2=LUNG_L[3], x1=0, y1=0, x2=1, y2=1),
            dict(object_id="aaaa-1111_x", bbox_name="not a region", original_x1=1, original_y1=1, original_x2=5,
                 original_y2=5)]
    (sg / "aaaa-1111_SceneGraph.json").write_text(json.dumps(dict(image_id="aaaa-1111", objects=objs)))
    (sg / "bbbb-2222_SceneGraph.json").write_text("{not json")


def test_mimic_adapter(tmp_path, cxr_dir):
    from gkcore.data.adapters import MimicCXR, open_dataset

    _mimic_tree(tmp_path, cxr_dir)
    with pytest.warns(RuntimeWarning):
        ds = MimicCXR(tmp_path, imagenome_dir=tmp_path / "imagenome", check_images=True, progress=False)
    paths = [os.path.basename(s.path) for s in ds.samples]
    assert paths == ["aaaa-1111.jpg", "bbbb-2222.png", "cccc-3333.jpg"]
    skipped = dict(ds.skipped)
    assert any("dddd-4444" in p and "report missing" in r for p, r in skipped.items())
    assert any("eeee-5555" in p for p in skipped)
    s0 = ds[0]
    assert s0.study_id == 50414267 and s0.report.startswith("FINDINGS: Moderate cardiomegaly")
    assert "INDICATION" not in s0.report and "IMPRESSION: Cardiomegaly, possible mild edema." in s0.report
    lab = s0.entity_labels
    assert lab[entity_index("cardiomegaly")] == 1 and lab[entity_index("edema")] == 1  # CSV -1 -> U-ones
    assert lab[entity_index("pneumothorax")] == 0 and lab[entity_index("pleural effusion")] == -1
    ri, li = REGIONS.index("right lung"), REGIONS.index("left lung")
    assert s0.region_mask.sum() == 2 and s0.region_mask[ri] and s0.region_mask[li]
    np.testing.assert_allclose(s0.region_boxes[ri], np.array(LUNG_R) / [1036, 885, 1036, 885], rtol=1e-6)
    with pytest.warns(RuntimeWarning, match="scene graph unusable"):
        s1 = ds[1]
    assert s1.region_boxes is None  # corrupt scene graph: boxes dropped, sample kept
    s2 = ds[2]
    assert s2.study_id == 53189527 and s2.entity_labels[entity_index("pleural effusion")] == 0  # from the labeller
    assert ds.summary()["skipped"] >= 3
    ds2 = open_dataset(f"mimic:{tmp_path}", progress=False)
    assert len(ds2) == 4  # without check_images the corrupt file is indexed (the loader skips it later)
    batch = next(iter(build_loader(ds, 3, 64, train=False, backend="pil", num_threads=0)))
    assert batch["region_mask"][0].sum() == 2 and batch["study_id"].tolist()[0] == 50414267


_IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR{n}"/><IUXRId id="{n}"/>
<MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">rule out pneumonia</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
{images}
</eCitation>"""


def _iu_tree(root, cxr_dir):
    rep = root / "ecgen-radiology"
    rep.mkdir()
    img = root / "NLMCXR_png"
    img.mkdir()

    def pimg(ids):
        return "".join(f'<parentImage id="{i}"><figureId>F1</figureId></parentImage>' for i in ids)

    (rep / "1.xml").write_text(_IU_XML.format(n=1, findings="Heart size normal. Small left pleural effusion.",
                                              impression="Left effusion.",
                                              images=pimg(["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"])))
    (rep / "2.xml").write_text(_IU_XML.format(n=2, findings="No pneumothorax.", impression="Normal chest.",
                                              images=pimg(["CXR2_IM-0652-1001"])))
    (rep / "3.xml").write_text(_IU_XML.format(n=3, findings="", impression="", images=pimg(["CXR3_IM-1-1"])))
    (rep / "4.xml").write_text("<eCitation><unclosed>")
    shutil.copy(cxr_dir / PNG1, img / "CXR1_1_IM-0001-3001.png")
    shutil.copy(cxr_dir / PNG2, img / "CXR2_IM-0652-1001.png")
    (img / "CXR3_IM-1-1.png").write_bytes(b"junk")


def test_iu_adapter(tmp_path, cxr_dir):
    from gkcore.data.adapters import IUXray, open_dataset

    _iu_tree(tmp_path, cxr_dir)
    with pytest.warns(RuntimeWarning):
        ds = IUXray(tmp_path, progress=False)
    assert [os.path.basename(s.path) for s in ds] == ["CXR1_1_IM-0001-3001.png", "CXR2_IM-0652-1001.png"]
    reasons = [r for _, r in ds.skipped]
    assert "image file missing" in reasons  # CXR1_1_IM-0001-4001
    assert any(r.startswith("corrupt report XML") for r in reasons)
    assert "report has no FINDINGS or IMPRESSION" in reasons
    s = ds[0]
    assert s.study_id == 1 and s.report == "FINDINGS: Heart size normal. Small left pleural effusion.\nIMPRESSION: Left effusion."
    assert s.entity_labels[entity_index("pleural effusion")] == 1 and s.entity_labels[entity_index("cardiomegaly")] == 0
    assert s.entity_labels[entity_index("pneumonia")] == -1  # the indication is not labelled
    assert ds[1].entity_labels[entity_index("pneumothorax")] == 0
    assert ds.summary()["skipped"] == 3
    # the tgz form of the reports, through open_dataset
    import tarfile

    with tarfile.open(tmp_path / "r.tgz", "w:gz") as tf:
        tf.add(tmp_path / "ecgen-radiology" / "1.xml", arcname="ecgen-radiology/1.xml")
    ds2 = open_dataset(f"iu:{tmp_path}", reports=str(tmp_path / "r.tgz"), progress=False)
    assert len(ds2) == 1 and ds2[0].report == s.report
    b = next(iter(build_loader(ds, 2, 32, train=False, backend="pil", num_threads=0)))
    assert b["image"].shape == (2, 1, 32, 32) and not b["region_mask"].any()
    with pytest.raises(ValueError, match="unknown dataset spec"):
        open_dataset("kaggle:/x")


def test_synth_dataset_through_loader(tmp_path):
    from gkcore.data import synth
    from gkcore.data.adapters import open_dataset

    synth.generate(str(tmp_path / "s"), n=3, size=128, seed=0, progress=False)
    ds = open_dataset(f"synth:{tmp_path / 's'}")
    assert len(ds) == 3
    b = next(iter(build_loader(ds, 3, 64, train=True, backend="pil", num_threads=0)))
    assert b["image"].shape == (3, 1, 64, 64) and b["region_mask"].float().mean() > 0.8
    rb = b["region_boxes"][b["region_mask"]]
    assert (rb[:, 2] > rb[:, 0]).all() and (rb[:, 3] > rb[:, 1]).all() and rb.min() >= 0 and rb.max() <= 1
    for fbs in b["finding_boxes"]:
        for e, x0, y0, x1, y1 in fbs:
            assert 0 <= e < E and 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
