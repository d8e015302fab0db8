"""Class-word matching: which caption words name which detector class (METHODS.md section 5).

Seed 000 (section 3.2) treats a detected object as *critical* when its class label "was included in the
word tokens of the caption". We match whole words and multi-word names ("teddy bear", "traffic light"),
singular and plural (regular -s/-es/-ies and irregular forms), case-insensitively, against the class
names plus a curated synonym table (``class_words.txt`` beside this module). ``mode="exact"`` matches the
class names (and their plurals) only, for parity with the paper's wording.

Overlapping candidates are resolved longest first, then leftmost: in "a teddy bear" the span
"teddy bear" wins over "bear". Each match carries a token span (into the Karpathy tokens) and a
character span (into the raw caption), so a subword tokenizer can map it with its offset mapping.

Two guards against false hits (``mode="synonyms"`` only; ``exact`` stays literal): phrases that name no
class (the table's ``!`` line: "computer board", "orange juice") take part in longest-first matching and
claim their words, so "computer" in "computer board" is not a laptop; and a class name that is also a
colour ("orange") is the colour, not the object, when it is used as an adjective (see
:func:`colour_use`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

from ...storage.word_forms import plural_forms

CLASS_WORDS_FILE = Path(__file__).with_name("class_words.txt")

# Same word definition as records.karpathy_tokens: runs of ASCII letters/digits; apostrophes and all
# other characters separate words ("man's" -> "man", "s"). Matching ASCII on the original string keeps
# character offsets exact (str.lower() may change a string's length for some non-ASCII letters).
_WORD = re.compile(r"[A-Za-z0-9]+")

# Placeholder names in detector label lists that must never match ("N/A" would match the word "a").
_PLACEHOLDERS = {"__background__", "n/a", ""}
NOT_A_CLASS = "!"  # the class_words.txt line of phrases that name no class

# Colour words, for telling the colour "orange" from the fruit (colour_use).
COLOURS = {
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "gray",
    "gold", "golden", "silver", "tan", "beige", "teal", "maroon", "navy", "violet", "turquoise", "colorful",
}  # fmt: skip
_SHADES = {"bright", "dark", "light", "pale", "deep", "neon", "burnt", "vivid", "dull", "reddish", "yellowish"}
_COPULAS = {"is", "are", "was", "were", "be", "been", "painted", "colored", "coloured", "all", "mostly", "mainly"}
# Words after a singular colour-class word that leave it a noun (the fruit): function words, verbs, and
# the fruit's own parts ("an orange on a plate", "an orange cut in half", "orange slices").
_NOUN_FOLLOWERS = {
    "on", "in", "at", "by", "near", "next", "beside", "behind", "under", "over", "with", "without", "of", "from",
    "and", "or", "but", "to", "for", "that", "which", "who", "while", "as", "is", "are", "was", "were", "has",
    "have", "sits", "sitting", "lies", "lying", "laying", "rests", "resting", "being", "cut", "sliced", "peeled",
    "half", "halves", "halved", "slice", "slices", "wedge", "wedges", "peel", "peels", "segment", "segments",
    "section", "sections", "rind", "a", "an", "the", "this", "it", "there", "here",
}  # fmt: skip


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in _WORD.findall(text))


def phrase_forms(phrase: str) -> set[tuple[str, ...]]:
    """The phrase and its plurals (the head noun, i.e. the last word, inflected), as word tuples."""
    words = _words(phrase)
    if not words:
        return set()
    return {words} | {words[:-1] + (p,) for p in plural_forms(words[-1])}


@dataclass(frozen=True)
class Match:
    """One caption span naming a class.

    ``token_start``/``token_end`` (exclusive) index the caption's tokens; ``char_start``/``char_end``
    (exclusive) index the raw caption, or are -1 when the tokens could not be aligned to the raw text.
    ``label`` indexes the matcher's ``class_names``; ``words`` is the matched text, lowercased.
    """

    token_start: int
    token_end: int
    char_start: int
    char_end: int
    label: int
    words: str


def load_class_words(path: str | Path = CLASS_WORDS_FILE) -> dict[str, list[str]]:
    """Read a class-word table: ``class name, word, word, ...`` per line, ``#`` comments.

    Returns ``{class_name: [words...]}`` in file order (the class name itself not repeated). Repeats
    within a line are dropped; a class listed twice or a word under two classes is a ``ValueError``
    naming the file and line. The ``!`` line (phrases naming no class) is not part of the table; see
    :func:`load_not_class_phrases`.
    """
    table = _read_table(path)
    table.pop(NOT_A_CLASS, None)
    return table


def load_not_class_phrases(path: str | Path = CLASS_WORDS_FILE) -> list[str]:
    """The phrases of the table's ``!`` line: word sequences that name no class ("computer board")."""
    return _read_table(path).get(NOT_A_CLASS, [])


