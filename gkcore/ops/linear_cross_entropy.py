"""linear_cross_entropy: LM head + cross-entropy without the (T, V) logits (see
gkcore/reference/linear_cross_entropy.py for the math).

Backends: ``triton`` (fp32/fp16/bf16, online log-sum-exp over vocabulary tiles, backward recomputes
the tiles, deterministic), ``cpu`` (fp32/fp64: the tokens in chunks; each chunk's (chunk, V) logits come
from one BLAS matmul into a reused buffer of at most ``_CPU_CHUNK_ELEMS`` elements, the row-wise softcap,
log-sum-exp, loss and logit gradient run in C++/OpenMP (AVX2 row passes), ignored tokens are left out of
the matmuls; for a scalar loss (``mean``/``sum``) that needs
gradients the forward also contracts each chunk's logit gradient with BLAS into the hidden/weight/bias
gradients (three matmuls in all, like the reference; held until the backward scales them in place),
otherwise the backward recomputes the chunks), ``reference`` (``F.linear`` + ``F.cross_entropy``, any device and dtype, materialises
the logits).

The kernels return per-token losses (T,) and the per-token log-sum-exp (saved for the backward); the
reduction (``none``/``sum``/``mean``) is plain torch on (T,) values, so one backward kernel serves every
reduction: it receives the upstream gradient per token.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _ext
from ..reference.linear_cross_entropy import linear_cross_entropy_reference, reduce_token_losses
from . import _triton
from ._checks import any_nonfinite, nan_where, nonfinite_rows
from ._util import acc_dtype, check_same_device, check_tensor, is_compiling, new_output
from .registry import Backend, register_op

__all__ = ["linear_cross_entropy", "OP"]

OP = register_op("linear_cross_entropy", "LM-head cross-entropy without materialising the logits")

_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------- checks
def validate(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, softcap):
    """Checks shapes, dtypes, devices and scalars; returns (hidden2d (T, D), targets1d (T,) int64)."""
    check_tensor("hidden", hidden, floating=True)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D), got a 0-d tensor")
    check_tensor("weight", weight, (2,), floating=True)
    check_tensor("targets", targets)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of class indices, got {targets.dtype}")
    if bias is not None:
        check_tensor("bias", bias, (1,), floating=True)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    D = hidden.shape[-1]
    V = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"weight must have shape (V, D={D}) like nn.Linear(D, V).weight, got {tuple(weight.shape)}")
    if V < 1:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if D < 1:
        raise ValueError(f"hidden must have at least one feature, got D=0 (hidden {tuple(hidden.shape)})")
    if bias is not None and bias.shape[0] != V:
        raise ValueError(f"bias must have shape (V={V},), got {tuple(bias.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's shape without D), "
                         f"got {tuple(targets.shape)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not float(softcap) > 0.0
                                or float(softcap) == float("inf")):
        raise ValueError(f"softcap must be None or a finite positive float, got {softcap!r}")
    h2 = hidden.reshape(-1, D)
    y = targets.reshape(-1).to(torch.int64)
    if y.numel() and not is_compiling():
        bad = ((y < 0) | (y >= V)) & (y != ignore_index)
        if bool(bad.any()):
            first = int(y[bad][0])
            raise ValueError(f"targets must be in [0, V={V}) or equal ignore_index={ignore_index}; "
                             f"{int(bad.sum())} are not (e.g. {first})")
    return h2, y


# ------------------------------------------------------------------------------------------- kernels
#: cpu backend: tokens per chunk are chosen so that one (chunk, V) logits buffer holds at most this
#: many elements (32 MiB in float32); the whole (T, V) matrix never exists.
_CPU_CHUNK_ELEMS = 1 << 23


def _cpu_chunk_rows(T: int, V: int) -> int:
    return max(1, min(max(T, 1), _CPU_CHUNK_ELEMS // max(V, 1)))


def _cpu_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """(n, V) logits of the token rows ``h`` (n, D) into ``out`` (n, V) with one BLAS call."""
    if bias is not None:
        return torch.addmm(bias, h, weight.t(), out=out)
    return torch.mm(h, weight.t(), out=out)


@torch.library.custom_op("gkcore::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
             ignore_index: int, label_smoothing: float, softcap: float,
             impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (T,) and log-sum-exp (T,), float32 (float64 for float64 inputs); softcap 0 = off."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    targets = targets.contiguous()
    T, D = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    if impl == "cpu":
        sel = _live_rows(targets, ignore_index)  # ignored tokens are left out of the matmuls (loss 0)
        hs, ys = (hidden, targets) if sel is None else (hidden.index_select(0, sel), targets.index_select(0, sel))
        Ts = hs.shape[0]
        loss = new_output((Ts,), dtype=acc, device=hidden.device)
        lse = new_output((Ts,), dtype=acc, device=hidden.device)
        C, code = _ext.ext(), _ext.dtype_code(hidden.dtype)
        rows = _cpu_chunk_rows(Ts, V)
        buf = torch.empty((rows, V), dtype=hidden.dtype)
        for t0 in range(0, Ts, rows):
            n = min(rows, Ts - t0)
            z = _cpu_logits(hs[t0:t0 + n], weight, bias, buf[:n])
            C.lce_chunk_forward_cpu(code, z.data_ptr(), ys[t0:].data_ptr(), loss[t0:].data_ptr(),
                                    lse[t0:].data_ptr(), n, V, ignore_index, float(label_smoothing), float(softcap))
        if sel is not None:
            loss = torch.zeros((T,), dtype=acc).index_copy_(0, sel, loss)
            lse = torch.zeros((T,), dtype=acc).index_copy_(0, sel, lse)  # unused at ignored tokens
        return loss, lse
    if impl == "triton":
        from gkcore.kernels import merge_lse_splits
        from gkcore.kernels.linear_cross_entropy import forward_splits, linear_cross_entropy_forward

        n, per = forward_splits(T, V, D, hidden.dtype, hidden.device)
        parts = [new_output((n, T), dtype=torch.float32, device=hidden.device) for _ in range(4)]
        linear_cross_entropy_forward(hidden, weight, bias, targets, *parts, softcap=softcap, v_per_split=per)
        lz_p, zy_p, zs_p, mx_p = parts
        mx, lz = merge_lse_splits(lz_p, mx_p)  # the loss is lz + (mx - target)
        lse = mx + lz
        zy, zsum = zy_p.sum(0), zs_p.sum(0)
        eps = float(label_smoothing)
        loss = (1.0 - eps) * (lz + (mx - zy)) + eps * (lz + (mx - zsum / V))
        loss = torch.where(targets != ignore_index, loss, torch.zeros_like(loss))
        return loss, lse.contiguous()
    raise ValueError(f"unknown linear_cross_entropy implementation {impl!r}")


@_lce_fwd.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, impl):
    T = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    return hidden.new_empty((T,), dtype=acc), hidden.new_empty((T,), dtype=acc)


@torch.library.custom_op("gkcore::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             targets: torch.Tensor, lse: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float,
             need_hidden: bool, need_weight: bool,
             impl: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden (T, D), dweight (V, D), dbias (V,)) in the inputs' dtype; a gradient that is not needed
    comes back as an empty (0,) tensor (dbias also when there is no bias)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    targets = targets.contiguous()
    T, D = hidden.shape
    V = weight.shape[0]
    dt, dev = hidden.dtype, hidden.device
    acc = acc_dtype(dt)
    g = torch.where(targets != ignore_index, grad_loss.to(acc), torch.zeros((), dtype=acc, device=dev)).contiguous()
    lse = lse.to(acc).contiguous()
    want_db = need_weight and bias is not None
    empty = hidden.new_empty((0,))
    if impl == "cpu":
        dh = new_output((T, D), dtype=dt, device=dev) if need_hidden else None
        dw = torch.zeros((V, D), dtype=dt, device=dev) if need_weight else None
        db = torch.zeros((V,), dtype=dt, device=dev) if want_db else None
        C, code = _ext.ext(), _ext.dtype_code(dt)
        rows = _cpu_chunk_rows(T, V)
        buf = torch.empty((rows, V), dtype=dt)
        live = (g != 0).tolist()  # a CPU tensor: no device synchronisation
        for t0 in range(0, T, rows):
            n = min(rows, T - t0)
            if not any(live[t0:t0 + n]):  # every token of the chunk ignored (or zero upstream gradient)
                if dh is not None:
                    dh[t0:t0 + n].zero_()
                continue
            hc = hidden[t0:t0 + n]
            z = _cpu_logits(hc, weight, bias, buf[:n])
            C.lce_chunk_backward_cpu(code, z.data_ptr(), targets[t0:].data_ptr(), lse[t0:].data_ptr(),
                                     g[t0:].data_ptr(), n, V, float(label_smoothing), float(softcap), False)
            if dh is not None:
                torch.mm(z, weight, out=dh[t0:t0 + n])
            if dw is not None:
                dw.addmm_(z.t(), hc)
            if db is not None:
                db += z.sum(0)
    elif impl == "triton":
        from gkcore.kernels.linear_cross_entropy import linear_cross_entropy_backward

        dh = new_output((T, D), dtype=torch.float32, device=dev) if need_hidden else None
        dw = new_output((V, D), dtype=torch.float32, device=dev) if need_weight else None
        db = new_output((V,), dtype=torch.float32, device=dev) if want_db else None
        linear_cross_entropy_backward(hidden, weight, bias, targets, lse, g, dh, dw, db, softcap, label_smoothing)
        dh, dw, db = (None if x is None else x.to(dt) for x in (dh, dw, db))
    else:
        raise ValueError(f"unknown linear_cross_entropy implementation {impl!r}")
    return (dh if dh is not None else empty, dw if dw is not None else empty.clone(),
            db if db is not None else empty.clone())


@_lce_bwd.register_fake
def _(grad_loss, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, softcap, need_hidden,
      need_weight, impl):
    T, D = hidden.shape
    V = weight.shape[0]
    dh = hidden.new_empty((T, D) if need_hidden else (0,))
    dw = hidden.new_empty((V, D) if need_weight else (0,))
    db = hidden.new_empty((V,) if need_weight and bias is not None else (0,))
    return dh, dw, db


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, impl = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse)
    ctx.meta = (ignore_index, label_smoothing, softcap, impl, bias is not None)


def _backward(ctx, grad_loss, grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    ignore_index, label_smoothing, softcap, impl, has_bias = ctx.meta
    need_h = bool(ctx.needs_input_grad[0])
    need_w = bool(ctx.needs_input_grad[1]) or (has_bias and bool(ctx.needs_input_grad[2]))
    if grad_loss is None or not (need_h or need_w):
        return (None,) * 8
    dh, dw, db = _lce_bwd(grad_loss, hidden, weight, bias if has_bias else None, targets, lse, ignore_index,
                          label_smoothing, softcap, need_h, need_w, impl)
    return (dh if need_h else None, dw if ctx.needs_input_grad[1] else None,
            db if has_bias and ctx.needs_input_grad[2] else None) + (None,) * 5


_lce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------- cpu: forward that also computes the gradients
@torch.library.custom_op("gkcore::linear_cross_entropy_fwd_grad_cpu", mutates_args=())
def _lce_fwd_grad_cpu(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      targets: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float,
                      need_hidden: bool, need_weight: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """cpu backend, used when a scalar loss (``'mean'``/``'sum'``) needs gradients: one pass over the
    logits chunks gives the loss and, from the same chunk (no recompute in the backward), the gradients of
    ``sum_t loss_t`` over the non-ignored tokens. Returns loss (T,), lse (T,), dh1 (T, D), dw1 (V, D),
    db1 (V,) in the inputs' dtype; a gradient that is not needed is an empty (0,) tensor. The backward
    scales them by the upstream gradient (uniform over the tokens for a scalar loss). Ignored tokens are
    left out of the matmuls (their loss and gradient rows are 0)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    targets = targets.contiguous()
    sel = _live_rows(targets, ignore_index)
    if sel is None:
        return _fwd_grad_rows(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, need_hidden,
                              need_weight)
    T, D = hidden.shape
    loss_s, lse_s, dh_s, dw1, db1 = _fwd_grad_rows(hidden.index_select(0, sel), weight, bias,
                                                   targets.index_select(0, sel), ignore_index, label_smoothing,
                                                   softcap, need_hidden, need_weight)
    loss = torch.zeros((T,), dtype=hidden.dtype).index_copy_(0, sel, loss_s)
    lse = torch.zeros((T,), dtype=hidden.dtype).index_copy_(0, sel, lse_s)  # unused at ignored tokens
    dh1 = torch.zeros((T, D), dtype=hidden.dtype).index_copy_(0, sel, dh_s) if need_hidden else dh_s
    return loss, lse, dh1, dw1, db1


