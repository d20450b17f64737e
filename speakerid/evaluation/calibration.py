"""Score calibration: trial scores (and optional quality measures) → natural-log likelihood ratios.

A prior-weighted logistic regression (BOSARIS' ``train_llr_fusion``; scikit-learn's ``LogisticRegression``,
effectively unregularised) is fitted on a calibration trial list of *training* speakers and applied to the test
lists: llr = w·x + b − logit(p_target), x = [score, quality features…]. Targets and non-targets are weighted
p_target : 1 − p_target whatever their counts, so the map is optimal for decisions at that prior (default 0.05,
the seeds' DCF prior); Cllr, actual DCF and the Bayes threshold −logit(p) then mean what they say.

With the score alone the map is increasing (w > 0 on a usable list), so EER and minDCF are unchanged and only
Cllr / actual DCF improve. With quality measures (QMF) the map is no longer monotone in the score: it can
also move EER and minDCF, for better (what QMF is for) or worse. Quality measures of a trial, from per-utterance
values of its two sides (the order of enrollment and test does not matter):

* ``duration``: min and max over the pair of log seconds of audio (whole-utterance protocol);
* ``norm``: min and max over the pair of the raw embeddings' L2 norm (before any normalisation).

:class:`Calibration` is saved as JSON beside the scores (``calibration.json``) and can be applied again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from speakerid.data.index import write_json_atomic
from speakerid.data.lists import utterance_key
from speakerid.errors import SpeakeridError
from speakerid.evaluation.embeddings import Embeddings
from speakerid.evaluation.scoring import trial_indices
from speakerid.evaluation.trials import TrialList
from speakerid.metrics import check_trials

FORMAT = "speakerid-calibration"
QUALITY_MEASURES = ("duration", "norm")  # per-utterance values a trial's quality features are made of
DEFAULT_P_TARGET = 0.05
_C = 1e6  # inverse L2 strength: effectively no penalty (as BOSARIS), valid for every sklearn version


@dataclass(frozen=True)
class CalibrationConfig:
    calibration_trials: str | None = None  # labelled trial list of training speakers (shardify calibration-trials)
    calibration_audio: str | None = None  # the training shards it was drawn from (or an audio folder / eval shards)
    quality: tuple[str, ...] = ()  # quality measures beside the score: duration, norm
    calibration_prior: float = DEFAULT_P_TARGET  # the effective prior p_target the regression is weighted for
    calibration: str | None = None  # a calibration.json of an earlier run to apply instead of fitting one

    def __post_init__(self) -> None:
        object.__setattr__(self, "quality", tuple(dict.fromkeys(self.quality or ())))
        if self.calibration and (self.calibration_trials or self.calibration_audio or self.quality):
            raise SpeakeridError("--calibration FILE applies a fitted calibration (its quality measures included); "
                                 "--calibration-trials/--calibration-audio/--quality fit a new one: give one or the other")
        unknown = [q for q in self.quality if q not in QUALITY_MEASURES]
        if unknown:
            raise SpeakeridError(f"--quality {unknown[0]!r}: choose from {', '.join(QUALITY_MEASURES)}")
        if self.calibration_trials and not self.calibration_audio:
            raise SpeakeridError("--calibration-trials needs --calibration-audio: the training shards the list was "
                                 "drawn from (speakerid shardify calibration-trials)")
        if (self.quality or self.calibration_audio) and not self.calibration_trials:
            raise SpeakeridError("--quality and --calibration-audio calibrate scores: give --calibration-trials LIST")
        if not 0 < self.calibration_prior < 1:
            raise SpeakeridError(f"--calibration-prior must lie strictly between 0 and 1, got {self.calibration_prior}")


def utterance_measures(embeddings: Embeddings, names: tuple[str, ...], sample_rate: int = 16000) -> dict[str, np.ndarray]:
    """Per-utterance quality measures of ``embeddings`` (rows as its keys): durations in seconds (whole utterances
    only), raw embedding norms (the mean over crops)."""
    measures: dict[str, np.ndarray] = {}
    for name in names:
        if name == "norm":
            values = embeddings.values.reshape(len(embeddings.keys), -1, embeddings.values.shape[-1])
            measures[name] = np.linalg.norm(values.astype(np.float64), axis=-1).mean(axis=1)
        elif name == "duration":
            samples = embeddings.samples or [None] * len(embeddings.keys)
            unknown = [k for k, n in zip(embeddings.keys, samples) if n is None]
            if unknown:
                raise SpeakeridError(f"the duration of {len(unknown)} utterance(s) is unknown (e.g. {unknown[0]}): "
                                     "durations are recorded for whole utterances, not the crop protocol "
                                     "(--eval-frames), and not in embedding caches of older versions (--no-cache once)")
            measures[name] = np.asarray(samples, dtype=np.float64) / sample_rate
        else:
            raise SpeakeridError(f"unknown quality measure {name!r}: choose from {', '.join(QUALITY_MEASURES)}")
    return measures


def trial_quality(embeddings: Embeddings, trial_list: TrialList, names: tuple[str, ...],
                  sample_rate: int = 16000) -> dict[str, np.ndarray]:
    """The quality features of every trial of ``trial_list`` (see :func:`quality_features`)."""
    if not names:
        return {}
    pairs = trial_indices([(utterance_key(t.enroll), utterance_key(t.test)) for t in trial_list.trials],
                          embeddings.keys)
    return quality_features(utterance_measures(embeddings, names, sample_rate), pairs)


def quality_features(measures: Mapping[str, np.ndarray], pairs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-trial features from per-utterance ``measures`` (name → (U,) values) and ``pairs`` (T, 2) rows into them:
    ``<name>_min`` and ``<name>_max`` over each pair; durations (seconds) and norms enter as logs."""
    features: dict[str, np.ndarray] = {}
    for name, values in measures.items():
        if name not in QUALITY_MEASURES:
            raise SpeakeridError(f"unknown quality measure {name!r}: choose from {', '.join(QUALITY_MEASURES)}")
        values = np.asarray(values, dtype=np.float64)
        if not np.all(values > 0):
            raise SpeakeridError(f"quality measure {name!r} must be positive for every utterance (a log is taken); "
                                 f"found {values[~(values > 0)][0]}")
        both = np.log(values)[pairs]  # (T, 2)
        features[f"{name}_min"], features[f"{name}_max"] = both.min(axis=1), both.max(axis=1)
    return features


