"""GK-MVLP model tests on the CPU with the tiny preset shrunk to very small sizes (``MICRO``): contract
losses, gradients, the reference-vs-fused parity switch, momentum + queues, knowledge-book cache,
safetensors round trip, inference API, bad batches, and learning a fixed batch.
Run with ``python -m pytest -q -x tests/test_model_gk_mvlp.py``. Component tests (MiniLM, base preset,
Faster R-CNN, ``gkcore info``) are in tests/test_model_components.py."""
from __future__ import annotations

import copy
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gkcore.models import GKMVLP, create_model, get_config, list_presets, parameter_table  # noqa: E402
from gkcore.testing import assert_parity  # noqa: E402

REPORTS = ["The heart size is normal. No pleural effusion or pneumothorax.",
           "There is a small right pleural effusion with basal atelectasis.",
           "Cardiomegaly with mild pulmonary edema.",
           "Left lower lobe consolidation concerning for pneumonia. Support devices in place.",
           "No acute cardiopulmonary process.",
           "Right upper lobe opacity; possible lung lesion."]

#: the tiny preset made very small: 32 px images with 8 px patches (4 x 4 grid), a 1-layer 64-wide ViT
#: (in place of the preset's CNN; tests/test_pluggable_encoder.py runs a CNN through the same model),
#: random 64-wide BERT towers (1 text + 1 fusion layer, 1 decoder layer) instead of MiniLM, no dropout.
MICRO = dict(image_size=32, embed_dim=32, dropout=0.0, max_length=24,
             vision__model_name="vit_tiny_patch16_224", vision__feature_index=None, vision__patch_size=8, vision__embed_dim=64, vision__depth=1, vision__num_heads=2,
             text__pretrained=None, text__hidden_size=64, text__num_layers=2, text__fusion_start=1,
             text__num_heads=2, text__intermediate_size=128, text__decoder_layers=1,
             gk__depth=1, gk__num_heads=2, loss__queue_size=16)

LOSSES = ("loss", "loss_itc", "loss_itm", "loss_lm", "loss_ecls", "loss_gk")


def micro(backend=None, **kw):
    return create_model("gk_mvlp_tiny", backend=backend, **{**MICRO, **kw})


