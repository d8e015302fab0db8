"""English plural forms of a class word: stage one's caption matching finds "boxes" for the class
"box" with them, and the store's figures use them to tell whether a matched word is its class's name."""

from __future__ import annotations

# Irregular plurals; also applied to compounds ending in the word (policeman -> policemen,
# grandchild -> grandchildren, pocketknife -> pocketknives).
_IRREGULAR = {
    "person": ("people", "persons"),
    "man": ("men",),
    "woman": ("women",),
    "child": ("children",),
    "mouse": ("mice",),
    "knife": ("knives",),
    "goose": ("geese",),
    "foot": ("feet",),
    "tooth": ("teeth",),
    "ox": ("oxen",),
    "calf": ("calves",),
    "leaf": ("leaves",),
    "loaf": ("loaves",),
    "shelf": ("shelves",),
    "wolf": ("wolves",),
    "half": ("halves",),
    "wife": ("wives",),
    "life": ("lives",),
    "scarf": ("scarves", "scarfs"),
    "cactus": ("cacti", "cactuses"),
}
# Words whose plural is the word itself (or that are plural already).
_INVARIANT = {
    "sheep", "fish", "deer", "moose", "bison", "aircraft", "watercraft", "hovercraft", "spacecraft",
    "people", "children", "men", "women", "oxen", "cattle", "scissors", "skis", "police", "luggage",
    "series", "species", "broccoli",
}  # fmt: skip


def plural_forms(word: str) -> set[str]:
    """Plural forms of one lowercase word (over-generating is harmless: only whole words match)."""
    if word in _INVARIANT:
        return {word}
    forms: set[str] = set()
    for singular, plurals in _IRREGULAR.items():
        if word.endswith(singular):
            stem = word[: len(word) - len(singular)]
            forms.update(stem + p for p in plurals)
    if word.endswith(("s", "x", "z", "ch", "sh")):
        forms.add(word + "es")
        if word.endswith("s"):
            forms.add(word + "ses")  # bus -> busses
    elif len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    elif word.endswith("o"):
        forms.update((word + "s", word + "es"))
    else:
        forms.add(word + "s")
    return forms
