"""MMCA: Multi-Modality Cross Attention for image-sentence matching (seed 001; METHODS §4).

Self-attention module: regions (bottom-up features) -> FC -> Transformer unit -> average pool -> l2 -> i0;
frozen BERT token outputs -> 1-D CNN (windows 1, 2, 3) -> max-pool -> FC -> l2 -> c0.
Cross-attention module: one Transformer unit over the stacked pair [R; E] -> split -> regions: average
pool -> l2 -> i1; words: 1-D CNN + max-pool + FC -> l2 -> c1.  S(I, T) = i0.c0 + alpha * i1.c1.

Choices the paper leaves open (ours, documented here and in the README):
- R entering the cross unit is the FC output (before the self-attention unit), as Sec. 3.4 writes
  Y = [R; E]. E is the BERT output projected by a linear layer to d, since R and E must share a width.
- The words' head in the cross module has its own weights (its input is d-dim, c0's is BERT-dim; the
  paper says the two are "quite similar", not shared).
- Eq. 7 writes LayerNorm, the text says l2; we l2-normalise every embedding, so products are cosines.
- Feed-forward width = d (Eq. 4 gives W1, W2 as d x d); post-LayerNorm residual sub-layers (Fig. 3).
- 1-D convolutions see zeros beyond the last word, and max-pool over windows starting at real words,
  so results do not depend on how much padding a batch has.
- Attention for CCR/CCS (METHODS §7): the cross unit's softmax probabilities (before dropout) averaged
  over heads, word-query rows restricted to region keys and renormalised to sum to 1.

Masks are bool with True = a real region / word token.

:class:`MmcaMatch` puts MMCA behind the matching protocol (``protocol``): BERT text and region features
in, hardest-negative triplet; ICA ranks log(w · R_valid) of the cross-unit weights; evaluation can
shortlist by i0·c0 and rerank (METHODS §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .protocol import MatchModel, attention_scores


def _check_mask(mask: torch.Tensor, what: str) -> torch.Tensor:
    mask = mask.bool()
    empty = (~mask.any(dim=1)).nonzero()
    if len(empty):
        raise ValueError(f"{what} {int(empty[0])} has no valid entries in its mask")
    return mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x (B, N, d)`` over the positions where ``mask (B, N)`` is True."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class TransformerUnit(nn.Module):
    """One Transformer encoder layer (multi-head attention + feed-forward, post-LayerNorm) that also
    returns its attention probabilities averaged over heads, taken before dropout."""

    def __init__(self, d: int, heads: int = 16, ff_dim: int | None = None, dropout: float = 0.1):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        ff_dim = ff_dim or d
        self.ff = nn.Sequential(nn.Linear(d, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, N, d)``, ``mask (B, N)`` True = real -> ``(y (B, N, d), attn (B, N, N))``."""
        B, N, d = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1)  # (B, heads, N, N)
        ctx = (self.drop(probs) @ v).transpose(1, 2).reshape(B, N, d)
        x = self.norm1(x + self.drop(self.out(ctx)))
        x = self.norm2(x + self.drop(self.ff(x)))
        return x, probs.mean(1)