def make_batch(model, B: int = 4, seed: int = 0, L: int = 24):
    """A batch following docs/api.md: random images, real reports tokenised by the model's
    tokenizer, random labels / boxes / masks; samples 0 and 1 share a study when B > 2."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    E = len(model.entity_prompts)
    reports = [REPORTS[(seed + i) % len(REPORTS)] for i in range(B)]
    tok = model.tokenizer(reports, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    xy = torch.rand(B, 29, 2, generator=g) * 0.6
    wh = torch.rand(B, 29, 2, generator=g) * 0.35 + 0.05
    study = torch.arange(B) + 100
    if B > 2:
        study[1] = study[0]
    labels = torch.randint(-1, 2, (B, E), generator=g)
    labels[:, 0] = 1  # every sample has a present entity
    return {
        "image": torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, generator=g),
        "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
        "entity_labels": labels,
        "region_boxes": torch.cat([xy, xy + wh], -1),
        "region_mask": torch.rand(B, 29, generator=g) > 0.15,
        "study_id": study, "report": reports,
        "finding_boxes": [[] for _ in range(B)], "path": [f"synthetic_{i}.png" for i in range(B)],
    }


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return micro()


@pytest.fixture
def batch(tiny):
    return make_batch(tiny, B=4, seed=1)


def test_presets_listed_and_overrides():
    assert {"gk_mvlp_base", "gk_mvlp_tiny"} <= set(list_presets())
    cfg = get_config("gk_mvlp_tiny", embed_dim=32, vision__depth=2, **{"loss.queue_size": 16})
    assert (cfg.embed_dim, cfg.vision.depth, cfg.loss.queue_size) == (32, 2, 16)
    assert get_config("gk_mvlp_tiny").loss.queue_size != 16  # presets are fresh copies
    with pytest.raises(ValueError, match="no field 'nonsense'"):
        get_config("gk_mvlp_tiny", vision__nonsense=1)
    with pytest.raises(ValueError, match="unknown config override 'bogus'"):
        create_model("gk_mvlp_tiny", bogus=3)
    with pytest.raises(ValueError, match="unknown model preset 'gk_mvlp_huge'.*gk_mvlp_base"):
        create_model("gk_mvlp_huge")
    with pytest.raises(ValueError, match="backend must be one of"):
        create_model("gk_mvlp_tiny", backend="fortran")
    # values keep their field's type: a string "False" is not silently truthy, "2.5" layers is refused
    with pytest.raises(ValueError, match="must be true or false, got 'False'"):
        get_config("gk_mvlp_tiny", **{"text.share_decoder_embeddings": "False"})
    with pytest.raises(ValueError, match="must be an integer"):
        get_config("gk_mvlp_tiny", **{"text.decoder_layers": 2.5})
    with pytest.raises(ValueError, match="must be a number"):
        get_config("gk_mvlp_tiny", dropout="0.1")
    assert get_config("gk_mvlp_tiny", **{"text.decoder_layers": 3.0}).text.decoder_layers == 3


def test_cli_set_values_parse_json_and_python_literals():
    from gkcore.cli.train import _parse_set

    got = _parse_set(["a=False", "b=false", "c=0.5", "d=conv", "e=None", "f=[1, 2]"])
    assert got == {"a": False, "b": False, "c": 0.5, "d": "conv", "e": None, "f": [1, 2]}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        _parse_set(["novalue"])


def test_create_model_applies_overrides(tiny):
    assert tiny.config.image_size == 32 and tiny.config.embed_dim == 32
    assert tiny.visual.grid_size == (4, 4) and tiny.visual.width == 64
    assert len(tiny.text_encoder.layer) == 1 and len(tiny.fusion_encoder.layer) == 1
    assert len(tiny.decoder.layer) == 1
    assert tiny.itc.image_queue.shape == (16, 32)
    from gkcore.models.config import minilm_path

    assert tiny.config.tokenizer_path == minilm_path()  # no text.pretrained folder: the MiniLM tokenizer
    assert tiny.lm_head.weight is tiny.decoder.embed.word_embeddings.weight  # tied LM head


def test_forward_returns_every_loss_finite(tiny, batch):
    tiny.train()
    out = tiny(batch)
    for k in LOSSES:
        assert out[k].dim() == 0 and torch.isfinite(out[k]), (k, out[k])
        assert float(out[k].detach()) > 0, k
    w = tiny.config.loss
    total = (w.w_itc * out["loss_itc"] + w.w_itm * out["loss_itm"] + w.w_lm * out["loss_lm"]
             + w.w_ecls * out["loss_ecls"] + w.w_gk * out["loss_gk"])
    torch.testing.assert_close(out["loss"], total)
    V = tiny.config.text.vocab_size
    # BERT-initialised towers: the LM loss starts near log(V)
    assert 0.8 * math.log(V) < out["loss_lm"].item() < 1.2 * math.log(V)
    assert 0 < out["loss_itm"].item() < 3 * math.log(2)


def test_every_trainable_parameter_gets_a_gradient(tiny, batch):
    tiny.train()
    tiny.zero_grad(set_to_none=True)
    tiny(batch)["loss"].backward()
    missing = [n for n, p in tiny.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    zero = [n for n, p in tiny.named_parameters() if p.grad is not None and not bool(p.grad.abs().sum() > 0)]
    # the [PAD] row of the embeddings is the only expected all-zero gradient, and it is one row only
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    nonfinite = [n for n, p in tiny.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not nonfinite
    momentum = [n for n, p in tiny.named_parameters() if n.split(".")[0].endswith("_m")]
    assert momentum and all(not dict(tiny.named_parameters())[n].requires_grad for n in momentum)
    tiny.zero_grad(set_to_none=True)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_parity_reference_vs_fused_one_training_step():
    """One training step from the same weights and batch on backend="reference" (float32 and float64)
    and on the automatic backends (float32): docs/numerics.md, error <= 2 x reference float32 error + floor."""
    torch.manual_seed(3)
    ref = micro(backend="reference")
    auto = micro(backend=None)
    auto.load_state_dict(ref.state_dict())
    ref64 = copy.deepcopy(ref).double()
    b = make_batch(ref, B=4, seed=7)
    runs, kernels = {}, {}
    for name, m in (("ref32", ref), ("ref64", ref64), ("auto", auto)):
        m.train()
        m.zero_grad(set_to_none=True)
        if name != "ref32":  # identical ITM negatives on every path (sampling is random by nature)
            negs = runs["ref32"][2]
            m.sample_negatives = lambda *a, _n=negs: _n
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = m(b)
            out["loss"].backward()
        kernels[name] = {e.key for e in prof.key_averages() if e.key.startswith("gkcore::")}
        runs[name] = (out, _grads(m), m.last_itm_negatives if name == "ref32" else None)
    (o32, g32, _), (o64, g64, _), (oa, ga, _) = runs["ref32"], runs["ref64"], runs["auto"]
    # the reference path runs no compiled kernel; the automatic path runs the C++ CPU kernels (when built)
    assert not kernels["ref32"] and not kernels["ref64"], kernels
    from gkcore import _ext

    if _ext.has_cpu():
        assert any("linear_cross_entropy" in k for k in kernels["auto"]), kernels["auto"]
        assert any("region_pool" in k for k in kernels["auto"]), kernels["auto"]
    for k in LOSSES:
        assert_parity(oa[k], o32[k], o64[k], atol=1e-6, rtol_floor=1e-6, name=k)
    assert g32.keys() == g64.keys() == ga.keys() and len(ga) > 50
    for n in ga:
        # scalar parameters (the two temperatures) get a sum of B x (B + Q) / B x E cancelling terms:
        # their floor is relative to that sum's magnitude, about 1e-3 of the result here
        floor = 1e-3 if ga[n].numel() == 1 else 1e-5
        assert_parity(ga[n], g32[n], g64[n], atol=1e-7, rtol_floor=floor, name=f"grad {n}")
    # the step really differs from a perturbed model (the comparison is not vacuous)
    assert not torch.equal(ga["vision_proj.weight"], torch.zeros_like(ga["vision_proj.weight"]))


def test_parameter_table_counts_every_parameter_once(tiny):
    rows = dict(parameter_table(tiny))
    assert rows["total"] == sum(p.numel() for p in tiny.parameters())
    assert rows["trainable"] == sum(p.numel() for p in tiny.parameters() if p.requires_grad)
    parts = sum(v for k, v in rows.items() if k not in ("trainable", "total"))
    assert parts == rows["total"]
    assert rows["image encoder (ViT)"] == sum(p.numel() for p in tiny.visual.parameters())
    assert rows["momentum encoders (EMA, frozen)"] == rows["total"] - rows["trainable"]


def test_momentum_update_is_ema(tiny):
    pairs = list(tiny._momentum_pairs())
    assert len(pairs) == sum(1 for _ in tiny.visual.parameters()) + 2 + sum(
        1 for _ in tiny.text_encoder.parameters()) + 2
    p, pm = pairs[3]
    with torch.no_grad():
        before_m = pm.clone()
        p.add_(torch.randn_like(p))  # make online and momentum differ
        online = p.clone()
    tiny.momentum_update()
    m = tiny.config.loss.momentum
    assert m == 0.995
    torch.testing.assert_close(pm, m * before_m + (1 - m) * online)
    assert not torch.equal(pm, before_m)


def test_queue_enqueue_and_wraparound():
    torch.manual_seed(1)
    model = micro(loss__queue_size=12)
    model.train()
    Q, B = 12, 4  # the pointer wraps after 3 steps
    b = make_batch(model, B=B, seed=3, L=16)
    img_q, txt_q, ptr = model.queues()
    assert img_q.shape == (Q, 32) and ptr == 0
    for step in range(Q // B + 1):
        before = img_q.clone()
        model(b)
        img_q, txt_q, ptr = model.queues()
        assert ptr == ((step + 1) * B) % Q
        changed = (img_q != before).any(1).nonzero().flatten().tolist()
        assert changed == list(range((step * B) % Q, (step * B) % Q + B))
    # the momentum features of the last step sit just before the pointer (slot 0..3 after the wrap)
    with torch.no_grad():
        img_m = torch.nn.functional.normalize(model.vision_proj_m(model.visual_m(b["image"])[:, 0]), dim=-1)
    p = (ptr - B) % Q
    torch.testing.assert_close(img_q[p:p + B], img_m, atol=1e-5, rtol=1e-4)
    assert int(model.step) == Q // B + 1
    model.eval()  # eval forwards leave the queues alone
    before = img_q.clone()
    with torch.no_grad():
        model(b)
    assert torch.equal(model.queues()[0], before) and model.queues()[2] == ptr


def test_alpha_ramp(tiny):
    lc = tiny.config.loss
    old = int(tiny.step)
    tiny.step.fill_(0)
    assert tiny.current_alpha() == 0.0
    tiny.step.fill_(lc.alpha_warmup_steps // 2)
    assert tiny.current_alpha() == pytest.approx(lc.alpha / 2, rel=1e-2)
    tiny.step.fill_(10 * lc.alpha_warmup_steps)
    assert tiny.current_alpha() == pytest.approx(lc.alpha)
    tiny.step.fill_(old)


def test_knowledge_book_cached_until_text_tower_changes(tiny):
    tiny.eval()
    f1, e1 = tiny.knowledge_book()
    assert e1.shape == (len(tiny.entity_prompts), tiny.config.embed_dim)
    assert f1.shape == (len(tiny.entity_prompts), tiny.config.text.hidden_size)
    f2, _ = tiny.knowledge_book()
    assert f2 is f1  # cached
    # an optimizer step on the text tower (in-place update) invalidates the cache
    opt = torch.optim.SGD(tiny.text_encoder.parameters(), lr=0.5)
    for p in tiny.text_encoder.parameters():
        p.grad = torch.randn_like(p) * 0.01
    opt.step()
    tiny.zero_grad(set_to_none=True)
    f3, e3 = tiny.knowledge_book()
    assert f3 is not f1 and not torch.allclose(f3, f1)
    assert tiny.knowledge_book()[0] is f3  # cached again
    # load_state_dict (in-place copy) invalidates it as well
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    sd["text_proj.weight"] = sd["text_proj.weight"] * 2
    tiny.load_state_dict(sd)
    f4, e4 = tiny.knowledge_book()
    assert e4 is not e3 and not torch.allclose(e4, e3)
    # a change to the vision tower does not invalidate it
    with torch.no_grad():
        tiny.vision_proj.weight.mul_(1.0)
    assert tiny.knowledge_book()[0] is f4


def test_knowledge_book_dropped_exactly_by_optimizer_steps_over_the_knowledge_towers():
    """The model watches optimizer steps itself: no trainer has to tell it. Fused AdamW (which writes
    the weights without bumping their version counters) drops the book; a step over other parameters, or
    over text parameters without a gradient, keeps it; a copy of the model has a book of its own."""
    torch.manual_seed(0)
    model = micro()
    model.eval()
    _, e1 = model.knowledge_book()
    vision = list(model.vision_proj.parameters())
    text = list(model.text_proj.parameters())

    def step(params, opt, grad=True):
        for p in params:
            p.grad = torch.randn_like(p) if grad else None
        opt.step()
        model.zero_grad(set_to_none=True)

    step(vision, torch.optim.AdamW(vision, lr=0.1, fused=True))
    assert model.knowledge_book()[1] is e1
    step(text, torch.optim.AdamW(text, lr=0.1), grad=False)  # no gradient: the optimizer updates nothing
    assert model.knowledge_book()[1] is e1
    step(text, torch.optim.AdamW(text, lr=0.1, fused=True))
    _, e2 = model.knowledge_book()
    assert e2 is not e1 and not torch.allclose(e2, e1)
    twin = copy.deepcopy(model)
    _, t2 = twin.knowledge_book()
    assert t2 is not e2 and torch.equal(t2, e2)  # computed from the copy's own towers
    twin_text = list(twin.text_proj.parameters())
    step(twin_text, torch.optim.SGD(twin_text, lr=0.1))
    assert model.knowledge_book()[1] is e2 and twin.knowledge_book()[1] is not t2
    model.text_proj.weight.data.mul_(2.0)  # an edit outside an optimizer: the documented call
    model.invalidate_caches()
    assert not torch.allclose(model.knowledge_book()[1], e2)


def test_safetensors_round_trip(tiny, batch, tmp_path):
    path = str(tmp_path / "gk.safetensors")
    tiny.save(path)
    loaded = GKMVLP.load(path)
    sd0, sd1 = tiny.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    assert loaded.lm_head.weight is loaded.decoder.embed.word_embeddings.weight  # tie survives
    assert loaded.config == tiny.config
    tiny.eval()
    loaded.eval()
    torch.testing.assert_close(loaded.encode_image(batch["image"]), tiny.encode_image(batch["image"]))
    tiny.itm_generator = loaded.itm_generator = None  # both restart from loss.itm_seed: same ITM negatives
    with torch.no_grad():
        a, b = tiny(batch), loaded(batch)
    for k in LOSSES:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ValueError, match="does not exist"):
        GKMVLP.load(str(tmp_path / "missing.safetensors"))


def test_inference_api_shapes(tiny, batch):
    # the inference API switches to eval mode itself (no dropout) and restores the mode
    tiny.train()
    img = batch["image"][:3]
    drop = tiny.text_encoder.embeddings.dropout
    drop.p = 0.5
    try:
        t_a, t_b = tiny.encode_text(REPORTS[:2]), tiny.encode_text(REPORTS[:2])
        assert tiny.training
        torch.testing.assert_close(t_a, t_b)
        with torch.no_grad():  # train mode by hand: dropout active, results differ
            h1 = tiny.text_encoder(*tiny._tokenize(REPORTS[:2], "cpu"))
            h2 = tiny.text_encoder(*tiny._tokenize(REPORTS[:2], "cpu"))
        assert not torch.allclose(h1, h2)
    finally:
        drop.p = 0.0
    tiny.eval()
    v = tiny.encode_image(img)
    assert v.shape == (3, tiny.config.embed_dim)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    t = tiny.encode_text(batch["input_ids"][:3], batch["attention_mask"][:3])
    assert t.shape == (3, tiny.config.embed_dim)
    assert tiny.encode_text(REPORTS[:2]).shape == (2, tiny.config.embed_dim)
    E = len(tiny.entity_prompts)
    p = tiny.zero_shot_classify(img)
    assert p.shape == (3, E) and bool(((p >= 0) & (p <= 1)).all())
    p2 = tiny.zero_shot_classify(img, entities=["cardiomegaly", "a nodule in the left apex"],
                                 region_boxes=batch["region_boxes"][:3], region_mask=batch["region_mask"][:3])
    assert p2.shape == (3, 2)
    # knowledge-base entities named explicitly use their cached prompts: the same table as entities=None
    # (the GK queries attend to each other, so only the same query set gives the same numbers)
    from gkcore.data import knowledge

    p3 = tiny.zero_shot_classify(img, entities=list(knowledge.ENTITY_NAMES))
    torch.testing.assert_close(p3, p)
    gh, gw = tiny.visual.grid_size
    g = tiny.ground(img, "pleural effusion", region_boxes=batch["region_boxes"][:3],
                    region_mask=batch["region_mask"][:3])
    assert g["region_scores"].shape == (3, 29) and g["patch_map"].shape == (3, gh, gw)
    rs = g["region_scores"]
    assert bool((rs[~batch["region_mask"][:3]] == 0).all())
    torch.testing.assert_close(rs.sum(-1), torch.ones(3))
    torch.testing.assert_close(g["patch_map"].sum((-1, -2)), torch.ones(3))
    rts = g["region_text_scores"]
    assert rts.shape == (3, 29) and bool((rts[~batch["region_mask"][:3]] == 0).all())
    torch.testing.assert_close(rts.sum(-1), torch.ones(3))
    g2 = tiny.ground(img, "pleural effusion")  # atlas boxes
    assert g2["region_scores"].shape == (3, 29)
    for beams in (1, 3):
        reps = tiny.generate_report(img[:2], max_length=6, num_beams=beams)
        assert len(reps) == 2 and all(isinstance(r, str) for r in reps)
    with pytest.raises(ValueError, match="images"):
        tiny.encode_image(img[:, :, :16])


def test_ground_saliency_is_the_norm_of_the_gk_decision_gradient(tiny, batch):
    """``patch_saliency`` against central finite differences of logit_present - logit_absent with
    respect to every channel of every patch token (all perturbations in one batched GK forward; the GK
    module runs with the whole knowledge book, the entity's column is read)."""
    img, rb, rm = batch["image"][:1], batch["region_boxes"][:1], batch["region_mask"][:1]
    entity = "pleural effusion"
    sal = tiny.ground(img, entity, region_boxes=rb, region_mask=rm)["patch_saliency"]
    gh, gw = tiny.visual.grid_size
    assert sal.shape == (1, gh, gw) and bool((sal >= 0).all())
    torch.testing.assert_close(sal.sum(), torch.tensor(1.0))
    tiny.eval()
    with torch.no_grad():
        x = tiny._images(img)
        tokens = tiny.visual(x)[:, 1:]
        boxes, rmask = tiny.detector(x, rb.to(x.dtype), rm)
        q = tiny.knowledge_book()[0]
        from gkcore.data import knowledge

        col = list(knowledge.ENTITY_NAMES).index(entity)
        N, D = tokens.shape[1:]
        eps = 1e-2
        d = torch.eye(N * D).view(N * D, N, D) * eps
        p = torch.cat([tokens + d, tokens - d])  # (2 N D, N, D)
        M = p.shape[0]
        lo = tiny._run_gk(p, boxes.expand(M, -1, -1), rmask.expand(M, -1), q, with_regions=False)["logits"][:, col]
        f = (lo[:, 1] - lo[:, 0]).double()
        grad = ((f[:N * D] - f[N * D:]) / (2 * eps)).view(N, D)
    want = grad.norm(dim=-1)
    want = (want / want.sum()).float().view(1, gh, gw)
    torch.testing.assert_close(sal, want, atol=2e-3, rtol=2e-2)
    assert want.max() > 1.5 / (gh * gw)  # not a flat map: the check can fail


def test_centred_gk_queries_ignore_a_common_shift_of_the_prompts(tiny):
    """gk.center_queries: the book's mean prompt feature is removed before the query projection, so a
    vector added to every prompt feature changes nothing; without centring it does."""
    torch.manual_seed(0)
    gk = tiny.gk.eval()
    feats, _ = tiny.knowledge_book()
    gh, gw = tiny.visual.grid_size
    patches = torch.randn(2, gh * gw, gk.width)
    boxes = torch.tensor([0.1, 0.1, 0.6, 0.7]).expand(2, 29, 4).clone()
    mask = torch.ones(2, 29, dtype=torch.bool)
    shift = torch.randn(feats.shape[1])
    with torch.no_grad():
        a = gk(patches, (gh, gw), boxes, mask, feats, prompt_center=feats.mean(0))["logits"]
        b = gk(patches, (gh, gw), boxes, mask, feats + shift, prompt_center=(feats + shift).mean(0))["logits"]
        c = gk(patches, (gh, gw), boxes, mask, feats + shift)["logits"]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)
    assert not tiny.config.gk.center_queries and tiny._query_center() is None  # off by default
    torch.manual_seed(0)
    m = micro(gk__center_queries=True).eval()
    book = m.knowledge_book()[0]
    assert torch.equal(m._query_center(), book.mean(0))
    img = torch.randn(2, 1, m.config.image_size, m.config.image_size)
    with torch.no_grad():
        tokens = m.visual(img)
        boxes, rmask = m.detector(img)
        want = m.gk(tokens[:, 1:], m.visual.grid_size, boxes, rmask, book - book.mean(0))["logits"]
    torch.testing.assert_close(m.zero_shot_classify(img), torch.softmax(want, -1)[..., 1])


