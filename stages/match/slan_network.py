"""SLAN self-locator over cached data (seed 003, Sec. 3.2; METHODS §9): text-guided region filtering and
progressive box regression on stage one's detector boxes and grid feature map.

Pipeline for one (image, text) pair (Algorithm 1 of the seed, with the store's data in place of DETR):

1. Grid ``(G*G, D_g)`` (row-major G x G cells over the whole image) -> linear to d -> map F ``(d, G, G)``.
   Vision [CLS] = average of F over cells. Text: frozen BERT outputs -> linear to d; t_cls = token 0.
2. Region embeddings: ``torchvision.ops.roi_align`` of F at the detector boxes (pixels mapped to grid
   cells per axis, so non-square images work), averaged over the ``pool x pool`` bins.
3. Region filter (Sec. 3.2.2): saliency -> normalise to max 1 -> sort -> keep S > h, at most T ->
   embeddings weighted by S.
4. Region adaptor (Sec. 3.2.3), ``levels`` times: cross attention (Eq. 1); a neighbourhood of size
   r_i (W, H) centred on the box, split in K x K sub-regions pooled from F; each sub-region's best cosine
   with the vision-aware words; offsets by Eq. 2; w' = p_w w, h' = p_h h; re-pool the new boxes.
   ḡ = mean of the levels' boxes (Eq. 3; the loss is in ``slan_losses``).
5. Image embedding v = l2(W_v (v_cls + mean_kept(S_t e_t))), text embedding t = l2(W_t t_cls);
   S(I, T) = v . t (cosine). ITM head: linear on cat(v_cls + mean_kept(S_t e_t), t_cls + mean(E^T_L)).

Choices the seed leaves open (ours; also in the README):
- Boxes come from the store (``regions/boxes`` or ``instances/boxes``), frozen; the seed's DETR and its
  pyramid decoder are replaced by the one cached grid map F, shared by all levels.
- The grid is projected to d before RoIAlign (equal to projecting after: both are linear and the
  bilinear weights sum to 1), which is cheaper.
- Saliency: the attention mass regions receive from the words, a_r = mean_w softmax_r(q_w . k_r / sqrt(d))
  (learned q, k), so S depends on the text; threshold ``None`` keeps the top T (Table 6's
  "sorted, fixed number" row). Every level's region embeddings are weighted by the same S.
- Eq. 1 with learned query/key maps (the seed says "multi-head attention layers"; one head here) and a
  residual + LayerNorm on the words, E^T_i = LN(E^T_{i-1} + softmax(Attn^T) E^G_{i-1}), so words keep
  their identity across levels. Eq. 1's E^G_i is not needed: Algorithm 1 re-embeds regions from G_i.
- Eq. 2 read as: j enumerates sub-regions column-major (⌊j/K⌋ = column, j mod K = row), the step is the
  sub-region's extent along the same axis (NW_i/K for Δx, NH_i/K for Δy; the seed's H_j/W_j labels agree
  with this for its square 224 x 224 inputs), and s_j is softmax_j(max_w cos(sub_j, E^T_w) / tau_i) over
  sub-regions whose centre lies inside the image (raw similarities would move boxes by unbounded
  amounts). K must be odd so ⌊K/2⌋ is the centre. tau_i, p_w, p_h learnable per level, p = exp(θ) > 0.
- (NH_i, NW_i) = r_i (H, W) with (H, W) the image size (the seed's H_i, W_i are its feature map's).
- Boxes are kept inside the image, at least 1 pixel wide and high, after every update.
- ``box_grad=True``: adapted boxes are pooled by bilinear sampling (``F.grid_sample``, the same samples
  as ``roi_align(aligned=True)``), which is differentiable in the box coordinates, so ITC/ITM train the
  adaptor too; torchvision's RoIAlign gives no gradient to boxes. ``False``: boxes are detached.
- Image/text embeddings for S, and which queues ITC uses: see ``slan_losses``.

Masks are bool with True = a real box / word token. Token 0 of every caption must be real ([CLS]).

(About 400 lines on purpose: the box geometry above the network is used by nothing else.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .slan_losses import FeatureQueue

# ---------------------------------------------------------------------------------------- geometry


def boxes_to_grid(boxes: torch.Tensor, hw: torch.Tensor, G: int) -> torch.Tensor:
    """Pixel boxes ``(..., 4)`` -> grid-cell coordinates (cell i spans [i, i+1]); ``hw (..., 2)`` the
    image (H, W) broadcastable to ``boxes[..., :2]``. Per axis, so non-square images map correctly."""
    scale = G / hw.to(boxes.dtype).flip(-1)  # (G/W, G/H)
    return boxes * torch.cat([scale, scale], -1)


def clip_boxes(boxes: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """Clip pixel boxes into their image, at least 1 pixel wide and high."""
    W, H = hw[..., 1:2].to(boxes.dtype), hw[..., 0:1].to(boxes.dtype)
    x1 = torch.minimum(boxes[..., 0:1].clamp(min=0), W - 1)
    y1 = torch.minimum(boxes[..., 1:2].clamp(min=0), H - 1)
    x2 = torch.maximum(torch.minimum(boxes[..., 2:3], W), x1 + 1)
    y2 = torch.maximum(torch.minimum(boxes[..., 3:4], H), y1 + 1)
    return torch.cat([x1, y1, x2, y2], -1)


def update_boxes(boxes: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, pw: torch.Tensor, ph: torch.Tensor,
                 hw: torch.Tensor) -> torch.Tensor:
    """Seed 003 Eq. 2's update: centre (x + Δx, y + Δy), size (p_w w, p_h h); then kept inside the image
    (centre clamped into it, size <= the image's, edges clipped, >= 1 pixel). ``hw`` broadcastable."""
    W, H = hw[..., 1].to(boxes.dtype), hw[..., 0].to(boxes.dtype)
    cx = torch.minimum(((boxes[..., 0] + boxes[..., 2]) / 2 + dx).clamp(min=0), W)
    cy = torch.minimum(((boxes[..., 1] + boxes[..., 3]) / 2 + dy).clamp(min=0), H)
    w = torch.minimum(((boxes[..., 2] - boxes[..., 0]) * pw).clamp(min=1), W)
    h = torch.minimum(((boxes[..., 3] - boxes[..., 1]) * ph).clamp(min=1), H)
    x1 = torch.minimum((cx - w / 2).clamp(min=0), W - 1)
    y1 = torch.minimum((cy - h / 2).clamp(min=0), H - 1)
    x2 = torch.maximum(torch.minimum(cx + w / 2, W), x1 + 1)
    y2 = torch.maximum(torch.minimum(cy + h / 2, H), y1 + 1)
    return torch.stack([x1, y1, x2, y2], -1)


def roi_pool(fmap: torch.Tensor, boxes: torch.Tensor, out: int, samples: int) -> torch.Tensor:
    """RoIAlign by bilinear sampling, differentiable in the boxes: ``fmap (N, d, G, G)``, ``boxes
    (N, M, 4)`` in grid coordinates -> ``(N, M, d, out, out)``. Same sample points and border rule as
    ``torchvision.ops.roi_align(aligned=True, sampling_ratio=samples)`` for boxes inside the map."""
    N, M = boxes.shape[:2]
    d, Gh, Gw = fmap.shape[1:]
    S = out * samples
    t = (torch.arange(S, device=boxes.device, dtype=boxes.dtype) + 0.5) / S
    x = boxes[..., 0:1] + t * (boxes[..., 2:3] - boxes[..., 0:1])  # (N, M, S) sample centres
    y = boxes[..., 1:2] + t * (boxes[..., 3:4] - boxes[..., 1:2])
    gx, gy = 2 * x / Gw - 1, 2 * y / Gh - 1  # align_corners=False: -1/+1 are the map's outer edges
    grid = torch.stack(torch.broadcast_tensors(gx[:, :, None, :], gy[:, :, :, None]), -1)
    v = F.grid_sample(fmap, grid.reshape(N, M * S, S, 2).to(fmap.dtype), mode="bilinear",
                      padding_mode="border", align_corners=False)  # (N, d, M*S, S)
    if samples > 1:  # bins are aligned samples x samples blocks of the (M*S, S) sample grid
        v = F.avg_pool2d(v, samples)
    return v.view(N, d, M, out, out).permute(0, 2, 1, 3, 4)


def eq2_offsets(s: torch.Tensor, nw: torch.Tensor, nh: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 003 Eq. 2 offsets from sub-region weights ``s (..., K*K)`` (j column-major):

        Δx = Σ_j s_j (NW/K) (⌊j/K⌋ - ⌊K/2⌋),   Δy = Σ_j s_j (NH/K) ((j mod K) - ⌊K/2⌋)

    i.e. the s-weighted sum of the sub-region centres relative to the neighbourhood (= box) centre.
    ``nw``/``nh`` (...) the neighbourhood's width and height."""
    j = torch.arange(K * K, device=s.device)
    col = (j // K - K // 2).to(s.dtype)
    row = (j % K - K // 2).to(s.dtype)
    return (s * col).sum(-1) * nw / K, (s * row).sum(-1) * nh / K


def subregion_similarity(fmap: torch.Tensor, boxes: torch.Tensor, hw: torch.Tensor, ratio: float, K: int,
                         samples: int, words: torch.Tensor, word_mask: torch.Tensor):
    """Neighbourhood embedding and similarity of one adaptor level (Algorithm 1 lines 5-7).

    ``fmap (n, d, G, G)``; ``boxes (n, m, T, 4)`` pixels; ``hw (n, 2)``; ``words (n, m, L, d)`` the
    vision-aware words with ``word_mask (n, m, L)``. The neighbourhood of a box is ``ratio * (W, H)``
    centred on it, split into K x K sub-regions pooled by RoIAlign + average. Returns ``sim (n, m, T, K*K)``
    = max over real words of the cosine, ``inside (n, m, T, K*K)`` (sub-region centre in the image),
    ``nw, nh (n, m, T)``; j enumerates sub-regions column-major as Eq. 2 does.
    """
    n, m, T, _ = boxes.shape
    G = fmap.shape[-1]
    hwb = hw[:, None, None, :].to(boxes.dtype)
    W, H = hwb[..., 1], hwb[..., 0]
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    nw, nh = (ratio * W).expand(n, m, T), (ratio * H).expand(n, m, T)
    nb = torch.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], -1)
    feats = roi_pool(fmap, boxes_to_grid(nb, hwb, G).reshape(n, m * T, 4), K, samples)  # (n, mT, d, K, K)
    sub = feats.transpose(-1, -2).reshape(n, m, T, -1, K * K).transpose(-1, -2)  # [col, row] -> j
    L = words.shape[2]
    cos = (F.normalize(sub, dim=-1).reshape(n, m, T * K * K, -1)  # one matmul per pair, no broadcast copies
           @ F.normalize(words, dim=-1).transpose(-1, -2)).view(n, m, T, K * K, L)
    sim = cos.masked_fill(~word_mask[:, :, None, None, :], float("-inf")).amax(-1)
    j = torch.arange(K * K, device=boxes.device)
    ox = (j // K - K // 2).to(boxes.dtype) * (nw / K)[..., None]
    oy = (j % K - K // 2).to(boxes.dtype) * (nh / K)[..., None]
    px, py = cx[..., None] + ox, cy[..., None] + oy
    inside = (px >= 0) & (px <= W[..., None]) & (py >= 0) & (py <= H[..., None])
    return sim, inside, nw, nh


def filter_regions(scores: torch.Tensor, valid: torch.Tensor, max_regions: int, threshold: float | None):
    """Region filter selection rule (seed 003 Sec. 3.2.2 steps a-d).

    ``scores (P, R)`` >= 0, ``valid (P, R)``. (a) normalise to max 1 per row; (b) sort descending;
    (c) keep S > ``threshold`` (None: no threshold); (d) at most ``max_regions``. Returns ``idx (P, T)``
    region indices in descending order (T = min(max_regions, R)), ``keep (P, T)``, ``norm (P, R)`` the
    normalised scores (0 at invalid regions; differentiable).
    """
    s = scores.masked_fill(~valid, 0.0)
    norm = s / s.amax(1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    top, idx = norm.detach().masked_fill(~valid, -1.0).topk(min(max_regions, s.shape[1]), dim=1)
    keep = top >= 0
    if threshold is not None:
        keep = keep & (top > threshold)
    return idx, keep, norm


# ---------------------------------------------------------------------------------------- model


@dataclass
class SLANImages:
    """Text-independent image encodings, for all-pairs scoring."""

    fmap: torch.Tensor  # (N, d, G, G)
    vcls: torch.Tensor  # (N, d)
    region: torch.Tensor  # (N, R, d) RoIAlign at the detector boxes
    key: torch.Tensor  # (N, R, d) saliency keys
    boxes: torch.Tensor  # (N, R, 4) pixels, clipped into the image
    mask: torch.Tensor  # (N, R)
    hw: torch.Tensor  # (N, 2) float


@dataclass
class SLANTexts:
    words: torch.Tensor  # (M, L, d)
    mask: torch.Tensor  # (M, L)
    embed: torch.Tensor  # (M, d) unit text embedding t


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (P, R, ...)``, ``idx (P, T)`` -> ``(P, T, ...)``."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


class SLAN(nn.Module):
    def __init__(self, grid_dim: int = 2048, text_dim: int = 384, d: int = 256, levels: int = 3,
                 ratios: tuple[float, ...] | None = None, K: int = 3, max_regions: int = 16,
                 threshold: float | None = 0.5, pool: int = 2, samples: int = 2, box_grad: bool = True,
                 queue_size: int = 4096, tau: float = 0.07, offset_tau: float = 0.1):
        super().__init__()
        ratios = tuple(0.5 ** i for i in range(levels)) if ratios is None else tuple(ratios)
        if len(ratios) != levels:
            raise ValueError(f"need one neighbourhood ratio per level: levels={levels}, ratios={ratios}")
        if K < 1 or K % 2 == 0:
            raise ValueError(f"K must be odd (Eq. 2 centres sub-regions on ⌊K/2⌋), got {K}")
        if threshold is not None and not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1) (scores are normalised to max 1) or None, got {threshold}")
        if max_regions < 1 or pool < 1 or samples < 1:
            raise ValueError("max_regions, pool and samples must be >= 1")
        self.d, self.levels, self.ratios, self.K = d, levels, ratios, K
        self.max_regions, self.threshold, self.pool, self.samples, self.box_grad = (
            max_regions, threshold, pool, samples, box_grad)
        self.vis_proj = nn.Linear(grid_dim, d)
        self.word_proj = nn.Linear(text_dim, d)
        self.sal_q, self.sal_k = nn.Linear(d, d), nn.Linear(d, d)
        self.cross_w = nn.ModuleList(nn.Linear(d, d) for _ in range(levels))  # Eq. 1 word side
        self.cross_r = nn.ModuleList(nn.Linear(d, d) for _ in range(levels))  # Eq. 1 region side
        self.word_norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(levels))
        self.log_pw = nn.Parameter(torch.zeros(levels))
        self.log_ph = nn.Parameter(torch.zeros(levels))
        self.log_offset_tau = nn.Parameter(torch.full((levels,), math.log(offset_tau)))
        self.img_head, self.txt_head = nn.Linear(d, d), nn.Linear(d, d)
        self.itm_head = nn.Linear(2 * d, 2)
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        self.queue = FeatureQueue(queue_size, d)

    @property
    def _dtype(self):
        return self.vis_proj.weight.dtype

    def _device(self):
        return self.vis_proj.weight.device

    @property
    def tau(self) -> torch.Tensor:
        """ITC temperature, learnable, clamped to [0.001, 0.5] (ALBEF's range)."""
        return self.log_tau.exp().clamp(0.001, 0.5)

    # ---- encoders ------------------------------------------------------------------------------

    def encode_images(self, grid: torch.Tensor, hw: torch.Tensor, boxes: torch.Tensor,
                      box_mask: torch.Tensor) -> SLANImages:
        """``grid (N, G*G, D_g)``, ``hw (N, 2)`` image (H, W), ``boxes (N, R, 4)`` pixels, ``box_mask (N, R)``."""
        N, P, Dg = grid.shape
        if Dg != self.vis_proj.in_features:
            raise ValueError(f"grid feature width {Dg} != the model's grid_dim {self.vis_proj.in_features}")
        G = math.isqrt(P)
        if G * G != P or G < 1:
            raise ValueError(f"grid has {P} cells per image, not a square G x G")
        if hw.shape != (N, 2) or boxes.shape[:1] != (N,) or boxes.shape[-1] != 4 or box_mask.shape != boxes.shape[:2]:
            raise ValueError(f"expected hw (N, 2), boxes (N, R, 4), box_mask (N, R) with N={N}; got "
                             f"{tuple(hw.shape)}, {tuple(boxes.shape)}, {tuple(box_mask.shape)}")
        mask = box_mask.bool()
        bad = ((hw < 1).any(1) | ~mask.any(1)).nonzero()
        if len(bad):
            b = int(bad[0])
            raise ValueError(f"image {b}: needs a positive size and at least one box, got hw={hw[b].tolist()} "
                             f"and {int(mask[b].sum())} boxes")
        fmap = self.vis_proj(grid.to(self._dtype)).transpose(1, 2).reshape(N, self.d, G, G)
        hw = hw.to(self._dtype)
        boxes = clip_boxes(boxes.to(self._dtype), hw[:, None, :])
        rois = boxes_to_grid(boxes, hw[:, None, :], G)
        region = roi_align(fmap, list(rois), self.pool, spatial_scale=1.0, sampling_ratio=self.samples,
                           aligned=True).mean((2, 3)).view(N, -1, self.d)
        return SLANImages(fmap, fmap.mean((2, 3)), region, self.sal_k(region), boxes, mask, hw)

    def encode_texts(self, words: torch.Tensor, word_mask: torch.Tensor) -> SLANTexts:
        """Frozen BERT outputs ``words (M, L, text_dim)``, ``word_mask (M, L)`` (token 0 = [CLS])."""
        if words.shape[-1] != self.word_proj.in_features:
            raise ValueError(f"text feature width {words.shape[-1]} != the model's text_dim {self.word_proj.in_features}")
        mask = word_mask.bool()
        bad = (~mask[:, 0]).nonzero()
        if len(bad):
            raise ValueError(f"caption {int(bad[0])}: token 0 ([CLS]) is masked out or the caption is empty")
        w = self.word_proj(words.to(self._dtype))
        return SLANTexts(w, mask, F.normalize(self.txt_head(w[:, 0]), dim=-1))

    # ---- the self-locator on pairs ---------------------------------------------------------------

    def _pool(self, fmap: torch.Tensor, boxes: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
        """Region embeddings at pixel ``boxes (n, m, T, 4)`` on ``fmap (n, d, G, G)`` -> ``(n, m, T, d)``."""
        n, m, T, _ = boxes.shape
        if not self.box_grad:
            boxes = boxes.detach()
        g = boxes_to_grid(boxes, hw[:, None, None, :], fmap.shape[-1]).reshape(n, m * T, 4)
        return roi_pool(fmap, g, self.pool, self.samples).mean((3, 4)).view(n, m, T, self.d)

    def _pairs(self, img: SLANImages, txt: SLANTexts, ii: torch.Tensor, tt: torch.Tensor, full: bool = True) -> dict:
        """Every image ``ii[a]`` with each text ``tt[a, b]`` -> dict of ``(n, m, ...)`` tensors."""
        n, m = tt.shape
        d, R = self.d, img.region.shape[1]
        fmap, hw = img.fmap[ii], img.hw[ii]
        rmask = img.mask[ii][:, None].expand(n, m, R)
        words, wmask = txt.words[tt], txt.mask[tt]  # (n, m, L, d), (n, m, L)
        # Region filter: attention mass each region receives from the words.
        q = self.sal_q(words)
        L = q.shape[2]
        logits = (q.reshape(n, m * L, d) @ img.key[ii].transpose(-1, -2)).view(n, m, L, R) / math.sqrt(d)
        attn0 = logits.masked_fill(~rmask[:, :, None, :], float("-inf")).softmax(-1)
        wm = wmask[..., None].to(attn0.dtype)
        mass = (attn0 * wm).sum(2) / wm.sum(2)  # (n, m, R)
        idx, keep, sal = filter_regions(mass.flatten(0, 1), rmask.flatten(0, 1), self.max_regions, self.threshold)
        T = idx.shape[1]
        idx, keep, sal = idx.view(n, m, T), keep.view(n, m, T), sal.view(n, m, R)
        weight = sal.gather(2, idx) * keep
        boxes0 = _gather(img.boxes[ii][:, None].expand(n, m, R, 4).flatten(0, 1), idx.flatten(0, 1)).view(n, m, T, 4)
        region0 = _gather(img.region[ii][:, None].expand(n, m, R, d).flatten(0, 1), idx.flatten(0, 1))
        e = region0.view(n, m, T, d) * weight[..., None]
        kmask = keep[:, :, None, :]  # (n, m, 1, T) for word -> region softmax
        attn_kept = attn0.gather(3, idx[:, :, None, :].expand(n, m, attn0.shape[2], T)).masked_fill(~kmask, 0.0)
        attn_kept = attn_kept / attn_kept.sum(-1, keepdim=True).clamp_min(1e-12)
        boxes, level_boxes = boxes0, []
        for i in range(self.levels):
            # Eq. 1 (ours: learned q/k, residual + LayerNorm on the words).
            att = self.cross_w[i](words) @ self.cross_r[i](e).transpose(-1, -2) / math.sqrt(d)  # Attn^T (n, m, L, T)
            attn_kept = att.masked_fill(~kmask, float("-inf")).softmax(-1)
            words = self.word_norm[i](words + attn_kept @ e)
            pool_boxes = boxes if self.box_grad else boxes.detach()
            sim, inside, nw, nh = subregion_similarity(fmap, pool_boxes, hw, self.ratios[i], self.K, self.samples,
                                                       words, wmask)
            s = (sim / self.log_offset_tau[i].exp()).masked_fill(~inside, float("-inf")).softmax(-1)
            dx, dy = eq2_offsets(s, nw, nh, self.K)
            boxes = update_boxes(boxes, dx, dy, self.log_pw[i].exp(), self.log_ph[i].exp(), hw[:, None, None, :])
            level_boxes.append(boxes)
            e = self._pool(fmap, boxes, hw) * weight[..., None]
        kf = keep[..., None].to(e.dtype)
        v_fused = img.vcls[ii][:, None] + (e * kf).sum(2) / kf.sum(2)  # (n, m, d)
        v = F.normalize(self.img_head(v_fused), dim=-1)
        t = txt.embed[tt]
        wm = wmask[..., None].to(words.dtype)
        t_fused = txt.words[tt][:, :, 0] + (words * wm).sum(2) / wm.sum(2)
        out = {"sim": (v * t).sum(-1), "itm_logits": self.itm_head(torch.cat([v_fused, t_fused], -1)),
               "img_embed": v, "txt_embed": t}
        if full:
            attn_kept = attn_kept * wmask[..., None].to(attn_kept.dtype)
            attn = attn_kept.new_zeros(*attn_kept.shape[:3], R).scatter(3, idx[:, :, None, :].expand_as(attn_kept),
                                                                        attn_kept)
            lv = torch.stack(level_boxes, 2) if level_boxes else boxes0.new_zeros(n, m, 0, T, 4)
            out.update(saliency=sal, keep_idx=idx, keep=keep, weights=weight, boxes_before=boxes0, boxes=lv,
                       boxes_after=boxes, target=lv.mean(2) if level_boxes else boxes0, attn_kept=attn_kept,
                       attn=attn)
        return out

    def forward(self, grid, hw, boxes, box_mask, words, word_mask, all_pairs: bool = True) -> dict:
        """Matched pairs: image b with text b.

        Inputs: ``grid (B, G*G, D_g)``, ``hw (B, 2)``, ``boxes (B, R, 4)`` pixels, ``box_mask (B, R)``,
        ``words (B, L, text_dim)``, ``word_mask (B, L)``. Per matched pair: ``score (B,)`` = S,
        ``img_embed``/``txt_embed (B, d)`` unit, ``saliency (B, R)`` normalised, ``keep_idx``/``keep``/
        ``weights (B, T)``, ``boxes_before (B, T, 4)`` (kept detector boxes), ``boxes (B, levels, T, 4)``,
        ``boxes_after (B, T, 4)`` (last level), ``target (B, T, 4)`` = ḡ, ``attn (B, L, R)`` word ->
        region (last Eq. 1 level, or the filter's attention when levels=0; 0 on dropped regions and padded
        words), ``attn_kept (B, L, T)``, ``region_embed (B, R, d)``, ``word_embed (B, L, d)``, ``hw``,
        ``tau``. With ``all_pairs=True``: ``sim (B, B)`` S(image i, text j) and ``itm_logits (B, B, 2)``
        for every pair (B^2 self-locator passes, differentiable); else ``itm_logits (B, 2)``.
        """
        B = grid.shape[0]
        if words.shape[0] != B:
            raise ValueError(f"forward pairs row b with row b: got {B} images, {words.shape[0]} texts")
        img = self.encode_images(grid, hw, boxes, box_mask)
        txt = self.encode_texts(words, word_mask)
        ar = torch.arange(B, device=grid.device)
        tt = ar[None].expand(B, B) if all_pairs else ar[:, None]
        res = self._pairs(img, txt, ar, tt)
        pick = (lambda x: x[ar, ar]) if all_pairs else (lambda x: x[:, 0])
        out = {k: pick(v) for k, v in res.items()}
        out["score"] = out.pop("sim")
        if all_pairs:
            out["sim"], out["itm_logits"] = res["sim"], res["itm_logits"]
        out.update(region_embed=img.region, word_embed=txt.words, hw=img.hw, tau=self.tau)
        return out

    # ---- all-pairs evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def score_matrix(self, grid, hw, boxes, box_mask, words, word_mask, block: int = 1024,
                     enc_block: int = 256) -> torch.Tensor:
        """S for every (image, text) pair -> ``(n_img, n_txt)`` on the model's device, in eval mode
        (restored after). Encoders run ``enc_block`` rows at a time; the self-locator ``block`` pairs."""
        was = self.training
        self.eval()
        try:
            dev = self._device()
            parts = [self.encode_images(grid[s:s + enc_block].to(dev), hw[s:s + enc_block].to(dev),
                                        boxes[s:s + enc_block].to(dev), box_mask[s:s + enc_block].to(dev))
                     for s in range(0, grid.shape[0], enc_block)]
            img = SLANImages(*(torch.cat([getattr(p, f) for p in parts]) for f in SLANImages.__dataclass_fields__))
            tparts = [self.encode_texts(words[s:s + enc_block].to(dev), word_mask[s:s + enc_block].to(dev))
                      for s in range(0, words.shape[0], enc_block)]
            txt = SLANTexts(*(torch.cat([getattr(p, f) for p in tparts]) for f in SLANTexts.__dataclass_fields__))
            n_img, n_txt = img.vcls.shape[0], txt.embed.shape[0]
            ct = max(1, min(n_txt, block))
            ci = max(1, block // ct)
            out = torch.empty(n_img, n_txt, device=dev)
            for a in range(0, n_img, ci):
                ii = torch.arange(a, min(a + ci, n_img), device=dev)
                for b in range(0, n_txt, ct):
                    tt = torch.arange(b, min(b + ct, n_txt), device=dev)[None].expand(len(ii), -1)
                    out[ii[0]:ii[-1] + 1, b:b + tt.shape[1]] = self._pairs(img, txt, ii, tt, full=False)["sim"]
            return out
        finally:
            self.train(was)
