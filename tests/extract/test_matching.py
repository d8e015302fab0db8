"""Class-word matching (METHODS.md section 5) on hand-written captions and the curated COCO table."""

from pathlib import Path

import pytest
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

from vlcache.pipeline.records import karpathy_tokens
from vlcache.stages.extract.matching import (
    CLASS_WORDS_FILE,
    ClassWordMatcher,
    Match,
    load_class_words,
    load_not_class_phrases,
    match_statistics,
    plural_forms,
)

REFERENCE = Path("/work/shared/reference/nbt_coco_class_words.txt")


@pytest.fixture(scope="module")
def coco():
    return ClassWordMatcher.coco()


def named(matcher, caption, tokens=None):
    """(matched words, class name) pairs of a caption."""
    return [(m.words, matcher.class_names[m.label]) for m in matcher.match(caption, tokens)]


def test_table_names_are_torchvision_coco_categories():
    cats = MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    expected = [c for c in cats if c not in ("__background__", "N/A")]
    table = load_class_words()
    assert list(table) == expected
    assert len(table) == 80


def test_curated_table_fixes_reference_errors():
    table = load_class_words()
    assert "surfboard" not in table["boat"] and "sailboard" in table["surfboard"]
    assert "ewe" not in table["cow"] and "ewe" in table["sheep"]
    assert "cattle" not in table["sheep"] and "goat" not in table["sheep"]
    assert "plate" not in table["bowl"] and "container" not in table["bowl"]
    assert "street sign" not in table["stop sign"]
    assert not {"lenovo", "macbook"} & set(table["laptop"])
    assert not {"iPhone", "phon"} & set(table["cell phone"])
    every = [w for ws in table.values() for w in ws]
    for typo in ("solider", "televison", "phon", "knive"):
        assert typo not in every
    assert len(every) == len(set(every)), "a word is listed twice"
    # the raw reference really has these problems, so the checks above test the curation
    raw = REFERENCE.read_text()
    assert "surfboard" in raw.splitlines()[8] and "televison" in raw and "solider" in raw


def test_curated_table_fixes_change_matches(coco):
    assert named(coco, "A man carrying a surfboard to the beach.") == [("man", "person"), ("surfboard", "surfboard")]
    assert named(coco, "A plate of food next to a bowl") == [("bowl", "bowl")]
    assert named(coco, "A street sign on a pole") == []
    assert named(coco, "A ewe and her lamb") == [("ewe", "sheep"), ("lamb", "sheep")]
    assert named(coco, "A lenovo notebook") == [("notebook", "laptop")]


def test_synonyms_plurals_and_irregular_plurals(coco):
    got = named(coco, "Two women and several men watch the children ride bikes past three people.")
    assert got == [("women", "person"), ("men", "person"), ("children", "person"), ("bikes", "bicycle"), ("people", "person")]
    assert named(coco, "mice, knives, sheep and geese") == [
        ("mice", "mouse"), ("knives", "knife"), ("sheep", "sheep"), ("geese", "bird")
    ]  # fmt: skip
    assert named(coco, "Policemen on ponies near the buses and couches") == [
        ("policemen", "person"), ("ponies", "horse"), ("buses", "bus"), ("couches", "couch")
    ]  # fmt: skip
    assert named(coco, "A puppy and a kitten on the sofa") == [("puppy", "dog"), ("kitten", "cat"), ("sofa", "couch")]


def test_multiword_names_and_longest_match(coco):
    got = named(coco, "A teddy bear beside two hot dogs, a traffic light and a cell phone.")
    assert got == [("teddy bear", "teddy bear"), ("hot dogs", "hot dog"), ("traffic light", "traffic light"), ("cell phone", "cell phone")]
    # "bear" alone is a bear; inside "teddy bear" it is not
    assert named(coco, "A bear hugs teddy bears") == [("bear", "bear"), ("teddy bears", "teddy bear")]
    # multi-word synonyms win over their parts: not laptop + mouse, not oven + microwave
    assert named(coco, "a computer mouse by the microwave oven") == [("computer mouse", "mouse"), ("microwave oven", "microwave")]
    assert named(coco, "a baseball bat and a baseball") == [("baseball bat", "baseball bat"), ("baseball", "sports ball")]