def _read_table(path: str | Path) -> dict[str, list[str]]:
    path = Path(path)
    table: dict[str, list[str]] = {}
    owner: dict[str, tuple[str, int]] = {}  # normalised word -> (class, line)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        items = [" ".join(x.split()) for x in line.split(",")]
        items = [x for x in items if x]
        name = items[0]
        if name in table:
            raise ValueError(f"{path}:{lineno}: class {name!r} is listed twice")
        words: list[str] = []
        for item in items[1:] if name == NOT_A_CLASS else items:
            key = " ".join(_words(item))
            if not key:
                raise ValueError(f"{path}:{lineno}: entry {item!r} has no letters or digits")
            if key in owner:
                other, other_line = owner[key]
                if other != name:
                    raise ValueError(
                        f"{path}:{lineno}: {item!r} is listed under {name!r} and under {other!r} "
                        f"(line {other_line}); a word may name one class only"
                    )
                continue  # repeated within the line
            owner[key] = (name, lineno)
            if item != name:
                words.append(item)
        table[name] = words
    return table


class ClassWordMatcher:
    """Finds class names and their synonyms in captions.

    ``class_names`` is the detector's label list (``Match.label`` indexes it; placeholder entries such
    as ``"__background__"`` and ``"N/A"`` never match). ``synonyms`` maps class names to extra words or
    phrases; ``mode="exact"`` ignores it. A phrase claimed by two classes is a ``ValueError``, except
    that a listed phrase beats a generated plural form ("glasses" listed vs. the plural of "glass").
    ``not_classes``: phrases that name no class (default: the curated table's ``!`` line); a class
    phrase of the same words wins over them.
    """

    def __init__(
        self,
        class_names: list[str],
        synonyms: dict[str, list[str]] | None = None,
        mode: str = "synonyms",
        not_classes: list[str] | None = None,
    ):
        if mode not in ("synonyms", "exact"):
            raise ValueError(f"matching mode must be 'synonyms' or 'exact', got {mode!r}")
        self.class_names = list(class_names)
        self.mode = mode
        index = {n: i for i, n in enumerate(self.class_names) if n.strip().lower() not in _PLACEHOLDERS}
        unknown = sorted(set(synonyms or {}) - set(index))
        if unknown:
            raise ValueError(f"synonyms given for classes not in class_names: {unknown}")
        # word tuple -> (label, listed): listed phrases beat generated plural forms.
        self._table: dict[tuple[str, ...], tuple[int, bool]] = {}
        for name, label in index.items():
            phrases = [name]
            if mode == "synonyms":
                phrases += list((synonyms or {}).get(name, []))
            for phrase in phrases:
                words = _words(phrase)
                if not words:
                    raise ValueError(f"class {name!r}: phrase {phrase!r} has no letters or digits")
                # the listed form first, then sorted: errors and the table do not depend on set order
                for form in sorted(phrase_forms(phrase), key=lambda f: (f != words, f)):
                    self._add(form, label, listed=form == words)
        if mode == "synonyms":  # label -1: claims its words, names nothing
            for phrase in load_not_class_phrases() if not_classes is None else not_classes:
                for form in phrase_forms(phrase):
                    self._table.setdefault(form, (-1, False))
        self._colour_labels = {label for form, (label, _) in self._table.items()
                               if mode == "synonyms" and len(form) == 1 and form[0] in COLOURS}
        self._max_len = max((len(k) for k in self._table), default=0)

    def _add(self, form: tuple[str, ...], label: int, listed: bool) -> None:
        old = self._table.get(form)
        if old is None or (listed and not old[1]):
            self._table[form] = (label, listed)
        elif old[0] != label and listed == old[1]:
            raise ValueError(
                f"phrase {' '.join(form)!r} would name both {self.class_names[old[0]]!r} and "
                f"{self.class_names[label]!r}"
            )

    @classmethod
    def coco(cls, class_names: list[str] | None = None, mode: str = "synonyms") -> "ClassWordMatcher":
        """A matcher over COCO class names using the curated ``class_words.txt`` table.

        ``class_names`` defaults to the table's 80 names in torchvision's order; table rows for classes
        absent from ``class_names`` are ignored (a detector with fewer classes).
        """
        table = load_class_words(CLASS_WORDS_FILE)
        names = list(table) if class_names is None else list(class_names)
        return cls(names, {n: w for n, w in table.items() if n in names}, mode=mode)

    @property
    def vocabulary(self) -> dict[str, str]:
        """Every matchable phrase (with generated plurals) -> its class name."""
        return {" ".join(k): self.class_names[v[0]] for k, v in sorted(self._table.items()) if v[0] >= 0}

    def match(self, raw: str, tokens: list[str] | tuple[str, ...] | None = None) -> list[Match]:
        """Class-naming spans of one caption, sorted by position.

        Without ``tokens`` the caption is split like Karpathy's tokens (lowercase ASCII letter/digit
        runs). With ``tokens`` (e.g. a dataset's own Karpathy tokens), matching runs on them and their
        character spans are found by aligning their characters to the raw caption's letters and digits;
        where the two disagree (a token that is not in the raw text), that token's matches get
        ``char_start = char_end = -1`` but keep their token span.
        """
        if tokens is None:
            found = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(raw)]
            norm = [w for _, _, w in found]
            spans: list[tuple[int, int] | None] = [(s, e) for s, e, _ in found]
        else:
            norm = ["".join(_WORD.findall(t)).lower() for t in tokens]
            spans = _align(raw, norm)

        n, taken = len(norm), [False] * len(norm)
        candidates = []
        for length in range(min(self._max_len, n), 0, -1):
            for i in range(n - length + 1):
                hit = self._table.get(tuple(norm[i : i + length]))
                if hit is not None:
                    candidates.append((i, i + length, hit[0]))
        out = []
        for s, e, label in candidates:  # longest first, then leftmost
            if any(taken[s:e]):
                continue
            taken[s:e] = [True] * (e - s)
            if label < 0 or (label in self._colour_labels and e - s == 1 and colour_use(norm, s)):
                continue  # a phrase naming no class, or a colour word used as a colour
            first, last = spans[s], spans[e - 1]
            cs, ce = (first[0], last[1]) if first and last else (-1, -1)
            out.append(Match(s, e, cs, ce, label, " ".join(norm[s:e])))
        return sorted(out, key=lambda m: m.token_start)


