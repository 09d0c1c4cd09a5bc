"""Adapters for real chest X-ray datasets: each is a sequence of :class:`gkcore.data.Sample`.

- :class:`MimicCXR`: the MIMIC-CXR-JPG layout ``files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg`` with the
  free-text reports ``files/pXX/pNNNNNNNN/sNNNNNNNN.txt`` (MIMIC-CXR), the CheXpert-style label CSV
  (``mimic-cxr-2.0.0-chexpert.csv[.gz]``), optional split / metadata CSVs, and optional Chest ImaGenome
  scene graphs (``<dicom_id>_SceneGraph.json``) for the 29 region boxes.
- :class:`IUXray`: IU X-ray / OpenI, the report XML files as in ``NLMCXR_reports.tgz`` (a folder of
  ``*.xml`` or the ``.tgz`` itself) and a folder of PNG images named ``<parentImage id>.png``.
- :func:`open_dataset`: ``"synth:PATH"`` | ``"mimic:PATH"`` | ``"iu:PATH"``.

A missing or unreadable file (report, image, label row, scene graph) is reported as (path, reason) in
``dataset.skipped`` (and with ``warnings``), the sample is skipped or the optional part dropped, and the
run goes on; ``dataset.summary()`` counts them. Images are checked (header parsed) at indexing time when
``check_images=True``; otherwise corrupt images are caught by the loader, which reports and skips them too.

Entity labels: the CheXpert CSV gives the 14 CheXpert observations (1 -> 1, 0 -> 0, -1 (uncertain) ->
``uncertain`` (default 1, U-ones), blank -> -1); every other entity, and all of them when there is no
CSV row, come from :func:`gkcore.data.reports.label_report` on the report.
"""
from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import os
import re
import tarfile
import warnings
import xml.etree.ElementTree as ET
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .io import ImageReadError, image_size
from .sample import Sample

_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")


class _Indexed:
    """Common behaviour: a list of samples, a list of (path, reason) problems, a summary."""

    name = "dataset"

    def __init__(self):
        self.samples: List[Sample] = []
        self.skipped: List[Tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._materialise(self.samples[i])

    def _materialise(self, s: Sample) -> Sample:
        return s

    def _skip(self, path, reason: str, warn: bool = True) -> None:
        self.skipped.append((str(path), reason))
        if warn:
            warnings.warn(f"{self.name}: skipping {path}: {reason}", RuntimeWarning, stacklevel=3)

    def summary(self) -> Dict[str, object]:
        """``dict(samples=N, skipped=K, reasons={reason kind: count})``."""
        kinds = collections.Counter(r.split(" (")[0] for _, r in self.skipped)
        return dict(samples=len(self.samples), skipped=len(self.skipped), reasons=dict(kinds))

    def _check_image(self, path: str) -> bool:
        try:
            w, h = image_size(path)
            if w <= 0 or h <= 0:
                raise ImageReadError(path, f"invalid size {w}x{h}")
            return True
        except ImageReadError as e:
            self._skip(e.path, e.reason)
            return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {len(self.skipped)} skipped)"


def _labels_from(report: str, csv_row: Optional[Dict[str, str]], uncertain: int) -> np.ndarray:
    from .knowledge import ENTITY_NAMES
    from .reports import label_report

    labels = label_report(report, uncertain=uncertain)
    if csv_row:
        lower = {k.strip().lower(): v for k, v in csv_row.items() if k}
        for i, name in enumerate(ENTITY_NAMES):
            if name in lower:
                v = (lower[name] or "").strip()
                if v == "":
                    labels[i] = -1
                else:
                    f = float(v)
                    labels[i] = 1 if f == 1 else 0 if f == 0 else uncertain if f == -1 else -1
    return labels


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _find_first(root: str, names: Sequence[str]) -> Optional[str]:
    for n in names:
        p = os.path.join(root, n)
        if os.path.exists(p):
            return p
    return None


# ----------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG

