"""sample_hard_negatives: ALBEF-style ITM hard negatives (see gkcore/reference/hard_negatives.py).

Backends: ``triton`` (fused tiles + Gumbel-max, fp32/fp16/bf16, no B x B buffer, no host sync),
``cpu`` (C++/OpenMP Gumbel-max over similarity chunks from ``torch.mm``, fp32/fp64, O(chunk * B)
memory), ``reference`` (masked softmax + ``torch.multinomial``, any device and dtype). The triton and
cpu backends use the same counter-based random numbers (Philox4x32-10 keyed by one 64-bit seed drawn
from the generator), so for one generator state they return the same indices.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _ext
from ..reference.hard_negatives import hard_negatives_multinomial, seed_words
from . import _triton
from ._checks import any_nonfinite, check_scalar
from ._util import check_same_device, check_tensor, is_compiling, new_output
from .registry import Backend, register_op

__all__ = ["sample_hard_negatives", "draw_seed", "OP"]

OP = register_op("sample_hard_negatives", "ITM hard-negative sampling (softmax over in-batch similarities)")

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
#: Similarity rows per chunk of the cpu backend: chunk * B elements at most about this many.
_CPU_CHUNK_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------- checks
def validate(image_feat, text_feat, scale, group_ids, generator) -> None:
    check_tensor("image_feat", image_feat, (2,), floating=True)
    check_tensor("text_feat", text_feat, (2,), floating=True)
    if image_feat.shape != text_feat.shape:
        raise ValueError(f"image_feat {tuple(image_feat.shape)} and text_feat {tuple(text_feat.shape)} must have "
                         "one shape (B, D)")
    if image_feat.dtype != text_feat.dtype:
        raise ValueError(f"image_feat dtype {image_feat.dtype} and text_feat dtype {text_feat.dtype} differ")
    check_same_device(image_feat=image_feat, text_feat=text_feat)
    B, D = image_feat.shape
    if D == 0:
        raise ValueError("image_feat and text_feat have D=0 features")
    dev = image_feat.device
    # the op promises no host synchronisation on a GPU: a CUDA scale tensor's value is not read there
    check_scalar("scale", scale, dev, read_device=False)
    if dev.type == "cpu" and B and not is_compiling():  # reading is free on the CPU
        for name, t in (("image_feat", image_feat), ("text_feat", text_feat)):
            if bool(any_nonfinite(t)):
                raise ValueError(f"{name} holds NaN or inf: hard negatives cannot be drawn from it")
    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor):
            raise ValueError(f"group_ids must be a tensor or None, got {type(group_ids).__name__}")
        if group_ids.dtype not in _INT_DTYPES:
            raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
        if group_ids.shape != (B,):
            raise ValueError(f"group_ids must have shape (B={B},), got {tuple(group_ids.shape)}")
        if group_ids.device != dev and group_ids.device.type != "cpu":
            raise ValueError(f"group_ids is on {group_ids.device} but the features are on {dev} "
                             "(pass it on the features' device, or on the CPU)")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != dev.type:
            raise ValueError(f"generator is on {generator.device} but the features are on {dev}: use a "
                             f"generator of the features' device (torch.Generator(device={str(dev)!r}))")
    if B == 1:
        raise ValueError("row 0 has no valid negative: B=1 (the only candidate is its own positive); "
                         "hard negatives need B >= 2")
    if group_ids is not None and B and not is_compiling():
        # Every row lacks a negative exactly when all pairs share one group (a device read on CUDA
        # unless group_ids are given on the CPU).
        g = group_ids
        if bool((g == g[0]).all()):
            raise ValueError(f"row 0 (and every other row) has no valid negative: all B={B} samples share "
                             f"group_ids value {int(g[0])}")


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """One 64-bit seed as a (1,) int64 tensor drawn from ``generator`` (default: the device's default
    generator) on ``device``: no host synchronisation."""
    dev = generator.device if generator is not None else device
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, device=dev, generator=generator)


def _scale_tensor(scale, like: torch.Tensor) -> torch.Tensor:
    """(1,) scale in the compute dtype (float64 for float64 features, else float32) on ``like``'s device."""
    cdt = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(scale, torch.Tensor):
        return scale.detach().reshape(1).to(device=like.device, dtype=cdt)
    return torch.full((1,), float(scale), dtype=cdt, device=like.device)


