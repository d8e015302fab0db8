"""Show-Attend-Tell captioner with soft attention over grid features (METHODS.md section 1).

One decoder step ``s`` (0-based) reads token ``captions[:, s]`` and the state ``h_{s-1}``:

    e_s   = w . tanh(W_a a + W_h h_{s-1})        energies over the P = G*G locations (pre-softmax)
    alpha = softmax(e_s);  beta = sigmoid(f_beta(h_{s-1}))   (one scalar gate, as in the paper)
    z_s   = beta * sum_i alpha_i a_i
    h_s, c_s = LSTMCell([E captions[:, s]; z_s], (h_{s-1}, c_{s-1}))
    logits_s = W_o dropout(h_s)                   -> predicts captions[:, s + 1]

so ``energies[:, s]``/``alphas[:, s]`` belong to the step that *predicts* ``captions[:, s + 1]``: the
attention used to emit Karpathy token k (encoded at position k + 1, after ``<start>``) is step k. The
ICA loss (section 2) supervises exactly those energies. ``h_0, c_0`` are linear maps of the mean
feature. Decoding never emits ``<pad>`` or ``<start>``; scores are sums of log-softmax over the full
vocabulary (no length normalisation), so greedy and beam search rank sequences the same way as
:meth:`ShowAttendTell.log_prob` scores them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn


def _eval_no_grad(fn):
    """Decode in eval mode (dropout off) without autograd, restoring the caller's mode after."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(self, *args, **kwargs)
        finally:
            self.train(was_training)

    return wrapper


@dataclass
class Decoded:
    """Decoder output for a batch of images.

    ``tokens[b]``: generated word ids, without ``<start>`` and ``<end>``. ``log_probs[b]``: sum of the
    log-probabilities of every generated token, ``<end>`` included when it was emitted.
    ``alphas[b]``: (L, P) attention of each generated step (the ``<end>`` step included), for figures.
    ``ended[b]``: False when decoding stopped at ``max_len`` without ``<end>``.
    """

    tokens: list[list[int]]
    log_probs: torch.Tensor
    alphas: list[torch.Tensor]
    ended: list[bool]