class MimicCXR(_Indexed):
    """MIMIC-CXR-JPG (+ reports, CheXpert labels, optional Chest ImaGenome boxes).

    Args:
        root: the folder holding ``files/`` (and usually the CSVs).
        reports_dir: where ``files/pXX/pNNN/sNNN.txt`` live (default ``root``).
        labels_csv: the CheXpert-style CSV (default ``root/mimic-cxr-2.0.0-chexpert.csv[.gz]`` if present).
        split_csv / split: keep only the studies of ``split`` ("train", "validate", "test") per
            ``mimic-cxr-2.0.0-split.csv[.gz]`` (dicom_id, study_id, subject_id, split).
        metadata_csv / views: keep only images whose ``ViewPosition`` is in ``views`` (e.g. ("PA", "AP")).
        imagenome_dir: folder (searched recursively) of ``<dicom_id>_SceneGraph.json`` files.
        check_images: parse every image header while indexing (slow on the full dataset).
        uncertain: the value of CheXpert's -1 (default 1).
        limit: index at most this many images (quick runs).
        progress: a tqdm bar while indexing.
    """

    name = "MimicCXR"

    def __init__(self, root, *, reports_dir=None, labels_csv=None, split_csv=None, split=None,
                 metadata_csv=None, views=None, imagenome_dir=None, check_images: bool = False,
                 uncertain: int = 1, limit: Optional[int] = None, progress: bool = True):
        super().__init__()
        self.root = str(root)
        files = os.path.join(self.root, "files")
        if not os.path.isdir(files):
            raise FileNotFoundError(f"MimicCXR: no 'files' folder under root={self.root!r} "
                                    "(expected files/pXX/pNNN/sNNN/*.jpg)")
        self.reports_dir = str(reports_dir or self.root)
        self.uncertain = uncertain
        if labels_csv is None:
            labels_csv = _find_first(self.root, ["mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-chexpert.csv.gz"])
        self.labels = self._read_labels(labels_csv) if labels_csv else {}
        keep_dicoms = None
        if split is not None:
            if split_csv is None:
                split_csv = _find_first(self.root, ["mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz"])
            if split_csv is None:
                raise FileNotFoundError(f"MimicCXR: split={split!r} needs split_csv (none found in {self.root})")
            with _open_text(str(split_csv)) as fh:
                keep_dicoms = {r["dicom_id"] for r in csv.DictReader(fh) if r.get("split") == split}
        if views is not None:
            if metadata_csv is None:
                metadata_csv = _find_first(self.root, ["mimic-cxr-2.0.0-metadata.csv",
                                                       "mimic-cxr-2.0.0-metadata.csv.gz"])
            if metadata_csv is None:
                raise FileNotFoundError(f"MimicCXR: views={views!r} needs metadata_csv (none found in {self.root})")
            vs = {v.upper() for v in views}
            with _open_text(str(metadata_csv)) as fh:
                ok = {r["dicom_id"] for r in csv.DictReader(fh) if (r.get("ViewPosition") or "").upper() in vs}
            keep_dicoms = ok if keep_dicoms is None else keep_dicoms & ok
        self.scene_graphs: Dict[str, str] = {}
        if imagenome_dir is not None:
            for dp, _, fns in os.walk(str(imagenome_dir)):
                for fn in fns:
                    if fn.endswith("_SceneGraph.json"):
                        self.scene_graphs[fn[: -len("_SceneGraph.json")]] = os.path.join(dp, fn)
        self._index(files, keep_dicoms, check_images, limit, progress)
        if self.skipped:
            warnings.warn(f"MimicCXR: {self.summary()}", RuntimeWarning, stacklevel=2)

    @staticmethod
    def _read_labels(path) -> Dict[int, Dict[str, str]]:
        out = {}
        with _open_text(str(path)) as fh:
            for r in csv.DictReader(fh):
                try:
                    out[int(r["study_id"])] = r
                except (KeyError, ValueError):
                    continue
        return out

    def _index(self, files, keep, check_images, limit, progress):
        images = []
        for dp, dns, fns in os.walk(files):
            dns.sort()
            for fn in sorted(fns):
                if fn.lower().endswith(_IMAGE_EXT):
                    images.append(os.path.join(dp, fn))
        it = images
        if progress and len(images) > 1000:
            from tqdm.auto import tqdm

            it = tqdm(images, desc="indexing MIMIC-CXR", unit="image")
        report_cache: Dict[str, Optional[str]] = {}
        label_cache: Dict[str, np.ndarray] = {}
        for path in it:
            if limit is not None and len(self.samples) >= limit:
                break
            study_dir = os.path.dirname(path)
            sname = os.path.basename(study_dir)
            pdir = os.path.dirname(study_dir)
            if not re.fullmatch(r"s\d+", sname):
                self._skip(path, "not in a sNNN study folder", warn=False)
                continue
            dicom_id = os.path.splitext(os.path.basename(path))[0]
            if keep is not None and dicom_id not in keep:
                continue
            study_id = int(sname[1:])
            rel = os.path.relpath(pdir, os.path.join(self.root))
            rpath = os.path.join(self.reports_dir, rel, sname + ".txt")
            if rpath not in report_cache:  # images of a study are consecutive: keep only the last study
                report_cache.clear()
                label_cache.clear()
                report_cache[rpath] = self._read_report(rpath)
            report = report_cache[rpath]
            if report is None:
                self._skip(path, f"report missing or unreadable ({rpath})", warn=False)
                continue
            if check_images and not self._check_image(path):
                continue
            if rpath not in label_cache:  # one labelling per study, shared by its images
                label_cache[rpath] = _labels_from(report, self.labels.get(study_id), self.uncertain)
            self.samples.append(Sample(path=path, report=report, entity_labels=label_cache[rpath].copy(),
                                       region_boxes=None,
                                       study_id=study_id, finding_boxes=[]))

    def _read_report(self, rpath) -> Optional[str]:
        from .reports import extract_sections, report_text

        try:
            with open(rpath, "r", encoding="utf-8", errors="replace") as fh:
                raw = fh.read()
        except OSError:
            return None
        sec = extract_sections(raw)
        text = report_text(sec["findings"], sec["impression"])
        return text if text.strip() else None

    def _materialise(self, s: Sample) -> Sample:
        dicom_id = os.path.splitext(os.path.basename(s.path))[0]
        sg = self.scene_graphs.get(dicom_id)
        if sg is None or s.region_boxes is not None:
            return s
        try:
            boxes, mask = read_scene_graph(sg, s.path)
        except (OSError, ValueError, KeyError, ImageReadError) as e:
            self._skip(sg, f"scene graph unusable, boxes dropped ({e})")
            self.scene_graphs.pop(dicom_id, None)
            return s
        return Sample(path=s.path, report=s.report, entity_labels=s.entity_labels, region_boxes=boxes,
                      study_id=s.study_id, finding_boxes=s.finding_boxes, region_mask=mask)


