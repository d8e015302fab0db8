"""Caption scores with the official COCO caption evaluation code (pycocoevalcap), METHODS section 10.

Same pipeline as ``pycocoevalcap.eval.COCOEvalCap``: PTB-tokenise references and candidates (Stanford
tokenizer, Java), then BLEU-1..4, METEOR, ROUGE-L, CIDEr, and SPICE when Stanford CoreNLP 3.6.0 is
present. SPICE's CoreNLP jars are not shipped with pycocoevalcap (it downloads them on first use,
which cannot happen offline); "auto" skips SPICE with a note saying so, never silently.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Hashable

import pycocoevalcap
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

SPICE_LIB_DIR = Path(list(pycocoevalcap.__path__)[0]) / "spice" / "lib"
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def missing_spice_jars(lib_dir: Path | None = None) -> list[str]:
    """Names of the CoreNLP jars SPICE needs that are absent from ``lib_dir`` (default: pycocoevalcap's)."""
    lib_dir = Path(SPICE_LIB_DIR if lib_dir is None else lib_dir)
    return [j for j in SPICE_JARS if not (lib_dir / j).is_file()]


def _check_inputs(gts: dict, res: dict) -> None:
    if not gts:
        raise ValueError("score_captions: no captions to score (gts is empty)")
    if set(gts) != set(res):
        only_gts, only_res = sorted(map(str, set(gts) - set(res))), sorted(map(str, set(res) - set(gts)))
        raise ValueError(
            f"score_captions: references and candidates cover different ids; only in gts: {only_gts[:5]}, "
            f"only in res: {only_res[:5]}"
        )
    for i, refs in gts.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"score_captions: gts[{i!r}] must be a non-empty list of strings, got {refs!r}")
        if not isinstance(res[i], str):
            raise ValueError(f"score_captions: res[{i!r}] must be one string, got {type(res[i]).__name__}")


def tokenize(gts: dict, res: dict) -> tuple[dict, dict]:
    """PTB-tokenise references and candidates like COCOEvalCap, in one Java run.

    The tokenizer works line by line (``-preserveLines``), so one run over both sets gives exactly what
    COCOEvalCap's two runs give, at one JVM start instead of two.
    """
    both = {("gts", i): [{"caption": c} for c in refs] for i, refs in gts.items()}
    both.update({("res", i): [{"caption": res[i]}] for i in gts})
    with _java_stderr_filtered():
        tok = PTBTokenizer().tokenize(both)
    return {i: tok[("gts", i)] for i in gts}, {i: tok[("res", i)] for i in gts}


@contextlib.contextmanager
def _java_stderr_filtered():
    """The Stanford tokenizer's JVM writes "PTBTokenizer tokenized N tokens at ..." to the process's
    stderr (pycocoevalcap leaves it attached), a stray line in the middle of a report or a progress bar.
    Its stderr goes to a file for the call; every other line is passed on afterwards, so errors still show."""
    with tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            rest = [ln for ln in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not ln.startswith("PTBTokenizer tokenized")]
            if rest:
                sys.stderr.write("".join(rest))
                sys.stderr.flush()


class CaptionScorer:
    """Scores caption sets repeatedly with one METEOR JVM (it takes seconds to start and load).

    Use as a context manager, or call :meth:`close`. ``spice``: "auto" runs SPICE when its jars are
    present and otherwise reports ``SPICE: None`` with a note (a SPICE run that fails is also noted);
    True requires SPICE (a clear error if it cannot run); False skips it.
    """

    def __init__(self, spice: str | bool = "auto"):
        if spice not in ("auto", True, False):
            raise ValueError(f"spice must be 'auto', True or False, got {spice!r}")
        if shutil.which("java") is None:
            raise RuntimeError(
                "caption scoring needs Java on PATH: pycocoevalcap's PTB tokenizer, METEOR and SPICE are "
                "Java programs (install a JRE, e.g. OpenJDK 17)"
            )
        self.spice = spice
        self.missing_spice = missing_spice_jars() if spice else []
        if spice is True and self.missing_spice:
            raise RuntimeError(
                f"SPICE requested but Stanford CoreNLP 3.6.0 jars {self.missing_spice} are not in "
                f"{SPICE_LIB_DIR}; they cannot be downloaded offline; put them there "
                "(from stanford-corenlp-full-2015-12-09.zip)"
            )
        self._meteor: Meteor | None = None

    @property
    def meteor(self) -> Meteor:
        if self._meteor is None:
            self._meteor = Meteor()
        return self._meteor

    def score(self, gts: dict[Hashable, list[str]], res: dict[Hashable, str]) -> dict:
        """gts: id -> reference captions; res: id -> generated caption (raw text, same ids).

        Returns {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "notes"} (corpus level).
        """
        _check_inputs(gts, res)
        gts_t, res_t = tokenize(gts, res)
        out: dict = {}
        bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
        out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
        out["METEOR"] = float(self.meteor.compute_score(gts_t, res_t)[0])
        out["ROUGE_L"] = float(Rouge().compute_score(gts_t, res_t)[0])
        out["CIDEr"] = float(Cider().compute_score(gts_t, res_t)[0])
        out["SPICE"], out["notes"] = None, []
        if self.spice is False:
            out["notes"].append("SPICE not computed (spice=False)")
        elif self.missing_spice:
            out["notes"].append(
                f"SPICE skipped: Stanford CoreNLP 3.6.0 jars not found in {SPICE_LIB_DIR}; they cannot be "
                "downloaded offline; put them there to enable SPICE"
            )
        else:
            try:
                out["SPICE"] = _spice(gts_t, res_t)
            except Exception as e:  # noqa: BLE001 - reported, never silent
                if self.spice is True:
                    raise RuntimeError(f"SPICE failed: {e}") from e
                out["notes"].append(f"SPICE failed and was skipped: {type(e).__name__}: {e}")
        return out

    def close(self) -> None:
        """Stop the METEOR JVM now rather than at garbage collection."""
        if self._meteor is not None:
            p = self._meteor.meteor_p
            p.stdin.close()
            p.kill()
            p.wait()
            self._meteor = None

    def __enter__(self) -> "CaptionScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_captions(gts: dict[Hashable, list[str]], res: dict[Hashable, str], spice: str | bool = "auto") -> dict:
    """One-shot :meth:`CaptionScorer.score` (starts and stops its own METEOR JVM)."""
    with CaptionScorer(spice) as scorer:
        return scorer.score(gts, res)


def _spice(gts_t: dict, res_t: dict) -> float:
    from pycocoevalcap.spice.spice import Spice  # its constructor would download the jars if absent

    return float(Spice().compute_score(gts_t, res_t)[0])
