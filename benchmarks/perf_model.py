"""Performance model: for each op and shape, the work it must do and the floor that implies on a machine.

For every benchmarked op, :func:`work` returns a :class:`Work` (FLOPs on the matrix units, FLOPs on the
vector units, bytes through main memory) for one call in a mode (``forward``, ``backward``, ``full`` =
forward + backward), from the shape dict the benchmark records. :func:`floor` turns a Work into the
time no implementation can beat on a machine with the given :class:`Peaks`::

    compute_s = matmul_flops / matmul_rate(dtype) + vector_flops / vector_rate
    memory_s  = bytes / memory_bandwidth
    floor_s   = max(compute_s, memory_s)            bound = whichever is larger

and ``ratio = measured time / floor_s`` says how far a measurement is from that limit.

Counting conventions (every op below follows them):

* A multiply-add is 2 FLOPs. Only the products that dominate are counted (matrix products, the
  bilinear taps of RoIAlign); softmax, exp, log and other O(rows x cols) element work are left out of
  ``flops`` (``transcendentals`` counts the exps for information; they do not enter the floor).
* Bytes are the compulsory traffic: every input read once and every output written once, in its
  dtype, per pass. ``full`` is the forward pass plus the backward pass, each counted on its own (the
  backward re-reads its inputs: in training the two passes are separated by the rest of the network),
  so ``full = forward + backward`` for FLOPs and bytes alike.
* The backward counts the gradient products only (one product per differentiable operand), never a
  recomputation of the forward: a fused kernel that recomputes its logits tile by tile instead of
  storing them (our info_nce, linear_cross_entropy and region_attention kernels do, to stay within
  O(rows x D) memory) does more work than the floor, so its best possible ratio is above 1 (about
  4/3 for linear_cross_entropy's full pass).
* Grad-free inputs (the ITC queue, momentum features, boxes, targets) get no gradient product and no
  gradient write.

Machine peaks (:func:`gpu_peaks`, :func:`probe_cpu`, :func:`probe_gpu`):

* NVIDIA H200: measured on this workplace's H200 machines (the device notes, KINDS.md: an
  8192x8192x8192 bf16 product ran at 769-798 TFLOP/s on random data; a device-to-device copy moved
  about 4.3 TB/s, bytes read plus written); fp32 and fp64 rates from NVIDIA's H100 SXM datasheet,
  which applies to the H200 (same chip): not measured here.
* NVIDIA H100 (SXM, PCIe, NVL): NVIDIA's datasheet figures (dense, no sparsity), not measured.
* Any other GPU: :func:`probe_gpu` (a bf16 and an fp32 product and a copy, well under a second).
* The CPU: :func:`probe_cpu`, run at the start of a benchmark run (about a second): the fp32 and fp64
  matrix product rate through torch's BLAS and the copy bandwidth (bytes read plus written). bf16 and
  fp16 work on the CPU is rated at the measured fp32 rate.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

__all__ = ["Work", "Peaks", "work", "floor", "annotate", "gpu_peaks", "probe_cpu", "probe_gpu", "peaks_for",
           "dtype_bytes", "gk_mvlp_step", "OPS"]

MODES = ("forward", "backward", "full")
_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "bool": 1}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype given as a torch dtype or its name ("bfloat16", "torch.float32")."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return _DTYPE_BYTES[name]


@dataclass
class Work:
    """What one call must do: FLOPs on the matrix units, FLOPs on the vector units, bytes moved."""
    matmul_flops: float = 0.0
    vector_flops: float = 0.0
    bytes: float = 0.0
    transcendentals: float = 0.0  # exps and logs, for information only
    note: str = ""

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.vector_flops

    def __add__(self, other: "Work") -> "Work":
        note = "; ".join(n for n in (self.note, other.note) if n)
        return Work(self.matmul_flops + other.matmul_flops, self.vector_flops + other.vector_flops,
                    self.bytes + other.bytes, self.transcendentals + other.transcendentals, note)

    def scaled(self, k: float) -> "Work":
        return Work(self.matmul_flops * k, self.vector_flops * k, self.bytes * k, self.transcendentals * k, self.note)


def _pick(mode: str, fwd: Work, bwd: Work) -> Work:
    if mode == "forward":
        return fwd
    if mode == "backward":
        return bwd
    if mode == "full":
        return fwd + bwd
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


# ------------------------------------------------------------------------------------------ the ops
def info_nce(mode: str, *, B: int, N: int, D: int, dtype: str = "float32", alpha: float = 0.0,
             keys_grad: bool = False, **_: Any) -> Work:
    """InfoNCE of M = B queries (M, D) against N keys (N, D), hard labels by index, soft targets from
    momentum queries (M, D) when ``alpha > 0``.

    forward:  logits ``2 M N D``; with soft targets the momentum logits ``2 M N D`` more. Bytes: the
              queries, keys (and momentum queries) once, the (M,) labels (int64), the loss and the
              per-row log-sum-exps kept for the backward (fp32, one or two per row).
    backward: dQ = (P - T) K: ``2 M N D``; dK = (P - T)^T Q: ``2 M N D`` only when the keys get a gradient
              (not for a queue). Bytes: queries, keys, momentum queries and labels read again, the saved
              log-sum-exps read, dQ written (dK too with ``keys_grad``). The scale's gradient is an O(M N)
              reduction, not counted.
    """
    M = B
    s = dtype_bytes(dtype)
    soft = alpha > 0
    nq = 2 if soft else 1
    stats = 4 * M * nq
    fwd = Work(matmul_flops=2.0 * M * N * D * nq, bytes=s * D * (M * nq + N) + 8 * M + 4 * M + stats,
               transcendentals=float(M * N * nq))
    bwd_flops = 2.0 * M * N * D * (2 if keys_grad else 1)
    bwd_bytes = s * D * (M * nq + N) + 8 * M + stats + s * M * D + (s * N * D if keys_grad else 0)
    bwd = Work(matmul_flops=bwd_flops, bytes=bwd_bytes, transcendentals=float(M * N * nq))
    return _pick(mode, fwd, bwd)


def itc_loss(mode: str, *, B: int, queue: int, D: int, dtype: str = "float32", alpha: float = 0.4, **_: Any) -> Work:
    """ALBEF's ITC with queues: two info_nce directions (image -> [text momentum; text queue] and text ->
    [image momentum; image queue]), each with M = B queries with a gradient and N = B + queue grad-free keys."""
    one = info_nce(mode, B=B, N=B + queue, D=D, dtype=dtype, alpha=alpha, keys_grad=False)
    return one.scaled(2)


def clip_loss(mode: str, *, B: int, D: int, dtype: str = "float32", **_: Any) -> Work:
    """CLIP's symmetric loss over the (B, B) logits of image (B, D) and text (B, D) features.

    forward:  one logits product ``2 B^2 D`` serves both directions (row and column softmax). Bytes: both
              feature matrices read, the scalar loss written.
    backward: d image = G T: ``2 B^2 D``; d text = G^T I: ``2 B^2 D``. Bytes: both features read, both
              gradients written.
    """
    s = dtype_bytes(dtype)
    fwd = Work(matmul_flops=2.0 * B * B * D, bytes=s * 2 * B * D + 4, transcendentals=2.0 * B * B)
    bwd = Work(matmul_flops=4.0 * B * B * D, bytes=s * 4 * B * D, transcendentals=2.0 * B * B)
    return _pick(mode, fwd, bwd)


def linear_cross_entropy(mode: str, *, T: int, V: int, D: int, dtype: str = "float32", bias: bool = True,
                         ignored: float = 0.0, **_: Any) -> Work:
    """LM head + cross-entropy: hidden (T, D), weight (V, D), bias (V,), targets (T,) of which a fraction
    ``ignored`` is ``ignore_index``. Only the Te = round(T (1 - ignored)) counted tokens need logits.

    forward:  logits ``2 Te V D``. Bytes: the counted hidden rows, the weight, the bias, the targets
              (int64), the scalar loss.
    backward: dH = G W: ``2 Te V D``; dW = G^T H: ``2 Te V D`` (the bias gradient, a column sum, is not
              counted). Bytes: hidden rows, weight, bias and targets read again; dH (all T rows, zeros for
              ignored tokens), dW and db written.
    """
    s = dtype_bytes(dtype)
    Te = int(round(T * (1.0 - float(ignored))))
    nb = V if bias else 0
    fwd = Work(matmul_flops=2.0 * Te * V * D, bytes=s * (Te * D + V * D + nb) + 8 * T + 4,
               transcendentals=float(Te * V))
    bwd = Work(matmul_flops=4.0 * Te * V * D,
               bytes=s * (Te * D + V * D + nb) + 8 * T + s * (T * D + V * D + nb), transcendentals=float(Te * V))
    return _pick(mode, fwd, bwd)


def _grid(grid: Any) -> int:
    """Cells of a grid given as ``(gh, gw)``, ``"14x14"`` or an int count."""
    if isinstance(grid, str):
        a, b = re.split(r"[x,]", grid)
        return int(a) * int(b)
    if isinstance(grid, (tuple, list)):
        return int(grid[0]) * int(grid[1])
    return int(grid)


#: bilinear taps per output element of RoIAlign with sampling_ratio 2: 2 x 2 samples per bin, 4 taps each
_TAPS = 16


def region_pool(mode: str, *, B: int, grid: Any, C: int, R: int, output_size: int = 1, dtype: str = "float32",
                reduce: bool = True, sampling_ratio: int = 2, **_: Any) -> Work:
    """RoIAlign of R boxes on a (gh x gw) token grid of C channels, ``output_size^2`` bins per box with
    ``sampling_ratio^2`` bilinear samples each (4 taps per sample).

    forward:  ``2 * taps * B R S^2 C`` vector FLOPs (a multiply-add per tap and channel; taps = 4
              sampling_ratio^2 = 16). Bytes: the (B, N, C) tokens read once, the boxes, the output
              ((B, R, C) with ``reduce``, else (B, R, S, S, C)) written.
    backward: the same taps scattered: ``2 * taps * B R S^2 C``. Bytes: the upstream gradient and the
              boxes read, the (B, N, C) token gradient written.
    The taps are the direct RoIAlign work; with ``reduce`` a box's taps could be merged into one weight
    per grid cell first (at most N per box), so at large ``output_size`` a clever kernel can do fewer
    FLOPs than this count. The token bytes are a true lower bound.
    """
    s = dtype_bytes(dtype)
    N = _grid(grid)
    taps = 4 * sampling_ratio * sampling_ratio
    out_elems = B * R * C * (1 if reduce else output_size * output_size)
    flops = 2.0 * taps * B * R * output_size * output_size * C
    fwd = Work(vector_flops=flops, bytes=s * B * N * C + 4 * B * R * 4 + s * out_elems)
    bwd = Work(vector_flops=flops, bytes=s * out_elems + 4 * B * R * 4 + s * B * N * C)
    return _pick(mode, fwd, bwd)


def region_attention(mode: str, *, B: int, P: int, R: int, grid: Any, heads: int, head_dim: int,
                     attend_patches: bool = True, dtype: str = "float32", **_: Any) -> Work:
    """Queries q (B, H, P, d) attend to R region keys/values (RoIAlign, output 1, of the patch keys and
    values k, v (B, H, N, d)) and, with ``attend_patches``, to the N patch keys/values: L = R (+ N).

    forward:  pooling of k and v (vector, as :func:`region_pool` with C = H d, twice); scores
              ``2 B H P L d`` and weighted values ``2 B H P L d`` on the matrix units. Bytes: q, k, v, the
              boxes and mask read, the output (B, H, P, d) and the per-row log-sum-exp (fp32) written.
    backward: dV = A^T dO, dA = dO V^T, dQ = dS K, dK = dS^T Q: ``8 B H P L d``; the pooling backward for
              the region parts of dK and dV (vector). Bytes: q, k, v, out, dO, log-sum-exp read; dq, dk,
              dv written.
    """
    s = dtype_bytes(dtype)
    N = _grid(grid)
    H, d = heads, head_dim
    L = R + (N if attend_patches else 0)
    q_el, kv_el = B * H * P * d, B * H * N * d
    pool = 2.0 * _TAPS * B * R * H * d * 2  # k and v
    small = 4 * B * R * 4 + B * R
    fwd = Work(matmul_flops=4.0 * B * H * P * L * d, vector_flops=pool,
               bytes=s * (q_el + 2 * kv_el + q_el) + small + 4 * B * H * P, transcendentals=float(B * H * P * L))
    bwd = Work(matmul_flops=8.0 * B * H * P * L * d, vector_flops=pool,
               bytes=s * (q_el + 2 * kv_el + 2 * q_el) + small + 4 * B * H * P + s * (q_el + 2 * kv_el),
               transcendentals=float(B * H * P * L))
    return _pick(mode, fwd, bwd)


def sample_hard_negatives(mode: str, *, B: int, D: int, dtype: str = "float32", **_: Any) -> Work:
    """ITM hard negatives: similarities ``2 B^2 D`` (one product serves both directions), then one draw
    per row and per column from the softmax over the negatives (B^2 exps per direction, not counted).
    Bytes: both (B, D) feature matrices read, two (B,) int64 index vectors written. No backward."""
    if mode != "forward":
        raise ValueError("sample_hard_negatives has no backward")
    s = dtype_bytes(dtype)
    return Work(matmul_flops=2.0 * B * B * D, bytes=s * 2 * B * D + 2 * 8 * B, transcendentals=2.0 * B * B)


#: op name (as the benchmarks record it) -> model function
OPS: Dict[str, Callable[..., Work]] = {
    "info_nce": info_nce, "itc_loss": itc_loss, "clip_loss": clip_loss,
    "linear_cross_entropy": linear_cross_entropy, "region_pool": region_pool,
    "region_attention": region_attention, "sample_hard_negatives": sample_hard_negatives,
}


def work(op: str, shape: Mapping[str, Any], mode: str) -> Optional[Work]:
    """The Work of one call of ``op`` at ``shape`` (the benchmark's shape dict) in ``mode``; None for an op
    without a model (the loader, the synthetic renderer)."""
    fn = OPS.get(op)
    if fn is None:
        return None
    return fn(mode, **dict(shape))


# ------------------------------------------------------------------------------------- the training step
def gk_mvlp_step(B: int = 64, L: int = 128, image_tokens: int = 197, width: int = 768, ffn: int = 3072,
                 vit_depth: int = 12, text_layers: int = 6, fusion_layers: int = 6, decoder_layers: int = 12,
                 vocab: int = 31090, gk_depth: int = 2, entities: int = 56, regions: int = 29) -> Work:
    """A coarse FLOP count of one pre-training step of ``gk_mvlp_base`` (ViT-B/16 at 224 px, a BERT-base
    report encoder split 6 text + 6 fusion layers, a 12-layer decoder, batch B, reports padded to L).

    Per token and transformer layer: ``2 (4 w^2 + 2 w f)`` FLOPs of projections and MLP plus ``4 S w`` of
    attention over S keys; a cross-attention layer adds ``4 w^2`` per query token, ``4 w^2`` per memory
    token (its key/value projections) and ``4 S_mem w``. Trained towers cost 3x their forward (forward +
    two gradient products), the momentum image and text encoders 1x. The ITM fusion runs on 3B pairs
    (positives + two kinds of negatives); the LM head on B (L - 1) tokens; the GK module (queries = the
    entity prompts over regions + patches) is small and counted like the decoder's cross-attention.
    Element work (norms, softmax, GELU) is left out. Bytes are not modelled (the step is compute-bound).
    """
    w, f = width, ffn

    def layer(tokens, keys):
        return tokens * (2 * (4 * w * w + 2 * w * f) + 4 * keys * w)

    def cross(tokens, mem_tokens, seqs):
        return tokens * (4 * w * w + 4 * mem_tokens * w) + seqs * mem_tokens * 4 * w * w

    vit = vit_depth * layer(B * image_tokens, image_tokens)
    text = text_layers * layer(B * L, L)
    fusion = fusion_layers * (layer(3 * B * L, L) + cross(3 * B * L, image_tokens, 3 * B))
    mem = image_tokens + entities
    decoder = decoder_layers * (layer(B * L, L) + cross(B * L, mem, B))
    gk = gk_depth * (layer(B * entities, entities) + cross(B * entities, regions + image_tokens - 1, B))
    head = 2.0 * B * (L - 1) * vocab * w
    trained = vit + text + fusion + decoder + gk + head
    momentum = vit + text
    return Work(matmul_flops=3.0 * trained + momentum,
                note="coarse: transformer projections, MLPs and attention; element work not counted")


# ------------------------------------------------------------------------------------------ peaks
@dataclass
class Peaks:
    """Rates of one machine: matrix-product FLOP/s per dtype, vector fp32 FLOP/s, memory bytes/s."""
    device: str
    matmul: Dict[str, float]
    vector: float
    memory: float
    source: str
    measured: Dict[str, float] = field(default_factory=dict)

    def matmul_rate(self, dtype: str) -> float:
        name = str(dtype).replace("torch.", "")
        return self.matmul.get(name) or self.matmul["float32"]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Peaks":
        return cls(d["device"], dict(d["matmul"]), float(d["vector"]), float(d["memory"]), d["source"],
                   dict(d.get("measured") or {}))


_H200_SRC = ("bf16/fp16 matmul 790 TFLOP/s and copy 4.3 TB/s measured on this workplace's H200 machines "
             "(device notes KINDS.md, 2026-10-28 and 2026-11-04); fp32 67 and fp64 67 TFLOP/s: NVIDIA H100 SXM "
             "datasheet (same chip), not measured")
#: (name pattern, bf16/fp16 dense matmul, fp32 (no TF32), fp64 matmul, vector fp32, memory B/s, source)
_GPU_TABLE = (
    (r"H200", 790e12, 67e12, 67e12, 67e12, 4.3e12, _H200_SRC),
    (r"H100.*PCIe", 756e12, 51e12, 51e12, 51e12, 2.0e12, "NVIDIA H100 PCIe datasheet (dense), not measured"),
    (r"H100.*NVL", 835e12, 60e12, 60e12, 60e12, 3.9e12, "NVIDIA H100 NVL datasheet (dense), not measured"),
    (r"H100", 989e12, 67e12, 67e12, 67e12, 3.35e12, "NVIDIA H100 SXM5 datasheet (dense), not measured"),
)


def gpu_peaks(name: str) -> Optional[Peaks]:
    """Known peaks of a GPU by its name (``torch.cuda.get_device_name``), or None."""
    for pat, half, f32, f64, vec, mem, src in _GPU_TABLE:
        if re.search(pat, name):
            return Peaks(name, {"bfloat16": half, "float16": half, "float32": f32, "float64": f64}, vec, mem, src)
    return None


def _rate(fn: Callable[[], Any], sync: Callable[[], None], work_units: float, budget_s: float, min_reps: int = 3):
    fn()
    sync()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return work_units / min(times)  # the best repetition: the machine's capability, not its noise


def probe_cpu(budget_s: float = 1.2) -> Peaks:
    """Measure this CPU (torch's current thread count): fp32 and fp64 matrix products (random data) and a
    large copy (bytes read + written). About ``budget_s`` seconds."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = 1024
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a64, b64 = a32.double(), b32.double()
    src = torch.randn(32 * 1024 * 1024, generator=g)  # 128 MiB: well past the caches
    dst = torch.empty_like(src)
    noop = lambda: None  # noqa: E731
    share = budget_s / 3
    f32 = _rate(lambda: torch.mm(a32, b32), noop, 2.0 * n ** 3, share)
    f64 = _rate(lambda: torch.mm(a64, b64), noop, 2.0 * n ** 3, share)
    mem = _rate(lambda: dst.copy_(src), noop, 2.0 * src.numel() * 4, share)
    threads = torch.get_num_threads()
    return Peaks(f"cpu ({threads} threads)", {"float32": f32, "float64": f64, "bfloat16": f32, "float16": f32},
                 f32, mem, f"measured at the start of this run ({threads} threads; bf16/fp16 rated at fp32)",
                 {"matmul_fp32": f32, "matmul_fp64": f64, "copy": mem})


def probe_gpu(device: Any = None, budget_s: float = 0.6) -> Dict[str, float]:
    """Measure the current GPU: an 8192^3 bf16 product and a 4096^3 fp32 product on random data, and a
    1 GiB device-to-device copy (bytes read + written). Returns FLOP/s and bytes/s."""
    import torch

    dev = torch.device(device or "cuda")
    sync = lambda: torch.cuda.synchronize(dev)  # noqa: E731
    share = budget_s / 3

    def matmul(n, dtype):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        return _rate(lambda: torch.mm(a, b), sync, 2.0 * n ** 3, share)

    def copy(numel):
        src = torch.randn(numel, device=dev)
        dst = torch.empty_like(src)
        return _rate(lambda: dst.copy_(src), sync, 2.0 * numel * 4, share)

    out: Dict[str, float] = {"matmul_bf16": matmul(8192, torch.bfloat16)}
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32, as torch's default
    try:
        out["matmul_fp32"] = matmul(4096, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    out["copy"] = copy(256 * 1024 * 1024)  # 1 GiB
    torch.cuda.empty_cache()
    return out


_CACHE: Dict[str, Peaks] = {}


def peaks_for(device: Any) -> Peaks:
    """The peaks used for floors on ``device`` (cached per process): a known GPU from the table, an unknown
    one probed; the CPU probed, or read from the JSON file named by ``GKCORE_PEAKS_FILE`` when that file
    holds a ``cpu`` entry (the GPU check probes once and shares it with its benchmark run)."""
    import torch

    dev = torch.device(device)
    key = dev.type
    if key in _CACHE:
        return _CACHE[key]
    shared = os.environ.get("GKCORE_PEAKS_FILE")
    if shared and os.path.exists(shared):
        with open(shared) as fh:
            d = json.load(fh)
        if key in d:
            _CACHE[key] = Peaks.from_dict(d[key])
            return _CACHE[key]
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        p = gpu_peaks(name)
        if p is None:
            m = probe_gpu(dev)
            p = Peaks(name, {"bfloat16": m["matmul_bf16"], "float16": m["matmul_bf16"], "float32": m["matmul_fp32"],
                             "float64": m["matmul_fp32"] / 2}, m["matmul_fp32"], m["copy"],
                      "unknown GPU: measured at the start of this run", m)
    else:
        p = probe_cpu()
    _CACHE[key] = p
    return p


def floor(w: Work, peaks: Peaks, dtype: str) -> Dict[str, Any]:
    """Floor time of ``w`` on a machine with ``peaks`` for inputs of ``dtype``: compute, memory, their max."""
    compute = w.matmul_flops / peaks.matmul_rate(dtype) + w.vector_flops / peaks.vector
    memory = w.bytes / peaks.memory
    fl = max(compute, memory)
    return {"compute_s": compute, "memory_s": memory, "floor_s": fl,
            "bound": "compute" if compute >= memory else "memory"}


def annotate(op: str, shape: Mapping[str, Any], mode: str, device: Any) -> Optional[Dict[str, Any]]:
    """The fields a benchmark record carries: flops, bytes, floor and its bound on ``device``, and where
    the peaks came from. None for an op without a model."""
    w = work(op, shape, mode)
    if w is None:
        return None
    p = peaks_for(device)
    dtype = str(shape.get("dtype", "float32"))
    f = floor(w, p, dtype)
    return {"flops": w.flops, "matmul_flops": w.matmul_flops, "vector_flops": w.vector_flops, "bytes": w.bytes,
            "floor_s": f["floor_s"], "floor_bound": f["bound"], "floor_compute_s": f["compute_s"],
            "floor_memory_s": f["memory_s"], "peaks": p.to_dict()}


def ratio(time_s: Optional[float], floor_s: Optional[float]) -> Optional[float]:
    if not time_s or not floor_s or not math.isfinite(time_s) or floor_s <= 0:
        return None
    return time_s / floor_s