def test_greedy_generation_follows_the_argmax(tiny, batch):
    """Greedy decoding equals step-by-step argmax of the decoder's next-token distribution."""
    tiny.eval()
    img = batch["image"][:1]
    with torch.no_grad():
        # make the decoder prefer a fixed token so that the output is a non-empty string
        tok = tiny.tokenizer.convert_tokens_to_ids("heart")
        assert tok != tiny.tokenizer.unk_token_id
        saved = tiny.lm_head.bias.detach().clone()
        tiny.lm_head.bias.zero_()
        tiny.lm_head.bias[tok] = 50.0
        try:
            rep = tiny.generate_report(img, max_length=4)
            rep_beam = tiny.generate_report(img, max_length=4, num_beams=2)
        finally:
            tiny.lm_head.bias.copy_(saved)
    assert rep == ["heart heart heart"] and rep_beam == rep


def test_beam_search_scores(tiny, batch):
    """generate() scores are the teacher-forced log-probabilities of the returned ids; beam search finds
    a sequence at least as likely as greedy decoding, and 1 beam equals greedy."""
    tiny.eval()
    img = batch["image"][:2]
    T = 5
    ids_g, sc_g = tiny.generate(img, max_length=T, num_beams=1)
    ids_b, sc_b = tiny.generate(img, max_length=T, num_beams=4)
    assert ids_g.shape == (2, T - 1) and sc_g.shape == (2,)
    assert bool((sc_b >= sc_g - 1e-5).all()), (sc_b, sc_g)
    # teacher forcing: re-score the sequences with the decoder
    tokens = tiny.visual(img)
    boxes, rmask = tiny.detector(img)
    gk = tiny._run_gk(tokens[:, 1:], boxes, rmask, tiny.knowledge_book()[0])
    enc, enc_mask = tiny._decoder_memory(tokens, gk, rmask)
    sep = tiny.tokenizer.sep_token_id
    for ids, sc in ((ids_g, sc_g), (ids_b, sc_b)):
        seq = torch.cat([torch.full((2, 1), tiny.bos_token_id), ids], 1)
        want = torch.zeros(2)
        for b_ in range(2):
            for t in range(ids.shape[1]):
                lp = tiny._next_logprobs(seq[b_:b_ + 1, :t + 1], enc[b_:b_ + 1], enc_mask[b_:b_ + 1])[0]
                want[b_] += lp[ids[b_, t]]
                if int(ids[b_, t]) == sep:
                    break
        torch.testing.assert_close(sc, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b.pop("region_boxes"), r"missing key\(s\) \['region_boxes'\]"),
    (lambda b: b.pop("input_ids"), r"missing key\(s\) \['input_ids'\]"),
    (lambda b: b.__setitem__("region_boxes", b["region_boxes"][:, :, :2]), r"region_boxes.*shape"),
    (lambda b: b.__setitem__("region_boxes", b["region_boxes"][:, :28]), r"region_boxes.*shape"),
    (lambda b: b.__setitem__("region_mask", b["region_mask"][:3]), r"batch size mismatch.*region_mask"),
    (lambda b: b.__setitem__("study_id", b["study_id"][:2]), r"batch size mismatch.*study_id"),
    (lambda b: b.__setitem__("image", b["image"][:, :, :16]), r"pixels"),
    (lambda b: b.__setitem__("image", b["image"].repeat(1, 3, 1, 1)), r"channels"),
    (lambda b: b.__setitem__("entity_labels", b["entity_labels"][:, :3]), r"entity_labels.*shape"),
    (lambda b: b.__setitem__("attention_mask", b["attention_mask"][:, :5]), r"attention_mask"),
    (lambda b: b.__setitem__("input_ids", b["input_ids"].float()), r"input_ids.*integer"),
])
def test_bad_batches_raise_clear_errors(tiny, batch, mutate, match):
    mutate(batch)
    with pytest.raises(ValueError, match=match):
        tiny(batch)


