"""SCAN: Stacked Cross Attention for image-text matching (Lee et al., ECCV 2018; METHODS §6).

Image: bottom-up region features -> FC -> l2 (v_j). Text: word embedding -> bi-GRU (averaged) -> l2.
Stacked cross attention, direction t2i (words attend to regions) or i2t (regions attend to words):

    s_ij  = q_i . v_j                                    (q: queries, v: context fragments)
    s̄_ij = [s_ij]_0.1 / sqrt(sum_i [s_ij]_0.1^2)         (LeakyReLU 0.1, l2 over the *queries*)
    w_ij  = softmax_j(lambda_1 * s̄_ij),  a_i = sum_j w_ij v_j
    R_i   = cos(q_i, a_i);   S = mean_i R_i  (AVG)  or  log(sum_i exp(lambda_2 R_i)) / lambda_2  (LSE)

t2i: queries = words, context = regions; i2t: queries = regions, context = words. Padded regions and
words are excluded from every sum (the reference code slices each caption to its length).

:meth:`SCAN.sim_matrix` scores every (image, caption) pair without materialising a_i: with
G = V V^T, q.a = sum_j w_ij s_ij and |a|^2 = w^T G w, so memory is O(pairs x R x L), chunked.

:class:`ScanMatch` puts SCAN behind the matching protocol (``protocol``): vocabulary tokens and region
features in, hardest-negative triplet; ICA ranks the pre-softmax λ1 s̄_ij (``logits``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common.text_encoders import GRUTextEncoder
from .protocol import MatchModel

# SCAN's Flickr30k settings (METHODS §6): direction -> (lambda_1, lambda_2 for LSE)
DEFAULT_LAMBDAS = {"t2i": (9.0, 6.0), "i2t": (4.0, 5.0)}


def _safe_norm_sq(sq: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """sqrt of a squared norm, at least ``eps`` (cosines as F.cosine_similarity clamps them); the clamp
    comes first so all-zero padding rows get a zero gradient instead of 0 * inf = NaN."""
    return sq.clamp_min(eps * eps).sqrt()


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    lengths = torch.as_tensor(lengths)
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class SCAN(nn.Module):
    def __init__(self, vocab_size: int, direction: str = "t2i", lambda_softmax: float | None = None,
                 agg: str = "avg", lambda_lse: float | None = None, embed: int = 1024,
                 region_dim: int = 2048, word_dim: int = 300, num_layers: int = 1, max_elements: int = 2 ** 24):
        super().__init__()
        if direction not in DEFAULT_LAMBDAS:
            raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
        if agg not in ("avg", "lse"):
            raise ValueError(f"agg must be 'avg' or 'lse', got {agg!r}")
        self.direction, self.agg = direction, agg
        l1, l2 = DEFAULT_LAMBDAS[direction]
        self.lambda_softmax = l1 if lambda_softmax is None else float(lambda_softmax)
        self.lambda_lse = l2 if lambda_lse is None else float(lambda_lse)
        self.max_elements = max_elements  # bound on pairs x R x L entries per chunk of sim_matrix
        self.img_fc = nn.Linear(region_dim, embed)
        r = math.sqrt(6.0) / math.sqrt(region_dim + embed)  # SCAN's Xavier init of the image FC
        nn.init.uniform_(self.img_fc.weight, -r, r)
        nn.init.zeros_(self.img_fc.bias)
        self.txt_enc = GRUTextEncoder(vocab_size, word_dim, embed, num_layers)

    # ---- encoders -------------------------------------------------------------------------------

    def encode_image(self, regions: torch.Tensor) -> torch.Tensor:
        """``regions (B, R, region_dim)`` -> l2-normalised ``(B, R, embed)``."""
        return F.normalize(self.img_fc(regions.to(self.img_fc.weight.dtype)), dim=-1, eps=1e-8)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``tokens (B, L)`` word ids, ``lengths (B,)`` -> l2-normalised ``(B, L, embed)``."""
        return self.txt_enc(tokens, lengths)

    def forward(self, regions, region_mask, tokens, lengths) -> dict:
        """Encode a batch and score all its pairs: ``img_emb, cap_emb`` and ``sim (B_img, B_txt)``."""
        img, cap = self.encode_image(regions), self.encode_text(tokens, lengths)
        return dict(img_emb=img, cap_emb=cap, sim=self.sim_matrix(img, region_mask, cap, lengths))

    # ---- attention ------------------------------------------------------------------------------

    def _logits(self, dots: torch.Tensor, qmask: torch.Tensor, kmask: torch.Tensor) -> torch.Tensor:
        """``dots (..., Q, K)`` raw q.v -> pre-softmax scores lambda_1 * s̄ (padded keys -inf)."""
        s = F.leaky_relu(dots, 0.1) * qmask[..., :, None]
        s = s / (_safe_norm_sq(s.pow(2).sum(-2, keepdim=True)) + 1e-8)  # l2 over the queries
        return (self.lambda_softmax * s).masked_fill(~kmask[..., None, :], float("-inf"))

    def _weights(self, dots: torch.Tensor, qmask: torch.Tensor, kmask: torch.Tensor) -> torch.Tensor:
        """``dots (..., Q, K)`` raw q.v -> attention weights over K, SCAN's clipped-l2 then softmax."""
        return self._logits(dots, qmask, kmask).softmax(-1)

    def _pool(self, rel: torch.Tensor, qmask: torch.Tensor) -> torch.Tensor:
        """Pool relevances ``R_i (..., Q)`` over the real queries: AVG or LSE."""
        if self.agg == "avg":
            return (rel * qmask).sum(-1) / qmask.sum(-1)
        lam = self.lambda_lse
        return torch.logsumexp((lam * rel).masked_fill(~qmask.bool(), float("-inf")), -1) / lam

    def _queries_context(self, img, img_mask, cap, cap_mask):
        if self.direction == "t2i":
            return cap, cap_mask, img, img_mask
        return img, img_mask, cap, cap_mask

    def attention(self, img_emb, img_mask, cap_emb, cap_lens) -> dict:
        """Cross attention of matched pairs (row b of images with row b of captions), as the model uses it.

        Returns ``query (B, Q, d)`` (q_i), ``values (B, K, d)`` (v_j), ``weights (B, Q, K)`` (w_ij,
        rows sum to 1 over real keys), ``logits (B, Q, K)`` (the pre-softmax lambda_1 * s̄_ij, -inf at
        padded keys; the scores the ICA loss supervises), ``attended (B, Q, d)`` (a_i), ``query_mask``, ``key_mask`` and
        ``sim (B,)``. For t2i the queries are words and the values regions (what CCR/CCS constrain);
        for i2t it is the other way round.
        """
        if img_emb.shape[0] != cap_emb.shape[0]:
            raise ValueError(f"attention pairs row b with row b: got {img_emb.shape[0]} images, "
                             f"{cap_emb.shape[0]} captions")
        img_mask = self._img_mask(img_emb, img_mask)
        cap_mask = lengths_to_mask(torch.as_tensor(cap_lens, device=cap_emb.device), cap_emb.shape[1])
        q, qm, v, km = self._queries_context(img_emb, img_mask, cap_emb, cap_mask)
        logits = self._logits(q @ v.transpose(1, 2), qm, km)
        w = logits.softmax(-1) * qm[..., None]
        a = w @ v
        rel = (q * a).sum(-1) / (_safe_norm_sq(q.pow(2).sum(-1)) * _safe_norm_sq(a.pow(2).sum(-1)))
        return dict(query=q, values=v, weights=w, logits=logits, attended=a, query_mask=qm, key_mask=km,
                    sim=self._pool(rel, qm.to(rel.dtype)))

    @staticmethod
    def _img_mask(img_emb, img_mask):
        if img_mask is None:
            return torch.ones(img_emb.shape[:2], dtype=torch.bool, device=img_emb.device)
        img_mask = img_mask.bool().to(img_emb.device)
        empty = (~img_mask.any(1)).nonzero()
        if len(empty):
            raise ValueError(f"image {int(empty[0])} has no valid regions in its mask")
        return img_mask

    # ---- all pairs ------------------------------------------------------------------------------

    def _sim_block(self, img, img_mask, cap, cap_mask) -> torch.Tensor:
        """Vectorised S for every pair of ``img (I, R, d)`` x ``cap (T, L, d)`` -> ``(I, T)``."""
        dots = torch.einsum("ird,tld->itrl", img, cap)  # (I, T, R, L)
        gram_img = img @ img.transpose(1, 2)  # (I, R, R)
        gram_cap = cap @ cap.transpose(1, 2)  # (T, L, L)
        rm, cm = img_mask[:, None, :].expand(-1, cap.shape[0], -1), cap_mask[None].expand(img.shape[0], -1, -1)
        if self.direction == "t2i":  # queries = words (L), keys = regions (R)
            dq = dots.transpose(2, 3)  # (I, T, L, R)
            w = self._weights(dq, cm, rm)
            qa = (w * dq).sum(-1)
            a_sq = torch.einsum("itlr,irs,itls->itl", w, gram_img, w)
            q_sq = cap.pow(2).sum(-1)[None]  # (1, T, L)
            qmask = cm
        else:  # queries = regions (R), keys = words (L)
            w = self._weights(dots, rm, cm)  # (I, T, R, L)
            qa = (w * dots).sum(-1)
            a_sq = torch.einsum("itrl,tlm,itrm->itr", w, gram_cap, w)
            q_sq = img.pow(2).sum(-1)[:, None]  # (I, 1, R)
            qmask = rm
        rel = qa / (_safe_norm_sq(q_sq) * _safe_norm_sq(a_sq))
        return self._pool(rel, qmask.to(rel.dtype))

    def sim_matrix(self, img_emb, img_mask, cap_emb, cap_lens) -> torch.Tensor:
        """S for every (image, caption) pair -> ``(B_img, B_txt)``, differentiable, chunked so that a
        chunk holds at most ``max_elements`` pair x region x word entries."""
        img_mask = self._img_mask(img_emb, img_mask)
        cap_lens = torch.as_tensor(cap_lens, device=cap_emb.device)
        if (cap_lens < 1).any() or (cap_lens > cap_emb.shape[1]).any():
            bad = int(((cap_lens < 1) | (cap_lens > cap_emb.shape[1])).nonzero()[0])
            raise ValueError(f"caption {bad} has length {int(cap_lens[bad])}, outside [1, {cap_emb.shape[1]}]")
        cap_mask = lengths_to_mask(cap_lens, cap_emb.shape[1])
        n_i, R = img_emb.shape[:2]
        n_t, L = cap_emb.shape[:2]
        per_pair = R * L
        ii = min(n_i, max(1, self.max_elements // per_pair))
        ti = min(n_t, max(1, self.max_elements // (per_pair * ii)))
        rows = []
        for s in range(0, n_i, ii):
            cols = [self._sim_block(img_emb[s:s + ii], img_mask[s:s + ii], cap_emb[t:t + ti], cap_mask[t:t + ti])
                    for t in range(0, n_t, ti)]
            rows.append(torch.cat(cols, 1))
        return torch.cat(rows, 0)


class ScanMatch(MatchModel):
    """SCAN in the matching loop (``protocol.MatchModel``). Word->region attention exists for t2i only."""

    name, text, visual, network = "scan", "tokens", "regions", SCAN

    def check_config(self, cfg) -> None:
        if cfg.direction != "t2i" and (cfg.ccr > 0 or cfg.ccs > 0 or cfg.ica > 0):
            raise ValueError("CCR/CCS/ICA constrain word->region attention: SCAN direction must be 't2i'")

    def network_args(self, cfg, visual_dim: int, vocab_size: int, text_dim: int) -> dict:
        return dict(vocab_size=vocab_size, direction=cfg.direction, lambda_softmax=cfg.lambda_softmax, agg=cfg.agg,
                    lambda_lse=cfg.lambda_lse, embed=cfg.embed, region_dim=visual_dim, word_dim=cfg.word_dim)

    @staticmethod
    def _attention(net, img, rmask, cap, lengths) -> dict:
        a = net.net.attention(img, rmask, cap, lengths)
        return dict(query=a["query"], values=a["values"], weights=a["weights"], scores=a["logits"],
                    value_mask=a["key_mask"])

    def forward(self, net, batch: dict, attention: bool) -> dict:
        ti, rmask = batch["txt_img"], batch["region_mask"]
        img = net.net.encode_image(net.regions(batch["regions"]))
        cap = net.net.encode_text(batch["tokens"], batch["lengths"])
        out = {"sim": net.net.sim_matrix(img, rmask, cap, batch["lengths"])[ti]}
        if attention and net.net.direction == "t2i":
            out.update(self._attention(net, img[ti], rmask[ti], cap, batch["lengths"]))
        return out

    def attention(self, net, batch: dict) -> dict:
        if net.net.direction != "t2i":
            raise ValueError("word->region attention needs SCAN direction 't2i'")
        ti = batch["txt_img"]
        img = net.net.encode_image(net.regions(batch["regions"][ti]))
        return self._attention(net, img, batch["region_mask"][ti], net.net.encode_text(batch["tokens"], batch["lengths"]),
                               batch["lengths"])

    def attention_missing(self, cfg) -> str | None:
        return None if cfg.direction == "t2i" else "attention metrics need word->region attention; SCAN i2t has none"

    def similarity(self, net, data: dict, device, rerank_top: int = 0, block: int = 1024) -> dict:
        regions, tokens, lengths = data["regions"], data["tokens"], data["lengths"]
        img = torch.cat([net.net.encode_image(net.regions(regions[s:s + 256].to(device)))
                         for s in range(0, len(regions), 256)])
        cap = torch.cat([net.net.encode_text(tokens[s:s + 512].to(device), lengths[s:s + 512])
                         for s in range(0, len(tokens), 512)])
        return {"sim": net.net.sim_matrix(img, data["region_mask"].to(device), cap, lengths.to(device)).cpu()}