def test_whole_words_only_and_case(coco):
    assert named(coco, "The catcher can't catch a cathedral scattered in concatenation") == [("catcher", "person")]
    assert named(coco, "carpet, dogma, bus stop sign? Cats!") == [("bus", "bus"), ("stop sign", "stop sign"), ("cats", "cat")]
    assert named(coco, "A DOG and a Teddy-Bear") == [("dog", "dog"), ("teddy bear", "teddy bear")]


def test_exact_mode_uses_class_names_only():
    m = ClassWordMatcher.coco(mode="exact")
    assert named(m, "A man with a puppy and two dogs near a tv and a sofa") == [("dogs", "dog"), ("tv", "tv")]
    assert named(m, "two teddy bears") == [("teddy bears", "teddy bear")]


def test_char_offsets_point_into_raw_text(coco):
    raw = "  A Man's  two Hot-Dogs,\tand the TEDDY bear!  "
    ms = coco.match(raw)
    assert [raw[m.char_start : m.char_end] for m in ms] == ["Man", "Hot-Dogs", "TEDDY bear"]
    toks = karpathy_tokens(raw)
    assert [toks[m.token_start : m.token_end] for m in ms] == [("man",), ("hot", "dogs"), ("teddy", "bear")]


def test_given_tokens_align_to_raw(coco):
    raw = "A woman's cat sits on a laptop."
    # the same tokens as Karpathy's tokenizer
    ms = coco.match(raw, list(karpathy_tokens(raw)))
    assert [(m.token_start, m.token_end, raw[m.char_start : m.char_end]) for m in ms] == [
        (1, 2, "woman"), (3, 4, "cat"), (7, 8, "laptop")
    ]  # fmt: skip
    # a tokenizer that joins the possessive: token spans follow the tokens, chars still align
    # (the joined "womans" still names a person: regular plural forms are generated for every word)
    ms = coco.match(raw, ["a", "womans", "cat", "sits", "on", "a", "laptop"])
    assert [(m.token_start, raw[m.char_start : m.char_end]) for m in ms] == [(1, "woman's"), (2, "cat"), (6, "laptop")]
    # tokens that are not in the raw text keep their token span and get char -1
    ms = coco.match("A dog on a sofa", ["a", "dog", "on", "a", "couch"])
    assert [(m.words, m.token_start, m.char_start, m.char_end) for m in ms] == [("dog", 1, 2, 5), ("couch", 4, -1, -1)]


def test_custom_synonyms_and_errors():
    m = ClassWordMatcher(["ball", "stop sign"], {"ball": ["sphere"], "stop sign": ["octagon"]})
    assert [(x.label, x.words) for x in m.match("Two spheres and octagons near stop signs")] == [
        (0, "spheres"), (1, "octagons"), (1, "stop signs")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not in class_names"):
        ClassWordMatcher(["ball"], {"bal": ["sphere"]})
    with pytest.raises(ValueError, match="'orb'.*both"):
        ClassWordMatcher(["ball", "box"], {"ball": ["orb"], "box": ["orb"]})
    with pytest.raises(ValueError, match="mode"):
        ClassWordMatcher(["ball"], mode="fuzzy")


def test_placeholder_labels_never_match():
    cats = MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]  # 91 with __background__ and N/A
    m = ClassWordMatcher.coco(cats)
    ms = m.match("A n/a dog on a bench")
    assert [cats[x.label] for x in ms] == ["dog", "bench"]


def test_load_class_words_errors(tmp_path):
    f = tmp_path / "words.txt"
    f.write_text("# comment\ncat, kitten, kitten\ndog, kitten\n")
    with pytest.raises(ValueError, match=r"words.txt:3: 'kitten' is listed under 'dog' and under 'cat'"):
        load_class_words(f)
    f.write_text("cat, kitten\ncat, tabby\n")
    with pytest.raises(ValueError, match=r"words.txt:2: class 'cat' is listed twice"):
        load_class_words(f)
    f.write_text("cat, kitten, kitten  # repeat in a line is dropped\n\n")
    assert load_class_words(f) == {"cat": ["kitten"]}
    assert CLASS_WORDS_FILE.name == "class_words.txt"


def test_plural_forms():
    assert "boxes" in plural_forms("box") and "ponies" in plural_forms("pony") and "guys" in plural_forms("guy")
    assert "grandchildren" in plural_forms("grandchild") and "pocketknives" in plural_forms("pocketknife")
    assert plural_forms("sheep") == {"sheep"}