def test_itm_negatives_respect_study_ids(tiny):
    # the sampler's generator is a module attribute from construction on (the trainer saves / restores it)
    assert isinstance(tiny.itm_generator, torch.Generator) and tiny.itm_generator.device.type == "cpu"
    tiny.train()
    b = make_batch(tiny, B=4, seed=4, L=16)
    b["study_id"] = torch.tensor([5, 5, 6, 6])
    for _ in range(2):
        tiny(b)
        neg_t, neg_i = tiny.last_itm_negatives
        assert neg_t.shape == neg_i.shape == (4,)
        sid = b["study_id"]
        assert bool((sid[neg_t] != sid).all()) and bool((sid[neg_i] != sid).all())
    b2 = make_batch(tiny, B=2, seed=4, L=16)
    b2["study_id"] = torch.tensor([7, 7])
    with pytest.warns(UserWarning, match="no negative"):
        out = tiny(b2)
    assert float(out["loss_itm"].detach()) == 0.0 and torch.isfinite(out["loss"])


def test_bf16_autocast_forward_backward(tiny, batch):
    """The trainer runs the model under bf16 autocast on GPUs; the same mixed-dtype path on the CPU."""
    tiny.train()
    tiny.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(batch)
    for k in LOSSES:
        assert torch.isfinite(out[k]), k
    out["loss"].float().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny.parameters() if p.requires_grad)
    tiny.zero_grad(set_to_none=True)


