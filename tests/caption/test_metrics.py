"""The wrapper must give exactly what direct pycocoevalcap calls give (COCOEvalCap's pipeline)."""

import os

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from vlcache.stages.caption import metrics as caption_metrics
from vlcache.stages.caption.metrics import CaptionScorer, missing_spice_jars, score_captions

GTS = {
    1: ["A dog runs on the grass.", "A brown dog is running in a field!", "dog running outside"],
    2: ["Two people ride bikes down a city street.", "People riding bicycles, in traffic."],
    "img-3": ["A cat sits on a mat.", "The cat is on the mat.", "a grey cat resting"],
    4: ["A man throws a frisbee to his dog in the park."],
}
RES = {
    1: "a dog running on the grass",
    2: "two men riding bikes on a street",
    "img-3": "a cat on a mat",
    4: "a man and a dog",
}


def test_wrapper_equals_direct_pycocoevalcap(monkeypatch, tmp_path):
    monkeypatch.setattr(caption_metrics, "SPICE_LIB_DIR", tmp_path)  # an empty jar folder: SPICE absent
    with CaptionScorer(spice="auto") as scorer:
        out = scorer.score(GTS, RES)
        # direct calls, as pycocoevalcap.eval.COCOEvalCap makes them (the same METEOR JVM is reused)
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in refs] for i, refs in GTS.items()})
        res = tok.tokenize({i: [{"caption": RES[i]}] for i in GTS})
        direct = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
        direct["METEOR"] = scorer.meteor.compute_score(gts, res)[0]
        direct["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
        direct["CIDEr"] = Cider().compute_score(gts, res)[0]
    for key, value in direct.items():
        assert out[key] == value, key  # exact equality, every metric
    assert 0 < out["Bleu_1"] <= 1 and out["CIDEr"] > 0
    assert out["SPICE"] is None
    assert out["notes"] == [
        f"SPICE skipped: Stanford CoreNLP 3.6.0 jars not found in {tmp_path}; they cannot be downloaded "
        "offline; put them there to enable SPICE"
    ]
    assert scorer._meteor is None  # the JVM was stopped on exit


def test_spice_required_without_jars_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(caption_metrics, "SPICE_LIB_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="SPICE requested but Stanford CoreNLP 3.6.0 jars"):
        score_captions(GTS, RES, spice=True)


def test_missing_spice_jars_lists_what_is_absent(tmp_path):
    assert missing_spice_jars(tmp_path) == ["stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"]
    (tmp_path / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    assert missing_spice_jars(tmp_path) == ["stanford-corenlp-3.6.0-models.jar"]
    (tmp_path / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"")
    assert missing_spice_jars(tmp_path) == []


def test_bad_inputs_and_missing_java(monkeypatch):
    with pytest.raises(ValueError, match=r"only in gts: \['4'\]"):
        score_captions(GTS, {k: v for k, v in RES.items() if k != 4})
    with pytest.raises(ValueError, match=r"gts\[2\] must be a non-empty list of strings"):
        score_captions({2: "a caption"}, {2: "a caption"})
    with pytest.raises(ValueError, match=r"res\[2\] must be one string"):
        score_captions({2: ["a caption"]}, {2: ["a caption"]})
    with pytest.raises(ValueError, match="spice must be"):
        CaptionScorer(spice="yes")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="needs Java on PATH"):
        score_captions(GTS, RES)


def test_tokenizer_leaves_no_stray_java_line_and_passes_other_stderr_on(capfd):
    """The JVM's 'PTBTokenizer tokenized N tokens' line is dropped; anything else it says still shows."""
    gts, res = caption_metrics.tokenize({0: ["A dog runs."]}, {0: "a dog"})
    assert gts == {0: ["a dog runs"]} and res == {0: ["a dog"]}
    err = capfd.readouterr().err
    assert "PTBTokenizer tokenized" not in err, err
    with caption_metrics._java_stderr_filtered():
        os.write(2, b"PTBTokenizer tokenized 3 tokens at 50 tokens per second.\nWARNING: something else\n")
    err = capfd.readouterr().err
    assert err == "WARNING: something else\n", err