def _live_rows(targets: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Indices of the tokens that are not ignored, or None when every token counts."""
    valid = targets != ignore_index
    if targets.numel() == 0 or bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def _fwd_grad_rows(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, need_hidden, need_weight):
    """The body of _lce_fwd_grad_cpu on contiguous inputs."""
    T, D = hidden.shape
    V = weight.shape[0]
    dt = hidden.dtype
    want_db = need_weight and bias is not None
    loss = new_output((T,), dtype=dt, device=hidden.device)
    lse = new_output((T,), dtype=dt, device=hidden.device)
    dh1 = new_output((T, D), dtype=dt, device=hidden.device) if need_hidden else None
    dw1 = new_output((V, D), dtype=dt, device=hidden.device) if need_weight else None
    db1 = new_output((V,), dtype=dt, device=hidden.device) if want_db else None
    first = True  # the first chunk with a live token writes dw1 / db1, the later ones accumulate
    valid = targets != ignore_index
    g1 = valid.to(dt)
    live = valid.tolist()
    C, code = _ext.ext(), _ext.dtype_code(dt)
    rows = _cpu_chunk_rows(T, V)
    buf = torch.empty((rows, V), dtype=dt)
    eps, cap = float(label_smoothing), float(softcap)
    for t0 in range(0, T, rows):
        n = min(rows, T - t0)
        hc = hidden[t0:t0 + n]
        z = _cpu_logits(hc, weight, bias, buf[:n])
        C.lce_chunk_forward_cpu(code, z.data_ptr(), targets[t0:].data_ptr(), loss[t0:].data_ptr(),
                                lse[t0:].data_ptr(), n, V, ignore_index, eps, cap)
        if not any(live[t0:t0 + n]):
            if dh1 is not None:
                dh1[t0:t0 + n].zero_()
            continue
        C.lce_chunk_backward_cpu(code, z.data_ptr(), targets[t0:].data_ptr(), lse[t0:].data_ptr(),
                                 g1[t0:].data_ptr(), n, V, eps, cap, True)
        if dh1 is not None:
            torch.mm(z, weight, out=dh1[t0:t0 + n])
        if dw1 is not None:
            if first:
                torch.mm(z.t(), hc, out=dw1)
            else:
                dw1.addmm_(z.t(), hc)
        if db1 is not None:
            if first:
                torch.sum(z, 0, out=db1)
            else:
                db1 += z.sum(0)
        first = False
    if first:  # every token ignored
        for t in (dw1, db1):
            if t is not None:
                t.zero_()
    empty = hidden.new_empty((0,))
    return (loss, lse, dh1 if dh1 is not None else empty, dw1 if dw1 is not None else empty.clone(),
            db1 if db1 is not None else empty.clone())


@_lce_fwd_grad_cpu.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, need_hidden, need_weight):
    T, D = hidden.shape
    V = weight.shape[0]
    return (hidden.new_empty((T,)), hidden.new_empty((T,)), hidden.new_empty((T, D) if need_hidden else (0,)),
            hidden.new_empty((V, D) if need_weight else (0,)),
            hidden.new_empty((V,) if need_weight and bias is not None else (0,)))


def _setup_context_grad(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, need_hidden, need_weight = inputs
    _, lse, dh1, dw1, db1 = output
    ctx.mark_non_differentiable(lse, dh1, dw1, db1)
    ctx.save_for_backward(hidden, weight, bias, targets, lse)
    # Held as a plain attribute, not a saved tensor: the backward scales them in place and drops them.
    ctx.pre = (dh1, dw1, db1)
    ctx.meta = (ignore_index, label_smoothing, softcap, bias is not None, need_hidden, need_weight)


def _backward_grad(ctx, grad_loss, *unused):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    ignore_index, label_smoothing, softcap, has_bias, need_hidden, need_weight = ctx.meta
    nig = ctx.needs_input_grad
    if grad_loss is None:
        return (None,) * 9
    valid = targets != ignore_index
    g = torch.where(valid, grad_loss, torch.zeros((), dtype=grad_loss.dtype))
    # The precomputed gradients are scaled in place (no second (V, D) buffer), so they serve one backward;
    # a second one (retain_graph=True) recomputes the chunks instead.
    fresh = ctx.pre is not None
    dh1, dw1, db1 = ctx.pre if fresh else (None, None, None)
    ctx.pre = None
    dh = dw = db = None
    if nig[0]:
        if fresh and need_hidden:
            dh = dh1.mul_(g[:, None].to(dh1.dtype))
        else:
            dh, _, _ = _lce_bwd(grad_loss, hidden, weight, bias if has_bias else None, targets, lse, ignore_index,
                                label_smoothing, softcap, True, False, "cpu")
    if nig[1] or (has_bias and nig[2]):
        gv = g[valid]
        if gv.numel() == 0:
            dw, db = torch.zeros_like(weight), (torch.zeros_like(bias) if has_bias else None)
        elif fresh and need_weight and bool((gv == gv[0]).all()):  # a scalar loss: one gradient for all tokens
            s = gv[0].to(dw1.dtype)
            dw, db = dw1.mul_(s), (db1.mul_(s) if has_bias else None)
        else:  # a non-uniform upstream gradient: recompute the chunks for the weight gradients
            _, dw, db = _lce_bwd(grad_loss, hidden, weight, bias if has_bias else None, targets, lse, ignore_index,
                                 label_smoothing, softcap, False, True, "cpu")
    return (dh, dw if nig[1] else None, db if has_bias and nig[2] else None) + (None,) * 6


_lce_fwd_grad_cpu.register_autograd(_backward_grad, setup_context=_setup_context_grad)


# ------------------------------------------------------------------------------------------ backends
def _kernel_fn(impl: str):
    def run(hidden2, weight, targets1, bias, lead, ignore_index, label_smoothing, reduction, softcap, dtype):
        need_h = hidden2.requires_grad
        need_w = weight.requires_grad or (bias is not None and bias.requires_grad)
        if (impl == "cpu" and reduction != "none" and (need_h or need_w) and torch.is_grad_enabled()
                and not is_compiling()):
            loss = _lce_fwd_grad_cpu(hidden2, weight, bias, targets1, ignore_index, float(label_smoothing),
                                     float(softcap or 0.0), need_h, need_w)[0]
            return reduce_token_losses(loss, targets1, ignore_index, reduction, dtype)
        loss, _ = _lce_fwd(hidden2, weight, bias, targets1, ignore_index, float(label_smoothing),
                           float(softcap or 0.0), impl)
        out = reduce_token_losses(loss, targets1, ignore_index, reduction, dtype)
        return out.reshape(lead) if reduction == "none" else out

    return run


def _reference(hidden2, weight, targets1, bias, lead, ignore_index, label_smoothing, reduction, softcap, dtype):
    out = linear_cross_entropy_reference(hidden2, weight, targets1, bias, ignore_index, float(label_smoothing),
                                         reduction, softcap)
    return out.reshape(lead) if reduction == "none" else out


def _triton_check(inputs):
    h = inputs["hidden"]
    if h.shape[-1] < 1:
        return ["D must be at least 1"]
    return []


_tri_dev, _tri_explicit = _triton.triton_devices()
OP.register(Backend("triton", _kernel_fn("triton"), devices=_tri_dev, explicit_only_devices=_tri_explicit,
                    dtypes=(torch.float32, torch.float16, torch.bfloat16), dtype_args=("hidden",),
                    availability=_triton.triton_unavailable, check=_triton_check))
OP.register(Backend("cpu", _kernel_fn("cpu"), devices=("cpu",), dtypes=(torch.float32, torch.float64),
                    dtype_args=("hidden",), availability=_ext.cpu_unavailable,
                    check=_ext.built_with("lce_chunk_forward_cpu", "linear_cross_entropy")))
OP.register(Backend("reference", _reference, devices=("cpu", "cuda"), dtype_args=("hidden",)))


# ------------------------------------------------------------------------------------------ public
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean", softcap: Optional[float] = None,
                         backend: Optional[str] = None) -> torch.Tensor:
    """Cross-entropy of the LM head ``hidden @ weight.T + bias`` without materialising the logits.

    With ``z = hidden W^T + b`` (optionally ``z <- c tanh(z / c)`` for ``softcap=c``), ``lse_t`` the
    log-sum-exp of token t's logits and ``eps = label_smoothing``::

        loss_t = (1 - eps) (lse_t - z_{t, y_t}) + eps (lse_t - mean_j z_tj),   0 where y_t == ignore_index

    which is ``F.cross_entropy(F.linear(hidden, weight, bias), targets, ...)``. The ``triton`` and ``cpu``
    backends never hold the (T, V) logits: they keep an online log-sum-exp over vocabulary tiles and
    recompute the tiles in the backward; extra memory is O(T) plus the gradients.

    Args:
        hidden: (..., D) floating (T = number of tokens after flattening).
        weight: (V, D), the layout of ``nn.Linear(D, V).weight`` (a tied embedding matrix can be passed).
            Cast to ``hidden``'s dtype (differentiably) if it differs, as is ``bias``.
        targets: (...) integer, hidden's shape without D; values in [0, V) or ``ignore_index``
            (anything else raises ``ValueError``).
        bias: optional (V,).
        ignore_index: target value whose tokens contribute 0 and are left out of the mean.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.
        reduction: ``'mean'`` (over non-ignored tokens), ``'sum'`` or ``'none'``. When every target is
            ignored, ``'mean'`` returns 0 with zero gradients (``F.cross_entropy`` would return NaN).
        softcap: None, or c > 0 to cap the logits at ``c tanh(z / c)`` before the softmax.
        backend: ``None`` (automatic), ``'triton'``, ``'cpu'`` or ``'reference'``.

    Returns:
        0-d loss (``'mean'``, ``'sum'``) or per-token losses of ``targets``' shape (``'none'``), in
        ``hidden``'s dtype (accumulated in float32, float64 for float64 inputs). Gradients flow to
        ``hidden``, ``weight`` and ``bias``.

    Non-finite inputs (every backend): a non-ignored token whose hidden row holds a NaN or an inf, or
    every non-ignored token when ``weight`` or ``bias`` does, has loss NaN (so ``'mean'``/``'sum'`` are
    NaN); gradients are then unspecified.
    """
    h2, y = validate(hidden, weight, targets, bias, ignore_index, label_smoothing, reduction, softcap)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    inputs = {"hidden": h2, "weight": weight, "targets": y, "bias": bias}
    be = OP.select(inputs, backend)
    out = be.fn(h2, weight, y, bias, tuple(targets.shape), ignore_index, float(label_smoothing), reduction,
                None if softcap is None else float(softcap), hidden.dtype)
    bad = (nonfinite_rows(h2) | any_nonfinite(weight) | any_nonfinite(bias)) & (y != ignore_index)
    return nan_where(out, bad, reduction)