def test_zero_weight_skips_itm_and_ecls():
    """``loss.w_itm`` / ``loss.w_ecls`` = 0 skip their losses (reported as exactly 0, no gradient to
    ``ecls_temp`` or the ITM head) and leave the others as they are."""
    torch.manual_seed(0)
    full = micro()
    torch.manual_seed(0)
    cut = micro(loss__w_itm=0.0, loss__w_ecls=0.0)
    full.train()
    cut.train()
    b = make_batch(full, B=4, seed=3)
    a, o = full(b), cut(b)
    assert float(o["loss_itm"]) == 0.0 and float(o["loss_ecls"]) == 0.0
    assert float(a["loss_itm"]) > 0 and float(a["loss_ecls"]) > 0
    for k in ("loss_itc", "loss_lm", "loss_gk"):
        torch.testing.assert_close(o[k], a[k])
    o["loss"].backward()
    assert cut.ecls_temp.grad is None
    assert all(p.grad is None for p in cut.itm_head.parameters())


def test_unmentioned_as_absent_counts_the_unmentioned_entities_in_the_gk_loss():
    """``loss.unmentioned_as_absent``: the GK entity loss is the cross-entropy over every (sample, entity)
    pair with an unmentioned entity (-1) as absent; by default only the mentioned pairs count; the other
    losses do not change."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    skip = micro()
    torch.manual_seed(0)
    absent = micro(loss__unmentioned_as_absent=True)
    b = make_batch(skip, B=4, seed=5)
    labels = b["entity_labels"].long()
    assert (labels == -1).any() and (labels >= 0).any()
    skip.train(), absent.train()
    gk = _gk_out(skip, b)
    logits = gk["logits"].float().flatten(0, 1)
    ce = F.cross_entropy(logits, labels.clamp(min=0).flatten(), reduction="none")
    known = (labels >= 0).flatten().float()
    with torch.no_grad():
        torch.testing.assert_close(skip._gk_loss(gk["logits"], labels), (ce * known).sum() / known.sum())
        torch.testing.assert_close(absent._gk_loss(gk["logits"], labels), ce.mean())
        a, o = skip(b), absent(b)
    assert abs(float(a["loss_gk"]) - float(o["loss_gk"])) > 1e-4
    for k in ("loss_itc", "loss_lm"):
        torch.testing.assert_close(o[k], a[k])


def test_decoder_entity_states_condition_the_lm_on_the_gk_head(tmp_path):
    """``gk.decoder_entity_states``: the decoder reads 2 P(present) - 1 of every knowledge entity through
    ``decoder.cond_proj``; the LM loss changes with that condition, trains the projection and never the GK
    head through it (detached); cached decoding equals uncached; a checkpoint brings it back; off by
    default and without the GK module."""
    assert micro().decoder.cond_proj is None
    assert micro(gk__enabled=False, gk__decoder_entity_states=True).decoder.cond_proj is None
    torch.manual_seed(0)
    model = micro(gk__decoder_entity_states=True).train()
    E = len(model.entity_prompts)
    assert model.decoder.cond_proj.in_features == E
    b = make_batch(model, B=4, seed=1)
    out = model(b)
    out["loss_lm"].backward()
    assert model.decoder.cond_proj.weight.grad.abs().sum() > 0
    assert model.gk.cls_head.weight.grad is None  # the condition is detached: LM does not train the head
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # other weights than the start (see the next tests)
        model.decoder.cond_proj.weight.normal_(std=0.5)

    cond = {}
    real = model._decoder_condition
    model._decoder_condition = lambda gk, labels=None: cond.setdefault("c", real(gk))
    with torch.no_grad():
        base = float(model(b)["loss_lm"])
        c = cond["c"]
        assert c.shape == (4, E) and float(c.abs().max()) <= 1.0
        cond["c"] = -c  # every entity's state flipped
        flipped = float(model(b)["loss_lm"])
    del model._decoder_condition
    assert abs(base - flipped) > 1e-4

    model.eval()
    img = b["image"][:2]
    for beams in (1, 3):
        ids_c, sc_c = model.generate(img, max_length=10, num_beams=beams)
        ids_u, sc_u = model.generate(img, max_length=10, num_beams=beams, use_cache=False)
        assert torch.equal(ids_c, ids_u)
        torch.testing.assert_close(sc_c, sc_u, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="cond"):
        model.decoder(b["input_ids"][:2], None, torch.zeros(2, 3, model.visual.width), cond=torch.zeros(2, E + 1))
    with pytest.raises(ValueError, match="cond"):
        model.decoder(b["input_ids"][:2], None, torch.zeros(2, 3, model.visual.width))
    path = str(tmp_path / "m.safetensors")
    model.save(path)
    back = GKMVLP.load(path).eval()
    assert back.config.gk.decoder_entity_states
    assert torch.equal(back.generate(img, max_length=10)[0], model.generate(img, max_length=10)[0])



def test_decoder_condition_starts_at_zero_and_changes_no_other_weight():
    """With ``gk.decoder_state_init = "zero"`` the condition's projection starts at 0 and draws nothing from
    the random generator: with the option on, every other weight and the first LM loss equal those of the
    model without it."""
    torch.manual_seed(0)
    plain = micro()
    torch.manual_seed(0)
    cond = micro(gk__decoder_entity_states=True, gk__decoder_state_init="zero")
    assert float(cond.decoder.cond_proj.weight.detach().abs().sum()) == 0.0
    ps = plain.state_dict()
    for k, v in cond.state_dict().items():
        if not k.startswith("decoder.cond_proj"):
            assert torch.equal(v, ps[k]), k
    b = make_batch(plain, B=4, seed=1)
    plain.train(), cond.train()
    with torch.no_grad():
        torch.testing.assert_close(cond(b)["loss_lm"], plain(b)["loss_lm"])


def test_decoder_condition_starts_as_the_present_entities_names():
    """The default ``gk.decoder_state_init = "names"``: a state vector (+1 present, -1 not) adds the sum of
    the present entities' name embeddings (the mean word embedding of the name's word pieces, scaled to
    the mean word-embedding norm) to every decoder input, all -1 adds nothing; no random draw (every
    other weight equals the zero-start model's); an unknown value is refused by name."""
    from gkcore.data import ENTITY_NAMES

    with pytest.raises(ValueError, match="decoder_state_init"):
        micro(gk__decoder_entity_states=True, gk__decoder_state_init="random")
    torch.manual_seed(0)
    zero = micro(gk__decoder_entity_states=True, gk__decoder_state_init="zero")
    torch.manual_seed(0)
    names = micro(gk__decoder_entity_states=True)
    assert names.config.gk.decoder_state_init == "names"
    zs = zero.state_dict()
    for k, v in names.state_dict().items():
        if not k.startswith("decoder.cond_proj"):
            assert torch.equal(v, zs[k]), k
    emb = names.decoder.embed.word_embeddings.weight.detach()
    E = len(ENTITY_NAMES)
    i = ENTITY_NAMES.index("cardiomegaly")
    j = ENTITY_NAMES.index("pleural effusion")
    ids_i = names.tokenizer("cardiomegaly", add_special_tokens=False)["input_ids"]
    ids_j = names.tokenizer("pleural effusion", add_special_tokens=False)["input_ids"]
    scale = emb.norm(dim=1).mean()
    vi, vj = emb[ids_i].mean(0), emb[ids_j].mean(0)
    vi, vj = vi / vi.norm() * scale, vj / vj.norm() * scale
    s = -torch.ones(2, E)
    s[1, i] = s[1, j] = 1.0
    with torch.no_grad():
        out = names.decoder.cond_proj(s)
    torch.testing.assert_close(out[0], torch.zeros_like(out[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], vi + vj, atol=1e-5, rtol=1e-5)


def test_decoder_label_forcing_feeds_the_true_states_in_training_only(tmp_path):
    """``gk.decoder_label_forcing`` > 0: the condition is a decision per entity (+1 present, -1 not): the GK
    head's margin above the threshold that as many of the recent training samples pass as were labelled
    present; in training that fraction of the samples read their true labels, the rest the decisions;
    evaluation always reads the decisions; the window is saved with the model; a value outside [0, 1]
    is refused by name."""
    with pytest.raises(ValueError, match="decoder_label_forcing"):
        micro(gk__decoder_entity_states=True, gk__decoder_label_forcing=1.5)
    torch.manual_seed(0)
    model = micro(gk__decoder_entity_states=True, gk__decoder_label_forcing=1.0)
    b = make_batch(model, B=8, seed=2)
    labels = b["entity_labels"].long()
    true = torch.where(labels == 1, 1.0, -1.0)
    real = model._decoder_condition
    gk = _gk_out(model, b)
    model.eval()
    assert torch.equal(real(gk), -torch.ones_like(true))  # no training sample seen: nothing present
    model.train()
    with torch.no_grad():
        model(b)  # the batch joins the window (and every sample is forced)
    assert int(model.state_seen) == 8 and torch.equal(model.state_present[:8], labels == 1)
    assert torch.equal(real(gk, labels), true)
    model.eval()
    head = real(gk)
    assert torch.equal(real(gk, labels), head)  # evaluation: the decisions, whatever the labels
    # calibrated on the window (this batch): per entity as many samples pass as were labelled present
    torch.testing.assert_close((head == 1).sum(0), (labels == 1).sum(0))
    assert not torch.equal(head, true)  # the untrained head ranks the samples wrongly
    model.train()
    model.config.gk.decoder_label_forcing = 0.5
    differ = [i for i in range(8) if not torch.equal(true[i], head[i])]
    forced = 0
    for _ in range(50):
        mixed = real(gk)  # no labels: no window update, so the decisions stay those above
        assert torch.equal(mixed, head)
        mixed = real(gk, labels)
        assert all(torch.equal(mixed[i], true[i]) or torch.equal(mixed[i], head[i]) for i in range(8))
        forced += sum(torch.equal(mixed[i], true[i]) for i in differ)
    assert differ and 0.3 < forced / (50 * len(differ)) < 0.7  # about half the samples forced
    path = str(tmp_path / "m.safetensors")
    model.save(path)
    back = GKMVLP.load(path).eval()
    assert int(back.state_seen) == int(model.state_seen)
    torch.testing.assert_close(back.state_margins, model.state_margins)


def test_decoder_state_rule_accuracy_and_calibrate_states():
    """``gk.decoder_state_rule`` "accuracy": per entity the threshold on the window that makes the most
    right decisions (an entity no threshold helps is never called present, a sure one always); a bad rule
    is refused by name. ``calibrate_states`` refills the window from a loader in eval mode (the margins
    the eval-mode GK head gives those images and their labels), leaves the training mode as it was, and
    refuses a model without the window."""
    with pytest.raises(ValueError, match="decoder_state_rule"):
        micro(gk__decoder_entity_states=True, gk__decoder_label_forcing=1.0, gk__decoder_state_rule="f1")
    with pytest.raises(ValueError, match="calibrate_states needs"):
        micro(gk__decoder_entity_states=True).calibrate_states([])
    model = micro(gk__decoder_entity_states=True, gk__decoder_label_forcing=1.0, gk__decoder_state_rule="accuracy")
    E = model.state_margins.shape[1]
    # a hand-made window of 6 samples: entity 0 separable at 0.5, entity 1 never worth calling (1 of 6
    # present, with the lowest margin), entity 2 always present, the others as entity 1
    m = torch.tensor([[3.0, 2.0, 0.1], [2.0, 1.0, 0.2], [1.0, 0.5, 0.3], [0.0, 0.4, 0.4], [-1.0, 0.3, 0.5],
                      [-2.0, -5.0, 0.6]])
    pres = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]], dtype=torch.bool)
    model.state_margins[:6, :3], model.state_present[:6, :3] = m, pres
    model.state_margins[:6, 3:], model.state_present[:6, 3:] = m[:, 1:2], pres[:, 1:2]
    model.state_seen.fill_(6)
    q = torch.zeros(3, E)
    q[:, 0] = torch.tensor([0.9, 0.0, 5.0])
    q[:, 1] = torch.tensor([9.0, 0.0, -9.0])
    q[:, 2] = torch.tensor([-9.0, 0.0, 9.0])
    got = model._entity_states(q)
    assert got[:, 0].tolist() == [True, False, True]  # the top three called: present above the fourth margin, 0
    assert not got[:, 1].any() and not got[:, 3:].any()
    assert got[:, 2].all()
    model.config.gk.decoder_state_rule = "prevalence"  # the same window: as many called as labelled present
    prev = model._entity_states(q)
    assert prev[0, 1] and not prev[2, 1]  # entity 1 (1 of 6 present): present above the second margin, 1
    model.config.gk.decoder_state_rule = "accuracy"
    # calibrate_states: eval-mode margins of the loader's images
    torch.manual_seed(0)
    batches = [make_batch(model, B=4, seed=s) for s in (5, 6)]
    model.train()
    n = model.calibrate_states(batches)
    assert n == 8 and int(model.state_seen) == 8 and model.training
    model.eval()
    with torch.no_grad():
        want = []
        for b in batches:
            lg = _gk_out(model, b)["logits"]
            want.append(lg[..., 1] - lg[..., 0])
    torch.testing.assert_close(model.state_margins[:8], torch.cat(want))
    assert torch.equal(model.state_present[:8], torch.cat([b["entity_labels"] == 1 for b in batches]))
    assert not model.state_margins[8:].any()
    assert model.calibrate_states(batches, max_batches=1) == 4 and int(model.state_seen) == 4
    with pytest.raises(ValueError, match="entity_labels"):
        model.calibrate_states([{k: v for k, v in batches[0].items() if k != "entity_labels"}])


