"""EER / minDCF / actual DCF / DET against slow loop implementations of the seed's definitions, and sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from speakerid.errors import SpeakeridError
from speakerid.metrics import Metrics, actual_dcf, bayes_threshold, cllr, det_curve, eer, min_cllr, min_dcf

# --------------------------------------------------------------------- slow references, written from the definitions


def slow_seed_eer(scores, labels):
    """voxceleb_trainer's EER: sklearn roc_curve's defaults spelled out with loops.

    One point per distinct score t (accept s ≥ t), highest t first; a point is dropped when both the false- and
    the true-positive counts are collinear with its neighbours (drop_intermediate); a (0, 0) point at +inf
    goes first; the first point with the smallest |fnr − fpr| gives max(fpr, fnr)·100.
    """
    scores, labels = [float(s) for s in scores], [int(v) for v in labels]
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    points = []  # (fp, tp, threshold)
    for t in sorted(set(scores), reverse=True):
        fp = tp = 0
        for s, v in zip(scores, labels):
            if s >= t:
                tp += v
                fp += 1 - v
        points.append((fp, tp, t))
    if len(points) > 2:
        kept = [points[0]]
        for i in range(1, len(points) - 1):
            (f0, t0, _), (f1, t1, _), (f2, t2, _) = points[i - 1], points[i], points[i + 1]
            if f0 - 2 * f1 + f2 != 0 or t0 - 2 * t1 + t2 != 0:
                kept.append(points[i])
        kept.append(points[-1])
        points = kept
    points = [(0, 0, math.inf)] + points
    best, best_gap = None, math.inf
    for fp, tp, t in points:
        fpr, fnr = fp / float(n_neg), 1 - tp / float(n_pos)
        if abs(fnr - fpr) < best_gap:
            best_gap, best = abs(fnr - fpr), (max(fpr, fnr) * 100, t)
    return best


def slow_seed_min_dcf(scores, labels, p_target=0.05, c_miss=1, c_fa=1):
    """voxceleb_trainer's ComputeErrorRates + ComputeMinDcf, by counting errors at each cut of the sorted trials.

    Trials are sorted by score (Python's stable sort: tied trials keep their input order); cut i rejects the
    first i + 1 of them.
    """
    scores, labels = [float(s) for s in scores], [int(v) for v in labels]
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    best, best_threshold = math.inf, None
    for cut in range(len(order)):
        misses = false_alarms = 0
        for rank, i in enumerate(order):
            if rank <= cut:
                misses += labels[i]
            else:
                false_alarms += 1 - labels[i]
        p_miss = misses / float(n_pos)
        p_fa = 1 - (n_neg - false_alarms) / float(n_neg)  # the seed's 1 − (correct rejections / non-targets)
        cost = c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)
        if cost < best:
            best, best_threshold = cost, scores[order[cut]]
    return best / min(c_miss * p_target, c_fa * (1 - p_target)), best_threshold


def sklearn_seed_eer(scores, labels):
    """The seed's formula on sklearn's own roc_curve."""
    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=1)
    fnr = 1 - tpr
    i = np.nanargmin(np.absolute(fnr - fpr))
    return max(fpr[i], fnr[i]) * 100, thresholds[i]


def random_trials(rng, n, tied: bool):
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    if tied:  # a handful of distinct values: long tie blocks of mixed labels
        scores = rng.integers(0, rng.integers(2, 6), n).astype(np.float64) + 0.5 * labels * rng.integers(0, 2, n)
    else:
        scores = rng.normal(size=n) + 1.5 * labels
    return scores, labels


CASES = [(seed, tied) for seed in range(12) for tied in (False, True)]


# --------------------------------------------------------------------------------------------- equal the seed


@pytest.mark.parametrize("seed,tied", CASES)
def test_eer_equals_slow_seed_definition(seed, tied):
    scores, labels = random_trials(np.random.default_rng(seed), 120, tied)
    value, threshold = eer(scores, labels)
    ref_value, ref_threshold = slow_seed_eer(scores, labels)
    assert value == pytest.approx(ref_value, abs=1e-12)
    assert threshold == ref_threshold


@pytest.mark.parametrize("seed,tied", CASES)
def test_min_dcf_equals_slow_seed_definition(seed, tied):
    scores, labels = random_trials(np.random.default_rng(100 + seed), 120, tied)
    for p_target, c_miss, c_fa in [(0.05, 1, 1), (0.01, 1, 1), (0.3, 2, 0.5)]:
        value, threshold = min_dcf(scores, labels, p_target, c_miss, c_fa)
        ref_value, ref_threshold = slow_seed_min_dcf(scores, labels, p_target, c_miss, c_fa)
        assert value == pytest.approx(ref_value, abs=1e-12)
        assert threshold == ref_threshold


@pytest.mark.parametrize("tied", [False, True])
def test_eer_equals_sklearn_roc_curve_bitwise(tied):
    rng = np.random.default_rng(7)
    for n in (2, 3, 5, 17, 1000, 200_000):
        scores, labels = random_trials(rng, n, tied)
        scores = scores.astype(np.float32)  # the seeds' scores are float32
        assert eer(scores, labels) == sklearn_seed_eer(scores, labels)


def test_seed_tie_conventions():
    # EER: the ROC point between (fp, tp) = (1, 0) and (1, 2) is collinear and dropped by roc_curve, so the
    # seed reports 100 % (at threshold 3) where the full curve has fpr = fnr = 0.5 at threshold 2.
    scores, labels = [2.0, 0.0, 3.0, 1.0], [1, 0, 0, 1]
    assert eer(scores, labels) == slow_seed_eer(scores, labels) == sklearn_seed_eer(scores, labels) == (100.0, 3.0)
    # All scores tied: one operating point besides +inf, accept everything → EER 100 %, threshold +inf wins ties.
    assert eer([0.5, 0.5, 0.5], [1, 0, 1]) == (100.0, math.inf)
    # minDCF: the seed's curve has one point per trial, so a block of tied scores is split in input order.
    # Scores 0, 0, 0, 1, 1: with the tied 0s labelled 0, 1, 1 the first cut rejects only a non-target (0.5);
    # labelled 1, 1, 0 no cut does better than rejecting all (1.0), which is also the best any threshold does.
    scores = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
    split_well, split_badly = np.array([0, 1, 1, 1, 0]), np.array([1, 1, 0, 1, 0])
    assert min_dcf(scores, split_well, 0.5) == (0.5, 0.0)
    assert min_dcf(scores, split_badly, 0.5) == (1.0, 1.0)
    for labels in (split_well, split_badly):
        assert min_dcf(scores, labels, 0.5) == slow_seed_min_dcf(scores, labels, 0.5)


def test_perfect_and_inverted_separation():
    assert eer([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == (0.0, 0.8)
    assert min_dcf([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == (0.0, 0.2)
    assert eer([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0])[0] == 100.0


# ------------------------------------------------------------------------------------- DCF, DET curve, summary


def test_actual_dcf_counts_errors_at_the_threshold():
    scores, labels = random_trials(np.random.default_rng(3), 500, False)
    for threshold in (-1.0, 0.3, 0.75, 2.0):
        accept = scores >= threshold
        p_miss = np.mean(~accept[labels == 1])
        p_fa = np.mean(accept[labels == 0])
        expected = (p_miss * 0.05 + p_fa * 0.95) / 0.05
        assert actual_dcf(scores, labels, threshold) == pytest.approx(expected, abs=1e-12)
    assert actual_dcf(scores, labels, math.inf) == pytest.approx(1.0)  # reject all: p_miss = 1
    # minDCF's threshold is the last rejected score: just above it, the actual DCF is the minimum.
    value, threshold = min_dcf(scores, labels)
    assert actual_dcf(scores, labels, np.nextafter(threshold, np.inf)) == pytest.approx(value, abs=1e-12)
    assert actual_dcf(scores, labels, threshold) >= value


def test_det_curve_is_the_full_roc_curve():
    scores, labels = random_trials(np.random.default_rng(5), 300, True)
    fpr, fnr, thresholds = det_curve(scores, labels)
    ref_fpr, ref_tpr, ref_thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, ref_fpr[1:][::-1])
    np.testing.assert_array_equal(fnr, (1 - ref_tpr)[1:][::-1])
    np.testing.assert_array_equal(thresholds, ref_thr[1:][::-1])
    assert np.all(np.diff(thresholds) > 0) and np.all(np.diff(fpr) <= 0) and np.all(np.diff(fnr) >= 0)
    assert (fpr[0], fnr[0], fnr[-1] < 1) == (1.0, 0.0, True)


def test_metrics_summary():
    scores, labels = random_trials(np.random.default_rng(9), 400, False)
    m = Metrics.compute(scores, labels)
    assert (m.eer, m.eer_threshold) == eer(scores, labels)
    assert (m.min_dcf_05, m.min_dcf_05_threshold) == min_dcf(scores, labels, 0.05)
    assert (m.min_dcf_01, m.min_dcf_01_threshold) == min_dcf(scores, labels, 0.01)
    assert (m.n_target, m.n_nontarget) == (int(labels.sum()), int((labels == 0).sum()))
    assert set(m.as_dict()) >= {"eer", "min_dcf_05", "min_dcf_01"}
    assert str(m).startswith(f"EER {m.eer:2.4f}%, minDCF(0.05) {m.min_dcf_05:2.5f}, minDCF(0.01)")


def test_accepts_lists_bools_floats_and_torch_tensors():
    scores, labels = random_trials(np.random.default_rng(11), 200, False)
    expected = eer(scores, labels)
    assert eer(scores.tolist(), labels.tolist()) == expected
    assert eer(scores, labels.astype(bool)) == expected
    assert eer(scores, labels.astype(np.float32)) == expected
    tensor = torch.tensor(scores, requires_grad=True)
    assert eer(tensor, torch.tensor(labels)) == expected
    assert Metrics.compute(tensor, torch.tensor(labels)).eer == expected[0]


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("labels,needle", [
    ([1, 0, 2, 1], "found 2 at trial 2 (1 trial(s) with other labels)"),
    ([1, 0, 0.5, -1], "found 0.5 at trial 2 (2 trial(s)"),
    ([1, 0, float("nan"), 1], "found nan at trial 2"),
    (["1", "0", "1", "0"], "found '1' (a str)"),
])
def test_bad_labels_are_named(labels, needle):
    with pytest.raises(SpeakeridError, match="labels must be 0 \\(non-target\\) or 1 \\(target\\)") as error:
        eer([0.1, 0.2, 0.3, 0.4], labels)
    assert needle in str(error.value)


@pytest.mark.parametrize("function", [eer, min_dcf, det_curve, Metrics.compute])
def test_single_class_explains_why(function):
    with pytest.raises(SpeakeridError) as error:
        function([0.1, 0.2, 0.3], [1, 1, 1])
    message = str(error.value)
    assert "is undefined: all 3 trials are target trials (label 1)" in message
    assert "false-acceptance rate divides by the number of non-target trials" in message
    with pytest.raises(SpeakeridError, match=r"all 2 trials are non-target trials .* miss rate .*label 1\)"):
        function([0.1, 0.2], [0, 0])


def test_single_class_message_names_the_metric():
    with pytest.raises(SpeakeridError, match="^EER is undefined"):
        eer([0.1, 0.2], [1, 1])
    with pytest.raises(SpeakeridError, match="^minDCF is undefined"):
        min_dcf([0.1, 0.2], [0, 0])


def test_length_mismatch_empty_and_shape():
    with pytest.raises(SpeakeridError, match="differ in length: 3 scores but 2 labels"):
        eer([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(SpeakeridError, match="needs trials, but scores and labels are empty"):
        min_dcf([], [])
    with pytest.raises(SpeakeridError, match=r"scores must be a 1-D sequence .* shape \(2, 2\)"):
        eer([[0.1, 0.2], [0.3, 0.4]], [1, 0])


def test_non_finite_scores_are_named():
    with pytest.raises(SpeakeridError, match=r"trial 1 has score nan \(2 NaN and 0 infinite scores in all\)"):
        eer([0.1, float("nan"), 0.3, float("nan")], [1, 0, 1, 0])
    with pytest.raises(SpeakeridError, match=r"trial 2 has score inf \(0 NaN and 1 infinite"):
        min_dcf([0.1, 0.2, float("inf")], [1, 0, 1])
    with pytest.raises(SpeakeridError, match="scores must be numbers"):
        eer(["a", "b"], [1, 0])


def test_bad_costs():
    with pytest.raises(SpeakeridError, match="p_target must lie strictly between 0 and 1, got 1.5"):
        min_dcf([0.1, 0.2], [1, 0], p_target=1.5)
    with pytest.raises(SpeakeridError, match="c_miss and c_fa must be positive"):
        actual_dcf([0.1, 0.2], [1, 0], 0.0, c_fa=0)
    with pytest.raises(SpeakeridError, match="threshold of actual_dcf is NaN"):
        actual_dcf([0.1, 0.2], [1, 0], float("nan"))


# ------------------------------------------------------------------------------------------------ Cllr, minCllr


def test_cllr_against_hand_computed_values():
    assert cllr([0.0, 0.0], [1, 0]) == pytest.approx(1.0)  # "don't know" costs one bit
    assert cllr([math.log(3), -math.log(3)], [1, 0]) == pytest.approx(math.log2(4 / 3))
    # a confident error costs log2(1 + e^s) bits: a non-target at LLR 2
    assert cllr([5.0, 2.0], [1, 0]) == pytest.approx(0.5 * (math.log2(1 + math.exp(-5)) + math.log2(1 + math.exp(2))))
    assert cllr([1e4, -1e4], [1, 0]) == pytest.approx(0.0, abs=1e-12)  # no overflow
    assert cllr([-1e4, 1e4], [1, 0]) == pytest.approx(1e4 / math.log(2))


def test_min_cllr_is_the_pav_calibrated_cllr():
    # PAV pools the violating pairs: posteriors .5 .5 .5 .5 1, empirical prior 3/5 → LLR −log 1.5 for the pool
    value = min_cllr([1, 2, 3, 4, 5], [1, 0, 1, 0, 1])
    assert value == pytest.approx(0.5 * (2 / 3 * math.log2(2.5) + math.log2(5 / 3)), abs=1e-9)
    assert min_cllr([1, 2, 3, 4], [0, 1, 0, 1]) == pytest.approx(0.5, abs=1e-9)
    assert min_cllr([0.1, 0.2, 0.3], [0, 1, 1]) == pytest.approx(0.0, abs=1e-9)  # separable: no cost
    assert min_cllr([7, 7, 7, 7], [1, 0, 1, 0]) == pytest.approx(1.0)  # tied scores share one LLR


def test_min_cllr_depends_on_the_order_only_and_bounds_cllr():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(size=500) + 1.5 * labels
    value = min_cllr(scores, labels)
    assert 0 < value < 1
    assert min_cllr(np.exp(scores) * 10 - 3, labels) == pytest.approx(value, abs=1e-12)
    for llrs in (scores, 3 * scores - 1, scores / 5):
        assert cllr(llrs, labels) >= value


def test_bayes_threshold_of_calibrated_llrs():
    assert bayes_threshold(0.5) == 0.0
    assert bayes_threshold(0.01) == pytest.approx(math.log(99))
    # perfectly calibrated LLRs (here: log-odds of two unit-variance Gaussians) are best cut at −logit(p)
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(4000), np.zeros(4000)]
    x = rng.normal(size=8000) + 2 * labels - 1
    llrs = 2 * x  # log N(x; 1, 1) − log N(x; −1, 1)
    act = actual_dcf(llrs, labels, bayes_threshold(0.05), 0.05)
    assert act == pytest.approx(min_dcf(llrs, labels, 0.05)[0], abs=0.03)
