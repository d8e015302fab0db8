"""Evaluation of a trained captioning run (files, caption metrics, attention metrics recomputed
independently) and the ICA ablation end to end; one METEOR JVM for the module."""

import json
import shutil

import pytest
import torch
import yaml
from synth_store import make_synth_store

from vlcache.stages.common.attention_metrics import attention_correctness, attention_prf
from vlcache.stages.caption.evaluate import evaluate_caption, load_run_model
from vlcache.stages.caption.metrics import CaptionScorer
from vlcache.stages.caption.train import CaptionTrainConfig, train_caption
from vlcache.stages.caption.experiment import run_ica_experiment
from vlcache.stages.common.ica import ica_labels
from vlcache.storage.store import open_store

torch.set_num_threads(1)
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


@pytest.fixture(scope="module")
def scorer():
    with CaptionScorer() as s:  # one METEOR JVM (slow to start) for the whole module
        yield s


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, scorer):
    url, data_dir = make_synth_store()
    run = tmp_path_factory.mktemp("eval") / "run"
    cfg = CaptionTrainConfig(store=url, epochs=1, batch_images=8, lr=3e-3, embed_dim=32, attn_dim=32, hidden_dim=32,
                             num_workers=0, device="cpu", beam_size=2, max_len=16, val_max_images=2)
    train_caption(cfg, run, progress=False)
    scores = evaluate_caption(run, "test", figures=3, device="cpu", scorer=scorer)
    return url, data_dir, run, scores


def test_evaluation_writes_captions_scores_report_and_figures(evaluated):
    url, _, run, scores = evaluated
    captions = json.loads((run / "eval" / "captions.json").read_text())
    assert json.loads((run / "eval" / "scores.json").read_text()) == json.loads(json.dumps(scores))
    assert (run / "eval" / "captions_test.json").is_file() and (run / "eval" / "scores_test.json").is_file()
    store = open_store(url)
    test_rows = store.rows("test").tolist()
    assert [c["row"] for c in captions] == test_rows and scores["n_images"] == len(test_rows)
    assert all(c["references"] == store.captions(c["row"]) for c in captions)
    for key in CAPTION_METRICS:
        assert 0.0 <= scores[key] <= (10.0 if key == "CIDEr" else 1.0), key
    for key in ("attn_precision", "attn_recall", "attn_f1", "attn_correctness", "attn_correctness_uniform"):
        assert 0.0 <= scores[key] <= 1.0, key
    assert scores["attn_words"] > 0 and scores["objects_per_caption"] > 0
    assert scores["attn_energy_spread"] >= 0 and scores["attn_ica_loss"] > 0
    assert 0 < scores["attn_label_share"] < 1 and 0 < scores["attn_mass_on_labels"] < 1
    assert scores["SPICE"] is not None or any("SPICE" in n for n in scores["notes"])  # never silently absent
    figures = sorted((run / "figures").glob("attention_test_row*.png"))
    assert len(figures) == 3 and all(f.read_bytes()[:4] == b"\x89PNG" for f in figures)
    report = (run / "report.md").read_text()
    assert scores["store_fingerprint"] in report and "| CIDEr |" in report and "SPICE" in report
    assert f"figures/{figures[0].name}" in report


def test_caption_scores_equal_scoring_directly(evaluated, scorer):
    _, _, run, scores = evaluated
    captions = json.loads((run / "eval" / "captions.json").read_text())
    direct = scorer.score({c["row"]: c["references"] for c in captions}, {c["row"]: c["caption"] for c in captions})
    for key in CAPTION_METRICS:
        assert scores[key] == pytest.approx(direct[key], abs=1e-9), key


def test_captions_are_the_models_beam_search(evaluated):
    url, _, run, scores = evaluated
    model, vocab, ckpt, _ = load_run_model(run)
    assert ckpt["name"] == "best" and scores["checkpoint"] == "best"
    captions = json.loads((run / "eval" / "captions.json").read_text())
    store = open_store(url)
    feats = torch.stack([torch.as_tensor(store.grid(c["row"])) for c in captions])
    seqs = model.beam_search(feats, beam_size=scores["beam_size"], max_len=16)
    assert [vocab.decode_text(s) for s in seqs] == [c["caption"] for c in captions]