def test_text_max_length_cuts_the_encoder_input_and_not_the_decoder():
    """``text_max_length``: the report encoder reads the first N word pieces (SEP closing a cut row) in
    training and in ``encode_text``, while the decoder's LM loss still reads the whole report; padding
    columns do not change the decoder's loss; a bad value is refused by name."""
    with pytest.raises(ValueError, match="text_max_length"):
        micro(text_max_length=1)
    torch.manual_seed(0)
    cut = micro(text_max_length=8).train()
    full = micro().train()
    full.load_state_dict(cut.state_dict())
    b = make_batch(cut, B=4, seed=3, L=24)
    ids, att = b["input_ids"], b["attention_mask"]
    assert int(att.sum(1).min()) > 8  # every report is longer than the cut
    seen = {}
    h1 = cut.text_encoder.register_forward_hook(lambda m, a, o: seen.setdefault("enc", a) and None)
    h2 = cut.decoder.register_forward_hook(lambda m, a, o: seen.setdefault("dec", a) and None)
    with torch.no_grad():
        out_cut = cut(b)
        out_full = full(b)
    h1.remove(), h2.remove()
    enc_ids, enc_att = seen["enc"]
    assert enc_ids.shape == (4, 8) and torch.equal(enc_att, att[:, :8])
    assert torch.equal(enc_ids[:, :7], ids[:, :7]) and bool((enc_ids[:, 7] == cut.tokenizer.sep_token_id).all())
    assert torch.equal(seen["dec"][1], att)  # the decoder reads the whole reports
    torch.testing.assert_close(out_cut["loss_lm"], out_full["loss_lm"])
    assert abs(float(out_cut["loss_itc"]) - float(out_full["loss_itc"])) > 1e-6
    torch.testing.assert_close(cut.encode_text(ids, att), full.encode_text(enc_ids, enc_att))
    padded = dict(b, input_ids=torch.cat([ids, torch.zeros(4, 5, dtype=ids.dtype)], 1),
                  attention_mask=torch.cat([att, torch.zeros(4, 5, dtype=att.dtype)], 1))
    with torch.no_grad():
        torch.testing.assert_close(full(padded)["loss_lm"], out_full["loss_lm"])