def read_scene_graph(json_path: str, image_path: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Chest ImaGenome scene graph -> (boxes (29, 4) float32 normalised xyxy in the original image frame,
    mask (29,) bool). Uses ``original_x1/y1/x2/y2`` divided by the image size (``original_width`` /
    ``original_height`` in the object when present, else the image header); objects whose
    ``bbox_name`` is not one of the 29 regions are ignored."""
    from .knowledge import REGIONS

    with open(json_path, "r", encoding="utf-8") as fh:
        g = json.load(fh)
    objs = g.get("objects")
    if not isinstance(objs, list):
        raise ValueError("no 'objects' list")
    idx = {r: i for i, r in enumerate(REGIONS)}
    boxes = np.zeros((len(REGIONS), 4), np.float32)
    mask = np.zeros(len(REGIONS), bool)
    wh = None
    for o in objs:
        name = str(o.get("bbox_name", o.get("name", ""))).strip().lower()
        if name not in idx:
            continue
        if "original_x1" in o:
            x0, y0, x1, y1 = (float(o[k]) for k in ("original_x1", "original_y1", "original_x2", "original_y2"))
            if "original_width" in o and "original_height" in o:
                w, h = float(o["original_width"]), float(o["original_height"])
            else:
                if wh is None:
                    if image_path is None:
                        raise ValueError("image size unknown for original_* coordinates")
                    wh = image_size(image_path)
                w, h = wh
        else:
            raise KeyError("objects lack original_x1..original_y2")
        if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
            continue
        b = np.clip(np.array([x0 / w, y0 / h, x1 / w, y1 / h], np.float32), 0.0, 1.0)
        boxes[idx[name]] = b
        mask[idx[name]] = True
    return boxes, mask


# ----------------------------------------------------------------------------------------------------
# IU X-ray / OpenI

def iter_iu_reports(source) -> Iterable[Tuple[str, bytes]]:
    """(name, xml bytes) for each report in a folder of ``*.xml`` or a ``.tgz``/``.tar.gz`` of them."""
    source = str(source)
    if os.path.isdir(source):
        for dp, dns, fns in os.walk(source):
            dns.sort()
            for fn in sorted(fns):
                if fn.lower().endswith(".xml"):
                    p = os.path.join(dp, fn)
                    with open(p, "rb") as fh:
                        yield p, fh.read()
    elif tarfile.is_tarfile(source):
        with tarfile.open(source, "r:*") as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith(".xml"):
                    fh = tf.extractfile(m)
                    if fh is not None:
                        yield f"{source}:{m.name}", fh.read()
    else:
        raise FileNotFoundError(f"IU reports: {source!r} is neither a folder of XML files nor a tar archive")


def parse_iu_report(xml: bytes) -> Dict[str, object]:
    """One OpenI report XML -> dict(uid, iu_id (int), findings, impression, indication, comparison,
    images (list of parentImage ids))."""
    root = ET.fromstring(xml)
    secs = {}
    for a in root.iter("AbstractText"):
        label = (a.get("Label") or "").strip().lower()
        secs[label] = "".join(a.itertext()).strip()
    uid = root.find("uId")
    iu = root.find("IUXRId")
    images = [p.get("id") for p in root.iter("parentImage") if p.get("id")]
    iu_id = iu.get("id") if iu is not None else None
    if iu_id is None and uid is not None:
        iu_id = re.sub(r"\D", "", uid.get("id") or "")
    return dict(uid=uid.get("id") if uid is not None else None, iu_id=int(iu_id) if iu_id else -1,
                findings=secs.get("findings", ""), impression=secs.get("impression", ""),
                indication=secs.get("indication", ""), comparison=secs.get("comparison", ""), images=images)


class IUXray(_Indexed):
    """IU X-ray / OpenI: report XML (folder or ``NLMCXR_reports.tgz``) + a folder of PNG images.

    Args:
        root: a folder; the defaults below are looked for inside it.
        reports: folder of XML or the tgz (default: ``root/ecgen-radiology``, ``root/NLMCXR_reports.tgz``,
            else ``root`` itself).
        images: folder of ``<parentImage id>.png`` (default: ``root/NLMCXR_png``, ``root/images``, else ``root``);
            ``.jpg``/``.dcm`` with the same stem are accepted too.
        require_text: skip reports with neither FINDINGS nor IMPRESSION (default True).
        check_images: parse each image header while indexing (default True; catches corrupt files early).
        uncertain: value of uncertain mentions for the labeller (default 1).
    """

    name = "IUXray"

    def __init__(self, root, *, reports=None, images=None, require_text: bool = True, check_images: bool = True,
                 uncertain: int = 1, limit: Optional[int] = None, progress: bool = True):
        super().__init__()
        from .reports import label_report, report_text

        self.root = str(root)
        if reports is None:
            reports = _find_first(self.root, ["ecgen-radiology", "NLMCXR_reports.tgz"]) or self.root
        if images is None:
            images = _find_first(self.root, ["NLMCXR_png", "images"]) or self.root
        self.reports_source, self.images_dir = str(reports), str(images)
        if not os.path.isdir(self.images_dir):
            raise FileNotFoundError(f"IUXray: images folder {self.images_dir!r} does not exist")
        present = {}
        for fn in os.listdir(self.images_dir):
            stem, ext = os.path.splitext(fn)
            if ext.lower() in _IMAGE_EXT:
                present.setdefault(stem, os.path.join(self.images_dir, fn))
        items = list(iter_iu_reports(self.reports_source))
        it = items
        if progress and len(items) > 500:
            from tqdm.auto import tqdm

            it = tqdm(items, desc="indexing IU X-ray", unit="report")
        n_reports = 0
        for name, xml in it:
            if limit is not None and len(self.samples) >= limit:
                break
            try:
                rec = parse_iu_report(xml)
            except ET.ParseError as e:
                self._skip(name, f"corrupt report XML ({e})")
                continue
            n_reports += 1
            text = report_text(rec["findings"], rec["impression"])
            if require_text and not text:
                self._skip(name, "report has no FINDINGS or IMPRESSION", warn=False)
                continue
            if not rec["images"]:
                self._skip(name, "report lists no images", warn=False)
                continue
            labels = label_report(text, uncertain=uncertain)
            for img_id in rec["images"]:
                path = present.get(img_id)
                if path is None:
                    self._skip(os.path.join(self.images_dir, img_id + ".png"), "image file missing", warn=False)
                    continue
                if check_images and not self._check_image(path):
                    continue
                self.samples.append(Sample(path=path, report=text, entity_labels=labels.copy(),
                                           region_boxes=None, study_id=int(rec["iu_id"]), finding_boxes=[]))
        self.n_reports = n_reports
        if self.skipped:
            warnings.warn(f"IUXray: {self.summary()}", RuntimeWarning, stacklevel=2)


# ----------------------------------------------------------------------------------------------------

def open_dataset(spec: str, **kwargs):
    """``"synth:PATH"`` -> SynthCXR, ``"mimic:PATH"`` -> MimicCXR, ``"iu:PATH"`` -> IUXray (kwargs passed on).

    A bare path is accepted when it holds a synthetic dataset (``metadata.jsonl``)."""
    if not isinstance(spec, str):
        raise TypeError(f"open_dataset: spec must be a str like 'synth:PATH', got {type(spec).__name__}")
    kind, sep, path = spec.partition(":")
    if not sep:
        kind, path = "", spec
    kind = kind.strip().lower()
    if kind == "" and os.path.exists(os.path.join(path, "metadata.jsonl")):
        kind = "synth"
    if kind == "synth":
        from .synth import SynthCXR

        return SynthCXR(path, **kwargs)
    if kind == "mimic":
        return MimicCXR(path, **kwargs)
    if kind == "iu":
        return IUXray(path, **kwargs)
    raise ValueError(f"open_dataset: unknown dataset spec {spec!r}; use 'synth:PATH', 'mimic:PATH' or 'iu:PATH'")