# ------------------------------------------------------------------------------------------- kernels
@torch.library.custom_op("gkcore::sample_hard_negatives", mutates_args=())
def _sample_hard_negatives(image_feat: torch.Tensor, text_feat: torch.Tensor, scale: torch.Tensor,
                           seed: torch.Tensor, group_ids: Optional[torch.Tensor],
                           impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    B, D = image_feat.shape
    dev = image_feat.device
    neg_t = new_output((B,), dtype=torch.int64, device=dev)
    neg_i = new_output((B,), dtype=torch.int64, device=dev)
    gid = group_ids.to(device=dev, dtype=torch.int64).contiguous() if group_ids is not None else None
    if impl == "triton":
        from gkcore.kernels.hard_negatives import hard_negatives_forward

        hard_negatives_forward(image_feat.contiguous(), text_feat.contiguous(), scale.to(torch.float32),
                               seed, gid, neg_t, neg_i)
    elif impl == "cpu":
        v, t = image_feat.contiguous(), text_feat.contiguous()
        cdt = v.dtype
        sc = float(scale.reshape(-1)[0])  # CPU tensor: no device sync
        k0, k1 = seed_words(seed)
        col_val = torch.full((B,), float("-inf"), dtype=cdt)
        col_idx = torch.full((B,), -1, dtype=torch.int64)
        chunk = max(1, min(B, _CPU_CHUNK_ELEMS // max(B, 1)))
        sim = torch.empty((chunk, B), dtype=cdt)
        C = _ext.ext()
        for r0 in range(0, B, chunk):
            rows = min(chunk, B - r0)
            s = sim[:rows]
            torch.mm(v[r0:r0 + rows], t.T, out=s)
            C.hard_negatives_cpu(_ext.dtype_code(cdt), s.data_ptr(), sc, k0, k1,
                                 gid.data_ptr() if gid is not None else 0, neg_t.data_ptr(), col_val.data_ptr(),
                                 col_idx.data_ptr(), r0, rows, B)
        neg_i.copy_(col_idx)
    else:
        raise ValueError(f"unknown sample_hard_negatives implementation {impl!r}")
    return neg_t, neg_i


@_sample_hard_negatives.register_fake
def _(image_feat, text_feat, scale, seed, group_ids, impl):
    B = image_feat.shape[0]
    return (image_feat.new_empty((B,), dtype=torch.int64), image_feat.new_empty((B,), dtype=torch.int64))


# ------------------------------------------------------------------------------------------ backends
def _kernel_fn(impl: str):
    def run(image_feat, text_feat, scale, group_ids, generator):
        dev = image_feat.device
        seed = draw_seed(generator, dev)
        return _sample_hard_negatives(image_feat.detach(), text_feat.detach(), _scale_tensor(scale, image_feat),
                                      seed, group_ids, impl)

    return run


def _reference(image_feat, text_feat, scale, group_ids, generator):
    return hard_negatives_multinomial(image_feat, text_feat, scale, group_ids, generator)


def _cpu_check(inputs):
    if inputs["image_feat"].shape[0] >= 2 ** 31:
        return ["B must be below 2^31"]
    return []


_tri_dev, _tri_explicit = _triton.triton_devices()
OP.register(Backend("triton", _kernel_fn("triton"), devices=_tri_dev, explicit_only_devices=_tri_explicit,
                    dtypes=(torch.float32, torch.float16, torch.bfloat16), dtype_args=("image_feat", "text_feat"),
                    availability=_triton.triton_unavailable))
OP.register(Backend("cpu", _kernel_fn("cpu"), devices=("cpu",), dtypes=(torch.float32, torch.float64),
                    dtype_args=("image_feat", "text_feat"), availability=_ext.cpu_unavailable, check=_cpu_check))
OP.register(Backend("reference", _reference, devices=("cpu", "cuda"), dtype_args=("image_feat", "text_feat")))


# ------------------------------------------------------------------------------------------ public
def sample_hard_negatives(image_feat: torch.Tensor, text_feat: torch.Tensor, scale: Union[float, torch.Tensor], *,
                          group_ids: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                          backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative text per image and one hard negative image per text (ALBEF / BLIP ITM).

    With ``S = scale * image_feat @ text_feat.T`` (B, B), pair (i, j) is a positive when ``i == j`` or
    ``group_ids[i] == group_ids[j]``; otherwise

        P(neg_text_for_image[i] = j) = exp(S_ij) / sum_{k: (i, k) not positive} exp(S_ik)
        P(neg_image_for_text[j] = i) = exp(S_ij) / sum_{k: (k, j) not positive} exp(S_kj)

    so a returned index is never a positive. ALBEF's recipe (softmax, zeroed diagonal, one
    ``torch.multinomial`` per row) draws the same law.

    The triton and cpu backends sample exactly with the Gumbel-max trick, ``argmax_j (S_ij + G_ij)``,
    where the Gumbel noise comes from Philox4x32-10 keyed by one 64-bit seed drawn from ``generator``
    (on the GPU as a device tensor: no host synchronisation, nothing of size B x B stored by triton).
    Each pair's noise depends only on (seed, i, j), so those two backends return the same indices for
    the same generator state. The reference backend uses softmax + ``torch.multinomial`` with
    ``generator`` (same law, different draws). Sampling has no gradient.

    Args:
        image_feat: (B, D) image features (normally L2-normalised ITC projections).
        text_feat: (B, D) text features, same dtype and device.
        scale: inverse temperature, a number or a one-element tensor on the features' device
            (e.g. ``1 / temp``).
        group_ids: optional (B,) integer tensor; samples sharing a value are positives of each other
            (e.g. images of one study). Pass it on the CPU to keep a CUDA call free of host syncs (the
            check below reads it).
        generator: optional ``torch.Generator`` on the features' device type; reproducible for a
            given seed. ``None`` uses the device's default generator.
        backend: ``None`` (automatic), ``'triton'``, ``'cpu'`` or ``'reference'``.

    Returns:
        ``(neg_text_for_image, neg_image_for_text)``, two (B,) int64 tensors on the features' device.

    Raises:
        ValueError: a row has no valid negative -- ``B == 1``, or every sample shares one
            ``group_ids`` value (then the message names row 0; every row is in the same case) -- or an
            argument is malformed (the message names it), or a non-finite ``scale`` (a Python number or
            a CPU tensor; a CUDA tensor is not read, to keep the call free of host synchronisation), or
            CPU features holding NaN/inf. CUDA features holding NaN/inf give unspecified indices (the
            reference backend raises from ``torch.multinomial``).
    """
    validate(image_feat, text_feat, scale, group_ids, generator)
    inputs = {"image_feat": image_feat, "text_feat": text_feat}
    be = OP.select(inputs, backend)
    if group_ids is not None and group_ids.device != image_feat.device:
        group_ids = group_ids.to(image_feat.device, non_blocking=True)
    return be.fn(image_feat, text_feat, scale, group_ids, generator)
