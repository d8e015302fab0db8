"""The matching models by name (the config's ``model``): each one module implementing
``protocol.MatchModel``, imported when first asked for (this module imports none of them).

Adding a model: its module (a ``MatchModel`` subclass with its network), and one line here.
"""

from __future__ import annotations

from ...pipeline.registry import Registry
from .protocol import MatchModel

MATCH_MODELS = Registry("matching model")
MATCH_MODELS.register_lazy("scan", f"{__package__}.scan:ScanMatch")
MATCH_MODELS.register_lazy("mmca", f"{__package__}.mmca:MmcaMatch")
MATCH_MODELS.register_lazy("slan", f"{__package__}.slan:SlanMatch")


def match_model(name: str) -> MatchModel:
    """The registered model called ``name``; ValueError naming the registered ones otherwise."""
    if name not in MATCH_MODELS:
        raise ValueError(f"model must be one of {tuple(MATCH_MODELS.names())}, got {name!r}")
    return MATCH_MODELS.get(name)()
