"""Verification metrics with the seeds' conventions: EER, minDCF, actual DCF and the DET curve, vectorised.

Both numbers follow voxceleb_trainer's ``tuneThreshold.py`` exactly (ties included), so that a score file
gives the same EER and minDCF here as there:

* **EER** is read off scikit-learn's ``roc_curve(labels, scores, pos_label=1)`` with its defaults: one
  operating point per *distinct* score (tied trials are accepted or rejected together; a trial is accepted
  when its score is ≥ the threshold), collinear intermediate points dropped (``drop_intermediate=True``),
  and a first point (fpr 0, fnr 1) at threshold +inf. With fnr = 1 − tpr, the EER is taken at the first
  (highest-threshold) point where |fnr − fpr| is smallest and reported as max(fpr, fnr)·100. Because
  collinear points are dropped, the EER on a curve that crosses fnr = fpr inside a run of same-label trials
  is an endpoint of that run, as in the seed.
* **minDCF** is the seed's ``ComputeErrorRates`` + ``ComputeMinDcf``: trials are stably sorted by score
  (ascending; tied trials keep their input order) and operating point i rejects the first i + 1 sorted
  trials, so inside a block of tied scores the curve has one point per trial and the result can depend on
  the order of tied trials in the input (no threshold realises such a split; the seed does it, so do we).
  The cost c_miss·p_miss·p_target + c_fa·p_fa·(1 − p_target) is minimised (first minimum) and divided by
  min(c_miss·p_target, c_fa·(1 − p_target)) (NIST SRE16). The threshold returned is the seed's: the score
  of the last rejected trial, i.e. the point accepts scores *strictly above* it (when it is not tied).

``actual_dcf`` accepts scores ≥ its threshold, like the EER threshold; at ``np.nextafter(t, np.inf)`` for
a minDCF threshold ``t`` on untied scores it reproduces minDCF. The DET curve is sklearn's full ROC curve.
The public functions take numpy arrays, lists or torch tensors; bad input raises :class:`SpeakeridError`.
``eer_from_roc`` is the EER without those checks, for code that builds its own arrays (the pairwise losses'
pair EER, which the seed computes with the same call).

**Cllr** (Brümmer & du Preez 2006; BOSARIS ``cllr``) reads scores as natural-log likelihood ratios:
Cllr = ½·[mean over targets of log2(1 + e^−s) + mean over non-targets of log2(1 + e^s)], in bits; 1 is a
system that always says "don't know" (s = 0), below 1 the scores carry calibrated information. Raw cosine
scores are not LLRs, so their Cllr means little: calibrate first (:mod:`speakerid.evaluation.calibration`).
**minCllr** is the Cllr after the best monotone map of the scores (pool-adjacent-violators, sklearn's
``IsotonicRegression``; tied scores share one value): what perfect calibration would give, so it depends
only on the scores' order. Cllr − minCllr is the calibration loss. ``bayes_threshold(p)`` = −logit(p) is
where calibrated LLRs are accepted for the DCF at prior p.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import numpy as np

from speakerid.errors import SpeakeridError

DCF_P_TARGETS = (0.05, 0.01)  # the p_target values a Metrics summary reports (the seeds' default is 0.05)


# ----------------------------------------------------------------------------------------------- input checks


def _to_numpy(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU or requiring grad
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as error:
        raise SpeakeridError(f"{name} cannot be read as an array: {error}") from error
    if array.ndim != 1:
        raise SpeakeridError(f"{name} must be a 1-D sequence with one value per trial, got shape {array.shape}")
    return array


def _check_costs(p_target: float, c_miss: float, c_fa: float) -> None:
    if not 0.0 < p_target < 1.0:
        raise SpeakeridError(f"p_target must lie strictly between 0 and 1, got {p_target}")
    if not (c_miss > 0 and c_fa > 0):
        raise SpeakeridError(f"c_miss and c_fa must be positive costs, got c_miss={c_miss}, c_fa={c_fa}")


def check_trials(scores, labels, what: str = "the metric") -> tuple[np.ndarray, np.ndarray]:
    """Validate scores and labels; return them as float64 scores and int64 labels (1 = target, 0 = non-target).

    ``what`` names the metric in the single-class message ("EER is undefined: …").
    """
    s = _to_numpy(scores, "scores")
    y = _to_numpy(labels, "labels")
    if len(s) != len(y):
        raise SpeakeridError(f"scores and labels differ in length: {len(s)} scores but {len(y)} labels "
                             "(one score per trial is expected)")
    if len(s) == 0:
        raise SpeakeridError(f"{what} needs trials, but scores and labels are empty")

    if y.dtype.kind not in "biuf":  # strings (an unconverted trial-list column) or mixed objects
        bad = next((v for v in y.tolist() if not isinstance(v, numbers.Real)), None)
        if bad is not None:
            raise SpeakeridError(f"labels must be 0 (non-target) or 1 (target); found {bad!r} "
                                 f"(a {type(bad).__name__}), convert the trial list's label column to numbers")
        y = y.astype(np.float64)
    bad_mask = (y != 0) & (y != 1)  # NaN labels are caught here too
    if bad_mask.any():
        where = np.flatnonzero(bad_mask)
        raise SpeakeridError(f"labels must be 0 (non-target) or 1 (target); found {y[where[0]].item()!r} at trial "
                             f"{where[0]} ({len(where)} trial(s) with other labels)")

    try:
        s = s.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise SpeakeridError(f"scores must be numbers: {error}") from error
    finite = np.isfinite(s)
    if not finite.all():
        where = np.flatnonzero(~finite)
        n_nan = int(np.isnan(s).sum())
        raise SpeakeridError(f"scores must be finite numbers, but trial {where[0]} has score {s[where[0]]} "
                             f"({n_nan} NaN and {len(where) - n_nan} infinite scores in all); NaN scores usually "
                             "come from NaN embeddings (a diverged model or an empty audio file)")

    y = y.astype(np.int64)
    n_target = int(y.sum())
    if n_target == 0 or n_target == len(y):
        kind, value, other, rate = (("target", 1, "non-target", "false-acceptance rate") if n_target
                                    else ("non-target", 0, "target", "miss rate"))
        raise SpeakeridError(f"{what} is undefined: all {len(y)} trials are {kind} trials (label {value}); the "
                             f"{rate} divides by the number of {other} trials, so at least one {other} trial "
                             f"(label {1 - value}) is needed")
    return s, y


# ------------------------------------------------------------------------------------------------- the curves


def eer_from_roc(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The seed's ``tuneThresholdfromScore`` on arrays as they are (sklearn checks them: NaN raises ValueError).

    (EER in percent, its threshold); :func:`eer` is the same after :func:`check_trials`.
    """
    from sklearn.metrics import roc_curve  # on first use: importing sklearn costs seconds of start-up

    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=1)  # the seed's call: drop_intermediate=True
    fnr = 1 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))  # the first (highest-threshold) nearest point
    return float(max(fpr[i], fnr[i]) * 100), float(thresholds[i])