def _gk_out(model, b):
    """The GK module's output for batch ``b`` (as the forward pass computes it)."""
    img = b["image"].to(model.vision_proj.weight.dtype)
    tokens = model.visual(img)
    boxes, rmask = model.detector(img, b["region_boxes"].to(img.dtype), b["region_mask"])
    feats, _ = model.knowledge_book()
    return model._run_gk(tokens[:, 1:], boxes, rmask, feats, book=feats)


def test_lm_vocab_restricts_the_lm_head_and_generation(tmp_path):
    """``text.lm_vocab``: the LM loss is the cross-entropy over those rows of the head (targets mapped to
    them, a token outside counting as [UNK]); generation emits only those tokens; the vocabulary comes
    back from a checkpoint; bad ids name the field."""
    from gkcore.data import report_token_ids

    vocab = report_token_ids(REPORTS[:2])
    torch.manual_seed(0)
    model = micro(text__lm_vocab=vocab, dropout=0.0).train()
    tok = model.tokenizer
    rows = model.lm_rows
    assert rows.tolist() == sorted(set(vocab) | {tok.sep_token_id, tok.unk_token_id})
    b = make_batch(model, B=4, seed=3)  # reports 3..6: some of their tokens are outside the vocabulary
    ids, att = b["input_ids"].long(), b["attention_mask"].long()
    assert not set(ids[att.bool()].tolist()) <= set(rows.tolist())
    out = model(b)
    with torch.no_grad():
        img_tokens, _ = model._image(b["image"])
        boxes, rmask = model.detector(b["image"], b["region_boxes"], b["region_mask"])
        feats, _ = model.knowledge_book()
        gk = model._run_gk(img_tokens[:, 1:], boxes, rmask, feats, book=feats)
        enc, enc_mask = model._decoder_memory(img_tokens, gk, rmask)
        dec_ids = ids.clone()
        dec_ids[:, 0] = model.bos_token_id
        h = model.decoder(dec_ids, att, enc, enc_mask)[:, :-1]
        logits = h @ model.lm_head.weight[rows].T + model.lm_head.bias[rows]
        pos = {t: i for i, t in enumerate(rows.tolist())}
        unk = pos[tok.unk_token_id]
        y = torch.tensor([[pos.get(t, unk) if a else -100 for t, a in zip(r[1:], m[1:])]
                          for r, m in zip(ids.tolist(), att.tolist())])
        exp = F.cross_entropy(logits.reshape(-1, len(rows)), y.reshape(-1), ignore_index=-100,
                              label_smoothing=model.config.loss.label_smoothing)
    torch.testing.assert_close(out["loss_lm"], exp, rtol=1e-4, atol=1e-4)
    model.eval()
    gen, _ = model.generate(b["image"][:2], max_length=10, num_beams=2)
    assert set(gen.flatten().tolist()) <= set(rows.tolist())
    path = str(tmp_path / "vocab.safetensors")
    model.save(path)
    back = GKMVLP.load(path).eval()
    assert back.config.text.lm_vocab == vocab and torch.equal(back.lm_rows, rows)
    torch.testing.assert_close(back.generate(b["image"][:2], max_length=10, num_beams=2)[0], gen)
    for bad in ([-1, 5], [30522], ["the"], [1.5]):
        with pytest.raises(ValueError, match="text.lm_vocab"):
            micro(text__lm_vocab=bad)


