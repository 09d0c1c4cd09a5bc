"""Anatomical region boxes for the GK module: ground truth, a fixed atlas, or a trainable detector.

Boxes everywhere are (B, 29, 4) normalised ``(x0, y0, x1, y1)`` in the model's image frame, in the
Chest ImaGenome region order (``REGIONS``), with a (B, 29) bool mask (False = region unknown / not
detected).

* ``RegionDetector(source="gt")``: the boxes of the batch (``batch["region_boxes"]``); when a caller has
  none (inference on a bare image), the fixed PA-view atlas :data:`ATLAS_BOXES`.
* ``RegionDetector(source="faster_rcnn")``: :class:`FasterRCNNRegionDetector`, a torchvision Faster
  R-CNN (ResNet-FPN backbone with a 1-channel stem, 29 region classes + background, random init), trained
  with :meth:`FasterRCNNRegionDetector.loss` on any dataset with region boxes; at inference the
  top-scoring box of each class and a "detected" mask (RGRG's recipe).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from gkcore.data.knowledge import NUM_REGIONS

__all__ = ["ATLAS_BOXES", "atlas_boxes", "RegionDetector", "FasterRCNNRegionDetector"]


# Rough PA-view positions (patient's right = image left); used only when no boxes are known.
_RIGHT = [(0.12, 0.15, 0.48, 0.80), (0.14, 0.15, 0.46, 0.38), (0.13, 0.38, 0.47, 0.58), (0.12, 0.58, 0.48, 0.80),
          (0.33, 0.38, 0.45, 0.52), (0.18, 0.12, 0.42, 0.22), (0.10, 0.72, 0.22, 0.84), (0.12, 0.70, 0.48, 0.82)]


def _mirror(b):
    return (1 - b[2], b[1], 1 - b[0], b[3])


_ATLAS = (_RIGHT + [_mirror(b) for b in _RIGHT] + [
    (0.46, 0.08, 0.54, 0.32),  # trachea
    (0.44, 0.05, 0.56, 0.95),  # spine
    (0.15, 0.12, 0.47, 0.22),  # right clavicle
    _mirror((0.15, 0.12, 0.47, 0.22)),  # left clavicle
    (0.50, 0.25, 0.62, 0.35),  # aortic arch
    (0.38, 0.20, 0.64, 0.75),  # mediastinum
    (0.40, 0.18, 0.60, 0.38),  # upper mediastinum
    (0.40, 0.25, 0.48, 0.42),  # svc
    (0.38, 0.45, 0.75, 0.78),  # cardiac silhouette
    (0.40, 0.42, 0.48, 0.50),  # cavoatrial junction
    (0.36, 0.50, 0.50, 0.72),  # right atrium
    (0.46, 0.32, 0.54, 0.38),  # carina
    (0.10, 0.82, 0.90, 1.00),  # abdomen
])
ATLAS_BOXES = torch.tensor(_ATLAS, dtype=torch.float32)
assert ATLAS_BOXES.shape == (NUM_REGIONS, 4)


def atlas_boxes(batch_size: int, device=None, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """The atlas boxes (B, 29, 4) and an all-True mask (B, 29)."""
    b = ATLAS_BOXES.to(device=device, dtype=dtype).unsqueeze(0).expand(batch_size, -1, -1).contiguous()
    return b, torch.ones(batch_size, NUM_REGIONS, dtype=torch.bool, device=device)


class FasterRCNNRegionDetector(nn.Module):
    """torchvision Faster R-CNN for the 29 anatomical regions on 1-channel (or C-channel) images.

    Inputs are images already normalised by the data pipeline, so the detector's own transform uses mean
    0 and std 1, resizing to ``image_size``. Random initialisation (no hub weights): the backbone uses
    trainable BatchNorm by default (``norm="frozen"`` for torchvision's frozen statistics, e.g. after
    loading pretrained weights with ``load_state_dict``). Extra keyword arguments go to torchvision's
    ``FasterRCNN`` (e.g. ``rpn_pre_nms_top_n_train``, ``box_batch_size_per_image``). ``loss(images, region_boxes, region_mask)`` returns the
    torchvision loss dict (train mode); ``detect(images)`` returns ``(boxes (B,29,4) normalised,
    mask (B,29) bool, scores (B,29))`` with the top-scoring box per class; a class without any detection
    above ``score_threshold`` is masked out (its box is the atlas box).
    """

    def __init__(self, backbone: str = "resnet50", image_size: int = 512, channels: int = 1,
                 trainable_layers: int = 5, score_threshold: float = 0.05, norm: str = "batch", **frcnn_kwargs):
        super().__init__()
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        from torchvision.ops import FrozenBatchNorm2d

        if norm not in ("batch", "frozen"):
            raise ValueError(f"norm must be 'batch' (trainable BatchNorm, for random init) or 'frozen', got {norm!r}")
        bb = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=trainable_layers,
                                 norm_layer=nn.BatchNorm2d if norm == "batch" else FrozenBatchNorm2d)
        bb.body.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.model = FasterRCNN(bb, num_classes=NUM_REGIONS + 1, min_size=image_size, max_size=image_size,
                                image_mean=[0.0] * channels, image_std=[1.0] * channels,
                                **{"box_score_thresh": 0.0, "box_detections_per_img": 10 * NUM_REGIONS, **frcnn_kwargs})
        self.image_size, self.channels, self.score_threshold = image_size, channels, score_threshold

    def _targets(self, images, region_boxes, region_mask):
        B, _, H, W = images.shape
        if region_boxes.shape != (B, NUM_REGIONS, 4):
            raise ValueError(f"region_boxes must have shape ({B}, {NUM_REGIONS}, 4), got {tuple(region_boxes.shape)}")
        if region_mask is None:
            region_mask = torch.ones(B, NUM_REGIONS, dtype=torch.bool, device=images.device)
        scale = torch.tensor([W, H, W, H], dtype=torch.float32, device=images.device)
        targets = []
        for b in range(B):
            keep = region_mask[b].bool() & (region_boxes[b, :, 2] > region_boxes[b, :, 0]) & \
                (region_boxes[b, :, 3] > region_boxes[b, :, 1])
            idx = keep.nonzero().flatten()
            targets.append({"boxes": region_boxes[b, idx].float() * scale, "labels": idx + 1})
        return targets

    def loss(self, images: torch.Tensor, region_boxes: torch.Tensor,
             region_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Training losses (dict of scalars, sum them to train) for a batch with ground-truth boxes."""
        if not self.training:
            raise RuntimeError("FasterRCNNRegionDetector.loss needs train mode (call .train())")
        return self.model(list(images), self._targets(images, region_boxes, region_mask))

    def fit(self, loader, steps: int, lr: float = 1e-3, weight_decay: float = 1e-4, progress: bool = True,
            optimizer: Optional[torch.optim.Optimizer] = None) -> list:
        """Train on batches with ground-truth boxes (any dataset with region boxes, e.g.
        ``gkcore.data.build_loader`` output: ``image`` (B, C, H, W), ``region_boxes`` (B, 29, 4),
        ``region_mask`` (B, 29)) for ``steps`` SGD-momentum steps, cycling over ``loader``; returns the
        total loss of every step. Images are used as they come (resized to ``image_size`` inside)."""
        from tqdm.auto import tqdm

        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        params = [p for p in self.parameters() if p.requires_grad]
        opt = optimizer or torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        self.train()
        losses, it = [], iter(loader)
        dev = next(self.parameters()).device
        bar = tqdm(range(steps), desc="detector", disable=not progress)
        for _ in bar:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            for k in ("image", "region_boxes"):
                if k not in batch:
                    raise ValueError(f"detector batches need {k!r} (got keys {sorted(batch)})")
            mask = batch.get("region_mask")
            out = self.loss(batch["image"].to(dev), batch["region_boxes"].to(dev),
                            None if mask is None else mask.to(dev))
            total = sum(out.values())
            if not torch.isfinite(total):
                raise FloatingPointError(f"detector loss is not finite: { {k: float(v) for k, v in out.items()} }")
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            losses.append(float(total.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        return losses

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        was = self.training
        self.eval()
        try:
            dets = self.model(list(images))
        finally:
            self.train(was)
        B, _, H, W = images.shape
        boxes, _ = atlas_boxes(B, images.device)
        boxes = boxes.clone()
        scores = torch.zeros(B, NUM_REGIONS, device=images.device)
        scale = torch.tensor([W, H, W, H], dtype=torch.float32, device=images.device)
        for b, d in enumerate(dets):
            # torchvision returns detections sorted by decreasing score: keep the first of each label.
            seen = set()
            for box, lab, sc in zip(d["boxes"], d["labels"].tolist(), d["scores"]):
                r = lab - 1
                if r in seen or not 0 <= r < NUM_REGIONS:
                    continue
                seen.add(r)
                boxes[b, r] = (box / scale).clamp(0, 1)
                scores[b, r] = sc
        mask = scores > self.score_threshold
        return boxes, mask, scores


class RegionDetector(nn.Module):
    """Source of region boxes for the GK module (see the module docstring).

    ``forward(images, region_boxes=None, region_mask=None) -> (boxes (B,29,4), mask (B,29))``:
    with ``source="gt"`` the given boxes (atlas when None); with ``source="faster_rcnn"`` the given
    boxes when ``prefer_given`` and they are present, else the detector's (no gradient).
    """

    def __init__(self, source: str = "gt", backbone: str = "resnet50", image_size: int = 512, channels: int = 1,
                 prefer_given: bool = True, detector: Optional[FasterRCNNRegionDetector] = None):
        super().__init__()
        if source not in ("gt", "faster_rcnn"):
            raise ValueError(f"detector source must be 'gt' or 'faster_rcnn', got {source!r}")
        if detector is not None and source != "faster_rcnn":
            raise ValueError("a detector instance needs source='faster_rcnn'")
        self.source, self.prefer_given = source, prefer_given
        if source == "faster_rcnn" and detector is None:
            detector = FasterRCNNRegionDetector(backbone, image_size, channels)
        self.detector = detector

    def forward(self, images: torch.Tensor, region_boxes: Optional[torch.Tensor] = None,
                region_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        B = images.shape[0]
        if region_boxes is not None and (not isinstance(region_boxes, torch.Tensor)
                                         or tuple(region_boxes.shape) != (B, NUM_REGIONS, 4)):
            raise ValueError(f"region_boxes must be a ({B}, {NUM_REGIONS}, 4) tensor, got "
                             f"{tuple(region_boxes.shape) if isinstance(region_boxes, torch.Tensor) else type(region_boxes)}")
        if region_mask is not None and tuple(region_mask.shape) != (B, NUM_REGIONS):
            raise ValueError(f"region_mask must have shape ({B}, {NUM_REGIONS}), got {tuple(region_mask.shape)}")
        if region_boxes is not None and (self.detector is None or self.prefer_given):
            if region_mask is None:
                region_mask = torch.ones(B, NUM_REGIONS, dtype=torch.bool, device=images.device)
            return region_boxes, region_mask.bool()
        if self.detector is not None:
            boxes, mask, _ = self.detector.detect(images)
            return boxes.to(images.dtype), mask
        return atlas_boxes(B, images.device, images.dtype)
