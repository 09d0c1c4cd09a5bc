"""The NVIDIA DALI loader backend: the host reads file bytes and plans the geometry; DALI decodes
(``device="mixed"`` on a GPU, ``"cpu"`` otherwise), jitters colour, resizes, warps and normalises."""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List

import numpy as np
import torch

from .geometry import jitter_offset, plan_sample
from .io import ImageReadError, encode_png, image_size, read_image, sniff_format
from .loader_base import MEAN, STD, _checked, _Common, _slot_candidates
from .sample import UNREADABLE_IMAGE


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except Exception:
        return False


class DALILoader(_Common):
    """NVIDIA DALI loader: the host reads the file bytes and plans the geometry; DALI decodes (mixed on
    a GPU, cpu otherwise), jitters colour, resizes (anti-aliased), warps and normalises."""

    backend = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not dali_available():
            raise RuntimeError("backend='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130)")
        self.gpu = self.device.type == "cuda"
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath

        gpu, train = self.gpu, self.train
        oh, ow = self.out_hw

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.num_threads),
                      device_id=self.device.index if gpu else None, exec_pipelined=False, exec_async=False,
                      prefetch_queue_depth=1, seed=self.seed)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1, no_copy=False)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            mat = fn.external_source(name="mat", dtype=types.FLOAT, ndim=2)
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.GRAY)
            img = fn.resize(img, size=size, antialias=True, interp_type=types.INTERP_LINEAR,
                            dtype=types.FLOAT)
            if train:  # colour jitter on the resized image: y = clip(x * gain + offset, 0, 255)
                gain = fn.external_source(name="gain", dtype=types.FLOAT, ndim=0, device="gpu" if gpu else "cpu")
                off = fn.external_source(name="offset", dtype=types.FLOAT, ndim=0, device="gpu" if gpu else "cpu")
                img = dmath.clamp(img * gain + off, 0.0, 255.0)
            img = fn.warp_affine(img, matrix=mat, size=[float(oh), float(ow)], fill_value=0.0,
                                 inverse_map=True, interp_type=types.INTERP_LINEAR)
            img = (img * (1.0 / 255.0) - MEAN) * (1.0 / STD)
            return fn.transpose(img, perm=[2, 0, 1])

        p = pipe()
        p.build()
        return p

    def _host(self, cands: Iterator[int], epoch: int, need: int):
        """Read bytes and plan the next ``need`` usable samples of ``cands``; returns (items, notes)."""
        items, skipped = [], []
        if need <= 0:
            return items, skipped
        for i in cands:
            sample, repairs, note = _checked(self.dataset, i, self.num_entities)
            if note is not None:
                skipped.append(note)
                continue
            path = str(sample.path)
            try:
                if not os.path.exists(path):
                    raise ImageReadError(path, "file not found")
                kind = sniff_format(path)
                if kind == "dicom":
                    grey = read_image(path)
                    data = np.frombuffer(encode_png(grey), np.uint8)
                    wh = (grey.shape[1], grey.shape[0])
                elif kind in ("png", "jpeg"):
                    data = np.fromfile(path, np.uint8)
                    wh = image_size(path)
                else:
                    # formats DALI's decoder may not know (TIFF, BMP...): decode with PIL, hand over as PNG
                    grey = read_image(path)
                    data = np.frombuffer(encode_png(grey), np.uint8)
                    wh = (grey.shape[1], grey.shape[0])
            except ImageReadError as e:
                skipped.append(("rejected", e.path, UNREADABLE_IMAGE, e.reason))
                continue
            plan = plan_sample(wh, self.out_hw, self._rng(epoch, i), self.augment)
            items.append((sample, plan, wh, data, repairs))
            if len(items) >= need:
                break
        return items, skipped

    def _run(self, items):
        if self._pipe is None:
            self._pipe = self._build()
        p = self._pipe
        p.feed_input("enc", [it[3] for it in items])
        p.feed_input("size", [np.array(it[1].resize_hw, np.float32) for it in items])
        p.feed_input("mat", [it[1].inv for it in items])
        if self.train:
            p.feed_input("gain", [np.array(it[1].contrast, np.float32) for it in items])
            p.feed_input("offset", [np.array(jitter_offset(it[1].contrast, it[1].brightness), np.float32)
                                    for it in items])
        (out,) = p.run()
        oh, ow = self.out_hw
        dst = torch.empty((len(items), 1, oh, ow), dtype=torch.float32,
                          device=self.device if self.gpu else "cpu")
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self.gpu:
            feed_ndarray(out.as_tensor(), dst, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            feed_ndarray(out.as_tensor(), dst)
        return dst

    def _decode_safely(self, items):
        """Run DALI; if the batch fails (a corrupt stream the header check missed), find the bad files
        with PIL, report them and rerun without them."""
        try:
            return items, self._run(items), []
        except Exception as e:  # DALI raises RuntimeError with the decoder's message
            self._pipe = None  # a failed pipeline is not reused
            good, bad = [], []
            for it in items:
                try:
                    read_image(it[0].path)
                    good.append(it)
                except ImageReadError as err:
                    bad.append(("rejected", err.path, UNREADABLE_IMAGE, err.reason))
            if not bad:
                raise RuntimeError(f"DALI failed on a batch whose files all decode with PIL: {e}") from e
            if not good:
                return [], None, bad
            return good, self._run(good), bad

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.epoch
        self.epoch += 1
        start = self._take_start()
        order, slots = self._slots(epoch, start)
        for k, (slot, need) in enumerate(self._wrap(slots, len(slots))):
            cands = _slot_candidates(order, slot, self.batch_size, self.refill)
            items: List[Any] = []
            imgs = None
            while True:  # top up to ``need`` usable samples; a file DALI cannot decode is dropped and replaced
                more, notes = self._host(cands, epoch, need - len(items))
                for note in notes:
                    self._note(*note)
                items += more
                if not items:
                    break
                items, imgs, bad = self._decode_safely(items)
                for note in bad:
                    self._note(*note)
                if not bad or not more:
                    break
            if not items:
                continue
            for it in items:
                for note in it[4]:
                    self._note(*note)
            self.position = (epoch, slot + 1)
            yield self._finish([self._record(s, p, wh) for s, p, wh, _, _ in items], imgs)
