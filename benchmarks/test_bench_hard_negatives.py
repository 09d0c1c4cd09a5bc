"""sample_hard_negatives: ALBEF's per-row multinomial loop, vectorised torch.multinomial, and our
reference / cpu / triton backends side by side. B=1024, D=256 (also in quick mode: the issue's shape is
cheap on the CPU). Forward only: sampling has no gradient. Target (docs/performance.md): >= 10x the per-row loop on
the GPU, no host sync.

``max_error`` is not meaningful for a sampler (the draws differ by construction); instead each
provider's output is checked to contain no positive before timing.
"""
import pytest
import torch

from harness import bench_case, cuda_or_cpu

from gkcore.functional import sample_hard_negatives
from gkcore.ops.hard_negatives import OP

DEV = cuda_or_cpu()
B = 1024
D = 256
SCALE = 1.0 / 0.07
PROVIDERS = ["albef_loop", "multinomial", "reference", "cpu", "triton"]


def make_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(DEV, dtype)
    t = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(DEV, dtype)
    return {"image_feat": v, "text_feat": t, "generator": torch.Generator(device=DEV).manual_seed(1)}


def albef_loop(inp):
    """As in ALBEF's ITM: softmax weights, zeroed diagonal, one torch.multinomial + .item() per row."""
    v, t = inp["image_feat"], inp["text_feat"]
    with torch.no_grad():
        sim_i2t = v @ t.T * SCALE
        w_i2t = torch.softmax(sim_i2t.float(), dim=1)
        w_t2i = torch.softmax(sim_i2t.T.float(), dim=1)
        w_i2t.fill_diagonal_(0)
        w_t2i.fill_diagonal_(0)
    neg_t, neg_i = [], []
    for b in range(B):
        neg_i.append(torch.multinomial(w_t2i[b], 1).item())
    for b in range(B):
        neg_t.append(torch.multinomial(w_i2t[b], 1).item())
    return torch.tensor(neg_t), torch.tensor(neg_i)


def vectorised_multinomial(inp):
    """The same law with one torch.multinomial call per side (no Python loop)."""
    v, t = inp["image_feat"], inp["text_feat"]
    with torch.no_grad():
        sim = v @ t.T * SCALE
        eye = torch.eye(B, dtype=torch.bool, device=sim.device)
        w_i2t = torch.softmax(sim.float().masked_fill(eye, float("-inf")), dim=1)
        w_t2i = torch.softmax(sim.T.float().masked_fill(eye, float("-inf")), dim=1)
        return (torch.multinomial(w_i2t, 1).squeeze(1), torch.multinomial(w_t2i, 1).squeeze(1))


@pytest.mark.parametrize("mode", ["forward"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hard_negatives(benchmark, provider, mode):
    if provider == "albef_loop":
        fn = albef_loop
    elif provider == "multinomial":
        fn = vectorised_multinomial
    else:
        probe = make_inputs()
        why = OP.backends[provider].not_supported_reasons({"image_feat": probe["image_feat"],
                                                            "text_feat": probe["text_feat"]})
        if why:
            pytest.skip(f"{provider} cannot run here: {'; '.join(why)}")

        def fn(inp):
            return sample_hard_negatives(inp["image_feat"], inp["text_feat"], SCALE, generator=inp["generator"],
                                         backend=provider)

    nt, ni = fn(make_inputs())
    r = torch.arange(B)
    assert (nt.cpu() != r).all() and (ni.cpu() != r).all(), f"{provider} drew a positive"
    bench_case(benchmark, op="sample_hard_negatives", provider=provider, mode=mode,
               shape=dict(B=B, D=D, dtype="float32"), make_inputs=make_inputs, fn=fn, truth=None)