class ShowAttendTell(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        feat_dim: int = 2048,
        embed_dim: int = 512,
        attn_dim: int = 512,
        hidden_dim: int = 512,
        dropout: float = 0.5,
        pad_id: int = 0,
        start_id: int = 1,
        end_id: int = 2,
        feat_norm: bool = False,
    ):
        super().__init__()
        if vocab_size <= max(pad_id, start_id, end_id):
            raise ValueError(f"vocab_size {vocab_size} must exceed the special ids {pad_id, start_id, end_id}")
        self.vocab_size, self.feat_dim = vocab_size, feat_dim
        self.pad_id, self.start_id, self.end_id = pad_id, start_id, end_id
        self.feat_proj = nn.Linear(feat_dim, attn_dim)  # W_a
        self.hid_proj = nn.Linear(hidden_dim, attn_dim)  # W_h
        self.energy = nn.Linear(attn_dim, 1)  # w
        self.f_beta = nn.Linear(hidden_dim, 1)  # scalar gate
        self.init_h = nn.Linear(feat_dim, hidden_dim)
        self.init_c = nn.Linear(feat_dim, hidden_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTMCell(embed_dim + feat_dim, hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)
        if feat_norm:  # per-channel standardisation; the statistics travel in the state dict
            self.register_buffer("feat_mean", torch.zeros(feat_dim))
            self.register_buffer("feat_std", torch.ones(feat_dim))

    @property
    def feat_norm(self) -> bool:
        return hasattr(self, "feat_mean")

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics of the training features, applied as ``(a - mean) / std`` to every input.

        Channels that never vary (``std`` ~ 0, e.g. dead ReLU units) are left unscaled.
        """
        if not self.feat_norm:
            raise ValueError("this model was built with feat_norm=False; it has no feature statistics")
        mean, std = torch.as_tensor(mean).flatten(), torch.as_tensor(std).flatten()
        if mean.shape != (self.feat_dim,) or std.shape != (self.feat_dim,):
            raise ValueError(f"feature statistics must have {self.feat_dim} channels, got {tuple(mean.shape)}, "
                             f"{tuple(std.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("feature statistics are not finite")
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    # ---- building blocks ---------------------------------------------------------------------------
    def _check_feats(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 3:
            raise ValueError(f"feats must be (B, P, D), got shape {tuple(feats.shape)}")
        if feats.shape[-1] != self.feat_dim:
            raise ValueError(f"feats have {feats.shape[-1]} channels, the model expects {self.feat_dim}")
        if feats.shape[1] == 0:
            raise ValueError("feats have no locations (P = 0)")
        feats = feats.to(self.out.weight.dtype)  # the store keeps float16
        if self.feat_norm:
            feats = (feats - self.feat_mean) / self.feat_std
        return feats

    def init_state(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = feats.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def attend(self, feats, feats_proj, h):
        """Soft attention from ``h_{t-1}``: (context (B,D), alpha (B,P), energy (B,P), beta (B,))."""
        energy = self.energy(torch.tanh(feats_proj + self.hid_proj(h).unsqueeze(1))).squeeze(-1)
        alpha = energy.softmax(dim=-1)
        beta = torch.sigmoid(self.f_beta(h))  # (B, 1)
        context = beta * torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)
        return context, alpha, energy, beta.squeeze(-1)

    def step(self, tokens, h, c, feats, feats_proj):
        """One decoder step: read ``tokens`` (B,), return (logits, h, c, alpha, energy, beta)."""
        context, alpha, energy, beta = self.attend(feats, feats_proj, h)
        h, c = self.lstm(torch.cat([self.embed(tokens), context], dim=-1), (h, c))
        return self.out(self.drop(h)), h, c, alpha, energy, beta

    # ---- teacher forcing -----------------------------------------------------------------------------
    def forward(self, feats: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor | None = None,
                img_index: torch.Tensor | None = None) -> dict:
        """Teacher-forced pass.

        feats (B, P, D); captions (B, T) long, ``<start>`` first; lengths (B,) encoded lengths incl.
        ``<start>``/``<end>`` (default: all T). Returns logits (B, T-1, V), alphas/energies (B, T-1, P),
        betas (B, T-1) and mask (B, T-1) bool, where index s is the step predicting captions[:, s+1]
        and mask[b, s] = s < lengths[b] - 1. Steps past the longest caption are not run (zeros).

        ``img_index`` (B,): feats are per *image* (N, P, D) and caption b belongs to image img_index[b]
        (several captions per image). The same as passing ``feats[img_index]``, but the feature
        projection and initial state are computed once per image, not once per caption.
        """
        feats = self._check_feats(feats)
        per_image = None
        if img_index is not None:
            img_index = torch.as_tensor(img_index, device=feats.device).long()
            if img_index.dim() != 1 or (img_index.numel() and bool((img_index.min() < 0) | (img_index.max() >= feats.shape[0]))):
                raise ValueError(f"img_index must be (B,) indices into the {feats.shape[0]} images of feats")
            per_image = feats
            feats = feats[img_index]
        if captions.dim() != 2 or captions.dtype != torch.long:
            raise ValueError(f"captions must be (B, T) long, got {tuple(captions.shape)} {captions.dtype}")
        B, T = captions.shape
        if B != feats.shape[0]:
            raise ValueError(f"feats hold {feats.shape[0]} images but captions {B}")
        if T < 2:
            raise ValueError(f"captions need at least <start> and one target (T >= 2), got T = {T}")
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=captions.device)
        lengths = torch.as_tensor(lengths, device=captions.device).long()
        if lengths.shape != (B,) or bool((lengths < 2).any()) or bool((lengths > T).any()):
            raise ValueError(f"lengths must be (B,) with 2 <= length <= T = {T}, got {lengths.tolist()}")
        if bool((captions.min() < 0) | (captions.max() >= self.vocab_size)):
            raise ValueError(f"caption ids must lie in [0, {self.vocab_size})")

        P, dev, dt = feats.shape[1], feats.device, feats.dtype
        logits = torch.zeros(B, T - 1, self.vocab_size, device=dev, dtype=dt)
        alphas = torch.zeros(B, T - 1, P, device=dev, dtype=dt)
        energies = torch.zeros(B, T - 1, P, device=dev, dtype=dt)
        betas = torch.zeros(B, T - 1, device=dev, dtype=dt)
        if per_image is None:
            feats_proj = self.feat_proj(feats)
            h, c = self.init_state(feats)
        else:
            feats_proj = self.feat_proj(per_image)[img_index]
            h, c = (x[img_index] for x in self.init_state(per_image))
        for s in range(int(lengths.max()) - 1):
            out, h, c, alpha, energy, beta = self.step(captions[:, s], h, c, feats, feats_proj)
            logits[:, s], alphas[:, s], energies[:, s], betas[:, s] = out, alpha, energy, beta
        mask = torch.arange(T - 1, device=captions.device)[None] < (lengths - 1)[:, None]
        return {"logits": logits, "alphas": alphas, "energies": energies, "betas": betas, "mask": mask}

    def log_prob(self, feats, captions, lengths=None) -> torch.Tensor:
        """(B,) sum over the valid steps of log p(captions[:, s+1] | ...), the decoders' ranking score."""
        out = self.forward(feats, captions, lengths)
        lp = out["logits"].float().log_softmax(-1).gather(-1, captions[:, 1:, None]).squeeze(-1)
        return (lp * out["mask"]).sum(1)

    # ---- decoding ------------------------------------------------------------------------------------
    def _step_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)
        logp[:, self.pad_id] = float("-inf")  # never generated
        logp[:, self.start_id] = float("-inf")
        return logp

    @_eval_no_grad
    def greedy(self, feats: torch.Tensor, max_len: int = 50, return_details: bool = False):
        """Argmax decoding, at most ``max_len`` steps (``<end>`` counts as a step)."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        feats = self._check_feats(feats)
        B, dev = feats.shape[0], feats.device
        feats_proj = self.feat_proj(feats)
        h, c = self.init_state(feats)
        tok = torch.full((B,), self.start_id, dtype=torch.long, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        score = torch.zeros(B, device=dev)
        toks, alphas = [], []
        for _ in range(max_len):
            logits, h, c, alpha, _, _ = self.step(tok, h, c, feats, feats_proj)
            best_lp, tok = self._step_log_probs(logits).max(-1)
            score = score + torch.where(finished, torch.zeros_like(best_lp), best_lp)
            toks.append(torch.where(finished, torch.full_like(tok, self.pad_id), tok))
            alphas.append(alpha)
            finished = finished | (tok == self.end_id)
            if bool(finished.all()):
                break
        toks_t, alphas_t = torch.stack(toks, 1), torch.stack(alphas, 1)
        out = Decoded([], score.cpu(), [], [])
        for b in range(B):
            seq = toks_t[b].tolist()
            n = seq.index(self.end_id) + 1 if self.end_id in seq else len(seq)
            out.tokens.append(seq[: n - 1] if self.end_id in seq else seq)
            out.alphas.append(alphas_t[b, :n].float().cpu())
            out.ended.append(self.end_id in seq)
        return out if return_details else out.tokens

    @_eval_no_grad
    def beam_search(self, feats: torch.Tensor, beam_size: int = 3, max_len: int = 50, return_details: bool = False):
        """Batched beam search: all beams of all images advance in one LSTM step.

        Each step scores every (beam, token) extension, keeps the 2k best; an ``<end>`` among the k
        best finishes a hypothesis, the k best others stay live. Scores are summed log-probs without
        length penalty, so they only decrease: an image stops once its best finished hypothesis scores
        at least its best live one (nothing live can beat it). At ``max_len`` steps live hypotheses
        compete unfinished. ``beam_size=1`` is exactly greedy decoding.
        """
        if beam_size < 1 or max_len < 1:
            raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size}, {max_len}")
        feats = self._check_feats(feats)
        B, P, dev, k, V = feats.shape[0], feats.shape[1], feats.device, beam_size, self.vocab_size
        feats = feats.repeat_interleave(k, dim=0)  # row b*k + j is beam j of image b
        feats_proj = self.feat_proj(feats)
        h, c = self.init_state(feats)
        rows = torch.arange(B, device=dev)
        scores = torch.full((B, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start identical: only one is live
        seqs = torch.zeros(B, k, max_len, dtype=torch.long, device=dev)  # live words
        hist = torch.zeros(B, k, max_len, P, device=dev)  # live attention per step
        tok = torch.full((B * k,), self.start_id, dtype=torch.long, device=dev)
        # best hypothesis so far per image: score, words, attention, word count, ended with <end>
        best_score = torch.full((B,), float("-inf"), device=dev)
        best_seq = torch.zeros(B, max_len, dtype=torch.long, device=dev)
        best_hist = torch.zeros(B, max_len, P, device=dev)
        best_len = torch.zeros(B, dtype=torch.long, device=dev)
        best_ended = torch.zeros(B, dtype=torch.bool, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        n_cand = min(2 * k, k * V)
        rank_ok = torch.arange(n_cand, device=dev)[None] < k

        def keep_best(improve, score, seq, hist_t, n_words, ended):
            nonlocal best_score, best_seq, best_hist, best_len, best_ended
            best_score = torch.where(improve, score, best_score)
            best_seq = torch.where(improve[:, None], seq, best_seq)
            best_hist = torch.where(improve[:, None, None], hist_t, best_hist)
            best_len = torch.where(improve, n_words, best_len)
            best_ended = torch.where(improve, ended, best_ended)

        for t in range(max_len):
            logits, h, c, alpha, _, _ = self.step(tok, h, c, feats, feats_proj)
            cand = (scores.reshape(B * k, 1) + self._step_log_probs(logits)).reshape(B, k * V)
            top_s, top_i = cand.topk(n_cand, dim=1)
            src, new = top_i // V, top_i % V
            is_end = new == self.end_id
            alpha = alpha.float().reshape(B, k, P)
            # hypotheses ending here: an <end> among the k best candidates of a still-open image
            fin_s = top_s.masked_fill(~(is_end & rank_ok & ~done[:, None]), float("-inf"))
            step_best, step_j = fin_s.max(dim=1)
            beam = src.gather(1, step_j[:, None]).squeeze(1)
            ended_hist = hist[rows, beam].clone()
            ended_hist[:, t] = alpha[rows, beam]
            improve = step_best > best_score
            n_words = torch.full_like(best_len, t)
            keep_best(improve, step_best, seqs[rows, beam], ended_hist, n_words, torch.ones_like(improve))
            # the k best candidates that do not end stay live
            sel_s, sel = top_s.masked_fill(is_end, float("-inf")).topk(k, dim=1)
            beam_src, new_tok = src.gather(1, sel), new.gather(1, sel)
            flat = (rows[:, None] * k + beam_src).reshape(-1)
            h, c = h[flat], c[flat]
            seqs = seqs[rows[:, None], beam_src]
            seqs[:, :, t] = new_tok
            hist = hist[rows[:, None], beam_src]
            hist[:, :, t] = alpha[rows[:, None], beam_src]
            scores, tok = sel_s, new_tok.reshape(-1)
            # summed log-probs only decrease: nothing live can beat a finished score >= the best live one
            done = done | (best_score >= scores.max(1).values)
            if bool(done.all()):
                break
        # images still open after max_len steps: their best live hypothesis competes unfinished
        live_s, live_j = scores.max(1)
        improve = ~done & (live_s > best_score)
        no_end = torch.zeros_like(best_ended)
        keep_best(improve, live_s, seqs[rows, live_j], hist[rows, live_j], torch.full_like(best_len, max_len), no_end)
        out = Decoded([], best_score.cpu(), [], [])
        seq_c, hist_c, len_c, end_c = best_seq.cpu(), best_hist.cpu(), best_len.tolist(), best_ended.tolist()
        for b in range(B):
            out.tokens.append(seq_c[b, : len_c[b]].tolist())
            out.alphas.append(hist_c[b, : len_c[b] + int(end_c[b])])
            out.ended.append(bool(end_c[b]))
        return out if return_details else out.tokens
