"""Caption vocabulary built from Karpathy tokens (METHODS.md section 1).

Words seen at least ``min_count`` times (5, as in Show-Attend-Tell's public code) get an id; every
other word maps to ``<unk>``. Ids 0..3 are the specials ``<pad>`` (0, so padded batches are zeros),
``<start>``, ``<end>``, ``<unk>``; real words follow by decreasing count, ties alphabetical, so the
same captions always give the same ids. A caption longer than ``max_len`` words is truncated to its
first ``max_len`` words: an encoded caption is ``<start> w_0 .. w_{L-1} <end>`` with
``L = min(len(tokens), max_len)``, length ``L + 2``.

The vocabulary is saved in runs as a JSON-able dict (:meth:`Vocab.to_dict`), never pickled.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import torch

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
FORMAT = "vlcache.vocab"
VERSION = 1


def _as_tokens(tokens: Sequence[str] | str) -> list[str]:
    """Accept a token list or a space-joined token string (the store's ``captions/tokens``)."""
    if isinstance(tokens, str):
        return tokens.split()
    return list(tokens)


class Vocab:
    """Word <-> id mapping with the four specials at ids 0..3."""

    pad_id = 0
    start_id = 1
    end_id = 2
    unk_id = 3

    def __init__(self, words: Sequence[str], max_len: int = 50, min_count: int = 5):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        words = list(words)
        clash = [w for w in words if w in SPECIALS]
        if clash:
            raise ValueError(f"vocabulary words {clash} collide with the special tokens {SPECIALS}")
        if len(set(words)) != len(words):
            dup = sorted({w for w in words if words.count(w) > 1})
            raise ValueError(f"duplicate vocabulary words: {dup[:10]}")
        self.itos: list[str] = list(SPECIALS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.max_len = int(max_len)
        self.min_count = int(min_count)

    @classmethod
    def build(
        cls, token_lists: Iterable[Sequence[str] | str], min_count: int = 5, max_len: int = 50
    ) -> "Vocab":
        """Count words over ``token_lists`` (training captions) and keep those with count >= min_count."""
        counts: Counter[str] = Counter()
        for tokens in token_lists:
            counts.update(_as_tokens(tokens))
        for s in SPECIALS:
            counts.pop(s, None)  # a caption literally containing "<unk>" must not shadow the specials
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept, max_len=max_len, min_count=min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos and self.max_len == other.max_len

    def encode(self, tokens: Sequence[str] | str) -> list[int]:
        """``<start>`` + ids of the first ``max_len`` words (unknown -> ``<unk>``) + ``<end>``."""
        words = _as_tokens(tokens)[: self.max_len]
        return [self.start_id] + [self.stoi.get(w, self.unk_id) for w in words] + [self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids``: skips ``<start>``/``<pad>``, stops at the first ``<end>``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} outside the vocabulary (size {len(self.itos)})")
            out.append(self.itos[i])
        return out

    def decode_text(self, ids: Iterable[int]) -> str:
        return " ".join(self.decode(ids))

    def encode_batch(self, token_lists: Sequence[Sequence[str] | str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and right-pad with ``<pad>``: (captions (B, T) long, lengths (B,) long incl. start/end)."""
        if len(token_lists) == 0:
            raise ValueError("encode_batch needs at least one caption")
        encoded = [self.encode(t) for t in token_lists]
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        caps = torch.full((len(encoded), int(lengths.max())), self.pad_id, dtype=torch.long)
        for b, e in enumerate(encoded):
            caps[b, : len(e)] = torch.tensor(e, dtype=torch.long)
        return caps, lengths

    def to_dict(self) -> dict:
        """JSON-able form, what a run directory stores."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "max_len": self.max_len,
            "min_count": self.min_count,
            "specials": list(SPECIALS),
            "words": self.itos[len(SPECIALS) :],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a vlcache vocabulary: expected format {FORMAT!r}, got {got!r}")
        if d.get("version") != VERSION:
            raise ValueError(f"vocabulary version {d.get('version')!r} is not supported (expected {VERSION})")
        if list(d.get("specials", [])) != list(SPECIALS):
            raise ValueError(f"vocabulary specials {d.get('specials')!r} differ from {list(SPECIALS)}")
        for key in ("max_len", "words"):
            if key not in d:
                raise ValueError(f"vocabulary dict is missing field {key!r}")
        return cls(d["words"], max_len=int(d["max_len"]), min_count=int(d.get("min_count", 5)))