@dataclass(frozen=True)
class Calibration:
    """llr = Σ weights·[score, features…] + bias − logit(p_target); :meth:`apply` computes it."""

    features: tuple[str, ...]  # "score" first, then quality features ("duration_min", …)
    weights: tuple[float, ...]
    bias: float
    p_target: float
    n_target: int = 0  # calibration trials it was fitted on
    n_nontarget: int = 0
    trials: str = ""  # the calibration trial list, for the record
    scoring: dict = field(default_factory=dict)  # what produced the scores it maps (checkpoint, protocol, …)

    @property
    def quality(self) -> tuple[str, ...]:
        """The quality measures it needs (``duration``, ``norm``)."""
        return tuple(dict.fromkeys(f.rsplit("_", 1)[0] for f in self.features[1:]))

    @property
    def monotone(self) -> bool:
        """Score-only and increasing: EER and minDCF of calibrated scores equal the raw ones'."""
        return len(self.features) == 1 and self.weights[0] > 0

    def apply(self, scores, features: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Calibrated LLRs of ``scores`` (T,), with the quality ``features`` it was fitted with (name → (T,))."""
        columns = [np.asarray(scores, dtype=np.float64)]
        features = features or {}
        for name in self.features[1:]:
            if name not in features:
                raise SpeakeridError(f"the calibration was fitted with quality feature {name!r}; pass it "
                                     f"(--quality {' '.join(self.quality)})")
            columns.append(np.asarray(features[name], dtype=np.float64))
        x = np.stack(columns, axis=1)
        return x @ np.asarray(self.weights) + self.bias - _logit(self.p_target)

    def check_scoring(self, scoring: dict, path: str | os.PathLike) -> None:
        """A saved calibration maps the scores of one checkpoint, protocol and normalisation only."""
        changed = sorted(k for k in set(self.scoring) | set(scoring) if self.scoring.get(k) != scoring.get(k))
        if changed:
            raise SpeakeridError(f"{path} was fitted on other scores ({', '.join(changed)} differ: "
                                 f"{ {k: self.scoring.get(k) for k in changed} } there, "
                                 f"{ {k: scoring.get(k) for k in changed} } now): fit it again with "
                                 "--calibration-trials")

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_json_atomic(path, {"format": FORMAT, **asdict(self)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise SpeakeridError(f"{path}: cannot read the calibration ({error})") from error
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise SpeakeridError(f"{path}: not a speakerid calibration file (written as calibration.json by "
                                 "speakerid evaluate --calibration-trials)")
        try:
            data["features"], data["weights"] = tuple(data["features"]), tuple(data["weights"])
            return cls(**data)
        except (KeyError, TypeError) as error:
            raise SpeakeridError(f"{path}: a damaged calibration file ({error}); fit it again") from error


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def fit_calibration(scores, labels, features: Mapping[str, np.ndarray] | None = None, *,
                    p_target: float = DEFAULT_P_TARGET, trials: str = "", scoring: dict | None = None) -> Calibration:
    """Fit the prior-weighted logistic regression on calibration trials: ``scores`` (T,), ``labels`` (T,) 1/0,
    ``features`` name → (T,) quality features (:func:`quality_features`)."""
    from sklearn.linear_model import LogisticRegression  # on first use: importing sklearn costs seconds

    if not 0 < p_target < 1:
        raise SpeakeridError(f"the calibration prior p_target must lie strictly between 0 and 1, got {p_target}")
    s, y = check_trials(scores, labels, "calibration")
    names = ["score", *(features or {})]
    x = np.stack([s, *(np.asarray(v, dtype=np.float64) for v in (features or {}).values())], axis=1)
    if x.shape[0] != len(y):
        raise SpeakeridError(f"quality features have {x.shape[0]} rows for {len(y)} calibration trials")
    if not np.isfinite(x).all():
        raise SpeakeridError("a calibration quality feature is not finite (NaN or ±inf)")
    n_target = int(y.sum())
    n_nontarget = len(y) - n_target
    weight = np.where(y == 1, p_target / n_target, (1 - p_target) / n_nontarget) * len(y)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0  # a constant feature carries nothing; keep it harmless
    model = LogisticRegression(C=_C, max_iter=1000).fit((x - mean) / scale, y, sample_weight=weight)
    w = model.coef_[0] / scale  # back to raw features: w·(x − mean)/scale + b = (w/scale)·x + b − Σ w·mean/scale
    bias = float(model.intercept_[0] - np.dot(w, mean))
    return Calibration(tuple(names), tuple(float(v) for v in w), bias, p_target, n_target, n_nontarget, trials,
                       dict(scoring or {}))