def test_match_statistics(coco):
    caps = ["A man and a woman with a dog.", "Two dogs.", "A cloudy sky."]
    ms = [coco.match(c) for c in caps]
    stats = match_statistics(ms, coco.class_names)
    # distinct classes per caption: {person, dog}, {dog}, {} -> 1.0; spans: 3, 1, 0 -> 4/3
    assert stats["mean_matched_objects_per_caption"] == pytest.approx(1.0)
    assert stats["mean_matched_words_per_caption"] == pytest.approx(4 / 3)
    assert stats["captions_with_match"] == pytest.approx(2 / 3)
    assert dict(stats["top_words"]) == {"man": 1, "woman": 1, "dog": 1, "dogs": 1}
    assert dict(stats["top_classes"]) == {"person": 2, "dog": 2}
    with pytest.raises(ValueError, match="caption 0"):
        match_statistics([[Match(0, 1, 0, 1, 99, "x")]], coco.class_names)
    assert match_statistics([], coco.class_names)["mean_matched_objects_per_caption"] == 0.0


# ------------------------------------------------------------------ issue 13: real-style captions
CAPTIONS_FILE = Path(__file__).with_name("matching_captions.txt")


def _expected_matches():
    cases = []
    for line in CAPTIONS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            caption, _, expected = line.partition("|")
            pairs = [tuple(x.strip() for x in p.split("=")) for p in expected.split(",") if p.strip()]
            cases.append((caption.strip(), pairs))
    return cases


def test_hand_written_captions_match_as_expected(coco):
    cases = _expected_matches()
    assert len(cases) >= 100
    wrong = [(caption, named(coco, caption), expected) for caption, expected in cases
             if named(coco, caption) != expected]
    assert not wrong, "\n".join(f"{c!r}: got {g}, expected {e}" for c, g, e in wrong)


def test_orange_the_colour_is_not_the_fruit(coco):
    colour = ["an orange cat", "orange juice", "black and orange", "orange and white kite", "bright orange bus",
              "the truck is orange", "an orange colored wall", "orange-colored"]
    fruit = ["an orange", "an orange on a plate", "oranges", "orange slices", "an orange and an apple",
             "an orange cut in half", "two oranges and a banana"]
    assert [c for c in colour if any(w == "orange" for w, _ in named(coco, c))] == []
    assert [f for f in fruit if "orange" not in [cls for _, cls in named(coco, f)]] == []
    # exact mode stays literal: the class name matches wherever it appears
    assert named(ClassWordMatcher.coco(mode="exact"), "an orange cat") == [("orange", "orange"), ("cat", "cat")]


def test_not_a_class_phrases_claim_their_words(coco, tmp_path):
    assert named(coco, "a computer board") == [] and named(coco, "a computer") == [("computer", "laptop")]
    assert load_not_class_phrases()[:2] == ["computer board", "circuit board"]
    assert "computer board" not in coco.vocabulary and "!" not in load_class_words()
    own = ClassWordMatcher(["laptop"], {"laptop": ["computer"]}, not_classes=["computer game"])
    assert named(own, "a computer game on a computer") == [("computer", "laptop")]
    bad = tmp_path / "words.txt"
    bad.write_text("laptop, computer\n!, computer\n")
    with pytest.raises(ValueError, match="listed under '!' and under 'laptop'"):
        load_class_words(bad)


def test_a_datasets_own_table_lists_its_own_phrases_that_name_no_class(tmp_path):
    from vlcache.pipeline.config import load_config
    from vlcache.pipeline.datasets import load_dataset
    from vlcache.pipeline.synth import generate
    from vlcache.stages.extract.config import ExtractConfig
    from vlcache.stages.extract.models import build_models

    generate(tmp_path, n_images=3, seed=0, size=(32, 32))
    words = tmp_path / "class_words.txt"  # extraction picks up the table beside the dataset
    words.write_text(words.read_text() + "!, ring road\n")
    ds = load_dataset(tmp_path / "dataset_synth.json", instances=tmp_path / "instances.json")
    cfg = load_config(ExtractConfig, overrides=["detector.backend=annotations", "groups=[matches]"])
    matcher = build_models(cfg, ds).matcher
    assert [m.words for m in matcher.match("a ring road next to a ring")] == ["ring"]
