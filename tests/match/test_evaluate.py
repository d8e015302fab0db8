"""Matching evaluation: scores and report, rerank = exact at K = all, Flickr30k Entities reader."""

import json
import re

import pytest
import torch

from synth_store import make_synth_store
from vlcache.stages.match.entities import entity_queries, read_entities_annotation, read_entities_sentences
from vlcache.stages.match.data import load_split
from vlcache.stages.match.ablation import run_match_ablation
from vlcache.stages.match.evaluate import evaluate_match, protocol_metrics
from vlcache.stages.match.train import MatchTrainConfig, load_match_run, make_dataset, similarity, train_match
from vlcache.storage.store import open_store

torch.set_num_threads(2)
# One caption per image per step: these tests are about evaluation, 5 short steps train enough.
TINY = dict(embed=32, word_dim=32, d=32, heads=4, vocab_min_count=1, device="cpu", epochs=1, batch_size=8,
            region_norm=True, val_max_images=4, captions="one")


@pytest.fixture(scope="module")
def synth():
    return make_synth_store()[0]


@pytest.fixture(scope="module")
def scan_run(synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "scan"
    train_match(MatchTrainConfig(model="scan", store=synth, **TINY), run)
    return run


@pytest.fixture(scope="module")
def mmca_run(synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "mmca"  # no text cache: BERT runs online in training and eval
    train_match(MatchTrainConfig(model="mmca", store=synth, **TINY), run)
    return run


def test_evaluation_writes_scores_and_report_in_range(scan_run):
    s = evaluate_match(scan_run, "test", figures=2, device="cpu")
    assert s["n_images"] == 4 and s["n_captions"] == 20 and s["retrieval"]["protocol"] == "full"
    recalls = [s[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert all(0 <= r <= 100 for r in recalls) and s["rsum"] == pytest.approx(sum(recalls))
    assert s["t2i_r5"] == s["t2i_r10"] == 100.0  # 4 images: the right one is always in the top 5
    for k in ("attn_precision", "attn_recall", "attn_f1"):
        assert 0.0 <= s[k] <= 1.0, k
    assert 0 < s["attn_words"] <= s["matched_words"]
    saved = json.loads((scan_run / "eval" / "scores_test.json").read_text())
    assert saved["rsum"] == s["rsum"] and json.loads((scan_run / "eval" / "scores.json").read_text()) == saved
    report = (scan_run / "report.md").read_text()
    assert "rsum" in report and "Attention" in report and f"{s['rsum']:.2f}" in report
    assert "best-covered" not in report and "(no fallback)" in s["attn_reference"]  # the report says what was scored
    figs = sorted((scan_run / "figures").glob("match_attention_test_*.png"))
    assert len(figs) == 2 and all(f.stat().st_size > 5000 for f in figs)
    assert all(f"figures/{f.name}" in report for f in figs)


def test_evaluation_refuses_another_store(scan_run, tiny_store):
    with pytest.raises(ValueError, match="fingerprint"):
        evaluate_match(scan_run, "test", store=tiny_store.url, device="cpu")


def test_mmca_rerank_with_k_all_equals_exact(mmca_run):
    s = evaluate_match(mmca_run, "test", rerank_top=1000, figures=0, device="cpu")
    rr = s["rerank"]
    assert rr["vs_exact"]["max_abs_diff"] == 0.0 and rr["metrics"]["full"]["rsum"] == s["rsum"]
    assert rr["cross_passes"] == rr["exact_cross_passes"] == 4 * 20
    net, vocab, _, cfg = load_match_run(mmca_run)
    from vlcache.stages.match.train import TextEncoder
    data = TextEncoder(cfg.bert, cfg.text_len, "cpu")(load_split(make_dataset(cfg, "test", vocab, "all", False)))
    exact = similarity(net, data, "cpu")["sim"]
    full = similarity(net, data, "cpu", rerank_top=20)
    assert torch.allclose(full["sim"], exact, atol=1e-5) and torch.allclose(full["sim_t2i"], exact, atol=1e-5)
    short = similarity(net, data, "cpu", rerank_top=2)
    assert short["n_pairs"] < 80
    # Shortlisted entries hold the exact S; the rest rank below them.
    top = exact.new_zeros(exact.shape, dtype=torch.bool)
    base = net.net.encode_all(net.regions(data["regions"]), data["region_mask"], data["words"], data["word_mask"])
    i0c0 = base.i0 @ base.c0.T
    top.scatter_(1, i0c0.topk(2, dim=1).indices, True)
    assert torch.allclose(short["sim"][top], exact[top], atol=1e-5)
    assert (short["sim"][~top].max() < short["sim"][top].min())


def test_protocol_is_coco_1k_5k_from_5000_images():
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(5000, 5000, generator=g)
    m = protocol_metrics(sim, torch.arange(5000))
    assert m["protocol"] == "coco" and len(m["folds"]) == 5 and set(m) >= {"1k", "5k"}
    assert protocol_metrics(sim[:1000, :1000], torch.arange(1000))["protocol"] == "full"


# ------------------------------------------------------------------------------- Flickr30k Entities
def test_entities_reader_on_the_published_format(tmp_path):
    (tmp_path / "s.txt").write_text(
        "[/EN#18/people A man] with [/EN#19/other pierced ears] is wearing [/EN#20/bodyparts/other glasses] .\n"
        "[/EN#0/notvisual Someone] looks at [/EN#21/clothing an orange hat] .\n")
    sents = read_entities_sentences(tmp_path / "s.txt")
    assert sents[0]["sentence"] == "A man with pierced ears is wearing glasses ."
    assert [(p["phrase_id"], p["first_word"], p["words"], p["types"]) for p in sents[0]["phrases"]] == [
        ("18", 0, ["A", "man"], ["people"]), ("19", 3, ["pierced", "ears"], ["other"]),
        ("20", 7, ["glasses"], ["bodyparts", "other"])]
    assert [p["phrase_id"] for p in sents[1]["phrases"]] == ["0", "21"]
    (tmp_path / "a.xml").write_text(
        "<annotation><filename>1.jpg</filename><size><width>500</width><height>333</height><depth>3</depth></size>"
        "<object><name>18</name><name>22</name><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>100</xmax>"
        "<ymax>200</ymax></bndbox></object>"
        "<object><name>18</name><bndbox><xmin>50</xmin><ymin>60</ymin><xmax>70</xmax><ymax>80</ymax></bndbox></object>"
        "<object><name>19</name><nobndbox>1</nobndbox></object>"
        "<object><name>23</name><scene>1</scene></object></annotation>")
    ann = read_entities_annotation(tmp_path / "a.xml")
    assert (ann["width"], ann["height"]) == (500, 333)
    assert ann["boxes"] == {"18": [[0, 10, 100, 200], [49, 59, 70, 80]], "22": [[0, 10, 100, 200]]}
    assert ann["nobox"] == ["19"] and ann["scene"] == ["23"]
    (tmp_path / "bad.txt").write_text("[/EN#5/people A man walks .\n")
    with pytest.raises(ValueError, match="never closed"):
        read_entities_sentences(tmp_path / "bad.txt")


def _write_entities(root, url, split="test"):
    """Entities files for the split's images: two captions each, matched words as phrases whose boxes are
    the instance boxes of their class (1-based XML pixel indices, as published)."""
    store = open_store(url)
    sep = lambda part: re.sub(r"([,.:;!?])", r" \1", part)  # noqa: E731  Entities splits off punctuation
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    expected = 0
    for row in store.rows(split):
        stem = str(store.backend.read("images/path", row)).rsplit("/", 1)[-1].rsplit(".", 1)[0]
        inst = store.instances(row)
        lines, objects = [], []
        for c in range(2):
            text = store.captions(row)[c].rstrip(".")
            out, at = [], 0
            for m in store.matches(row, c):
                out += [sep(text[at:m["char_start"]]), f"[/EN#{100 + m['label']}/other ",
                        text[m["char_start"]:m["char_end"]], "]"]
                at = m["char_end"]
                expected += 1
            lines.append("".join(out + [sep(text[at:]), " ."]))
        for lab, (x1, y1, x2, y2) in zip(inst["labels"].tolist(), inst["boxes"].tolist()):
            objects.append(f"<object><name>{100 + lab}</name><bndbox><xmin>{int(x1) + 1}</xmin><ymin>{int(y1) + 1}"
                           f"</ymin><xmax>{int(x2)}</xmax><ymax>{int(y2)}</ymax></bndbox></object>")
        (root / "Sentences" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
        scene = "<object><name>7</name><scene>1</scene></object>"
        (root / "Annotations" / f"{stem}.xml").write_text(f"<annotation>{''.join(objects)}{scene}</annotation>")
    return expected


def test_entities_queries_and_metrics_on_the_synthetic_store(scan_run, synth, tmp_path):
    expected = _write_entities(tmp_path / "ent", synth)
    net, vocab, _, cfg = load_match_run(scan_run)
    data = load_split(make_dataset(cfg, "test", vocab, "all", False))
    q = entity_queries(tmp_path / "ent", synth, data, "tokens")
    assert q["stats"]["images"] == 4 and q["stats"]["sentences"] == 8 and q["stats"]["sentences_unmatched"] == 0
    assert q["stats"]["phrases_boxed"] == q["stats"]["phrases_used"] == expected > 0
    store = open_store(synth)
    for j in range(len(q["txt"])):
        t = int(q["txt"][j])
        i = int(data["txt_img"][t])
        boxes = store.regions(int(data["rows"][i]))["boxes"]
        ref = q["reference"][j, :len(boxes)].numpy()
        assert ref.any()  # regions are the instance boxes here, so a phrase's own box is a region (IoU 1)
        words = [data["token_texts"][t].split()[int(p) - 1] for p in q["pos"][j].nonzero().squeeze(1)]
        assert words and all(w.isalpha() for w in words)
    s = evaluate_match(scan_run, "test", entities=tmp_path / "ent", figures=0, device="cpu")
    e = s["entities"]
    assert e["attn_words"] == expected and all(0 <= e[k] <= 1 for k in ("attn_precision", "attn_recall", "attn_f1"))
    assert "Flickr30k Entities" in (scan_run / "report.md").read_text()


def test_match_ablation_writes_a_table_and_reuses_finished_runs(synth, tmp_path):
    variants = {"baseline": {"ccr": 0.0, "ccs": 0.0}, "+CCR+CCS": {"ccr": 1.0, "ccs": 1.0}}
    kw = dict(seeds=2, runs_root=tmp_path, name="abl", split="test", variants=variants, figures=0, options=TINY)
    res = run_match_ablation(synth, "scan", **kw)
    assert [(r["variant"], r["seed"]) for r in res["rows"]] == [
        ("baseline", 0), ("baseline", 1), ("+CCR+CCS", 0), ("+CCR+CCS", 1)]
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "Δ +CCR+CCS − baseline" in md and "±" in md and "Attn P" in md and "rsum" in md
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    rsums = [r["rsum"] for r in res["rows"] if r["variant"] == "baseline"]
    assert saved["summary"]["baseline"]["rsum"]["mean"] == pytest.approx(sum(rsums) / 2)
    assert saved["summary"]["baseline"]["rsum"]["n"] == 2
    assert (tmp_path / "abl" / "ccr-ccs-seed1" / "checkpoints" / "best.pt").is_file()
    stamps = {p: p.stat().st_mtime for p in (tmp_path / "abl").glob("*/checkpoints/*.pt")}
    again = run_match_ablation(synth, "scan", **kw)
    assert again["rows"] == res["rows"]
    assert {p: p.stat().st_mtime for p in stamps} == stamps  # nothing retrained


def test_attention_metrics_score_only_words_with_a_region_half_inside(scan_run, synth):
    """METHODS §8, no fallback: a word is scored only when a region lies >= 50% inside its merged mask
    (computed here through the notebook API); the others are counted as skipped, not scored against
    ICA's largest-fraction fallback."""
    from vlcache.storage.masks import region_inside_fraction

    _, vocab, _, cfg = load_match_run(scan_run)
    data = load_split(make_dataset(cfg, "test", vocab, "all", True))
    store = open_store(synth)
    strict = []
    for j in range(len(data["match_txt"])):
        t = int(data["match_txt"][j])
        row, c = int(data["rows"][data["txt_img"][t]]), int(data["caption"][t])
        mask = store.merged_mask(row, c, int(data["match_tok"][j, 0]), score_threshold=cfg.ica_score_threshold)
        boxes = store.regions(row)["boxes"]
        strict.append(bool((region_inside_fraction(boxes, mask) >= 0.5 - 1e-6).any()))
    strict = torch.tensor(strict)
    assert bool((data["match_has_ref"] & ~strict).any())  # words the old fallback scored exist here
    s = evaluate_match(scan_run, "test", figures=0, device="cpu")
    assert s["attn_words"] == int(strict.sum()) > 0
    assert s["attn_words_skipped"] == s["matched_words"] - s["attn_words"] == int((~strict).sum())
