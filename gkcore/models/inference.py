"""GK-MVLP's inference API: image and report embeddings, zero-shot classification and grounding through
the GK module (or, for a model built with ``gk.enabled=False``, through text prompts in the ITC space,
CLIP / ALBEF style). Mixed into :class:`~gkcore.models.gk_mvlp.GKMVLP`; report generation is in
:mod:`gkcore.models.generation`.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from gkcore.data import knowledge as K
from .gk_module import GKModule

__all__ = ["InferenceAPI", "inference"]


def inference(fn):
    """Inference API methods run without autograd and in eval mode (no dropout); the mode is restored."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(self, *args, **kwargs)
        finally:
            self.train(was)
    return wrapper


class InferenceAPI:
    """Embeddings, zero-shot classification and grounding of :class:`~gkcore.models.gk_mvlp.GKMVLP` (a mixin)."""

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a (B, C, H, W) tensor")
        if images.shape[1] != self.config.channels or tuple(images.shape[2:]) != (self.config.image_size,) * 2:
            raise ValueError(f"images have shape {tuple(images.shape)}, the model expects (B, {self.config.channels}, "
                             f"{self.config.image_size}, {self.config.image_size})")
        return images.to(self.vision_proj.weight.device, self.vision_proj.weight.dtype)

    @inference
    def encode_image(self, images: torch.Tensor, projected: bool = True) -> torch.Tensor:
        """L2-normalised image embeddings (B, De) (the projected pooled image token); with
        ``projected=False`` the image encoder's pooled feature itself (B, Dv) (ViT CLS / CNN global
        average), unnormalised, e.g. for linear probes. :meth:`image_features` gives both from one pass."""
        emb, pooled = self.image_features(images)
        return emb if projected else pooled

    @inference
    def image_features(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, De), pooled features (B, Dv)) of :meth:`encode_image`, from one encoder pass."""
        tokens, emb = self._image(self._images(images))
        return emb, tokens[:, 0]

    @inference
    def encode_text(self, input_ids: Union[torch.Tensor, Sequence[str]],
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalised report embeddings (B, De); ``input_ids`` (B, L) with ``attention_mask``, or a list
        of strings (tokenised here)."""
        dev = self.vision_proj.weight.device
        if not isinstance(input_ids, torch.Tensor):
            input_ids, attention_mask = self._tokenize(input_ids, dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, att = self._encoder_text(input_ids.to(dev).long(), attention_mask.to(dev).long())
        return F.normalize(self.text_proj(self.pool_text(self.text_encoder(ids, att), att)), dim=-1)

    def _query_feats(self, entities: Optional[Sequence[str]]):
        feats, _ = self.knowledge_book()
        if entities is None:
            return feats
        if isinstance(entities, str):
            entities = [entities]
        names = list(K.ENTITY_NAMES)
        rows, out = [], [None] * len(entities)
        for i, e in enumerate(entities):
            if e in names:
                out[i] = feats[names.index(e)]
            else:
                rows.append(i)
        if rows:  # entities outside the knowledge base: their name is the prompt (zero-shot)
            f, _ = self._encode_prompts([entities[i] for i in rows], feats.device, feats.dtype, grad=False)
            for j, i in enumerate(rows):
                out[i] = f[j]
        return torch.stack(out)

    def _gk_infer(self, images, entities, region_boxes, region_mask, patch_grad: bool = False):
        """Image tokens, boxes, region mask and the GK output for ``entities``. ``patch_grad``: the GK
        module runs with autograd on (a copy of) the patch tokens, returned as ``out["patches"]``."""
        images = self._images(images)
        tokens = self.visual(images)
        if region_boxes is not None:
            region_boxes = region_boxes.to(images.device, images.dtype)
        boxes, rmask = self.detector(images, region_boxes, None if region_mask is None else region_mask.to(images.device))
        q = self._query_feats(entities)
        with torch.set_grad_enabled(patch_grad):
            patches = tokens[:, 1:].detach().requires_grad_(patch_grad)
            out = self._run_gk(patches, boxes, rmask, q, with_regions=False)
        out["patches"] = patches
        return tokens, boxes, rmask, out

    @inference
    def zero_shot_classify(self, images: torch.Tensor, entities: Optional[Sequence[str]] = None,
                           region_boxes: Optional[torch.Tensor] = None,
                           region_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """P(entity present) (B, E') through the GK module. ``entities``: names of knowledge-base entities
        (their "{entity}: {description}" prompt is used) or any other text (used as the prompt);
        None = every knowledge-base entity. Boxes default to the detector's / the atlas.

        Without the GK module (``gk.enabled=False``): CLIP-style prompts in the ITC space, P(present) =
        softmax over {"{entity}", "no {entity}"} of the image embedding's cosine with each prompt
        embedding / the ITC temperature (the boxes are not used)."""
        if self.gk is None:
            return self._prompt_zero_shot(images, entities)
        _, _, _, out = self._gk_infer(images, entities, region_boxes, region_mask)
        return GKModule.probabilities(out["logits"])

    def _prompt_zero_shot(self, images: torch.Tensor, entities: Optional[Sequence[str]]) -> torch.Tensor:
        names = list(K.ENTITY_NAMES) if entities is None else ([entities] if isinstance(entities, str) else list(entities))
        img = self._image(self._images(images))[1]
        pos = self.prompt_embeddings(names, img.device, img.dtype)
        neg = self.prompt_embeddings([f"no {e}" for e in names], img.device, img.dtype)
        scale = self._itc_scale().to(img.device).float()
        sims = torch.stack([img.float() @ pos.float().T, img.float() @ neg.float().T], -1) * scale  # (B, E', 2)
        return torch.softmax(sims, -1)[..., 0]

    def _entity_list(self, entity: Union[str, Sequence[str]], B: int) -> List[str]:
        if isinstance(entity, str):
            return [entity] * B
        ents = list(entity)
        if len(ents) != B or not all(isinstance(e, str) for e in ents):
            raise ValueError(f"entities must be a string or a list of {B} strings (one per image), got "
                             f"{len(ents)} item(s)")
        return ents

    def _region_text_scores(self, tokens, boxes, rmask, ents: List[str]) -> torch.Tensor:
        """(B, 29) softmax over the present regions of the ITC similarity between each region's pooled
        feature and the prompt "{entity} in the {region}" of the row's entity (prompts cached)."""
        from gkcore.functional import region_pool

        regions = list(K.REGIONS)
        uniq = list(dict.fromkeys(ents))
        pe = self.prompt_embeddings([f"{e} in the {r}" for e in uniq for r in regions], tokens.device,
                                    tokens.dtype).view(len(uniq), len(regions), -1)
        pe = pe[torch.tensor([uniq.index(e) for e in ents], device=tokens.device)]  # (B, 29, De)
        rf = region_pool(tokens[:, 1:], boxes.to(tokens.dtype), self.visual.grid_size, backend=self.backend)
        rf = F.normalize(self.vision_proj(rf), dim=-1)  # (B, 29, De)
        sim = torch.einsum("brd,brd->br", rf.float(), pe.float()) * self._itc_scale().float()
        sim = sim.masked_fill(~rmask.bool(), float("-inf"))
        return torch.softmax(sim, -1).nan_to_num(0.0)

    @inference
    def ground(self, images: torch.Tensor, entities: Union[str, Sequence[str]],
               region_boxes: Optional[torch.Tensor] = None,
               region_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Where is the entity? ``entities``: one name for every image, or a list with one name per image
        (B strings). The GK module runs once with the whole knowledge book as its queries (entities
        outside the knowledge base appended, their name as the prompt), and each row reads its entity's
        column:

        ``region_scores`` (B, 29): the GK fusion's region attention for the entity query (mean over
        layers and heads; masked regions 0; sums to 1 over present regions); ``patch_map`` (B, gh, gw):
        the fusion's patch attention when it attends to patches, else softmax over patches of the cosine
        similarity between the fused entity feature and the patch tokens (temperature 0.1);
        ``patch_saliency`` (B, gh, gw): gradient saliency of the GK decision (Simonyan et al. 2014), the
        L2 norm over channels of d(logit_present - logit_absent) / d(patch token), through the GK module
        with the image tokens fixed, normalised to sum to 1 (computed with autograd inside this no-grad
        method); ``region_text_scores`` (B, 29): ITC-space grounding with the region-aware prompts
        "{entity} in the {region}": softmax over the present regions of
        ``vision_proj(region_pool(patches, box_r)) . text_proj(prompt_r) / temp`` (masked regions 0;
        the prompt embeddings are cached until the text tower changes).

        A model without the GK module (``gk.enabled=False``) returns ``region_text_scores`` only."""
        images = self._images(images)
        B = images.shape[0]
        ents = self._entity_list(entities, B)
        tokens = self.visual(images)
        if region_boxes is not None:
            region_boxes = region_boxes.to(images.device, images.dtype)
        boxes, rmask = self.detector(images, region_boxes, None if region_mask is None else region_mask.to(images.device))
        res = {"region_text_scores": self._region_text_scores(tokens, boxes, rmask, ents)}
        if self.gk is None:
            return res
        # the whole knowledge book as queries (+ unknown entities); each row's column
        book, _ = self.knowledge_book(images.device, tokens.dtype)
        names = list(K.ENTITY_NAMES)
        extra = list(dict.fromkeys(e for e in ents if e not in names))
        q = book
        if extra:
            f, _ = self._encode_prompts(extra, book.device, book.dtype, grad=False)
            q = torch.cat([book, f])
        col = torch.tensor([names.index(e) if e in names else len(names) + extra.index(e) for e in ents],
                           device=images.device)
        rows = torch.arange(B, device=images.device)
        with torch.enable_grad():
            patches = tokens[:, 1:].detach().requires_grad_(True)
            out = self._run_gk(patches, boxes, rmask, q, book=book, with_regions=False)
        gh, gw = self.visual.grid_size
        ra = out["region_attn"]
        if ra is None:
            raise RuntimeError("the GK fusion returned no region attention maps")
        rs = ra[rows, col].float() * rmask.float()
        rs = rs / rs.sum(-1, keepdim=True).clamp(min=1e-12)
        pa = out.get("patch_attn")
        if pa is not None:
            pm = pa[rows, col].float()
            pm = pm / pm.sum(-1, keepdim=True).clamp(min=1e-12)
        else:
            z = F.normalize(out["z"][rows, col].float(), dim=-1)
            p = F.normalize(tokens[:, 1:].float(), dim=-1)
            pm = torch.softmax(torch.einsum("bd,bnd->bn", z, p) / 0.1, dim=-1)
        # gradient saliency of each row's decision on its patch tokens (rows are independent in the GK module)
        with torch.enable_grad():
            lo = out["logits"][rows, col]  # (B, 2)
            (g,) = torch.autograd.grad((lo[:, 1] - lo[:, 0]).float().sum(), patches)
        sal = g.float().norm(dim=-1)
        sal = sal / sal.sum(-1, keepdim=True).clamp(min=1e-12)
        res.update(region_scores=rs, patch_map=pm.view(B, gh, gw), patch_saliency=sal.view(B, gh, gw))
        return res
