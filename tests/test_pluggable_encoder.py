"""The pluggable image encoder and what rides on it (issue 13): a ViT and a BatchNorm CNN from timm through
the whole model (tokens, GK module, losses, backward), the presets, per-module learning rates, old
checkpoints with ``visual.vit.*`` names, the no-GK ablation (``gk.enabled=False``), batched grounding
with cached prompts, and report generation with the decoder's key/value cache.
CPU only; timm models are built with random weights (nothing is downloaded).
Run with ``python -m pytest -q -x tests/test_pluggable_encoder.py``."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gkcore.data import knowledge  # noqa: E402
from gkcore.models import GKMVLP, create_model, get_config  # noqa: E402
from gkcore.models.config import VisionConfig  # noqa: E402
from gkcore.models.encoders import ImageEncoder  # noqa: E402
from test_model_gk_mvlp import LOSSES, MICRO, make_batch  # noqa: E402

#: MICRO with timm's resnet10t cut after layer3 (256 channels, stride 16) in place of the ViT: 64 px -> 4 x 4
CNN = {**MICRO, "image_size": 64, "vision.model_name": "resnet10t", "vision.feature_index": 3,
       "vision.patch_size": None, "vision.embed_dim": None, "vision.depth": None, "vision.num_heads": None}


def build(kind: str = "vit", **kw) -> GKMVLP:
    torch.manual_seed(0)
    return create_model("gk_mvlp_tiny", **{**(MICRO if kind == "vit" else CNN), **kw})


@pytest.fixture(scope="module")
def vit():
    return build("vit")


@pytest.fixture(scope="module")
def cnn():
    return build("cnn")


@pytest.fixture(scope="module")
def nogk():
    return build("vit", **{"gk.enabled": False})


# ----------------------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("name,fi,size,grid,width,stride", [
    ("vit_tiny_patch16_224", None, 32, (2, 2), 192, None),   # ViT: CLS + patch tokens
    ("resnet10t", 3, 64, (4, 4), 256, None),                 # ResNet layer3 (stride 16), global average first
    ("resnet10t", 3, 64, (8, 8), 256, 8),                    # layer3 dilated: a grid twice as fine
    ("resnet10t", None, 64, (2, 2), 512, None),              # the final feature map (stride 32)
])
def test_image_encoder_tokens_from_any_timm_model(name, fi, size, grid, width, stride):
    kw = dict(depth=1) if name.startswith("vit") else {}
    enc = ImageEncoder(VisionConfig(model_name=name, feature_index=fi, output_stride=stride, **kw), image_size=size,
                       channels=1)
    assert enc.grid_size == grid and enc.width == width
    x = torch.randn(2, 1, size, size)
    enc.eval()
    out = enc(x)
    assert out.shape == (2, 1 + grid[0] * grid[1], width)
    if not name.startswith("vit"):  # CNN: the pooled token is the mean of the cells
        torch.testing.assert_close(out[:, 0], out[:, 1:].mean(1))


@pytest.mark.parametrize("name,stride,match", [
    ("resnet10t", 4, "output_stride"),              # timm's ResNet dilates to 8, 16 or 32 only
    ("resnet10t", 0, "positive int"),
    ("vit_tiny_patch16_224", 8, "output_stride"),   # a ViT has no strides to dilate
])
def test_image_encoder_output_stride_it_cannot_take_names_the_argument(name, stride, match):
    fi, kw = (None, dict(depth=1)) if name.startswith("vit") else (3, {})
    with pytest.raises(ValueError, match=match):
        ImageEncoder(VisionConfig(model_name=name, feature_index=fi, output_stride=stride, **kw), image_size=64, channels=1)


def test_presets_image_encoders_on_meta_device():
    """gk_mvlp_base stays ViT-B/16 (14x14 + CLS), gk_mvlp_resnet50 is MedKLIP's ResNet-50 layer3 (1024
    channels, 14x14 at 224 px), gk_mvlp_tiny a resnet10t (256 channels, 8x8 at 128 px)."""
    for name, grid, width in (("gk_mvlp_base", (14, 14), 768), ("gk_mvlp_resnet50", (14, 14), 1024),
                              ("gk_mvlp_tiny", (8, 8), 256)):
        cfg = get_config(name)
        with torch.device("meta"):
            enc = ImageEncoder(cfg.vision, cfg.image_size, cfg.channels)
        assert (enc.grid_size, enc.width) == (grid, width), name
    assert get_config("gk_mvlp_base").vision.model_name == "vit_base_patch16_224"
    assert get_config("gk_mvlp_resnet50").vision.feature_index == 3


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_vit_and_cnn_through_the_gk_module_and_backward(kind, vit, cnn):
    model = vit if kind == "vit" else cnn
    gh, gw = model.visual.grid_size
    assert (gh, gw) == (4, 4)  # ViT: 32 px / 8 px patches; CNN: 64 px / stride 16
    b = make_batch(model, B=4, seed=1)
    model.train()
    model.zero_grad(set_to_none=True)
    tokens = model.visual(b["image"])
    assert tokens.shape == (4, 1 + gh * gw, model.visual.width)
    out = model(b)
    for k in LOSSES:
        assert torch.isfinite(out[k]) and float(out[k].detach()) > 0, k
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    # the stem learns; so does most of the encoder (timm zero-initialises each ResNet block's last
    # BatchNorm scale, so the convolution before it starts with a zero gradient)
    grads = [p.grad for p in model.visual.parameters() if p.requires_grad]
    assert grads[0].abs().sum() > 0 and all(torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) > 0.6 * len(grads)
    model.zero_grad(set_to_none=True)
    g = model.ground(b["image"][:2], "pleural effusion", region_boxes=b["region_boxes"][:2],
                     region_mask=b["region_mask"][:2])
    assert g["patch_map"].shape == g["patch_saliency"].shape == (2, gh, gw)
    assert g["region_scores"].shape == g["region_text_scores"].shape == (2, 29)
    assert model.encode_image(b["image"][:2], projected=False).shape == (2, model.visual.width)
    assert model.encode_image(b["image"][:2]).shape == (2, model.config.embed_dim)


# ---------------------------------------------------------------------------------------- lr scales
def test_lr_scales_make_the_trainer_param_groups(tmp_path):
    from gkcore.engine.trainer import TrainConfig, Trainer

    model = build("vit", **{"lr_scale.text_encoder": 0.04, "lr_scale.gk": 0.5, "lr_scale.decoder": 0.2})
    scales = model.lr_scales()
    assert scales == {"visual": 1.0, "text_encoder": 0.04, "fusion_encoder": 1.0, "decoder": 0.2, "gk": 0.5}
    tr = Trainer(model, [make_batch(model, B=2)], TrainConfig(steps=1, lr=1e-3, warmup_steps=0, progress=False,
                                                                weight_decay=0.05), str(tmp_path), device="cpu")
    want = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            top = name.split(".")[0]
            want[id(p)] = 1e-3 * scales.get(top, 1.0)
    got = {}
    for g in tr._param_groups():
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        for p in g["params"]:
            assert id(p) not in got
            got[id(p)] = g["lr"]
            if p.ndim < 2:
                assert g["weight_decay"] == 0.0
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k]) for k in want)
    # the shared word embeddings belong to the text encoder (named there first)
    emb = model.text_encoder.embeddings.word_embeddings.weight
    assert got[id(emb)] == pytest.approx(1e-3 * 0.04)
    assert not build("vit", **{"gk.enabled": False}).lr_scales().get("gk")


# ------------------------------------------------------------------------------------- persistence
def test_old_checkpoint_with_vit_keys_loads(vit, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "new.safetensors")
    vit.save(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    old = {k.replace("visual.backbone.", "visual.vit.").replace("visual_m.backbone.", "visual_m.vit."): v
           for k, v in sd.items()}
    assert any(k.startswith("visual.vit.") for k in old) and any(k.startswith("visual_m.vit.") for k in old)
    cfg = json.loads(meta["config"])
    cfg.pop("lr_scale")  # written before lr_scale / gk.enabled / vision.feature_index existed
    cfg["gk"].pop("enabled")
    cfg["vision"].pop("feature_index")
    opath = str(tmp_path / "old.safetensors")
    save_file(old, opath, metadata={**meta, "config": json.dumps(cfg)})
    loaded = GKMVLP.load(opath)
    ref = vit.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded.encode_image(x), vit.encode_image(x))
    # a file with a tensor the model lacks is refused
    save_file({**old, "bogus.weight": torch.zeros(2)}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="bogus"):
        GKMVLP.load(str(tmp_path / "bad.safetensors"))


def test_cnn_model_save_load_round_trip(cnn, tmp_path):
    path = str(tmp_path / "cnn.safetensors")
    cnn.save(path)
    loaded = GKMVLP.load(path)
    ref = cnn.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())  # BatchNorm stats included


# ------------------------------------------------------------------------------------ no-GK ablation
def test_without_gk_forward_backward(nogk):
    assert nogk.gk is None and not hasattr(nogk, "knowledge_text")
    b = make_batch(nogk, B=4, seed=2)
    nogk.train()
    nogk.zero_grad(set_to_none=True)
    out = nogk(b)
    assert float(out["loss_ecls"]) == 0.0 and float(out["loss_gk"]) == 0.0
    for k in ("loss_itc", "loss_itm", "loss_lm"):
        assert torch.isfinite(out[k]) and float(out[k].detach()) > 0, k
    w = nogk.config.loss
    torch.testing.assert_close(out["loss"], w.w_itc * out["loss_itc"] + w.w_itm * out["loss_itm"]
                               + w.w_lm * out["loss_lm"])
    out["loss"].backward()
    missing = [n for n, p in nogk.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    nogk.zero_grad(set_to_none=True)
    reps = nogk.generate_report(b["image"][:2], max_length=5)
    assert len(reps) == 2


def test_without_gk_zero_shot_is_clip_style_prompts(nogk):
    img = torch.randn(3, 1, 32, 32)
    p = nogk.zero_shot_classify(img)
    E = len(knowledge.ENTITY_NAMES)
    assert p.shape == (3, E) and bool(((p > 0) & (p < 1)).all())
    e = "cardiomegaly"
    v = nogk.encode_image(img)
    t = nogk.encode_text([e, f"no {e}"])
    scale = nogk._itc_scale()
    want = torch.softmax(torch.stack([v @ t[0], v @ t[1]], -1) * scale, -1)[:, 0]
    torch.testing.assert_close(nogk.zero_shot_classify(img, [e])[:, 0], want, atol=1e-5, rtol=1e-4)
    g = nogk.ground(img, [e, "pleural effusion", e])
    assert set(g) == {"region_text_scores"} and g["region_text_scores"].shape == (3, 29)
    torch.testing.assert_close(g["region_text_scores"].sum(-1), torch.ones(3))


@pytest.mark.parametrize("kind", ["gk", "nogk"])
def test_evaluate_tasks_work_with_and_without_gk(kind, vit, nogk):
    from gkcore.engine import evaluate as EV

    model = vit if kind == "gk" else nogk
    batches = []
    for s in range(2):
        b = make_batch(model, B=4, seed=10 + s)
        b["entity_labels"][:2, :] = 0
        b["entity_labels"][2:, :] = 1  # both classes for every entity
        b["finding_boxes"] = [[(3, 0.1, 0.1, 0.5, 0.5)], [], [(5, 0.4, 0.2, 0.9, 0.8), (3, 0.2, 0.2, 0.4, 0.4)],
                              [(5, 0.0, 0.0, 0.3, 0.3)]]
        batches.append(b)
    zs = EV.zero_shot_classification(model, batches)
    assert 0.0 <= zs["macro"] <= 1.0
    gr = EV.grounding(model, batches)
    assert gr["n_findings"] == 8
    if kind == "gk":
        assert 0.0 <= gr["pointing_game"] <= 1.0 and "pointing_game_saliency" in gr
    else:
        assert gr["pointing_game"] != gr["pointing_game"]  # NaN: no GK attention map
        assert 0.0 <= gr["pointing_game_region_text"] <= 1.0
    feats = EV.extract_features(model, batches, pooled=True)
    assert feats["pooled"].shape == (8, model.visual.width)
    probe = EV.linear_probe(feats, feats, key="pooled")
    assert "macro" in probe


# ------------------------------------------------------------------------------ batched grounding
def test_ground_one_entity_per_row_equals_one_call_per_entity(vit):
    b = make_batch(vit, B=3, seed=5)
    img, rb, rm = b["image"][:3], b["region_boxes"][:3], b["region_mask"][:3]
    ents = ["pleural effusion", "cardiomegaly", "pleural effusion"]
    g = vit.ground(img, ents, region_boxes=rb, region_mask=rm)
    for i, e in enumerate(ents):
        gi = vit.ground(img[i:i + 1], e, region_boxes=rb[i:i + 1], region_mask=rm[i:i + 1])
        for k in ("region_scores", "patch_map", "patch_saliency", "region_text_scores"):
            torch.testing.assert_close(g[k][i:i + 1], gi[k], atol=1e-5, rtol=1e-4, msg=f"{k} row {i}")
    # an entity outside the knowledge base joins the book as one more query (its name is the prompt)
    g2 = vit.ground(img, ents[:2] + ["a nodule in the left apex"], region_boxes=rb, region_mask=rm)
    assert g2["patch_map"].shape == (3, *vit.visual.grid_size)
    torch.testing.assert_close(g2["region_scores"].sum(-1), torch.ones(3))
    with pytest.raises(ValueError, match="one per image"):
        vit.ground(img, ents[:2])


def test_grounding_prompts_are_encoded_once(vit, monkeypatch):
    img = torch.randn(2, 1, 32, 32)
    vit.ground(img, "pneumothorax")
    calls = []
    orig = vit._encode_prompts
    monkeypatch.setattr(vit, "_encode_prompts", lambda *a, **k: calls.append(1) or orig(*a, **k))
    vit.ground(img, ["pneumothorax", "pneumothorax"])
    assert not calls  # region prompts and the knowledge book come from the caches
    # an optimizer step over the text tower drops the prompt cache (fused AdamW bumps no version counter, so
    # the cache listens to optimizer steps, as the knowledge book does)
    vit.text_proj.weight.grad = torch.zeros_like(vit.text_proj.weight)
    torch.optim.SGD([vit.text_proj.weight], lr=0.0).step()
    vit.text_proj.weight.grad = None
    vit.ground(img, "pneumothorax")
    assert calls


# ------------------------------------------------------------------------------- KV-cache decoding
@pytest.mark.parametrize("kind", ["vit", "cnn", "nogk"])
@pytest.mark.parametrize("beams", [1, 3])
def test_cached_generation_equals_uncached(kind, beams, vit, cnn, nogk):
    model = {"vit": vit, "cnn": cnn, "nogk": nogk}[kind]
    torch.manual_seed(0)
    img = torch.randn(2, 1, model.config.image_size, model.config.image_size)
    ids_c, sc_c = model.generate(img, max_length=10, num_beams=beams, use_cache=True)
    ids_u, sc_u = model.generate(img, max_length=10, num_beams=beams, use_cache=False)
    assert torch.equal(ids_c, ids_u)
    torch.testing.assert_close(sc_c, sc_u, atol=1e-4, rtol=1e-5)
    assert model.generate_report(img, max_length=10, num_beams=beams) == \
        model.generate_report(img, max_length=10, num_beams=beams, use_cache=False)


def test_cached_next_logprobs_match_the_full_prefix(vit):
    vit.eval()
    img = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        tokens = vit.visual(img)
        boxes, rmask = vit.detector(img)
        gk = vit._run_gk(tokens[:, 1:], boxes, rmask, vit.knowledge_book()[0])
        enc, enc_mask = vit._decoder_memory(tokens, gk, rmask)
        seq = torch.tensor([[vit.bos_token_id, 2003, 2540, 1012, 2053]])
        cache = [{} for _ in vit.decoder.layer]
        for t in range(1, seq.shape[1] + 1):
            a = vit._next_logprobs(seq[:, :t], enc, enc_mask, cache)
            b = vit._next_logprobs(seq[:, :t], enc, enc_mask)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
