"""benchmarks/perf_model.py: the FLOP and byte counts on shapes worked out by hand, the floor arithmetic,
the peaks table and the benchmark annotation."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

import perf_model as pm  # noqa: E402


def test_info_nce_counts_by_hand():
    # M = 2 queries, N = 3 keys, D = 4, fp32, hard labels. Forward: logits 2*2*3*4 = 48 FLOPs; bytes: q 2*4*4
    # = 32, k 3*4*4 = 48, labels 2*8 = 16, loss 2*4 = 8, lse 2*4 = 8 -> 112.
    f = pm.info_nce("forward", B=2, N=3, D=4, dtype="float32")
    assert f.matmul_flops == 48 and f.vector_flops == 0
    assert f.bytes == 32 + 48 + 16 + 8 + 8
    # backward, queue keys (no key grad): dQ 48 FLOPs; bytes: q, k, labels, lse read (32 + 48 + 16 + 8), dQ
    # written (32) -> 136
    b = pm.info_nce("backward", B=2, N=3, D=4, dtype="float32")
    assert b.matmul_flops == 48 and b.bytes == 136
    full = pm.info_nce("full", B=2, N=3, D=4, dtype="float32")
    assert full.flops == 96 and full.bytes == 112 + 136
    # keys with a gradient: dK adds 48 FLOPs and its 48-byte write
    kb = pm.info_nce("backward", B=2, N=3, D=4, dtype="float32", keys_grad=True)
    assert kb.matmul_flops == 96 and kb.bytes == 136 + 48
    # soft targets (alpha > 0): the momentum logits double the forward products and add the momentum
    # queries (32 bytes) and their lse (8 bytes)
    s = pm.info_nce("forward", B=2, N=3, D=4, dtype="float32", alpha=0.4)
    assert s.matmul_flops == 96 and s.bytes == 112 + 32 + 8


def test_info_nce_design_shape():
    # the ITC shape of docs/performance.md: B = 1024 against 1024 + 65536 keys, D = 256: one logits product is 2 * 1024 * 66560 * 256
    one = 2 * 1024 * 66560 * 256
    assert one == 34_896_609_280
    w = pm.info_nce("full", B=1024, N=66560, D=256, dtype="bfloat16", alpha=0.4)
    assert w.matmul_flops == 3 * one  # forward: logits + momentum logits; backward: dQ
    # bf16 on an H200 (790 TFLOP/s, 4.3 TB/s): compute-bound, 105 GFLOP -> 0.13 ms
    f = pm.floor(w, pm.gpu_peaks("NVIDIA H200"), "bfloat16")
    assert f["bound"] == "compute"
    assert f["floor_s"] == pytest.approx(3 * one / 790e12)


def test_linear_cross_entropy_counts_by_hand():
    # T = 4 tokens of which 1 ignored (Te = 3), V = 5, D = 2, bf16, bias.
    f = pm.linear_cross_entropy("forward", T=4, V=5, D=2, dtype="bfloat16", bias=True, ignored=0.25)
    assert f.matmul_flops == 2 * 3 * 5 * 2  # 60
    # hidden rows 3*2*2 = 12, weight 5*2*2 = 20, bias 5*2 = 10, targets 4*8 = 32, loss 4 -> 78
    assert f.bytes == 78
    b = pm.linear_cross_entropy("backward", T=4, V=5, D=2, dtype="bfloat16", bias=True, ignored=0.25)
    assert b.matmul_flops == 120  # dH and dW
    # reads 12 + 20 + 10 + 32, writes dH 4*2*2 = 16, dW 20, db 10 -> 120
    assert b.bytes == 120
    # the LM-head shape of docs/performance.md, without ignored tokens: 2 * 8192 * 31090 * 768 per product, three products
    w = pm.linear_cross_entropy("full", T=8192, V=31090, D=768, dtype="float32")
    assert w.matmul_flops == 3 * 2 * 8192 * 31090 * 768


def test_region_pool_counts_by_hand():
    # B = 1, 2x3 grid, C = 4, R = 2, output 1, sampling 2: 16 taps x 2 FLOPs per output channel -> 2*16*1*2*1*4
    f = pm.region_pool("forward", B=1, grid="2x3", C=4, R=2, output_size=1, dtype="float32")
    assert f.vector_flops == 256 and f.matmul_flops == 0
    # tokens 1*6*4*4 = 96, boxes 2*4*4 = 32, output 1*2*4*4 = 32
    assert f.bytes == 160
    # output 7, not reduced: 49 bins per box, the (1, 2, 7, 7, 4) output written
    f7 = pm.region_pool("forward", B=1, grid=(2, 3), C=4, R=2, output_size=7, reduce=False, dtype="float32")
    assert f7.vector_flops == 256 * 49 and f7.bytes == 96 + 32 + 2 * 49 * 4 * 4
    assert pm.region_pool("full", B=1, grid=6, C=4, R=2).flops == 512


def test_region_attention_counts_by_hand():
    # B = 1, H = 1, P = 2 queries, R = 1 region + N = 4 patches (2x2) = 5 keys, d = 2, fp32
    w = pm.region_attention("forward", B=1, P=2, R=1, grid="2x2", heads=1, head_dim=2, dtype="float32")
    assert w.matmul_flops == 4 * 1 * 1 * 2 * 5 * 2  # scores and values: 80
    assert w.vector_flops == 2 * 16 * 1 * 1 * 2 * 2  # RoIAlign of k and v (C = H d = 2): 128
    # q 16 + k 32 + v 32 + out 16 bytes, boxes 16 + mask 1, lse 2 * 4
    assert w.bytes == 16 + 32 + 32 + 16 + 16 + 1 + 8
    b = pm.region_attention("backward", B=1, P=2, R=1, grid="2x2", heads=1, head_dim=2, dtype="float32")
    assert b.matmul_flops == 160
    # without the patches only the region is attended: L = 1
    r = pm.region_attention("forward", B=1, P=2, R=1, grid="2x2", heads=1, head_dim=2, attend_patches=False)
    assert r.matmul_flops == 16


def test_clip_and_itc_and_negatives():
    c = pm.clip_loss("full", B=3, D=2, dtype="float32")
    assert c.matmul_flops == 2 * 9 * 2 + 4 * 9 * 2
    itc = pm.itc_loss("forward", B=2, queue=5, D=4, dtype="float32", alpha=0.4)
    assert itc.matmul_flops == 2 * pm.info_nce("forward", B=2, N=7, D=4, alpha=0.4).matmul_flops
    n = pm.sample_hard_negatives("forward", B=3, D=2, dtype="float32")
    assert n.matmul_flops == 36 and n.bytes == 2 * 3 * 2 * 4 + 2 * 8 * 3
    with pytest.raises(ValueError, match="no backward"):
        pm.sample_hard_negatives("full", B=3, D=2)
    assert pm.work("loader", {"files": 4}, "forward") is None


def test_floor_picks_the_larger_term_and_the_dtype_rate():
    peaks = pm.Peaks("test", {"float32": 1e9, "bfloat16": 4e9}, vector=2e9, memory=1e9, source="test")
    w = pm.Work(matmul_flops=4e9, vector_flops=2e9, bytes=1e9)
    f32 = pm.floor(w, peaks, "float32")
    assert f32["compute_s"] == pytest.approx(4 + 1) and f32["memory_s"] == pytest.approx(1)
    assert f32["floor_s"] == pytest.approx(5) and f32["bound"] == "compute"
    bf = pm.floor(pm.Work(matmul_flops=4e9, bytes=3e9), peaks, "bfloat16")
    assert bf["floor_s"] == pytest.approx(3) and bf["bound"] == "memory"
    assert peaks.matmul_rate("float16") == 1e9  # no fp16 entry: the fp32 rate


def test_gpu_peaks_table():
    h200 = pm.gpu_peaks("NVIDIA H200")
    assert h200.matmul["bfloat16"] == 790e12 and h200.memory == 4.3e12 and "measured" in h200.source
    h100 = pm.gpu_peaks("NVIDIA H100 80GB HBM3")
    assert h100.matmul["bfloat16"] == pytest.approx(989e12) and "datasheet" in h100.source
    assert pm.gpu_peaks("NVIDIA H100 PCIe").memory == 2.0e12
    assert pm.gpu_peaks("Some Other GPU") is None
    assert pm.Peaks.from_dict(h200.to_dict()) == h200


def test_cpu_probe_and_annotation(monkeypatch, tmp_path):
    p = pm.probe_cpu(budget_s=0.05)
    assert p.matmul["float32"] > 1e8 and p.memory > 1e8 and p.measured["matmul_fp64"] > 1e7
    # the benchmark annotation reads shared peaks when the GPU check hands them over
    f = tmp_path / "peaks.json"
    fake = pm.Peaks("cpu (test)", {"float32": 1e10, "float64": 5e9}, 1e10, 1e10, "test file")
    f.write_text(__import__("json").dumps({"cpu": fake.to_dict()}))
    monkeypatch.setenv("GKCORE_PEAKS_FILE", str(f))
    monkeypatch.setattr(pm, "_CACHE", {})
    a = pm.annotate("info_nce", {"B": 2, "N": 3, "D": 4, "alpha": 0.0, "dtype": "float32"}, "forward",
                    torch.device("cpu"))
    assert a["flops"] == 48 and a["bytes"] == 112
    assert a["floor_s"] == pytest.approx(112 / 1e10) and a["floor_bound"] == "memory"
    assert a["peaks"]["source"] == "test file"
    assert pm.annotate("loader", {}, "forward", torch.device("cpu")) is None
    assert pm.ratio(2e-3, 1e-3) == pytest.approx(2.0) and pm.ratio(None, 1.0) is None


def test_gk_mvlp_step_is_in_the_expected_range():
    # ViT-B/16 forward at batch 64 alone is ~2.2 TFLOP; the whole step lands in the tens of TFLOP
    vit_fwd = 12 * 64 * 197 * (2 * (4 * 768 ** 2 + 2 * 768 * 3072) + 4 * 197 * 768)
    w = pm.gk_mvlp_step(B=64)
    assert 2.0e12 < vit_fwd < 2.4e12
    assert 15e12 < w.flops < 40e12
    assert pm.gk_mvlp_step(B=32).flops == pytest.approx(w.flops / 2, rel=1e-9)


def test_bench_summary_keeps_times_speedup_and_profile():
    from gkcore.cli.bench import summarise

    prof = [{"op": "aten::mm", "self_ms": 700.0, "share": 0.3, "calls": 134}]

    def case(provider, median, **extra):
        return {"name": f"test_x[{provider}]", "fullname": f"t::test_x[{provider}]",
                "stats": {"median": median, "min": median, "mean": median, "rounds": 2, "data": [median, median]},
                "extra_info": {"op": "train_step", "provider": provider, "mode": "full", "shape": {"B": 16},
                               "peak_bytes": 10, **extra}}

    rows = {r["provider"]: r for r in summarise({"benchmarks": [case("reference", 3.0),
                                                                 case("auto", 2.0, profile=prof)]})}
    assert rows["auto"]["speedup_vs_reference"] == pytest.approx(1.5)
    assert rows["auto"]["profile"] == prof and "profile" not in rows["reference"]
    assert rows["reference"]["times_s"] == [3.0, 3.0]