def colour_use(words: list[str], i: int) -> bool:
    """Whether ``words[i]``, a colour that is also a class ("orange"), is used as the colour.

    The colour when: it is in a list of colours ("orange and white", "black and orange"), shaded ("bright
    orange"), a predicate ("is orange", "painted orange"), or an adjective before a noun ("orange cat",
    "orange juice"), i.e. followed by a word that is not a function word, verb or part of the fruit.
    The object when plural ("oranges"), last, or followed by such a word ("an orange on a plate").
    """
    w = words[i]
    if w not in COLOURS:
        return False
    prev = words[i - 1] if i > 0 else ""
    prev2 = words[i - 2] if i > 1 else ""
    nxt = words[i + 1] if i + 1 < len(words) else ""
    nxt2 = words[i + 2] if i + 2 < len(words) else ""
    if prev in COLOURS or prev in _SHADES or prev in _COPULAS or (prev in ("and", "or") and prev2 in COLOURS):
        return True
    if nxt in COLOURS or (nxt in ("and", "or") and nxt2 in COLOURS) or nxt in ("colored", "coloured", "color", "colour"):
        return True
    return bool(nxt) and nxt not in _NOUN_FOLLOWERS


def _align(raw: str, tokens: list[str]) -> list[tuple[int, int] | None]:
    """Character span in ``raw`` of each (normalised) token, ``None`` where it cannot be aligned.

    Works on the letters and digits only, so tokenisations that split or join words differently
    ("man's" -> "mans" or "man", "s") still align; characters that differ are aligned with difflib.
    """
    pos: list[int] = []  # raw offset of each letter/digit
    for m in _WORD.finditer(raw):
        pos.extend(range(m.start(), m.end()))
    raw_chars = "".join(raw[i] for i in pos).lower()
    tok_chars = "".join(tokens)
    if raw_chars == tok_chars:
        where = list(range(len(tok_chars)))
    else:
        where = [-1] * len(tok_chars)
        matcher = SequenceMatcher(None, raw_chars, tok_chars, autojunk=False)
        for a, b, size in matcher.get_matching_blocks():
            where[b : b + size] = range(a, a + size)
    spans: list[tuple[int, int] | None] = []
    c = 0
    for t in tokens:
        first, last = (where[c], where[c + len(t) - 1]) if t else (-1, -1)
        spans.append((pos[first], pos[last] + 1) if first >= 0 and last >= first else None)
        c += len(t)
    return spans


def match_statistics(matches_per_caption: list[list[Match]], class_names: list[str], top: int = 20) -> dict:
    """Per-store matching statistics (METHODS.md section 2).

    ``mean_matched_objects_per_caption``: mean number of *distinct* classes matched in a caption (the
    ICA paper's "critical objects", 2.3 on its data); ``mean_matched_words_per_caption``: mean number
    of matched spans; ``captions_with_match``: fraction of captions with at least one match;
    ``top_words`` / ``top_classes``: the most frequent matched phrases / classes with their counts.
    """
    n = len(matches_per_caption)
    words: Counter[str] = Counter()
    classes: Counter[str] = Counter()
    objects = spans = with_match = 0
    for i, ms in enumerate(matches_per_caption):
        for m in ms:
            if not 0 <= m.label < len(class_names):
                raise ValueError(f"caption {i}: match label {m.label} outside the {len(class_names)} classes")
            words[m.words] += 1
            classes[class_names[m.label]] += 1
        objects += len({m.label for m in ms})
        spans += len(ms)
        with_match += bool(ms)
    return {
        "captions": n,
        "mean_matched_objects_per_caption": objects / n if n else 0.0,
        "mean_matched_words_per_caption": spans / n if n else 0.0,
        "captions_with_match": with_match / n if n else 0.0,
        "top_words": words.most_common(top),
        "top_classes": classes.most_common(top),
    }
