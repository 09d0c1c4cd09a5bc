"""Loader throughput: DALI (cpu here; mixed GPU decode when a GPU exists) against the PIL loader with
the same number of threads / worker processes, on full-resolution chest X-ray JPEGs resized to 224
(docs/performance.md: faster than PIL on the CPU, >= 5x with GPU decode).

Files: synthetic 2048x2048 JPEGs (the real 2373x2373 radiograph resized, so the content is a real chest,
re-encoded at quality 95) plus the real 2373x2373 JPEG itself. One timed call = one training epoch
(augmentation on, batch 16) over N files; ``images_per_s`` = N / median time is put in extra_info.
"""
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from harness import QUICK, bench_case

from gkcore.data.knowledge import ENTITY_NAMES
from gkcore.data.loader import build_loader, dali_available
from gkcore.data.sample import Sample

CXR = pathlib.Path(os.environ.get("GKCORE_CXR_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"))
BIG = CXR / "covid-19-pneumonia-58-prior.jpg"
N = 16 if QUICK else 64
THREADS = int(os.environ.get("GKCORE_BENCH_THREADS", min(os.cpu_count() or 2, 8)))
BATCH = 16
SIZE = 224


@pytest.fixture(scope="module")
def jpeg_files(tmp_path_factory):
    if not BIG.exists():
        pytest.skip(f"real CXR images not found at {CXR}")
    d = tmp_path_factory.mktemp("bench_jpegs")
    im = Image.open(BIG).convert("L")
    files = [str(BIG)]
    for k in range(3):  # three distinct 2048^2 crops/resizes of the real radiograph
        box = (k * 60, k * 40, 2373 - k * 50, 2373 - k * 70)
        p = d / f"synth2048_{k}.jpg"
        im.crop(box).resize((2048, 2048), Image.Resampling.BICUBIC).save(p, quality=95)
        files.append(str(p))
    return [files[i % len(files)] for i in range(N)]


def _dataset(files):
    lab = np.full(len(ENTITY_NAMES), -1, np.int64)
    boxes = np.tile(np.array([[0.1, 0.1, 0.5, 0.9]], np.float32), (29, 1))
    return [Sample(path=f, report="FINDINGS: No pleural effusion. IMPRESSION: Normal chest.", entity_labels=lab,
                   region_boxes=boxes, study_id=i) for i, f in enumerate(files)]


PROVIDERS = ["pil", "dali-cpu", "dali-mixed"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_loader_throughput(benchmark, provider, jpeg_files):
    if provider.startswith("dali") and not dali_available():
        pytest.skip("DALI not installed")
    if provider == "dali-mixed" and not torch.cuda.is_available():
        pytest.skip("dali-mixed needs a CUDA GPU")
    device = "cuda" if provider == "dali-mixed" else "cpu"
    backend = "pil" if provider == "pil" else "dali"
    ds = _dataset(jpeg_files)
    loader = build_loader(ds, BATCH, SIZE, train=True, backend=backend, device=device, num_threads=THREADS,
                          seed=0, drop_last=False)
    dev = torch.device(device)

    def epoch(_inputs):
        n = 0
        last = None
        for b in loader:
            n += b["image"].shape[0]
            last = b["image"]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        assert n == N, f"{provider}: {n} images of {N}"
        return last

    bench_case(benchmark, op="loader", provider=provider, mode="forward",
               shape=dict(files=N, source="2373^2 real + 2048^2 JPEG", out=SIZE, batch=BATCH, threads=THREADS),
               make_inputs=lambda: {}, fn=epoch, device=dev, rounds=2 if QUICK else 3)
    med = benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = N / med
    print(f"\n{provider}: {N / med:.1f} images/s ({THREADS} threads, {N} files, median epoch {med:.2f} s)")
