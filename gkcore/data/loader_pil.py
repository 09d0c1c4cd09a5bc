"""The PIL loader backend: PIL + numpy decoding and rendering on the host, optionally in torch
DataLoader worker processes (the reference path of the geometry in :mod:`gkcore.data.geometry`)."""
from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import numpy as np
import torch

from .geometry import SamplePlan, color_jitter, plan_sample
from .io import ImageReadError, read_image
from .loader_base import _checked, _Common, _normalise_uint8_range, _slot_candidates
from .sample import UNREADABLE_IMAGE


def pil_render(img: np.ndarray, plan: SamplePlan, out_hw: Tuple[int, int]) -> np.ndarray:
    """(H0, W0) uint8 -> (H, W) float32 in 0..255, following ``plan`` with PIL (the reference path)."""
    from PIL import Image

    im = Image.fromarray(img)
    hr, wr = plan.resize_hw
    if (wr, hr) != im.size:
        im = im.resize((wr, hr), Image.Resampling.BILINEAR, reducing_gap=None)
    imf = im.convert("F")
    if plan.contrast != 1.0 or plan.brightness != 0.0:
        imf = Image.fromarray(color_jitter(np.asarray(imf, np.float32).copy(), plan.contrast, plan.brightness))
    oh, ow = out_hw
    a = plan.inv.astype(np.float64).ravel().tolist()
    out = imf.transform((ow, oh), Image.Transform.AFFINE, data=a, resample=Image.Resampling.BILINEAR,
                        fillcolor=0.0)
    return np.asarray(out, np.float32)


def _pil_prepare(common_state: Dict[str, Any], dataset, cands, need: int, epoch: int):
    """Decode and transform one batch on the host (runs in a worker process or inline): the first
    ``need`` usable samples of the indices ``cands``.

    Returns (records, images float32 (B, 1, H, W) normalised, notes [(kind, path, reason, detail)]).
    """
    out_hw, seed, train, aug = common_state["out_hw"], common_state["seed"], common_state["train"], \
        common_state["augment"]
    recs, imgs, notes = [], [], []
    for i in cands:
        if len(recs) >= need:
            break
        sample, repairs, note = _checked(dataset, i, common_state["num_entities"])
        if note is not None:
            notes.append(note)
            continue
        try:
            grey = read_image(sample.path)
        except ImageReadError as e:
            notes.append(("rejected", e.path, UNREADABLE_IMAGE, e.reason))
            continue
        notes.extend(repairs)
        rng = np.random.default_rng([seed, epoch, int(i)]) if train else None
        orig_wh = (grey.shape[1], grey.shape[0])
        plan = plan_sample(orig_wh, out_hw, rng, aug)
        imgs.append(pil_render(grey, plan, out_hw))
        recs.append((sample, plan, orig_wh))
    if imgs:
        arr = torch.from_numpy(np.stack(imgs))[:, None]
        arr = _normalise_uint8_range(arr)
    else:
        arr = torch.zeros((0, 1) + tuple(out_hw), dtype=torch.float32)
    return recs, arr, notes


class _BatchSet(torch.utils.data.Dataset):
    def __init__(self, state, dataset, order, slots, epoch):
        self.state, self.dataset, self.order, self.slots, self.epoch = state, dataset, order, slots, epoch

    def __len__(self):
        return len(self.slots)

    def __getitem__(self, k):
        slot, need = self.slots[k]
        st = self.state
        cands = _slot_candidates(self.order, slot, st["batch_size"], st["refill"])
        return _pil_prepare(st, self.dataset, cands, need, self.epoch)


class PILLoader(_Common):
    """PIL + numpy loader; ``num_threads`` > 0 runs batches in that many torch DataLoader workers."""

    backend = "pil"

    def _state(self):
        return dict(out_hw=self.out_hw, seed=self.seed, train=self.train, augment=self.augment,
                    num_entities=self.num_entities, batch_size=self.batch_size, refill=self.refill)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.epoch
        self.epoch += 1
        start = self._take_start()
        order, slots = self._slots(epoch, start)
        bs = _BatchSet(self._state(), self.dataset, order, slots, epoch)
        if self.num_threads > 0 and len(slots) > 1:
            dl = torch.utils.data.DataLoader(bs, batch_size=None, shuffle=False, num_workers=self.num_threads,
                                             pin_memory=self.device.type == "cuda",
                                             persistent_workers=False, prefetch_factor=2)
            it = iter(dl)
        else:
            it = (bs[k] for k in range(len(bs)))
        for k, (recs, imgs, notes) in enumerate(self._wrap(it, len(slots))):
            for note in notes:
                self._note(*note)
            if not recs:
                continue
            self.position = (epoch, start + k + 1)
            yield self._finish([self._record(s, p, wh) for s, p, wh in recs], imgs)
