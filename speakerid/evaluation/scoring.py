"""Trial scoring from embeddings: cosine, the seeds' multi-crop distance score, mean subtraction and AS-Norm.

Every utterance is embedded once; a trial list becomes index pairs ``(T, 2)`` (enrollment, test) into the
embedding matrix (:func:`trial_indices`), and all trials are scored at once, in chunks of trials that bound
memory. Computation runs in torch on the embeddings' device and dtype (numpy input runs on the CPU); scores
come back as a numpy array ``(T,)`` of the embeddings' floating dtype.

* :func:`cosine_scores` — embeddings ``(U, D)``: the dot product of the L2-normalised rows.
* :func:`crop_scores` — the seeds' 10-crop protocol, embeddings ``(U, C, D)``: −mean of the C×C Euclidean
  distances between the two utterances' crops, after L2-normalising each crop when ``normalize`` (the loss's
  ``test_normalize``), as voxceleb_trainer's ``evaluateFromList`` (F.normalize, torch.cdist, −mean).
  With C = 1 (whole utterances) this is −‖e − t‖.
* :func:`subtract_mean` / :func:`cohort_mean` — subtract a cohort's mean embedding (from the embeddings and
  the cohort alike) before scoring; the scoring functions normalise afterwards.
* :func:`as_norm` — adaptive symmetric score normalisation with the top-k cohort scores of each side:
  s' = ½((s − μ_e)/σ_e + (s − μ_t)/σ_t), μ/σ the mean and (population) standard deviation of the k highest
  cosine scores of that side's embedding against the cohort; each unique utterance's statistics are
  computed once (:func:`cohort_stats`), for all the trial lists :func:`score_trials` scores together.

:func:`score_trials` applies them to trial lists: one score array per list, after the normalisations a
:class:`ScoreConfig` asks for (against the cohort of :mod:`speakerid.evaluation.cohort`; AS-Norm against its
per-speaker means, :func:`speaker_means`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from speakerid.data.lists import utterance_key
from speakerid.errors import SpeakeridError
from speakerid.evaluation.embeddings import Embeddings
from speakerid.evaluation.trials import TrialList

NORMALIZE_EPS = 1e-12  # F.normalize's default: x / max(‖x‖, eps), as the seeds


def _as_tensor(values, name: str, ndim: int | tuple[int, ...], shape_hint: str) -> Tensor:
    if isinstance(values, Tensor):
        tensor = values.detach()
    else:
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(values))
        except (TypeError, ValueError) as error:
            raise SpeakeridError(f"{name} cannot be read as a numeric array: {error}") from error
    if tensor.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise SpeakeridError(f"{name} must have shape {shape_hint}, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor


def _check_pairs(pairs, n_utterances: int, device: torch.device) -> Tensor:
    array = pairs.detach().cpu().numpy() if isinstance(pairs, Tensor) else np.asarray(pairs)
    if array.ndim != 2 or array.shape[1] != 2:
        raise SpeakeridError(f"pairs must have shape (T, 2) (enrollment index, test index per trial), "
                             f"got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise SpeakeridError(f"pairs must hold integer utterance indices, got dtype {array.dtype}")
    bad = (array < 0) | (array >= n_utterances)
    if bad.any():
        trial, side = np.argwhere(bad)[0]
        raise SpeakeridError(f"pairs index utterance {array[trial, side]} (trial {trial}, "
                             f"{'enrollment' if side == 0 else 'test'} side), but there are only {n_utterances} "
                             f"embeddings (valid indices 0…{n_utterances - 1})")
    return torch.as_tensor(array.astype(np.int64), device=device)


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise SpeakeridError(f"chunk_size must be at least 1, got {chunk_size}")


def _normalize(x: Tensor) -> Tensor:
    return F.normalize(x, p=2, dim=-1, eps=NORMALIZE_EPS)


def trial_indices(trials: Iterable[tuple[str, str]], utterances: Sequence[str]) -> np.ndarray:
    """Index pairs ``(T, 2)`` of (enrollment, test) names into ``utterances`` (the embedding matrix's rows)."""
    position = {name: i for i, name in enumerate(utterances)}
    rows, missing = [], []
    for enroll, test in trials:
        if enroll not in position or test not in position:
            missing.append(enroll if enroll not in position else test)
            continue
        rows.append((position[enroll], position[test]))
    if missing:
        raise SpeakeridError(f"{len(missing)} trial(s) name utterances that have no embedding, e.g. "
                             f"{missing[0]!r}: embed every utterance of the trial list")
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def cosine_scores(embeddings, pairs, *, chunk_size: int = 65536) -> np.ndarray:
    """Cosine similarity of each trial's two embeddings: ``embeddings`` (U, D), ``pairs`` (T, 2) → (T,)."""
    _check_chunk(chunk_size)
    emb = _as_tensor(embeddings, "embeddings", 2, "(U, D) (for crops (U, C, D) use crop_scores)")
    index = _check_pairs(pairs, emb.shape[0], emb.device)
    emb = _normalize(emb)
    scores = torch.empty(len(index), dtype=emb.dtype, device=emb.device)
    for start in range(0, len(index), chunk_size):
        chunk = index[start:start + chunk_size]
        scores[start:start + len(chunk)] = torch.einsum("td,td->t", emb[chunk[:, 0]], emb[chunk[:, 1]])
    return scores.cpu().numpy()


def crop_scores(embeddings, pairs, *, normalize: bool = True, chunk_size: int = 2048) -> np.ndarray:
    """The seeds' multi-crop score: −mean over the C×C crop pairs of the Euclidean distance, per trial.

    ``embeddings`` (U, C, D) (C = 10 in the seeds' protocol, 1 for whole utterances); ``normalize``: L2-normalise
    each crop first (the loss's ``test_normalize``). A chunk of trials needs about 2·chunk_size·C·D values.
    """
    _check_chunk(chunk_size)
    emb = _as_tensor(embeddings, "embeddings", 3, "(U, C, D): C crops of D values per utterance")
    index = _check_pairs(pairs, emb.shape[0], emb.device)
    if normalize:
        emb = _normalize(emb)
    scores = torch.empty(len(index), dtype=emb.dtype, device=emb.device)
    for start in range(0, len(index), chunk_size):
        chunk = index[start:start + chunk_size]
        distances = torch.cdist(emb[chunk[:, 0]], emb[chunk[:, 1]])  # (B, C, C), like the seed's per-trial cdist
        scores[start:start + len(chunk)] = -distances.mean(dim=(1, 2))
    return scores.cpu().numpy()


def cohort_mean(cohort) -> Tensor:
    """The mean embedding of a cohort ``(K, D)`` (or crops ``(K, C, D)``: the mean over all crops)."""
    coh = _as_tensor(cohort, "the cohort", (2, 3), "(K, D) or (K, C, D)")
    if coh.shape[0] == 0:
        raise SpeakeridError(f"the cohort must have shape (K, D) or (K, C, D) with K ≥ 1, got {tuple(coh.shape)}")
    return coh.reshape(-1, coh.shape[-1]).mean(dim=0)


def subtract_mean(embeddings, mean):
    """``embeddings − mean`` over the last axis; returns the input's kind (numpy array or tensor)."""
    mean_t = mean.detach() if isinstance(mean, Tensor) else torch.as_tensor(np.asarray(mean))
    emb_t = embeddings.detach() if isinstance(embeddings, Tensor) else torch.from_numpy(np.asarray(embeddings))
    if mean_t.ndim != 1 or emb_t.ndim < 1 or emb_t.shape[-1] != mean_t.shape[0]:
        raise SpeakeridError(f"the mean must be a vector of the embeddings' size: embeddings have shape "
                             f"{tuple(emb_t.shape)}, the mean {tuple(mean_t.shape)}")
    result = emb_t - mean_t.to(device=emb_t.device, dtype=emb_t.dtype)
    return result if isinstance(embeddings, Tensor) else result.numpy()


def _check_cohort(cohort, emb: Tensor, top_k: int) -> Tensor:
    coh = _as_tensor(cohort, "the cohort", 2, "(K, D)")
    if coh.shape[1] != emb.shape[1]:
        raise SpeakeridError(f"the cohort's embeddings have {coh.shape[1]} values but the trials' have "
                             f"{emb.shape[1]}: embed the cohort with the same model")
    if not 2 <= top_k <= coh.shape[0]:
        raise SpeakeridError(f"top_k must be between 2 and the cohort size {coh.shape[0]}, got {top_k} "
                             "(the standard deviation of one score is 0)")
    return coh.to(device=emb.device, dtype=emb.dtype)


def _cohort_stats(emb_n: Tensor, coh_n: Tensor, top_k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    mean = torch.empty(len(emb_n), dtype=emb_n.dtype, device=emb_n.device)
    std = torch.empty_like(mean)
    for start in range(0, len(emb_n), chunk_size):
        top = (emb_n[start:start + chunk_size] @ coh_n.T).topk(top_k, dim=1, sorted=False).values
        mean[start:start + len(top)] = top.mean(dim=1)
        std[start:start + len(top)] = top.std(dim=1, correction=0)
    return mean, std


def cohort_stats(embeddings, cohort, top_k: int = 300, *, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std of each embedding's top_k cosine scores against the cohort: (U,), (U,).

    Memory: chunk_size × K scores at a time.
    """
    _check_chunk(chunk_size)
    emb = _as_tensor(embeddings, "embeddings", 2, "(U, D)")
    coh = _check_cohort(cohort, emb, top_k)
    mean, std = _cohort_stats(_normalize(emb), _normalize(coh), top_k, chunk_size)
    return mean.cpu().numpy(), std.cpu().numpy()


def _row_stats(stats, n_utterances: int, emb: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = (_as_tensor(s, f"stats[{i}]", 1, "(U,)").to(device=emb.device, dtype=emb.dtype)
                 for i, s in enumerate(stats))
    if len(mean) != n_utterances or len(std) != n_utterances:
        raise SpeakeridError(f"stats must be two (U,) arrays, one value per embedding ({n_utterances}), got "
                             f"{len(mean)} and {len(std)}")
    return mean, std


def as_norm(embeddings, pairs, cohort, *, top_k: int = 300, scores=None, stats=None,
            chunk_size: int = 1024) -> np.ndarray:
    """Adaptive s-norm of trial scores (cosine scores of ``embeddings`` unless ``scores`` (T,) is given).

    ``embeddings`` (U, D), ``pairs`` (T, 2), ``cohort`` (K, D) (subtract the same mean from both first, if
    any); statistics are computed once per utterance that occurs in ``pairs``, unless ``stats`` gives them:
    (mean, std), each (U,), as :func:`cohort_stats` of every embedding row (rows that ``pairs`` does not
    name are not read), so that several trial lists over one embedding matrix share one computation.
    A zero std (a cohort whose top scores are all equal) is floored at 1e-12.
    """
    _check_chunk(chunk_size)
    emb = _as_tensor(embeddings, "embeddings", 2, "(U, D)")
    index = _check_pairs(pairs, emb.shape[0], emb.device)
    coh = _check_cohort(cohort, emb, top_k)
    if scores is None:
        raw = torch.from_numpy(cosine_scores(emb, index)).to(emb.device)
    else:
        raw = _as_tensor(scores, "scores", 1, "(T,)").to(device=emb.device, dtype=emb.dtype)
        if len(raw) != len(index):
            raise SpeakeridError(f"scores and pairs differ in length: {len(raw)} scores but {len(index)} trials")
    if stats is None:
        used, inverse = torch.unique(index, return_inverse=True)  # inverse: (T, 2) rows into `used`
        mean, std = _cohort_stats(_normalize(emb[used]), _normalize(coh), top_k, chunk_size)
    else:
        (mean, std), inverse = _row_stats(stats, emb.shape[0], emb), index
    std = std.clamp_min(1e-12)
    enroll, test = inverse[:, 0], inverse[:, 1]
    normed = 0.5 * ((raw - mean[enroll]) / std[enroll] + (raw - mean[test]) / std[test])
    return normed.cpu().numpy()


@dataclass(frozen=True)
class ScoreConfig:
    cohort: str | None = None  # training shards (or an audio folder) whose embeddings form the cohort
    cohort_speakers: int = 2000  # speakers taken from the cohort source (cohort.plan_cohort), at most
    cohort_utts_per_speaker: int = 4  # utterances embedded per cohort speaker, at most
    mean_subtraction: bool = False  # subtract the cohort's mean embedding before scoring
    as_norm: bool = False  # adaptive s-norm against the per-speaker cohort means
    top_k: int = 300  # AS-Norm: the k highest cohort scores of each side
    threshold: float | None = None  # actual DCF threshold; None: the EER threshold of the first labelled list

    def __post_init__(self) -> None:
        if (self.mean_subtraction or self.as_norm) and not self.cohort:
            raise SpeakeridError("--mean-subtraction and --as-norm need a cohort: --cohort TRAIN_SHARDS")
        if self.cohort_speakers < 1 or self.cohort_utts_per_speaker < 1:
            raise SpeakeridError("--cohort-speakers and --cohort-utts must be at least 1")


def check_protocol(scoring: ScoreConfig, crops: bool) -> None:
    """AS-Norm normalises cosine scores: the crop protocol's distance scores refuse it."""
    if scoring.as_norm and crops:
        raise SpeakeridError("--as-norm normalises cosine scores of whole utterances; the crop protocol "
                             "(--eval-frames) scores by distances: drop one of them")


def describe_normalisation(scoring: ScoreConfig, cohort: Embeddings | None) -> str:
    """The normalisation as the report names it: "none", "cohort mean subtracted", "AS-Norm (top k of …)"."""
    parts = []
    if scoring.mean_subtraction:
        parts.append("cohort mean subtracted")
    if scoring.as_norm:
        parts.append(f"AS-Norm (top {scoring.top_k} of {len(speaker_means(cohort))} cohort speakers)")
    return ", ".join(parts) or "none"


def speaker_means(cohort: Embeddings) -> np.ndarray:
    """One row per cohort speaker: the mean of its utterance embeddings (WeSpeaker's AS-Norm cohort)."""
    speakers = np.asarray(cohort.speakers if cohort.speakers is not None else cohort.keys, dtype=object)
    names, inverse = np.unique(speakers, return_inverse=True)
    flat = cohort.values.reshape(len(cohort.keys), -1, cohort.values.shape[-1]).mean(axis=1)
    sums = np.zeros((len(names), flat.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, flat)
    return (sums / np.bincount(inverse)[:, None]).astype(np.float32)


def score_trials(embeddings: Embeddings, lists: list[TrialList], *, crops: bool = False, test_normalize: bool = True,
                 cohort: Embeddings | None = None, scoring: ScoreConfig = ScoreConfig()) -> list[np.ndarray]:
    """One score array per list: cosine (whole utterances, (U, D) or (U, 1, D)) or, with ``crops``, the seeds'
    crop score of (U, C, D) embeddings; then the normalisations ``scoring`` asks for."""
    values = embeddings.values if crops else embeddings.values.reshape(len(embeddings.keys), -1)
    cohort_values = None
    if cohort is not None:
        cohort_values = cohort.values if crops else cohort.values.reshape(len(cohort.keys), -1)
    check_protocol(scoring, crops)
    if scoring.mean_subtraction:
        mean = cohort_mean(cohort_values)
        values = subtract_mean(values, mean.numpy())
        cohort_values = subtract_mean(cohort_values, mean.numpy())
    as_norm_cohort = None
    if scoring.as_norm:
        as_norm_cohort = speaker_means(Embeddings(cohort.keys, cohort_values, cohort.speakers))
        if not 2 <= scoring.top_k <= len(as_norm_cohort):
            raise SpeakeridError(f"--top-k {scoring.top_k}: the cohort has {len(as_norm_cohort)} speakers; choose "
                                 f"2 ≤ k ≤ {len(as_norm_cohort)} or raise --cohort-speakers")
    key_of: dict[str, str] = {}  # relpath → key, once per utterance: the lists name each one many times

    def key(relpath: str) -> str:
        found = key_of.get(relpath)
        if found is None:
            found = key_of[relpath] = utterance_key(relpath)
        return found

    all_pairs = [trial_indices([(key(t.enroll), key(t.test)) for t in trial_list.trials], embeddings.keys)
                 for trial_list in lists]
    stats = None
    if as_norm_cohort is not None:
        stats = _union_stats(values, all_pairs, as_norm_cohort, scoring.top_k)
    results = []
    for pairs in all_pairs:
        if crops:
            scores = crop_scores(values, pairs, normalize=test_normalize)
        else:
            scores = cosine_scores(values, pairs)
            if as_norm_cohort is not None:
                scores = as_norm(values, pairs, as_norm_cohort, top_k=scoring.top_k, scores=scores, stats=stats)
        results.append(np.asarray(scores, dtype=np.float64))
    return results


def _union_stats(values, all_pairs: list[np.ndarray], cohort: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """AS-Norm's per-utterance statistics, computed once for every utterance that any list names (O, E and H
    share most of theirs): (U,) mean and std, zero for rows no list names."""
    used = np.unique(np.concatenate([p.reshape(-1) for p in all_pairs]))
    mean, std = np.zeros(len(values), dtype=values.dtype), np.zeros(len(values), dtype=values.dtype)
    if len(used):
        mean[used], std[used] = cohort_stats(values[used], cohort, top_k)
    return mean, std
