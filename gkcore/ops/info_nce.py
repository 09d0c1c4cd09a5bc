"""info_nce: InfoNCE / contrastive cross-entropy of queries against keys (+ queue) without the (M, N)
logits (see gkcore/reference/info_nce.py for the math).

Backends: ``triton`` (fp32/fp16/bf16 with fp32 accumulation, online log-sum-exp over key tiles, backward
recomputes the tiles: one row-side kernel for the query gradient, one key-side kernel for the keys'
gradient, deterministic), ``cpu`` (fp32/fp64: the queries in chunks; each chunk's (rows, N) logits come
from one BLAS matmul into a reused buffer holding at most about the inputs' (M + N) D elements, the row
passes (log-sum-exp, loss, logit gradient p - t) run in C++/OpenMP, and the gradient rows are contracted
with BLAS in the same pass: ``A`` for the queries and, for a scalar loss whose keys need a gradient,
``C`` for the keys, held until the backward scales them; otherwise the backward recomputes the chunks),
``reference`` (plain torch, any device and dtype, materialises the logits).

The kernels return per-row losses (M,) (0 for rows without a positive) and per-row log-sum-exp values
(M,) (plus those of the soft targets); the reduction is plain torch on (M,) values, so one backward
serves every reduction. Row quantities used by the backward::

    A_i = sum_j (p_ij - t_ij) k_j            (M, D)   ->  dq_i = g_i * scale * A_i,  dscale = sum_i g_i <q_i, A_i>
    C_j = sum_i g_i (p_ij - t_ij) q_i        (N, D)   ->  dk_j = scale * C_j

where p = softmax(s), t the target distribution and g the upstream gradient per row.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _ext
from ..reference.info_nce import info_nce_reference
from . import _triton
from ._checks import any_nonfinite, check_scalar, nan_where, nonfinite_rows
from ._util import acc_dtype, check_same_device, check_tensor, is_compiling, new_output, ptr
from .registry import Backend, register_op

__all__ = ["info_nce", "OP", "validate"]

OP = register_op("info_nce", "InfoNCE / contrastive loss with queue, soft targets and multi-positives, "
                             "without materialising the logits")

_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------- checks
def validate(query, keys, scale, positives, soft_query, alpha, label_smoothing, reduction):
    """Checks shapes, dtypes, devices and scalars; raises ``ValueError`` naming the bad argument."""
    check_tensor("query", query, (2,), floating=True)
    check_tensor("keys", keys, (2,), floating=True)
    M, D = query.shape
    N = keys.shape[0]
    if keys.shape[1] != D:
        raise ValueError(f"keys must have shape (N, D={D}) like query (M, D), got {tuple(keys.shape)}")
    if keys.dtype != query.dtype:
        raise ValueError(f"keys dtype {keys.dtype} does not match query dtype {query.dtype}")
    if N < 1:
        raise ValueError("keys must hold at least one key (N >= 1)")
    if D < 1:
        raise ValueError(f"query and keys must have at least one feature, got D=0 (query {tuple(query.shape)})")
    check_scalar("scale", scale, query.device)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    if soft_query is not None:
        check_tensor("soft_query", soft_query, (2,), floating=True)
        if tuple(soft_query.shape) != (M, D):
            raise ValueError(f"soft_query must have query's shape ({M}, {D}), got {tuple(soft_query.shape)}")
        if soft_query.dtype != query.dtype:
            raise ValueError(f"soft_query dtype {soft_query.dtype} does not match query dtype {query.dtype}")
    if float(alpha) > 0.0 and soft_query is None:
        raise ValueError("alpha > 0 needs soft_query (the momentum queries of the soft targets)")
    if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool) \
            or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_same_device(query=query, keys=keys, soft_query=soft_query, positives=positives)
    if positives is None:
        if N < M:
            raise ValueError(f"positives=None takes key i as the positive of query i, so it needs N >= M; "
                             f"got M={M} queries and N={N} keys")
    else:
        check_tensor("positives", positives)
        if positives.dtype == torch.bool:
            if tuple(positives.shape) != (M, N):
                raise ValueError(f"a bool positives mask must have shape (M={M}, N={N}), got {tuple(positives.shape)}")
        elif positives.is_floating_point() or positives.is_complex():
            raise ValueError(f"positives must be an integer (M,) index tensor or a bool (M, N) mask, "
                             f"got dtype {positives.dtype}")
        else:
            if tuple(positives.shape) != (M,):
                raise ValueError(f"integer positives must have shape (M={M},), got {tuple(positives.shape)}")
            if positives.numel() and not is_compiling():
                if bool((positives >= N).any()):
                    raise ValueError(f"integer positives must be < N={N} (negative = no positive), "
                                     f"got max {int(positives.max())}")


# ------------------------------------------------------------------------------------------- kernels
def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


#: cpu backend: the (rows, N) logits buffers of a chunk hold at most about this many elements per
#: element of the inputs ((M + N) D): extra memory stays O((M + N) D), never O(M N).
_CPU_BUFFER_PER_INPUT = 1.0
_CPU_MIN_BUFFER = 1 << 16


def _cpu_rows(M: int, N: int, D: int, soft: bool) -> int:
    budget = max(int(_CPU_BUFFER_PER_INPUT * (M + N) * D), _CPU_MIN_BUFFER)
    return max(1, min(max(M, 1), budget // (max(N, 1) * (2 if soft else 1))))


def _cpu_chunks(query, keys, scale, sq, idx, mask, alpha, eps, loss, lse, lse_m, grad):
    """Yields (r0, n, G) per chunk of queries after the C++ row pass: G (n, N) is the logit gradient
    p - t of the chunk (when ``grad``), in a buffer reused by the next chunk. Fills loss, lse, lse_m."""
    M, D = query.shape
    N = keys.shape[0]
    C, code = _ext.ext(), _ext.dtype_code(query.dtype)
    rows = _cpu_rows(M, N, D, sq is not None)
    sc = float(scale)
    kt = keys.t()
    buf = torch.empty((rows, N), dtype=query.dtype)
    bufm = torch.empty((rows, N), dtype=query.dtype) if sq is not None else None
    qs = query * sc
    qms = sq * sc if sq is not None else None
    for r0 in range(0, M, rows):
        n = min(rows, M - r0)
        z = torch.mm(qs[r0:r0 + n], kt, out=buf[:n])
        zm = torch.mm(qms[r0:r0 + n], kt, out=bufm[:n]) if qms is not None else None
        C.info_nce_rows_cpu(code, z.data_ptr(), ptr(zm), idx[r0:].data_ptr() if mask is None else 0,
                            mask[r0:].data_ptr() if mask is not None else 0, n, N, float(alpha), float(eps),
                            loss[r0:].data_ptr(), lse[r0:].data_ptr(), lse_m[r0:].data_ptr() if zm is not None else 0,
                            grad)
        yield r0, n, z


def _kernel_inputs(query, keys, soft_query, mask, alpha):
    """Contiguous (query, keys, soft queries or None when unused, mask or None) and the accumulation dtype."""
    soft = soft_query is not None and alpha > 0.0
    return (query.contiguous(), keys.contiguous(), soft_query.contiguous() if soft else None,
            mask.contiguous() if mask is not None else None, acc_dtype(query.dtype))


@torch.library.custom_op("gkcore::info_nce_fwd", mutates_args=())
def _info_nce_fwd(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor,
                  mask: Optional[torch.Tensor], soft_query: Optional[torch.Tensor], alpha: float, eps: float,
                  fuse_dq: bool, fuse_dk: bool,
                  impl: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (loss (M,), lse (M,), soft lse (M,) or (0,), A (M, D) or (0,), C1 (N, D) or (0,)) in the
    accumulation dtype.

    ``idx`` (M,) int64 positive index per row (negative: none) or (0,) when ``mask`` (M, N) bool is given.
    ``A`` is computed only with ``fuse_dq`` and ``C1 = sum_i (p_ij - t_ij) q_i`` (C for a unit upstream
    gradient) only with ``fuse_dk`` (cpu backend)."""
    query, keys, sq, mask, acc = _kernel_inputs(query, keys, soft_query, mask, alpha)
    (M, D), N, dev, soft = query.shape, keys.shape[0], query.device, sq is not None
    idx = idx.contiguous()
    loss = new_output((M,), dtype=acc, device=dev)
    lse = new_output((M,), dtype=acc, device=dev)
    lse_m = new_output((M,), dtype=acc, device=dev) if soft else _empty(query, acc)
    A = new_output((M, D), dtype=acc, device=dev) if fuse_dq else _empty(query, acc)
    C1 = new_output((N, D), dtype=acc, device=dev) if fuse_dk else _empty(query, acc)
    if M == 0:
        return loss, lse, lse_m, A, C1.zero_()
    if impl == "cpu":
        first = True
        for r0, n, G in _cpu_chunks(query, keys, scale, sq, idx, mask.view(torch.uint8) if mask is not None else None,
                                    alpha, eps, loss, lse, lse_m, fuse_dq or fuse_dk):
            if fuse_dq:
                torch.mm(G, keys, out=A[r0:r0 + n])
            if fuse_dk:
                if first:
                    torch.mm(G.t(), query[r0:r0 + n], out=C1)
                else:
                    C1.addmm_(G.t(), query[r0:r0 + n])
            first = False
    elif impl == "triton":
        from gkcore.kernels.info_nce import info_nce_forward

        info_nce_forward(query, keys, sq, idx if mask is None else None, mask, scale, float(alpha), float(eps),
                         loss, lse, lse_m if soft else None)
    else:
        raise ValueError(f"unknown info_nce implementation {impl!r}")
    return loss, lse, lse_m, A, C1