def test_attention_metrics_recomputed_caption_by_caption(evaluated):
    """Independent path: the store's notebook API (matches, merged_mask) and one forward per caption."""
    url, _, run, scores = evaluated
    model, vocab, _, _ = load_run_model(run)
    store = open_store(url)
    alphas, coverage = [], []
    with torch.no_grad():
        for row in store.rows("test").tolist():
            feats = torch.as_tensor(store.grid(row))[None]
            for c, tokens in enumerate(store.tokens(row)):
                caps, lengths = vocab.encode_batch([tokens])
                out = model(feats, caps, lengths)
                for m in store.matches(row, c):
                    for k in range(m["token_start"], m["token_end"]):
                        alphas.append(out["alphas"][0, k])
                        coverage.append(torch.as_tensor(store.merged_mask(row, c, k, size="grid")).reshape(-1))
    alphas, coverage = torch.stack(alphas), torch.stack(coverage)
    # METHODS §8: reference = cells covered >= 50%, no fallback; a word without one is not scored
    reference = coverage >= 0.5 - 1e-6
    scored = reference.any(dim=1)
    _, has_mask = ica_labels(coverage)  # words whose class has a mask at all
    small = has_mask & ~scored  # ICA's training labels would give these their best-covered cell
    assert int(small.sum()) > 0, "the store must have small masks, or this test cannot tell the rules apart"
    assert scores["attn_words"] == int(scored.sum())
    assert scores["attn_words_skipped"] == len(coverage) - int(scored.sum())
    assert scores["attn_words_small_mask"] == int(small.sum())
    assert scores["attn_words_no_mask"] == int((~has_mask).sum())
    prf = attention_prf(alphas[scored], reference[scored])
    assert scores["attn_precision"] == pytest.approx(prf["precision"], abs=1e-5)
    assert scores["attn_recall"] == pytest.approx(prf["recall"], abs=1e-5)
    assert scores["attn_f1"] == pytest.approx(prf["f1"], abs=1e-5)
    corr = attention_correctness(alphas[scored], coverage[scored]).mean()
    assert scores["attn_correctness"] == pytest.approx(float(corr), abs=1e-5)
    assert scores["attn_correctness_uniform"] == pytest.approx(float(coverage[scored].mean()), abs=1e-5)


def test_evaluation_refuses_another_store(evaluated, tmp_path):
    _, _, run, _ = evaluated
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["store_fingerprint"] = "sha256:0000"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="fingerprint"):
        evaluate_caption(copy, "test", figures=0, device="cpu")
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run_model(copy)


def test_ica_experiment_end_to_end(tmp_path, scorer):
    url, _ = make_synth_store()
    overrides = ["epochs=1", "batch_images=16", "embed_dim=16", "attn_dim=16", "hidden_dim=16", "num_workers=0",
                 "device=cpu", "beam_size=1", "max_len=12", "val_max_images=2", "lr=0.003"]
    result = run_ica_experiment(url, seeds=1, name="abl", runs_root=tmp_path, overrides=overrides, figures=1,
                                progress=False, scorer=scorer)
    root = tmp_path / "abl"
    assert [(r["variant"], r["seed"]) for r in result["rows"]] == [("Show-Attend-Tell", 0), ("+ICA loss", 0)]
    for r, weight in zip(result["rows"], (0.0, 0.1)):
        assert yaml.safe_load((tmp_path / "abl" / r["run"].split("/")[-1] / "config.yaml").read_text())["ica_weight"] == weight
        assert 0 <= r["attn_correctness"] <= 1 and r["CIDEr"] >= 0
    md = (root / "ablation.md").read_text()
    assert "| Show-Attend-Tell | 1 |" in md and "| +ICA loss | 1 |" in md and "Δ +ICA loss − Show-Attend-Tell" in md
    assert "BLEU-4" in md and "Attn corr." in md and result["store_fingerprint"] in md
    saved = json.loads((root / "ablation.json").read_text())
    assert saved["rows"] == result["rows"] and saved["variants"]["+ICA loss"] == {"ica_weight": 0.1}
    # rerun: finished runs are neither retrained nor re-evaluated; the same table comes back
    mtime = (root / "show-attend-tell-seed0" / "checkpoints" / "last.pt").stat().st_mtime
    again = run_ica_experiment(url, seeds=1, name="abl", runs_root=tmp_path, overrides=overrides, progress=False,
                               scorer=scorer)
    assert again["rows"] == result["rows"]
    assert (root / "show-attend-tell-seed0" / "checkpoints" / "last.pt").stat().st_mtime == mtime


def test_attention_diagnostics_by_hand():
    from vlcache.stages.caption.evaluate import attention_scores

    labels = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 0, 0]])
    flat = torch.zeros(2, 4)
    attn = {"alphas": flat.softmax(-1), "energies": flat, "labels": labels, "coverage": labels}
    s = attention_scores(attn)
    assert s["attn_energy_spread"] == 0 and s["attn_energy_gap"] == 0
    assert s["attn_ica_loss"] == pytest.approx(1.0)  # a flat map at 0 sits on the hinge's kink
    assert s["attn_mass_on_labels"] == pytest.approx(s["attn_label_share"]) == pytest.approx((1 / 4 + 2 / 4) / 2)
    # raise the labelled cells by d: the loss falls by d x the labelled share (Lovász hinge at the kink)
    d = 0.3
    raised = d * labels
    s2 = attention_scores({**attn, "alphas": raised.softmax(-1), "energies": raised})
    assert s2["attn_energy_gap"] == pytest.approx(d)
    assert s2["attn_ica_loss"] == pytest.approx(1 - d * (1 / 4 + 2 / 4) / 2, abs=1e-6)
    assert s2["attn_mass_on_labels"] > s2["attn_label_share"]
    assert s2["attn_energy_spread"] == pytest.approx(float(raised.std(dim=1).mean()))
