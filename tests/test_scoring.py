"""Batched trial scoring against per-trial loop implementations: cosine, the seeds' 10-crop score, AS-Norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speakerid.errors import SpeakeridError
from speakerid.evaluation.scoring import (as_norm, cohort_mean, cohort_stats, cosine_scores, crop_scores,
                                          subtract_mean, trial_indices)

U, C, D, K, T = 9, 10, 16, 40, 30


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, U, size=(T, 2))
    pairs[0] = (3, 3)  # an utterance against itself
    return dict(emb=rng.normal(size=(U, D)), crops=rng.normal(size=(U, C, D)) * rng.uniform(0.5, 3, size=(U, C, 1)),
                cohort=rng.normal(size=(K, D)) + 0.3, pairs=pairs)


def loop_cosine(emb, pairs):
    out = []
    for e, t in pairs:
        a, b = emb[e], emb[t]
        out.append(sum(x * y for x, y in zip(a, b)) / (np.sqrt(sum(x * x for x in a)) * np.sqrt(sum(y * y for y in b))))
    return np.array(out)


def loop_crops(crops, pairs, normalize):
    out = []
    for e, t in pairs:
        a, b = crops[e], crops[t]
        if normalize:
            a = a / np.linalg.norm(a, axis=1, keepdims=True)
            b = b / np.linalg.norm(b, axis=1, keepdims=True)
        distances = [np.sqrt(np.sum((a[i] - b[j]) ** 2)) for i in range(len(a)) for j in range(len(b))]
        out.append(-sum(distances) / len(distances))
    return np.array(out)


def loop_as_norm(emb, pairs, cohort, top_k):
    def stats(x):
        cohort_scores = sorted((loop_cosine(np.stack([x, c]), [(0, 1)])[0] for c in cohort), reverse=True)[:top_k]
        mean = sum(cohort_scores) / top_k
        return mean, np.sqrt(sum((v - mean) ** 2 for v in cohort_scores) / top_k)

    out = []
    for e, t in pairs:
        score = loop_cosine(emb, [(e, t)])[0]
        (mean_e, std_e), (mean_t, std_t) = stats(emb[e]), stats(emb[t])
        out.append(0.5 * ((score - mean_e) / std_e + (score - mean_t) / std_t))
    return np.array(out)


def test_cosine_scores_equal_loop(data):
    for chunk_size in (1, 7, 65536):
        scores = cosine_scores(data["emb"], data["pairs"], chunk_size=chunk_size)
        np.testing.assert_allclose(scores, loop_cosine(data["emb"], data["pairs"]), rtol=0, atol=1e-12)
    assert scores.dtype == np.float64 and scores[0] == pytest.approx(1.0)
    as_float32 = cosine_scores(torch.tensor(data["emb"], dtype=torch.float32), torch.tensor(data["pairs"]))
    assert as_float32.dtype == np.float32
    np.testing.assert_allclose(as_float32, scores, atol=1e-6)
    assert cosine_scores(data["emb"], np.zeros((0, 2), dtype=np.int64)).shape == (0,)


@pytest.mark.parametrize("normalize", [True, False])
def test_crop_scores_equal_loop(data, normalize):
    expected = loop_crops(data["crops"], data["pairs"], normalize)
    for chunk_size in (1, 4, 2048):
        scores = crop_scores(data["crops"], data["pairs"], normalize=normalize, chunk_size=chunk_size)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)


def test_crop_scores_equal_the_seeds_per_trial_torch(data):
    crops = torch.tensor(data["crops"], dtype=torch.float32)
    seed = []
    for e, t in data["pairs"]:  # voxceleb_trainer's evaluateFromList, one trial at a time
        ref, com = F.normalize(crops[e], p=2, dim=1), F.normalize(crops[t], p=2, dim=1)
        seed.append(-1 * np.mean(torch.cdist(ref.reshape(C, -1), com.reshape(C, -1)).numpy()))
    np.testing.assert_allclose(crop_scores(crops, data["pairs"], chunk_size=8), seed, rtol=0, atol=2e-6)


def test_single_crop_is_minus_euclidean_distance(data):
    emb = data["emb"][:, None, :]
    a, b = data["emb"][data["pairs"][:, 0]], data["emb"][data["pairs"][:, 1]]
    np.testing.assert_allclose(crop_scores(emb, data["pairs"], normalize=False), -np.linalg.norm(a - b, axis=1),
                               atol=1e-12)


@pytest.mark.parametrize("top_k", [2, 7, K])
def test_as_norm_equals_per_trial_loop(data, top_k):
    expected = loop_as_norm(data["emb"], data["pairs"], data["cohort"], top_k)
    for chunk_size in (1, 3, 1024):
        normed = as_norm(data["emb"], data["pairs"], data["cohort"], top_k=top_k, chunk_size=chunk_size)
        np.testing.assert_allclose(normed, expected, rtol=0, atol=1e-10)
    given = as_norm(data["emb"], data["pairs"], data["cohort"], top_k=top_k,
                    scores=cosine_scores(data["emb"], data["pairs"]))
    np.testing.assert_allclose(given, expected, rtol=0, atol=1e-10)


def test_as_norm_after_mean_subtraction(data):
    mean = cohort_mean(data["cohort"])
    np.testing.assert_allclose(mean.numpy(), data["cohort"].mean(axis=0), atol=1e-12)
    emb, cohort = subtract_mean(data["emb"], mean), subtract_mean(data["cohort"], mean)
    assert isinstance(emb, np.ndarray) and isinstance(subtract_mean(torch.tensor(data["emb"]), mean), torch.Tensor)
    expected = loop_as_norm(data["emb"] - data["cohort"].mean(0), data["pairs"], cohort, 5)
    np.testing.assert_allclose(as_norm(emb, data["pairs"], cohort, top_k=5), expected, rtol=0, atol=1e-10)
    crops_mean = cohort_mean(data["crops"])  # (K, C, D) cohorts: the mean over every crop
    np.testing.assert_allclose(crops_mean.numpy(), data["crops"].reshape(-1, D).mean(0), atol=1e-12)


def test_cohort_stats_per_utterance(data):
    mean, std = cohort_stats(data["emb"], data["cohort"], top_k=5, chunk_size=2)
    assert mean.shape == std.shape == (U,)
    cos = (data["emb"] / np.linalg.norm(data["emb"], axis=1, keepdims=True)) @ (
        data["cohort"] / np.linalg.norm(data["cohort"], axis=1, keepdims=True)).T
    top = -np.sort(-cos, axis=1)[:, :5]
    np.testing.assert_allclose(mean, top.mean(1), atol=1e-12)
    np.testing.assert_allclose(std, top.std(1), atol=1e-12)


def test_trial_indices():
    names = ["a/1.wav", "b/2.wav", "c/3.wav"]
    np.testing.assert_array_equal(trial_indices([("a/1.wav", "c/3.wav"), ("b/2.wav", "a/1.wav")], names),
                                  [[0, 2], [1, 0]])
    assert trial_indices([], names).shape == (0, 2)
    with pytest.raises(SpeakeridError, match="1 trial\\(s\\) name utterances that have no embedding, e.g. 'x.wav'"):
        trial_indices([("a/1.wav", "x.wav")], names)


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_pairs(data):
    with pytest.raises(SpeakeridError, match=r"pairs index utterance 9 \(trial 1, test side\), but there are only "
                                             r"9 embeddings \(valid indices 0…8\)"):
        cosine_scores(data["emb"], [[0, 1], [2, 9]])
    with pytest.raises(SpeakeridError, match=r"pairs index utterance -1 \(trial 0, enrollment side\)"):
        crop_scores(data["crops"], [[-1, 1]])
    with pytest.raises(SpeakeridError, match=r"pairs must have shape \(T, 2\).*got shape \(3,\)"):
        cosine_scores(data["emb"], [0, 1, 2])
    with pytest.raises(SpeakeridError, match="pairs must hold integer utterance indices, got dtype float64"):
        cosine_scores(data["emb"], [[0.0, 1.0]])


def test_bad_shapes_and_options(data):
    with pytest.raises(SpeakeridError, match=r"embeddings must have shape \(U, D\) \(for crops .*crop_scores\)"):
        cosine_scores(data["crops"], data["pairs"])
    with pytest.raises(SpeakeridError, match=r"embeddings must have shape \(U, C, D\)"):
        crop_scores(data["emb"], data["pairs"])
    with pytest.raises(SpeakeridError, match="chunk_size must be at least 1, got 0"):
        cosine_scores(data["emb"], data["pairs"], chunk_size=0)
    with pytest.raises(SpeakeridError, match="cohort's embeddings have 15 values but the trials' have 16"):
        as_norm(data["emb"], data["pairs"], data["cohort"][:, :15])
    with pytest.raises(SpeakeridError, match="top_k must be between 2 and the cohort size 40, got 300"):
        as_norm(data["emb"], data["pairs"], data["cohort"])
    with pytest.raises(SpeakeridError, match="top_k must be between 2 and the cohort size 40, got 1"):
        cohort_stats(data["emb"], data["cohort"], top_k=1)
    with pytest.raises(SpeakeridError, match="scores and pairs differ in length: 3 scores but 30 trials"):
        as_norm(data["emb"], data["pairs"], data["cohort"], top_k=5, scores=[0.1, 0.2, 0.3])
    with pytest.raises(SpeakeridError, match=r"the mean must be a vector of the embeddings' size"):
        subtract_mean(data["emb"], np.zeros(D + 1))
    with pytest.raises(SpeakeridError, match=r"the cohort must have shape \(K, D\) or \(K, C, D\)"):
        cohort_mean(np.zeros(D))


def test_as_norm_statistics_once_for_all_lists(monkeypatch):
    """O- and E-like lists sharing most utterances: each utterance's top-k statistics are computed once for
    both lists, and the scores equal each list's own AS-Norm computation (to 1e-6 of float32 scores: the
    union is cut into other matrix-product chunks than each list alone)."""
    from pathlib import Path

    from speakerid.data.lists import Trial
    from speakerid.evaluation import scoring
    from speakerid.evaluation.embeddings import Embeddings
    from speakerid.evaluation.scoring import ScoreConfig, score_trials, speaker_means
    from speakerid.evaluation.trials import TrialList

    rng = np.random.default_rng(1)
    keys = [f"id{i // 4:05d}/v/{i:05d}" for i in range(60)]
    emb = Embeddings(keys, rng.normal(size=(60, 1, D)).astype(np.float32))
    cohort = Embeddings([f"c{i // 2:03d}/v/{i:05d}" for i in range(40)], rng.normal(size=(40, 1, D)).astype(np.float32),
                        [f"c{i // 2:03d}" for i in range(40)])

    def trial_list(name, rows):
        return TrialList(name, Path(name), [Trial(int(i % 2), f"{keys[a]}.wav", f"{keys[b]}.wav", f"{name}:{i}")
                                            for i, (a, b) in enumerate(rows)])

    o_rows = rng.integers(0, 40, size=(50, 2))  # O: utterances 0–39; E: 10–59, mostly O's
    e_rows = rng.integers(10, 60, size=(80, 2))
    rows_seen = []
    real = scoring._cohort_stats
    monkeypatch.setattr(scoring, "_cohort_stats", lambda emb_n, *a: rows_seen.append(len(emb_n)) or real(emb_n, *a))
    config = ScoreConfig(cohort="shards", as_norm=True, top_k=5)
    both = score_trials(emb, [trial_list("O", o_rows), trial_list("E", e_rows)], cohort=cohort, scoring=config)
    union = len(np.unique(np.concatenate([o_rows.ravel(), e_rows.ravel()])))
    assert sum(rows_seen) == union  # once per utterance, not once per utterance and list
    means = speaker_means(cohort)
    for rows, scores in zip((o_rows, e_rows), both):
        alone = as_norm(emb.values[:, 0], rows, means, top_k=5)
        np.testing.assert_allclose(scores, alone, rtol=0, atol=1e-6)


def test_score_trials_names_each_utterance_once(monkeypatch):
    """Trial lists name each utterance many times (E: 579,818 trials over 145,375): its key is made once."""
    from pathlib import Path

    from speakerid.data.lists import Trial
    from speakerid.evaluation import scoring
    from speakerid.evaluation.embeddings import Embeddings
    from speakerid.evaluation.scoring import score_trials
    from speakerid.evaluation.trials import TrialList

    keys = [f"id0000{i}/v/00001" for i in range(4)]
    emb = Embeddings(keys, np.random.default_rng(2).normal(size=(4, 1, D)).astype(np.float32))
    rows = [(a, b) for a in range(4) for b in range(4)]
    lists = [TrialList(name, Path(name), [Trial(1, f"{keys[a]}.wav", f"{keys[b]}.wav", f"{name}:{i}")
                                          for i, (a, b) in enumerate(rows)]) for name in ("O", "E")]
    made = []
    real = scoring.utterance_key
    monkeypatch.setattr(scoring, "utterance_key", lambda relpath: made.append(relpath) or real(relpath))
    scores = score_trials(emb, lists)
    assert sorted(made) == sorted(f"{k}.wav" for k in keys)
    np.testing.assert_allclose(scores[0], cosine_scores(emb.values[:, 0], rows), atol=0)
