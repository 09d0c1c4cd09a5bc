"""The file layout and the generator: image streams per (seed, index), studies, metadata records, and
generate() writing a folder with a pool of worker processes."""
from __future__ import annotations

import json
import os
from typing import List

import numpy as np

from ..knowledge import ENTITY_NAMES, REGIONS
from .image import render

MIN_SIZE, MAX_SIZE = 64, 2048
FOLLOW_UP_PROB = 0.1
META_FILE, HEADER_FILE, IMAGE_DIR = "metadata.jsonl", "synth.json", "images"
FORMAT_VERSION = 1


def _image_streams(seed: int, i: int):
    """(patient seed, acquisition seed) of image ``i``: independent of n and of the order."""
    return [seed, i, 0], [seed, i, 2]


def _is_follow_up(seed: int, i: int) -> bool:
    return i > 0 and float(np.random.default_rng([seed, i, 1]).random()) < FOLLOW_UP_PROB


def study_starts(seed: int, n: int) -> List[int]:
    """For each of the first ``n`` images, the index of the first image of its study (its study id). An image
    is a second view of the previous image's study with probability FOLLOW_UP_PROB, never a third view."""
    out: List[int] = []
    for i in range(n):
        if _is_follow_up(seed, i) and out[i - 1] == i - 1:
            out.append(i - 1)
        else:
            out.append(i)
    return out


def _record(i: int, study: int, fname: str, size: int, rec: dict) -> dict:
    labels = rec["labels"]
    fb = []
    for f in rec["findings"]:
        for e in f.entities:
            for b in f.boxes:
                fb.append([e, *[round(float(v), 5) for v in b]])
    return {
        "id": i,
        "file": fname,
        "study_id": study,
        "size": size,
        "view": "PA",
        "report": rec["report"],
        "findings_text": rec["findings_text"],
        "impression_text": rec["impression_text"],
        "labels": {ENTITY_NAMES[k]: int(v) for k, v in enumerate(labels) if v != -1},
        "region_boxes": [[round(float(v), 5) for v in b] for b in rec["region_boxes"]],
        "findings": [{"type": f.type, "entities": f.entities, "region": f.region, "side": f.side,
                      "uncertain": bool(f.uncertain), "boxes": [[round(float(v), 5) for v in b] for b in f.boxes]}
                     for f in rec["findings"]],
        "finding_boxes": fb,
    }


FORMATS = ("png", "jpg")


def _render_one(job):
    i, st, seed, size, root, fmt = job
    from PIL import Image

    ps, _ = _image_streams(seed, st)
    _, acq = _image_streams(seed, i)
    img, rec = render(size, ps, acq)
    fname = f"{IMAGE_DIR}/{i:07d}.{fmt}"
    im = Image.fromarray(img, mode="L")
    if fmt == "png":
        im.save(os.path.join(root, fname), compress_level=1)
    else:
        im.save(os.path.join(root, fname), quality=95)
    return json.dumps(_record(i, st, fname, size, rec))


def generate(out: str, n: int, size: int = 256, seed: int = 0, progress: bool = True, workers: int = 1,
             fmt: str = "png") -> str:
    """Write ``n`` synthetic chest X-rays to the folder ``out``.

    Args:
        out: output folder (created); any previous ``metadata.jsonl`` there is replaced.
        n: number of images (>= 1).
        size: image side in pixels (square), between 64 and 2048 (224 to 1024 are the intended sizes).
        seed: base seed; image ``i`` depends only on (seed, i), so outputs are prefixes of each other.
        progress: show a tqdm progress bar on stderr.
        workers: processes drawing images in parallel (the output does not depend on it).
        fmt: image format, "png" (lossless, default) or "jpg" (quality 95).

    Writes ``out/images/{i:07d}.png`` (or ``.jpg``; 8-bit grey, size x size), ``out/metadata.jsonl`` (one JSON object
    per image: id, file, study_id, report, findings_text, impression_text, labels {entity: 1|0} for the
    mentioned entities (others -1), region_boxes (29, 4), findings, finding_boxes [[entity, x0, y0, x1, y1],
    ...]) and ``out/synth.json`` (n, size, seed, REGIONS, ENTITY_NAMES). Returns ``out``.
    """
    n = _check_int("n", n, 1, None)
    size = _check_int("size", size, MIN_SIZE, MAX_SIZE)
    seed = _check_int("seed", seed, 0, None)
    workers = _check_int("workers", workers, 1, 256)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    out = os.fspath(out)
    os.makedirs(os.path.join(out, IMAGE_DIR), exist_ok=True)
    studies = study_starts(seed, n)
    jobs = ((i, studies[i], seed, size, out, fmt) for i in range(n))
    pool = None
    if workers > 1 and n > 1:
        import multiprocessing as mp

        # fork where available (no re-import of __main__; the workers only run numpy and PIL)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(min(workers, n))
        lines = pool.imap(_render_one, jobs, chunksize=4)
    else:
        lines = map(_render_one, jobs)
    if progress:
        from tqdm.auto import tqdm

        lines = tqdm(lines, desc=f"synth {size}px", unit="img", total=n)
    tmp = os.path.join(out, META_FILE + ".tmp")
    try:
        with open(tmp, "w") as meta:
            for line in lines:
                meta.write(line + "\n")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    os.replace(tmp, os.path.join(out, META_FILE))
    with open(os.path.join(out, HEADER_FILE), "w") as f:
        json.dump({"format": FORMAT_VERSION, "generator": "gkcore.data.synth", "n": n, "size": size, "seed": seed,
                   "image_format": fmt,
                   "regions": list(REGIONS), "entities": list(ENTITY_NAMES)}, f, indent=1)
    return out


def _check_int(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v