class TextCNNHead(nn.Module):
    """1-D convolutions with windows 1, 2, 3 (``d`` filters each), ReLU, max over word positions,
    concat -> FC -> l2 (seed 001 Eqs. 6-7)."""

    def __init__(self, in_dim: int, d: int, windows: tuple[int, ...] = (1, 2, 3)):
        super().__init__()
        self.windows = windows
        self.convs = nn.ModuleList(nn.Conv1d(in_dim, d, w) for w in windows)
        self.fc = nn.Linear(d * len(windows), d)

    def forward(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = (words * mask.unsqueeze(-1).to(words.dtype)).transpose(1, 2)  # (B, in, L), zeros at padding
        pooled = []
        for w, conv in zip(self.windows, self.convs):
            p = F.relu(conv(F.pad(x, (0, w - 1))))  # (B, d, L): one output per start position
            pooled.append(p.masked_fill(~mask[:, None, :], float("-inf")).amax(-1))
        return F.normalize(self.fc(torch.cat(pooled, -1)), dim=-1)


@dataclass
class MMCAEncoded:
    """Per-image and per-text results of the self-attention module, for all-pairs scoring."""

    i0: torch.Tensor  # (n_img, d)
    region_embed: torch.Tensor  # (n_img, R, d)
    region_mask: torch.Tensor  # (n_img, R)
    c0: torch.Tensor  # (n_txt, d)
    word_embed: torch.Tensor  # (n_txt, L, d)
    word_mask: torch.Tensor  # (n_txt, L)


class MMCA(nn.Module):
    def __init__(self, region_dim: int = 2048, text_dim: int = 384, d: int = 256, heads: int = 16,
                 alpha: float = 0.2, dropout: float = 0.1, ff_dim: int | None = None):
        super().__init__()
        self.alpha = alpha
        self.region_fc = nn.Linear(region_dim, d)
        self.self_unit = TransformerUnit(d, heads, ff_dim, dropout)
        self.text_head0 = TextCNNHead(text_dim, d)
        self.word_proj = nn.Linear(text_dim, d)
        self.cross_unit = TransformerUnit(d, heads, ff_dim, dropout)
        self.text_head1 = TextCNNHead(d, d)

    @property
    def _dtype(self):
        return self.region_fc.weight.dtype

    def encode_image(self, regions: torch.Tensor, region_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``regions (B, R, region_dim)`` -> ``(i0 (B, d) unit norm, region_embed R (B, R, d))``."""
        mask = _check_mask(region_mask, "image")
        r = self.region_fc(regions.to(self._dtype))
        rs, _ = self.self_unit(r, mask)
        return F.normalize(masked_mean(rs, mask), dim=-1), r

    def encode_text(self, words: torch.Tensor, word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT outputs ``words (B, L, text_dim)`` -> ``(c0 (B, d) unit norm, word_embed E (B, L, d))``."""
        mask = _check_mask(word_mask, "caption")
        words = words.to(self._dtype)
        return self.text_head0(words, mask), self.word_proj(words)

    def cross(self, region_embed, region_mask, word_embed, word_mask):
        """Cross-attention module on matched rows -> ``(i1 (B, d), c1 (B, d), attn (B, Lw, R))``.

        ``attn[b, w, r]``: word w's attention on region r, head-averaged, restricted to region keys and
        renormalised (rows of padded words are 0).
        """
        rmask, wmask = region_mask.bool(), word_mask.bool()
        R = region_embed.shape[1]
        y, attn = self.cross_unit(torch.cat([region_embed, word_embed], 1), torch.cat([rmask, wmask], 1))
        i1 = F.normalize(masked_mean(y[:, :R], rmask), dim=-1)
        c1 = self.text_head1(y[:, R:], wmask)
        w2r = attn[:, R:, :R]
        w2r = w2r / w2r.sum(-1, keepdim=True).clamp_min(1e-12) * wmask.unsqueeze(-1).to(w2r.dtype)
        return i1, c1, w2r

    def forward(self, regions, region_mask, words, word_mask, all_pairs: bool = False) -> dict:
        """Matched pairs (row b of the images with row b of the texts).

        Returns ``score (B,)`` = S, ``i0, c0, i1, c1 (B, d)``, ``attn (B, Lw, R)`` (word -> region),
        ``region_embed (B, R, d)`` and ``word_embed (B, Lw, d)`` (the values v_j and queries q_i that
        CCR/CCS use) and ``attended = attn @ region_embed (B, Lw, d)``. With ``all_pairs=True`` also
        ``sim (B, B)``: S for every (image, text) pair of the batch, differentiable (for the
        hardest-negative triplet loss; costs B^2 cross passes).
        """
        if regions.shape[0] != words.shape[0]:
            raise ValueError(f"forward pairs row b with row b: got {regions.shape[0]} images, {words.shape[0]} texts")
        i0, r = self.encode_image(regions, region_mask)
        c0, e = self.encode_text(words, word_mask)
        i1, c1, attn = self.cross(r, region_mask, e, word_mask)
        out = dict(score=(i0 * c0).sum(-1) + self.alpha * (i1 * c1).sum(-1), i0=i0, c0=c0, i1=i1, c1=c1,
                   attn=attn, region_embed=r, word_embed=e, attended=attn @ r)
        if all_pairs:
            B = regions.shape[0]
            ii, tt = torch.meshgrid(torch.arange(B), torch.arange(B), indexing="ij")
            enc = MMCAEncoded(i0, r, region_mask.bool(), c0, e, word_mask.bool())
            out["sim"] = self._pair_scores(enc, ii.reshape(-1), tt.reshape(-1)).view(B, B)
        return out

    # ---- all-pairs evaluation -------------------------------------------------------------------

    def _pair_scores(self, enc: MMCAEncoded, img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        dev = enc.i0.device
        img_idx, txt_idx = img_idx.to(dev), txt_idx.to(dev)
        rm, wm = enc.region_mask[img_idx], enc.word_mask[txt_idx]
        # Drop trailing all-padding columns of this block: results do not depend on padding.
        nr = int(rm.any(0).nonzero()[-1]) + 1
        nw = int(wm.any(0).nonzero()[-1]) + 1
        i1, c1, _ = self.cross(enc.region_embed[img_idx, :nr], rm[:, :nr], enc.word_embed[txt_idx, :nw], wm[:, :nw])
        s0 = (enc.i0[img_idx] * enc.c0[txt_idx]).sum(-1)
        return s0 + self.alpha * (i1 * c1).sum(-1)

    def _device(self):
        return self.region_fc.weight.device

    @torch.no_grad()
    def encode_all(self, regions, region_mask, words, word_mask, block: int = 256) -> MMCAEncoded:
        """Self-attention module for every image and text, in blocks, on the model's device."""
        dev, parts_i, parts_t = self._device(), [], []
        for s in range(0, regions.shape[0], block):
            i0, r = self.encode_image(regions[s:s + block].to(dev), region_mask[s:s + block].to(dev))
            parts_i.append((i0, r))
        for s in range(0, words.shape[0], block):
            c0, e = self.encode_text(words[s:s + block].to(dev), word_mask[s:s + block].to(dev))
            parts_t.append((c0, e))
        return MMCAEncoded(
            torch.cat([p[0] for p in parts_i]), torch.cat([p[1] for p in parts_i]), region_mask.to(dev).bool(),
            torch.cat([p[0] for p in parts_t]), torch.cat([p[1] for p in parts_t]), word_mask.to(dev).bool(),
        )

    @torch.no_grad()
    def score_pairs(self, enc: MMCAEncoded, img_idx: torch.Tensor, txt_idx: torch.Tensor,
                    block: int = 1024) -> torch.Tensor:
        """Exact S for the listed (image, text) pairs, ``block`` cross passes at a time -> ``(P,)``."""
        out = [self._pair_scores(enc, img_idx[s:s + block], txt_idx[s:s + block])
               for s in range(0, len(img_idx), block)]
        return torch.cat(out) if out else enc.i0.new_zeros(0)

    def _eval_mode(self):
        was = self.training
        self.eval()
        return was

    def score_matrix(self, regions, region_mask, words, word_mask, block: int = 1024) -> torch.Tensor:
        """Exact S for all pairs -> ``(n_img, n_txt)`` on the model's device. Runs in eval mode (no
        dropout) and restores the previous mode; one cross pass per pair, ``block`` pairs at a time."""
        was = self._eval_mode()
        try:
            enc = self.encode_all(regions, region_mask, words, word_mask)
            n_img, n_txt = enc.i0.shape[0], enc.c0.shape[0]
            ii, tt = torch.meshgrid(torch.arange(n_img), torch.arange(n_txt), indexing="ij")
            return self.score_pairs(enc, ii.reshape(-1), tt.reshape(-1), block).view(n_img, n_txt)
        finally:
            self.train(was)

    def rerank(self, i0c0: torch.Tensor | None, top_k: int, regions, region_mask, words, word_mask,
               block: int = 1024) -> dict:
        """Shortlist-and-rerank (METHODS §4): rank by i0.c0, rescore the top ``top_k`` per query with S.

        Returns ``i2t`` and ``t2i`` ``(n_img, n_txt)`` matrices to rank rows (images querying texts)
        and columns (texts querying images) respectively: shortlisted entries hold the exact S,
        the rest keep their i0.c0 order but sit below every shortlisted score. Also ``i0c0`` and
        ``n_pairs`` (cross passes run). With ``top_k`` >= the candidate count both equal
        :meth:`score_matrix`. ``i0c0=None`` computes it.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        was = self._eval_mode()
        try:
            enc = self.encode_all(regions, region_mask, words, word_mask)
            base = enc.i0 @ enc.c0.T if i0c0 is None else i0c0.to(enc.i0.device).float()
            n_img, n_txt = base.shape
            if (n_img, n_txt) != (enc.i0.shape[0], enc.c0.shape[0]):
                raise ValueError(f"i0c0 is {tuple(base.shape)} but there are {enc.i0.shape[0]} images "
                                 f"and {enc.c0.shape[0]} texts")
            none = torch.zeros_like(base, dtype=torch.bool)
            in_i2t = none.scatter(1, base.topk(min(top_k, n_txt), dim=1).indices, True)
            in_t2i = none.scatter(0, base.topk(min(top_k, n_img), dim=0).indices, True)
            union = (in_i2t | in_t2i).nonzero()
            full = torch.full_like(base, float("nan"))
            full[union[:, 0], union[:, 1]] = self.score_pairs(enc, union[:, 0], union[:, 1], block)
            result = {"i0c0": base, "n_pairs": int(union.shape[0])}
            for name, keep in (("i2t", in_i2t), ("t2i", in_t2i)):
                floor = full[keep].min()
                # Non-shortlisted entries: i0.c0 shifted so its maximum is 1 below the smallest rescored S.
                shifted = base - (base.max() - floor + 1.0)
                result[name] = torch.where(keep, full, shifted)
            return result
        finally:
            self.train(was)


class MmcaMatch(MatchModel):
    """MMCA in the matching loop (``protocol.MatchModel``)."""

    name, text, visual, network, shortlist = "mmca", "bert", "regions", MMCA, True

    def network_args(self, cfg, visual_dim: int, vocab_size: int, text_dim: int) -> dict:
        return dict(region_dim=visual_dim, text_dim=text_dim, d=cfg.d, heads=cfg.heads, alpha=cfg.alpha,
                    dropout=cfg.dropout)

    @staticmethod
    def _attention(m: dict, vm: torch.Tensor) -> dict:
        return dict(query=m["word_embed"], values=m["region_embed"], weights=m["attn"],
                    scores=attention_scores(m["attn"], vm), value_mask=vm)

    def forward(self, net, batch: dict, attention: bool) -> dict:
        ti, rmask = batch["txt_img"], batch["region_mask"]
        m = net.net(net.regions(batch["regions"][ti]), rmask[ti], batch["words"], batch["word_mask"], all_pairs=True)
        return {"sim": m["sim"], **(self._attention(m, rmask[ti]) if attention else {})}

    def attention(self, net, batch: dict) -> dict:
        ti, rmask = batch["txt_img"], batch["region_mask"]
        m = net.net(net.regions(batch["regions"][ti]), rmask[ti], batch["words"], batch["word_mask"])
        return self._attention(m, rmask[ti])

    def similarity(self, net, data: dict, device, rerank_top: int = 0, block: int = 1024) -> dict:
        rmask = data["region_mask"]
        regions = torch.cat([net.regions(data["regions"][s:s + 256].to(device))
                             for s in range(0, len(data["regions"]), 256)])
        if rerank_top:
            r = net.net.rerank(None, rerank_top, regions, rmask, data["words"], data["word_mask"], block)
            return {"sim": r["i2t"].cpu(), "sim_t2i": r["t2i"].cpu(), "n_pairs": r["n_pairs"]}
        return {"sim": net.net.score_matrix(regions, rmask, data["words"], data["word_mask"], block).cpu()}
