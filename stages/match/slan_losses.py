"""SLAN objectives (seed 003, Sec. 3.2.3 Eq. 3 and Sec. 3.3 Eqs. 4-6; METHODS §9): ITC with feature
queues, ITM with in-batch hard negatives, L1 + GIoU box regression. Pure functions of tensors, plus the
queue that holds past features (a module, so it travels in checkpoints).

Choices the seed leaves open (ours, also in ``slan.py``'s docstring and the README):
- Queues are momentum-free (no momentum encoder, unlike ALBEF): they hold detached unit embeddings of
  past batches (under DDP, of every rank's pairs, as ALBEF's all-gathered queues). Each entry carries
  its image id; an entry of the same image as a row counts as a positive for that row (soft target
  spread uniformly over all positives, as ALBEF/BLIP do).
- The in-batch part of ITC uses the exact pairwise similarity S(I_i, T_j) (the image embedding is
  conditioned on each text by the region filter/adaptor); queued texts are scored against the image
  embedding conditioned on its own caption, queued images are stored conditioned on theirs.
- ITM hard negatives: one text per image and one image per text, drawn with probability
  softmax(S / tau) over the row's negatives (ALBEF's batch sampling); 3B pairs, cross-entropy.
- L1 is on boxes divided by the image size (x / W, y / H), summed over the 4 coordinates; GIoU via
  ``torchvision.ops.generalized_box_iou_loss``; both averaged over boxes, weight 1 each (Eq. 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss


class FeatureQueue(nn.Module):
    """FIFO ring of the latest ``size`` (image embedding, text embedding, image id) triples.

    Buffers (saved with the model): ``img (Q, d)``, ``txt (Q, d)``, ``ids (Q,)`` (-1 = empty slot),
    ``ptr`` (next slot to overwrite) and ``filled`` (how many slots hold data). Under DDP the training
    loop enqueues every rank's pairs, all-gathered in rank order (``slan.after_step``, as ALBEF),
    so every rank holds the same queue: DDP broadcasts rank 0's buffers at each forward, which would
    otherwise drop what the other ranks enqueued. :meth:`enqueue` itself is local.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.size = size
        self.register_buffer("img", torch.zeros(size, dim))
        self.register_buffer("txt", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def get(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(img (n, d), txt (n, d), ids (n,))`` of the ``n = filled`` slots holding data."""
        n = int(self.filled)
        return self.img[:n], self.txt[:n], self.ids[:n]

    @torch.no_grad()
    def enqueue(self, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Append a batch (detached), overwriting the oldest entries once full. With more rows than the
        queue holds, only the last ``size`` rows are kept."""
        if img.shape != txt.shape or img.dim() != 2 or img.shape[1] != self.img.shape[1]:
            raise ValueError(f"enqueue needs img and txt of shape (B, {self.img.shape[1]}), "
                             f"got {tuple(img.shape)} and {tuple(txt.shape)}")
        if self.size == 0:
            return
        ids = torch.full((img.shape[0],), -1, dtype=torch.long) if ids is None else ids.long()
        img, txt, ids = img[-self.size:], txt[-self.size:], ids[-self.size:]
        slots = (int(self.ptr) + torch.arange(img.shape[0])) % self.size
        slots = slots.to(self.img.device)
        self.img[slots] = img.detach().to(self.img.dtype)
        self.txt[slots] = txt.detach().to(self.txt.dtype)
        self.ids[slots] = ids.to(self.ids.device)
        self.ptr.fill_((int(self.ptr) + img.shape[0]) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + img.shape[0]))


def _pos_mask(B: int, image_ids: torch.Tensor | None, device) -> torch.Tensor:
    eye = torch.eye(B, dtype=torch.bool, device=device)
    if image_ids is None:
        return eye
    image_ids = torch.as_tensor(image_ids, device=device)
    if image_ids.shape != (B,):
        raise ValueError(f"image_ids must be (B,) = ({B},), got {tuple(image_ids.shape)}")
    return eye | (image_ids[:, None] == image_ids[None, :])


def _soft_nce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    target = pos.to(logits.dtype) / pos.sum(1, keepdim=True).to(logits.dtype)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def itc_loss(sim: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, tau: torch.Tensor | float,
             queue: FeatureQueue | None = None, image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Image-text contrastive loss with queues (seed 003 Eqs. 5-6; METHODS §9), both directions.

        logits_i2t = [S(I_i, T_j)]_j ‖ [img_i · t_q]_q  (over tau),  logits_t2i = [S(I_j, T_i)]_j ‖ [txt_i · v_q]_q
        L_itc = 1/2 (mean_i H(y_i2t, softmax(logits_i2t)) + mean_i H(y_t2i, softmax(logits_t2i)))

    ``sim (B, B)``: S(image i, text j), positives on the diagonal; ``img``/``txt (B, d)``: unit embeddings
    of the matched pairs (what the queue stores). ``image_ids (B,)``: several texts of one image are all
    positives, as are queue entries with the same id. Targets ``y`` are uniform over a row's positives.
    (The seed sums the two terms; we average them so the scale matches one InfoNCE.)
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square (B, B) matrix, got {tuple(sim.shape)}")
    B = sim.shape[0]
    pos = _pos_mask(B, image_ids, sim.device)
    l_i2t, l_t2i, p_i2t, p_t2i = sim, sim.T, pos, pos.T
    if queue is not None and int(queue.filled) > 0:
        q_img, q_txt, q_ids = queue.get()
        ids = (torch.as_tensor(image_ids, device=sim.device) if image_ids is not None
               else torch.full((B,), -2, dtype=torch.long, device=sim.device))
        q_pos = ids[:, None] == q_ids.to(sim.device)[None, :]
        l_i2t = torch.cat([sim, img @ q_txt.to(img.dtype).T], 1)
        l_t2i = torch.cat([sim.T, txt @ q_img.to(txt.dtype).T], 1)
        p_i2t, p_t2i = torch.cat([pos, q_pos], 1), torch.cat([pos.T, q_pos], 1)
    return 0.5 * (_soft_nce(l_i2t / tau, p_i2t) + _soft_nce(l_t2i / tau, p_t2i))


def itm_loss(itm_logits: torch.Tensor, sim: torch.Tensor, tau: torch.Tensor | float = 1.0,
             image_ids: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Image-text matching loss with in-batch hard negatives (seed 003 Eq. 4, ALBEF sampling; METHODS §9).

        L_itm = mean over {(i, i)} ∪ {(i, j_i)} ∪ {(k_j, j)} of H(softmax(f_c(cat(v, t))), y)

    ``itm_logits (B, B, 2)``: the ITM head's logits for every (image i, text j) pair, class 1 = match;
    ``sim (B, B)`` (detached here) picks the negatives: text j_i ~ softmax(sim[i, :] / tau) over image
    i's negatives, image k_j ~ softmax(sim[:, j] / tau) over text j's. Rows without any negative (every
    text of the batch belongs to the same image) contribute only their positive.
    """
    B = sim.shape[0]
    if itm_logits.shape != (B, B, 2):
        raise ValueError(f"itm_logits must be (B, B, 2) = ({B}, {B}, 2), got {tuple(itm_logits.shape)}")
    pos = _pos_mask(B, image_ids, sim.device)
    w = (sim.detach().float() / tau).masked_fill(pos, float("-inf"))
    has_t, has_i = (~pos).any(1), (~pos).any(0)
    rows = torch.arange(B, device=sim.device)
    w_t = w.softmax(1)[has_t]
    w_i = w.T.softmax(1)[has_i]
    neg_t = torch.multinomial(w_t.cpu(), 1, generator=generator).squeeze(1).to(sim.device) if len(w_t) else rows[:0]
    neg_i = torch.multinomial(w_i.cpu(), 1, generator=generator).squeeze(1).to(sim.device) if len(w_i) else rows[:0]
    logits = torch.cat([itm_logits[rows, rows], itm_logits[rows[has_t], neg_t], itm_logits[neg_i, rows[has_i]]])
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(len(neg_t) + len(neg_i), dtype=torch.long)])
    return F.cross_entropy(logits, labels.to(logits.device))


def box_regression_loss(pred: torch.Tensor, target: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """L1 + GIoU between boxes (seed 003 Eq. 3; METHODS §9), averaged over the N boxes.

        L = mean_n [ Σ_c |p_nc - g_nc| / size_nc ] + mean_n [ 1 - GIoU(p_n, g_n) ]

    ``pred``/``target (N, 4)`` x1, y1, x2, y2 in pixels; ``hw (N, 2)`` each box's image (H, W), so the
    L1 term is on coordinates divided by (W, H, W, H). GIoU from ``torchvision.ops``.
    """
    if pred.shape != target.shape or pred.dim() != 2 or pred.shape[-1] != 4:
        raise ValueError(f"pred and target must both be (N, 4), got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    size = hw.to(pred.dtype).flip(-1).repeat(1, 2)  # (W, H, W, H)
    l1 = ((pred - target).abs() / size).sum(-1).mean()
    return l1 + generalized_box_iou_loss(pred, target, reduction="mean")


def slan_reg_loss(level_boxes: torch.Tensor, keep: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """L_reg of the region adaptor (seed 003 Eq. 3), over kept regions of the matched pairs.

        ḡ = (1/L) Σ_i g_i  (detached),   L_reg = (1/L) Σ_i box_regression_loss(g_i, ḡ)

    ``level_boxes (B, L, T, 4)``: each level's adapted boxes; ``keep (B, T)`` the filter's mask;
    ``hw (B, 2)``. The seed applies Eq. 3 to its trainable detector's box g; ours are frozen cached
    boxes, so (ours) each level's box is regressed to the detached mean, which keeps the cascade's levels
    consistent. No levels -> 0.
    """
    B, L, T, _ = level_boxes.shape
    if L == 0:
        return level_boxes.sum() * 0.0
    target = level_boxes.mean(1).detach()
    hw_t = hw[:, None, :].expand(B, T, 2)[keep]
    terms = [box_regression_loss(level_boxes[:, i][keep], target[keep], hw_t) for i in range(L)]
    return torch.stack(terms).mean()


def slan_objective(out: dict, queue: FeatureQueue | None = None, image_ids: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, w_itc: float = 1.0, w_itm: float = 1.0,
                   w_reg: float = 1.0) -> dict:
    """``L = w_itc L_itc + w_itm L_itm + w_reg L_reg`` (seed 003 Eqs. 8-9 without LM) from an
    ``SLAN.forward(..., all_pairs=True)`` output. Returns ``{"loss", "itc", "itm", "reg"}``. Reads the
    queue only; call ``queue.enqueue(out["img_embed"], out["txt_embed"], image_ids)`` after the step."""
    if "sim" not in out:
        raise ValueError("slan_objective needs SLAN.forward(..., all_pairs=True) outputs")
    res = {
        "itc": itc_loss(out["sim"], out["img_embed"], out["txt_embed"], out["tau"], queue, image_ids),
        "itm": itm_loss(out["itm_logits"], out["sim"], out["tau"], image_ids, generator),
        "reg": slan_reg_loss(out["boxes"], out["keep"], out["hw"]),
    }
    res["loss"] = w_itc * res["itc"] + w_itm * res["itm"] + w_reg * res["reg"]
    return res