def test_zero_momentum_reuses_online_features():
    """``loss.momentum = 0`` without dropout: the momentum features are the online ones, so the momentum
    encoders are not run, and the losses match a momentum just above 0 that does run them; with dropout
    the momentum pass still runs."""
    torch.manual_seed(0)
    zero = micro(loss__momentum=0.0, dropout=0.0)
    torch.manual_seed(0)
    tiny = micro(loss__momentum=1e-12, dropout=0.0)
    torch.manual_seed(0)
    noisy = micro(loss__momentum=0.0, dropout=0.1)
    calls = []
    for mdl in (zero, tiny, noisy):
        mdl.train()
        mdl.visual_m.register_forward_hook(lambda mod, i, o, mdl=mdl: calls.append(mdl))
        mdl.text_encoder_m.register_forward_hook(lambda mod, i, o, mdl=mdl: calls.append(mdl))
    b = make_batch(zero, B=4, seed=5)
    a, o = zero(b), tiny(b)
    noisy(b)
    assert not any(c is zero for c in calls)
    assert sum(c is tiny for c in calls) == 2 and sum(c is noisy for c in calls) == 2
    for k in ("loss", "loss_itc", "loss_lm", "loss_gk"):
        torch.testing.assert_close(a[k], o[k], rtol=1e-5, atol=1e-5)
    zero.eval()
    zero(b)
    assert sum(c is zero for c in calls) == 2  # evaluation runs the momentum copies (they lag one step)


@pytest.mark.parametrize("freeze", [True, False])
def test_knowledge_encoder_freeze_switch(freeze):
    """With only the entity losses weighted, the text tower gets a gradient exactly when the knowledge
    encoder is not frozen (the prompts are then encoded with gradient)."""
    torch.manual_seed(0)
    model = micro(gk__freeze_knowledge_encoder=freeze, loss__w_itc=0.0, loss__w_itm=0.0, loss__w_lm=0.0)
    model.train()
    b = make_batch(model, B=4, seed=2)
    model(b)["loss"].backward()
    g = model.text_encoder.layer[0].attention.self.query.weight.grad
    if freeze:
        assert g is None or not bool(g.abs().sum() > 0)
    else:
        assert g is not None and bool(g.abs().sum() > 0)


def test_frozen_knowledge_encoder_book_computed_once():
    torch.manual_seed(0)
    model = micro(gk__knowledge_encoder="frozen")
    assert all(not p.requires_grad for p in model.knowledge_text.parameters())
    torch.testing.assert_close(model.knowledge_text.layer[0].attention.self.query.weight,
                               model.text_encoder.layer[0].attention.self.query.weight)
    rows = dict(parameter_table(model))
    assert rows["knowledge encoder (frozen copy)"] == sum(
        p.numel() for p in list(model.knowledge_text.parameters()) + list(model.knowledge_proj.parameters()))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    b = make_batch(model, B=4, seed=2)
    f0, _ = model.knowledge_book()
    for _ in range(2):
        out = model(b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert model.knowledge_book()[0] is f0  # the text tower trained, the frozen copy did not: same book
    assert not torch.equal(model.knowledge_text.layer[0].attention.self.query.weight,
                           model.text_encoder.layer[0].attention.self.query.weight)
    with pytest.raises(ValueError, match="contradicts"):
        micro(gk__knowledge_encoder="frozen", gk__freeze_knowledge_encoder=False)


def test_tiny_learns_a_fixed_batch():
    """A few AdamW steps on one fixed batch drive the total and the LM loss down (ITC / ITM / LECLS of a
    random-text-tower micro model move little in 8 steps: the entity prompts' features start almost equal)."""
    torch.manual_seed(0)
    model = micro(loss__queue_size=16)
    b = make_batch(model, B=4, seed=5, L=24)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.02)
    model.train()
    t0, losses = time.process_time(), []
    for _ in range(8):
        out = model(b)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append({k: float(out[k].detach()) for k in LOSSES})
    # CPU time of this process (robust to a box shared with other jobs): ~1-2 CPU-s per step here
    assert time.process_time() - t0 < 60
    first, last = losses[0], losses[-1]
    assert all(math.isfinite(v) for r in losses for v in r.values())
    assert last["loss"] < 0.9 * first["loss"], losses
    assert last["loss_lm"] < 0.85 * first["loss_lm"], losses


def test_config_saved_before_newer_fields_loads():
    """A saved config without fields added later: they take their defaults (vision.stem "patch",
    gk.center_queries off), except text.pooling, whose old behaviour was CLS pooling."""
    from gkcore.models.config import config_from_dict, config_to_dict

    d = config_to_dict(get_config("gk_mvlp_tiny"))
    assert d["text"]["pooling"] != "cls"  # else this test would not tell the legacy value from the default
    for part, key in (("vision", "stem"), ("gk", "center_queries"), ("text", "pooling")):
        del d[part][key]
    c = config_from_dict(d)
    assert (c.vision.stem, c.gk.center_queries, c.text.pooling) == ("patch", False, "cls")
