import math

import pytest
import torch

from vlcache.stages.common.attention_metrics import (attended_set, attended_sets, attention_correctness, attention_prf,
    reference_sets)
from vlcache.stages.common.ica import ica_labels


def test_attended_set_stops_once_half_the_mass_is_reached():
    assert attended_set(torch.tensor([0.1, 0.5, 0.2, 0.2])).tolist() == [False, True, False, False]
    assert attended_set(torch.tensor([0.3, 0.1, 0.4, 0.2])).tolist() == [True, False, True, False]
    assert attended_set(torch.tensor([0.25, 0.25, 0.25, 0.25])).tolist() == [True, True, False, False]
    # unnormalised rows are read as distributions: same set as the normalised row
    assert attended_set(torch.tensor([3.0, 1.0, 4.0, 2.0])).tolist() == [True, False, True, False]
    assert attended_set(torch.tensor([0.3, 0.1, 0.4, 0.2]), mass=0.9).tolist() == [True, False, True, True]
    rows = attended_sets(torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    assert rows.tolist() == [[True, False], [False, True]]


def test_attended_set_rejects_bad_weights():
    with pytest.raises(ValueError, match="non-negative"):
        attended_set(torch.tensor([0.5, -0.1, 0.6]))
    with pytest.raises(ValueError, match=r"rows \[1\] sum to 0"):
        attended_sets(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="mass"):
        attended_set(torch.tensor([1.0]), mass=0.0)


def test_attention_prf_by_hand():
    weights = torch.tensor(
        [
            [0.5, 0.3, 0.1, 0.1],  # A = {0};     G = {0, 1}: P 1,   R 1/2, F1 2/3
            [0.1, 0.2, 0.3, 0.4],  # A = {3, 2};  G = {1}:    P 0,   R 0,   F1 0
            [0.3, 0.3, 0.2, 0.2],  # A = {0, 1};  G = {1, 2}: P 1/2, R 1/2, F1 1/2
            [0.9, 0.1, 0.0, 0.0],  # G empty: not counted
        ]
    )
    reference = torch.tensor(
        [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool
    )
    out = attention_prf(weights, reference)
    assert out["n_words"] == 3
    assert out["precision"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert out["recall"] == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert out["f1"] == pytest.approx((2 / 3 + 0 + 0.5) / 3)
    none = attention_prf(weights[3:], reference[3:])
    assert none["n_words"] == 0 and math.isnan(none["f1"])
    with pytest.raises(ValueError, match="must match weights"):
        attention_prf(weights, reference[:, :2])


def test_attention_correctness_weights_partial_coverage():
    weights = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    coverage = torch.tensor([[1.0, 0.5, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    out = attention_correctness(weights, coverage)
    torch.testing.assert_close(out, torch.tensor([0.5 + 0.125, 0.0]))
    # (n, G, G) coverage and unnormalised weights give the same numbers
    out2 = attention_correctness(weights * 4, coverage.reshape(2, 2, 2))
    torch.testing.assert_close(out2, out)
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        attention_correctness(weights, coverage * 3)


def test_reference_has_no_fallback_and_skipped_words_are_counted():
    """METHODS §8: the reference is the fragments >= 50% inside the mask, nothing else; a word whose
    reference is empty is not scored and is counted (ICA's largest-coverage fallback is training-only)."""
    fraction = torch.tensor([[0.6, 0.5, 0.1, 0.0],   # two fragments at/above one half
                             [0.3, 0.4, 0.1, 0.0],   # a small object: no fragment reaches one half
                             [0.0, 0.0, 0.0, 0.0],   # no mask at all
                             [0.9, 0.2, 0.7, 0.0]])  # third fragment is padding
    valid = torch.tensor([[True] * 4, [True] * 4, [True] * 4, [True, True, False, False]])
    ref = reference_sets(fraction, 0.5, valid)
    assert ref.tolist() == [[True, True, False, False], [False] * 4, [False] * 4, [True, False, False, False]]
    labels, keep = ica_labels(fraction)  # the training labels do fall back to the best-covered cell
    assert labels[1].tolist() == [0, 1, 0, 0] and keep.tolist() == [True, True, False, True]
    weights = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.1, 0.7, 0.1, 0.1], [0.25] * 4, [0.3, 0.1, 0.4, 0.2]])
    out = attention_prf(weights, ref)
    # row 0: A = {1} inside G = {0, 1}: P 1, R 1/2; row 3: A = {2, 0} (0.6 then 0.2), G = {0}: P 1/2, R 1
    assert out["n_words"] == 2 and out["n_skipped"] == 2
    assert out["precision"] == pytest.approx(0.75) and out["recall"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        reference_sets(fraction * 2)
    with pytest.raises(ValueError, match="does not match"):
        reference_sets(fraction, valid=valid[:, :2])