def _error_rates(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed's ComputeErrorRates: (fnrs, fprs, thresholds), point i rejecting the first i + 1 trials in stable
    ascending score order (the seed's ``sorted(…, key=score)``)."""
    order = np.argsort(s, kind="stable")
    misses = np.cumsum(y[order])  # targets among the rejected trials
    rejected_nontargets = np.arange(1, len(s) + 1) - misses
    n_target = int(misses[-1])
    n_nontarget = len(s) - n_target
    return misses / float(n_target), 1 - rejected_nontargets / float(n_nontarget), s[order]


def _min_dcf(fnrs: np.ndarray, fprs: np.ndarray, thresholds: np.ndarray, p_target: float, c_miss: float,
             c_fa: float) -> tuple[float, float]:
    """The seed's ComputeMinDcf on ComputeErrorRates' curve."""
    c_det = c_miss * fnrs * p_target + c_fa * fprs * (1 - p_target)
    i = int(np.argmin(c_det))  # first minimum, like the seed's strict "<"
    c_def = min(c_miss * p_target, c_fa * (1 - p_target))
    return float(c_det[i] / c_def), float(thresholds[i])


# ------------------------------------------------------------------------------------------------- public API


def eer(scores, labels) -> tuple[float, float]:
    """Equal error rate in percent and its threshold (accept scores ≥ threshold), as voxceleb_trainer.

    ``labels``: 1 = target (same speaker), 0 = non-target. See the module docstring for the tie rules.
    """
    s, y = check_trials(scores, labels, "EER")
    return eer_from_roc(s, y)


def min_dcf(scores, labels, p_target: float = 0.05, c_miss: float = 1, c_fa: float = 1) -> tuple[float, float]:
    """Normalised minimum detection cost and the seed's threshold (the last rejected score), as voxceleb_trainer."""
    _check_costs(p_target, c_miss, c_fa)
    return _min_dcf(*_error_rates(*check_trials(scores, labels, "minDCF")), p_target, c_miss, c_fa)


def actual_dcf(scores, labels, threshold: float, p_target: float = 0.05, c_miss: float = 1,
               c_fa: float = 1) -> float:
    """Normalised detection cost at a fixed threshold: a trial is accepted when its score is ≥ ``threshold``."""
    _check_costs(p_target, c_miss, c_fa)
    if np.isnan(threshold):
        raise SpeakeridError("the threshold of actual_dcf is NaN; pass a number (±inf rejects/accepts all)")
    s, y = check_trials(scores, labels, "the DCF")
    accept = s >= threshold
    n_target = int(y.sum())
    p_miss = int(np.count_nonzero(~accept & (y == 1))) / float(n_target)
    p_fa = int(np.count_nonzero(accept & (y == 0))) / float(len(y) - n_target)
    c_det = c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)
    return float(c_det / min(c_miss * p_target, c_fa * (1 - p_target)))


def bayes_threshold(p_target: float, c_miss: float = 1, c_fa: float = 1) -> float:
    """The LLR above which a trial is accepted at minimum expected cost: log(c_fa·(1 − p) / (c_miss·p))."""
    _check_costs(p_target, c_miss, c_fa)
    return float(np.log(c_fa * (1 - p_target)) - np.log(c_miss * p_target))


def _cllr(llrs: np.ndarray, y: np.ndarray) -> float:
    # log(1 + e^x) as logaddexp(0, x): exact for large |x| and ±inf
    target = np.logaddexp(0.0, -llrs[y == 1]).mean()
    nontarget = np.logaddexp(0.0, llrs[y == 0]).mean()
    return float((target + nontarget) / (2 * np.log(2)))


def cllr(scores, labels) -> float:
    """Log-likelihood-ratio cost in bits of scores read as natural-log likelihood ratios (see the module docstring)."""
    return _cllr(*check_trials(scores, labels, "Cllr"))


PAV_CLIP = 1e-15  # PAV posteriors of 0 or 1 (a block of one class) become LLRs of about ±34.5, not ±inf


def pav_llrs(scores, labels) -> np.ndarray:
    """The optimal monotone map of ``scores`` to LLRs on these trials (PAV posteriors minus the empirical prior)."""
    from sklearn.isotonic import IsotonicRegression

    s, y = check_trials(scores, labels, "minCllr")
    posterior = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit_transform(s, y.astype(np.float64))
    posterior = np.clip(posterior, PAV_CLIP, 1 - PAV_CLIP)
    prior = y.mean()
    return np.log(posterior / (1 - posterior)) - np.log(prior / (1 - prior))


def min_cllr(scores, labels) -> float:
    """Cllr after the optimal monotone (PAV) calibration of the scores on these trials: Cllr's floor."""
    s, y = check_trials(scores, labels, "minCllr")
    return _cllr(pav_llrs(s, y), y)


def det_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, fnr, thresholds) at every distinct score, thresholds ascending; accept scores ≥ threshold.

    sklearn's full ROC curve (nothing dropped, unlike the EER's; without its +inf point), reversed: fpr falls from
    1 to its last value and fnr rises from 0. For a DET plot, map both rates through the probit
    (``scipy.stats.norm.ppf``) and skip 0/1 values. (sklearn's own ``det_curve`` also trims the flat ends.)
    """
    from sklearn.metrics import roc_curve

    s, y = check_trials(scores, labels, "the DET curve")
    fpr, tpr, thresholds = roc_curve(y, s, pos_label=1, drop_intermediate=False)
    return fpr[:0:-1].copy(), (1 - tpr)[:0:-1].copy(), thresholds[:0:-1].copy()


@dataclass(frozen=True)
class Metrics:
    """What evaluation and the training loop's validation report: EER and minDCF at p_target 0.05 and 0.01."""

    eer: float  # percent
    eer_threshold: float
    min_dcf_05: float  # p_target 0.05 (the seeds' default)
    min_dcf_05_threshold: float
    min_dcf_01: float  # p_target 0.01
    min_dcf_01_threshold: float
    n_target: int
    n_nontarget: int

    @classmethod
    def compute(cls, scores, labels, c_miss: float = 1, c_fa: float = 1) -> Metrics:
        """Validate once, then compute every number (c_miss/c_fa apply to both minDCFs)."""
        s, y = check_trials(scores, labels, "EER")
        for p_target in DCF_P_TARGETS:
            _check_costs(p_target, c_miss, c_fa)
        value, threshold = eer_from_roc(s, y)
        rates = _error_rates(s, y)
        dcf05 = _min_dcf(*rates, DCF_P_TARGETS[0], c_miss, c_fa)
        dcf01 = _min_dcf(*rates, DCF_P_TARGETS[1], c_miss, c_fa)
        n_target = int(y.sum())
        return cls(value, threshold, *dcf05, *dcf01, n_target, len(y) - n_target)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        # The seeds print "VEER {:2.4f}, MinDCF {:2.5f}".
        return (f"EER {self.eer:2.4f}%, minDCF(0.05) {self.min_dcf_05:2.5f}, minDCF(0.01) {self.min_dcf_01:2.5f} "
                f"({self.n_target} target / {self.n_nontarget} non-target trials)")