@_info_nce_fwd.register_fake
def _(query, keys, scale, idx, mask, soft_query, alpha, eps, fuse_dq, fuse_dk, impl):
    M, D = query.shape
    N = keys.shape[0]
    acc = acc_dtype(query.dtype)
    soft = soft_query is not None and alpha > 0.0
    return (query.new_empty((M,), dtype=acc), query.new_empty((M,), dtype=acc),
            query.new_empty((M,) if soft else (0,), dtype=acc), query.new_empty((M, D) if fuse_dq else (0,), dtype=acc),
            query.new_empty((N, D) if fuse_dk else (0,), dtype=acc))


@torch.library.custom_op("gkcore::info_nce_bwd", mutates_args=())
def _info_nce_bwd(g: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor,
                  mask: Optional[torch.Tensor], soft_query: Optional[torch.Tensor], lse: torch.Tensor,
                  lse_m: torch.Tensor, alpha: float, eps: float, need_a: bool, need_c: bool,
                  impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A (M, D), C (N, D)) in the accumulation dtype (see the module docstring); one not needed comes back
    as an empty (0,) tensor. ``g`` (M,) is the upstream gradient per row, 0 at rows without a positive."""
    query, keys, sq, mask, acc = _kernel_inputs(query, keys, soft_query, mask, alpha)
    (M, D), N, dev, soft = query.shape, keys.shape[0], query.device, sq is not None
    g = g.to(acc).contiguous()
    lse, lse_m = lse.contiguous(), lse_m.contiguous()
    A = new_output((M, D), dtype=acc, device=dev) if need_a else None
    C = new_output((N, D), dtype=acc, device=dev) if need_c else None
    if M == 0:
        return (A if A is not None else _empty(query, acc), C.zero_() if C is not None else _empty(query, acc))
    if impl == "cpu":
        # recompute each chunk's logits and logit gradient (the recompute's loss / lse are scratch)
        scratch = [torch.empty((M,), dtype=acc) for _ in range(3)]
        gq = query * g[:, None].to(query.dtype) if need_c else None
        first = True
        for r0, n, G in _cpu_chunks(query, keys, scale, sq, idx, mask.view(torch.uint8) if mask is not None else None,
                                    alpha, eps, *scratch, True):
            if A is not None:
                torch.mm(G, keys, out=A[r0:r0 + n])
            if C is not None:
                if first:
                    torch.mm(G.t(), gq[r0:r0 + n], out=C)
                else:
                    C.addmm_(G.t(), gq[r0:r0 + n])
            first = False
    elif impl == "triton":
        from gkcore.kernels.info_nce import info_nce_backward

        info_nce_backward(query, keys, sq, idx if mask is None else None, mask, scale, float(alpha), float(eps),
                          lse, lse_m if soft else None, g, A, C)
    else:
        raise ValueError(f"unknown info_nce implementation {impl!r}")
    return (A if A is not None else _empty(query, acc), C if C is not None else _empty(query, acc))


@_info_nce_bwd.register_fake
def _(g, query, keys, scale, idx, mask, soft_query, lse, lse_m, alpha, eps, need_a, need_c, impl):
    M, D = query.shape
    N = keys.shape[0]
    acc = acc_dtype(query.dtype)
    return (query.new_empty((M, D) if need_a else (0,), dtype=acc),
            query.new_empty((N, D) if need_c else (0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    query, keys, scale, idx, mask, soft_query, alpha, eps, fuse_dq, fuse_dk, impl = inputs
    _, lse, lse_m, A, C1 = output
    ctx.save_for_backward(query, keys, scale, idx, mask, soft_query, lse, lse_m, A, C1)
    ctx.meta = (alpha, eps, fuse_dq, fuse_dk, impl)


def _backward(ctx, grad_loss, grad_lse, grad_lse_m, grad_A, grad_C1):
    query, keys, scale, idx, mask, soft_query, lse, lse_m, A, C1 = ctx.saved_tensors
    alpha, eps, fuse_dq, fuse_dk, impl = ctx.meta
    need_q, need_k, need_s = (bool(ctx.needs_input_grad[i]) for i in range(3))
    if grad_loss is None or not (need_q or need_k or need_s):
        return (None,) * 11
    acc = grad_loss.dtype
    valid = mask.any(dim=1) if mask is not None else idx >= 0
    g = torch.where(valid, grad_loss, torch.zeros((), dtype=acc, device=grad_loss.device))
    C = None
    if need_k and fuse_dk:
        # C1 is the key gradient for a unit upstream gradient: it serves when every row that has a positive
        # gets the same upstream gradient (a 'mean' or 'sum' loss), otherwise recompute
        gv = g[valid]
        if gv.numel() == 0:
            C = torch.zeros_like(C1)
        elif bool((gv == gv[0]).all()):
            C = C1 * gv[0]
    need_a = (need_q or need_s) and not fuse_dq
    need_c = need_k and C is None
    if need_a or need_c:
        A2, C2 = _info_nce_bwd(g, query, keys, scale, idx, mask, soft_query, lse, lse_m, alpha, eps, need_a, need_c,
                               impl)
        if need_a:
            A = A2
        if need_c:
            C = C2
    sc = scale.detach().to(acc)
    dq = dk = ds = None
    if need_q:
        dq = (A * (g * sc).unsqueeze(1)).to(query.dtype)
    if need_s:
        ds = torch.linalg.vecdot(A, query.to(acc)).mul(g).sum().to(scale.dtype).reshape(scale.shape)
    if need_k:
        dk = (C * sc).to(keys.dtype)
    return (dq, dk, ds) + (None,) * 8


_info_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ backends
def _targets(query, positives):
    """(idx (M,) int64 or (0,), mask (M, N) bool or None, valid (M,) bool)."""
    M = query.shape[0]
    if positives is None:
        idx = torch.arange(M, device=query.device, dtype=torch.int64)
        return idx, None, torch.ones(M, dtype=torch.bool, device=query.device)
    if positives.dtype == torch.bool:
        return torch.empty(0, dtype=torch.int64, device=query.device), positives, positives.any(dim=1)
    idx = positives.to(torch.int64)
    return idx, None, idx >= 0


def _kernel_fn(impl: str):
    def run(query, keys, scale, positives, soft_query, alpha, eps, reduction):
        dt = query.dtype
        acc = acc_dtype(dt)
        idx, mask, valid = _targets(query, positives)
        if isinstance(scale, torch.Tensor):
            scale_t = scale.reshape(())
        else:
            scale_t = torch.tensor(float(scale), dtype=acc, device=query.device)
        sq = soft_query if alpha > 0.0 else None
        grad_on = torch.is_grad_enabled()
        # cpu: contract the gradient rows in the forward, from the same logits chunks (no recompute in the
        # backward): the query side whenever the query or the scale needs a gradient and the key side for a
        # scalar loss (one upstream gradient for every row) whose keys need one
        cpu_grad = impl == "cpu" and grad_on and not is_compiling()
        fuse_dq = cpu_grad and (query.requires_grad or scale_t.requires_grad)
        fuse_dk = cpu_grad and keys.requires_grad and reduction != "none"
        loss = _info_nce_fwd(query, keys, scale_t, idx, mask, sq, float(alpha), float(eps), fuse_dq, fuse_dk, impl)[0]
        if reduction == "none":
            return loss.to(dt)
        total = loss.sum()
        if reduction == "sum":
            return total.to(dt)
        return (total / valid.sum().clamp(min=1).to(acc)).to(dt)

    return run


def _reference(query, keys, scale, positives, soft_query, alpha, eps, reduction):
    return info_nce_reference(query, keys, scale=scale, positives=positives, soft_query=soft_query, alpha=alpha,
                              label_smoothing=eps, reduction=reduction)


def _triton_check(inputs):
    D = inputs["query"].shape[1]
    if D > 1024:
        return [f"D={D} > 1024 (the kernels hold a full feature row per tile)"]
    try:
        import gkcore.kernels.info_nce  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return [f"gkcore.kernels.info_nce could not be imported: {e}"]
    return []


_tri_dev, _tri_explicit = _triton.triton_devices()
OP.register(Backend("triton", _kernel_fn("triton"), devices=_tri_dev, explicit_only_devices=_tri_explicit,
                    dtypes=(torch.float32, torch.float16, torch.bfloat16), dtype_args=("query",),
                    availability=_triton.triton_unavailable, check=_triton_check))
OP.register(Backend("cpu", _kernel_fn("cpu"), devices=("cpu",), dtypes=(torch.float32, torch.float64),
                    dtype_args=("query",), availability=_ext.cpu_unavailable, check=_ext.built_with("info_nce_rows_cpu", "info_nce")))
OP.register(Backend("reference", _reference, devices=("cpu", "cuda"), dtype_args=("query",)))


# ------------------------------------------------------------------------------------------ public
def info_nce(query: torch.Tensor, keys: torch.Tensor, *, scale: Union[float, torch.Tensor],
             positives: Optional[torch.Tensor] = None, soft_query: Optional[torch.Tensor] = None,
             alpha: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
             backend: Optional[str] = None) -> torch.Tensor:
    """InfoNCE (contrastive cross-entropy) of ``query`` rows against ``keys`` without the (M, N) logits.

    With ``s_ij = scale <q_i, k_j>``, hard targets ``y`` (from ``positives``), soft targets
    ``p^m_ij = softmax_j(scale <soft_query_i, k_j>)`` (no gradient) and ``eps = label_smoothing``::

        t_ij   = (1 - eps) ((1 - alpha) y_ij + alpha p^m_ij) + eps / N
        loss_i = -sum_j t_ij log softmax_j(s_i)

    The ``triton`` and ``cpu`` backends keep an online log-sum-exp per row over key tiles and recompute
    tiles in the backward: extra memory O((M + N) D), never O(M N).

    Args:
        query: (M, D) floating (e.g. L2-normalised image features); gets a gradient.
        keys: (N, D), same dtype and device; may hold a feature queue after the in-batch keys. Gets a
            gradient only when it requires grad (a queue tensor without grad gets none).
        scale: Python float or 0-d tensor multiplying the dot products (``logit_scale.exp()`` or
            ``1 / temperature``); a tensor that requires grad gets a gradient.
        positives: ``None``: key i is the positive of query i (needs N >= M); (M,) integer: the index of
            each row's positive, a negative value meaning "no positive"; (M, N) bool: several positives
            per row, ``y_ij = mask_ij / sum_j mask_ij``.
        soft_query: (M, D) momentum queries for the soft targets (used only when ``alpha > 0``).
        alpha: weight of the soft targets, in [0, 1].
        label_smoothing: eps in [0, 1] with ``F.cross_entropy``'s meaning, applied to the mixed target.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        backend: ``None`` (automatic), ``'triton'``, ``'cpu'`` or ``'reference'``.

    **Rows with no positive** (negative index, all-False mask row) get loss 0 and no gradient, and are
    left out of the mean: ``'mean'`` divides by the number of rows that have a positive (at least 1, so a
    batch without any positive gives 0).

    **Non-finite inputs** (every backend): a row with a positive whose query or soft-query row holds a
    NaN or an inf, or every such row when any key does, has loss NaN (so ``'mean'``/``'sum'`` are NaN);
    gradients are then unspecified. A tensor ``scale`` is read on the host to check that it is finite
    (one synchronisation on a GPU; not while ``torch.compile`` traces).

    Returns:
        0-d loss (``'mean'``, ``'sum'``) or (M,) per-row losses (``'none'``), in ``query``'s dtype
        (accumulated in float32, float64 for float64 inputs).
    """
    validate(query, keys, scale, positives, soft_query, alpha, label_smoothing, reduction)
    if alpha == 0.0:
        soft_query = None
    inputs = {"query": query, "keys": keys, "soft_query": soft_query, "positives": positives,
              "scale": scale if isinstance(scale, torch.Tensor) else None}
    be = OP.select(inputs, backend)
    out = be.fn(query, keys, scale, positives, soft_query, float(alpha), float(label_smoothing), reduction)
    return nan_where(out, _nonfinite_rows(query, keys, positives, soft_query), reduction)


def _nonfinite_rows(query, keys, positives, soft_query) -> torch.Tensor:
    """(M,) bool, the rows the non-finite rule sets to NaN: a row that has a positive and whose query
    (or soft query) row, or any key, holds a NaN or an inf. No host synchronisation."""
    bad = nonfinite_rows(query) | any_nonfinite(keys)
    if soft_query is not None:
        bad = bad | nonfinite_rows(soft_query)
    _, _, valid = _targets(query, positives)
    return bad & valid
