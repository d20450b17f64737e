"""Score calibration (logistic regression, quality measures), calibration trial lists, and evaluate with them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
from test_evaluation import save, train_shards  # noqa: F401 (train_shards: the fixture, shared)
from test_synthetic import mfcc_statistics

from evaluate.__main__ import main as evaluate_main
from shardify.__main__ import main as shardify_main
from speakerid.data.lists import entries_from_trials, read_train_list, read_trials, speaker_of, utterance_key
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.errors import SpeakeridError
from speakerid.evaluation import Embeddings, TrialList, run_command, score_trials
from speakerid.evaluation.calibration import Calibration, fit_calibration, quality_features
from speakerid.evaluation.calibration_trials import make_calibration_trials
from speakerid.metrics import Metrics, actual_dcf, bayes_threshold, cllr, eer, min_cllr, min_dcf


def cosine_like_trials(rng, n_target: int, n_nontarget: int, short_shift: float = 0.0):
    """Cosine-looking scores (targets ~0.6, non-targets ~0.1) and per-utterance durations; with ``short_shift``
    trials whose shorter side is short score lower, both classes (the shift quality measures correct)."""
    labels = np.r_[np.ones(n_target, np.int64), np.zeros(n_nontarget, np.int64)]
    durations = rng.uniform(1.0, 12.0, size=(len(labels), 2))  # seconds, per side
    shift = short_shift * np.log(durations.min(axis=1) / 12.0)
    scores = np.where(labels == 1, 0.6, 0.1) + shift + 0.12 * rng.normal(size=len(labels))
    return scores, labels, durations


def test_calibration_lowers_cllr_on_held_out_trials_and_leaves_eer_unchanged():
    rng = np.random.default_rng(0)
    cal_scores, cal_labels, _ = cosine_like_trials(rng, 300, 3000)
    test_scores, test_labels, _ = cosine_like_trials(rng, 200, 2000)
    calibration = fit_calibration(cal_scores, cal_labels)
    assert calibration.monotone and calibration.features == ("score",)
    llrs = calibration.apply(test_scores)
    assert cllr(llrs, test_labels) < 0.5 * cllr(test_scores, test_labels)
    assert cllr(llrs, test_labels) < 1.0  # informative, calibrated LLRs
    assert cllr(llrs, test_labels) - min_cllr(llrs, test_labels) < 0.05  # little calibration loss left
    assert min_cllr(llrs, test_labels) == pytest.approx(min_cllr(test_scores, test_labels), abs=1e-12)
    raw, calibrated = Metrics.compute(test_scores, test_labels), Metrics.compute(llrs, test_labels)
    assert calibrated.eer == raw.eer and calibrated.min_dcf_05 == raw.min_dcf_05
    # the Bayes threshold of calibrated LLRs is a good decision: close to the minimum DCF
    act = actual_dcf(llrs, test_labels, bayes_threshold(0.05), 0.05)
    assert act < min_dcf(llrs, test_labels, 0.05)[0] + 0.1
    assert act < actual_dcf(test_scores, test_labels, bayes_threshold(0.05), 0.05)


def test_the_prior_weighting_ignores_the_proportion_of_targets():
    rng = np.random.default_rng(1)
    few = fit_calibration(*cosine_like_trials(rng, 200, 4000)[:2])
    many = fit_calibration(*cosine_like_trials(rng, 2000, 2000)[:2])
    assert few.weights[0] == pytest.approx(many.weights[0], rel=0.2)
    assert few.bias == pytest.approx(many.bias, abs=0.2 * abs(many.bias) + 0.5)


def test_quality_measures_help_when_reliability_depends_on_duration():
    rng = np.random.default_rng(2)
    cal_scores, cal_labels, cal_durations = cosine_like_trials(rng, 1000, 5000, short_shift=0.15)
    test_scores, test_labels, test_durations = cosine_like_trials(rng, 1000, 5000, short_shift=0.15)
    pairs = np.arange(2 * len(cal_labels)).reshape(-1, 2)  # each trial its own two utterances
    cal_q = quality_features({"duration": cal_durations.reshape(-1)}, pairs)
    test_q = quality_features({"duration": test_durations.reshape(-1)}, pairs)
    assert set(cal_q) == {"duration_min", "duration_max"}
    np.testing.assert_allclose(cal_q["duration_min"], np.log(cal_durations.min(axis=1)))
    score_only = fit_calibration(cal_scores, cal_labels).apply(test_scores)
    qmf = fit_calibration(cal_scores, cal_labels, cal_q)
    assert qmf.features == ("score", "duration_min", "duration_max") and not qmf.monotone
    llrs = qmf.apply(test_scores, test_q)
    assert cllr(llrs, test_labels) < cllr(score_only, test_labels)
    assert eer(llrs, test_labels)[0] < eer(test_scores, test_labels)[0]  # not monotone: the order changes
    with pytest.raises(SpeakeridError, match="quality feature 'duration_min'"):
        qmf.apply(test_scores)


def test_calibration_round_trips_through_json(tmp_path):
    rng = np.random.default_rng(3)
    scores, labels, durations = cosine_like_trials(rng, 100, 400)
    q = quality_features({"norm": rng.uniform(5, 20, 2 * len(labels))}, np.arange(2 * len(labels)).reshape(-1, 2))
    calibration = fit_calibration(scores, labels, q, p_target=0.01, trials="cal.txt")
    loaded = Calibration.load(calibration.save(tmp_path / "calibration.json"))
    assert loaded == calibration and loaded.quality == ("norm",)
    np.testing.assert_array_equal(loaded.apply(scores, q), calibration.apply(scores, q))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SpeakeridError, match="not a speakerid calibration file"):
        Calibration.load(tmp_path / "bad.json")


def test_bad_calibration_input_is_named():
    with pytest.raises(SpeakeridError, match="calibration is undefined: all 3 trials are target"):
        fit_calibration([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(SpeakeridError, match="unknown quality measure 'snr'"):
        quality_features({"snr": np.ones(2)}, np.array([[0, 1]]))
    with pytest.raises(SpeakeridError, match="must be positive"):
        quality_features({"norm": np.array([1.0, 0.0])}, np.array([[0, 1]]))


# ------------------------------------------------------------------------------------ calibration trial lists


def test_calibration_trials_are_balanced_training_pairs_reproducible_by_seed(corpus, train_shards, tmp_path,
                                                                           shardify):
    result = shardify("calibration-trials", train_shards, "--out", tmp_path / "cal.txt", "--pairs", "30",
                      "--seed", "3")
    assert "30 target + 30 non-target trials of 12 training speakers (72 utterances in 3 shard(s))" in result.stderr
    trials = read_trials(tmp_path / "cal.txt")
    train_keys = {utterance_key(e.relpath) for e in read_train_list(corpus.train_list)}
    test_speakers = {speaker_of(e.relpath) for e in entries_from_trials([corpus.trials])}
    assert sum(t.label for t in trials) == 30 and len(trials) == 60
    assert {t.enroll for t in trials} | {t.test for t in trials} <= train_keys
    assert not {speaker_of(t.enroll) for t in trials} & test_speakers
    assert len({frozenset((t.enroll, t.test)) for t in trials}) == 60  # each pair once, never an utterance with itself
    for t in trials:
        assert (speaker_of(t.enroll) == speaker_of(t.test)) == (t.label == 1)
        if t.label:  # every training speaker of the corpus has several videos: targets are cross-session
            assert t.enroll.split("/")[1] != t.test.split("/")[1]
    again = make_calibration_trials(train_shards, tmp_path / "again.txt", pairs=30, seed=3)
    assert again.same_video_targets == 0
    other = make_calibration_trials(train_shards, tmp_path / "other.txt", pairs=30, seed=4)
    assert again.path.read_text() == (tmp_path / "cal.txt").read_text()
    assert other.path.read_text() != (tmp_path / "cal.txt").read_text()
    assert make_calibration_trials(train_shards, tmp_path / "one.txt", pairs=2, max_shards=1).shards_read == 1


def test_calibration_trials_refuse_what_they_cannot_draw(corpus, train_shards, tmp_path, capsys):
    assert shardify_main(["calibration-trials", str(train_shards), "--out", str(tmp_path / "cal.txt"),
                          "--pairs", "100000"]) == 2
    assert "--pairs 100000: the shards read allow" in capsys.readouterr().err
    eval_out = tmp_path / "eval"
    pack(make_plan(entries_from_trials([corpus.trials]), corpus.root, PackConfig(kind="eval")), corpus.root, eval_out)
    with pytest.raises(SpeakeridError, match="drawn from training shards"):
        make_calibration_trials(eval_out, tmp_path / "cal.txt")


def test_calibration_on_training_speakers_lowers_cllr_on_held_out_trials_of_the_built_in_corpus(corpus, train_shards,
                                                                                                tmp_path):
    # Fixed MFCC-statistics embeddings (test_synthetic's baseline, EER well below chance): the calibration list's
    # speakers are the corpus' training speakers, the test trials' are held out.
    rng = np.random.default_rng(0)
    relpaths = {utterance_key(e.relpath): e.relpath for e in read_train_list(corpus.train_list)}
    relpaths.update({utterance_key(e.relpath): e.relpath for e in entries_from_trials([corpus.trials])})
    keys = sorted(relpaths)
    stats = np.stack([mfcc_statistics(soundfile.read(str(corpus.root / relpaths[k]), dtype="int16")[0], 16000, rng)
                      for k in keys])
    stats = (stats - stats.mean(axis=0)) / stats.std(axis=0)
    embeddings = Embeddings(keys, stats.astype(np.float32))
    cal_list = TrialList("cal", tmp_path / "cal.txt",
                         read_trials(make_calibration_trials(train_shards, tmp_path / "cal.txt", pairs=120).path))
    test_list = TrialList("test", corpus.trials, read_trials(corpus.trials))
    cal_scores, test_scores = score_trials(embeddings, [cal_list, test_list])
    calibration = fit_calibration(cal_scores, cal_list.labels)
    llrs = calibration.apply(test_scores)
    labels = test_list.labels
    assert calibration.monotone
    assert cllr(llrs, labels) < cllr(test_scores, labels)
    assert cllr(llrs, labels) < 1.0
    raw, calibrated = Metrics.compute(test_scores, labels), Metrics.compute(llrs, labels)
    assert calibrated.eer == raw.eer and calibrated.min_dcf_05 == raw.min_dcf_05 and raw.eer < 40


# ------------------------------------------------------------------------------- evaluate --calibration-trials


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(tmp_path_factory.mktemp("ckpt") / "demo")


def scores_of(path) -> np.ndarray:
    return np.array([float(line.split()[0]) for line in open(path)])


def test_evaluate_calibrates_on_training_speakers_and_reports_cllr(corpus, train_shards, checkpoint, tmp_path):
    cal_path = make_calibration_trials(train_shards, tmp_path / "cal.txt", pairs=40, seed=0).path
    out = tmp_path / "out"
    common = ["--checkpoint", str(checkpoint), "--trials", str(corpus.trials), "--audio", str(corpus.root),
              "--workers", "0", "--calibration-trials", str(cal_path), "--calibration-audio", str(train_shards)]
    assert evaluate_main([*common, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    result = summary["lists"][0]
    labels = np.array([t.label for t in read_trials(corpus.trials)])
    raw = scores_of(out / "scores-trials.txt")
    llrs = scores_of(out / "llr-trials.txt")
    calibration = Calibration.load(out / "calibration.json")
    assert calibration.features == ("score",) and calibration.n_target == calibration.n_nontarget == 40
    # the files' six decimals, times the slope (an untrained model's cosine scores crowd near 1: a steep map)
    np.testing.assert_allclose(llrs, calibration.apply(raw), atol=2e-6 * abs(calibration.weights[0]) + 2e-6)
    cal = result["calibrated"]
    assert cal["cllr"] == pytest.approx(cllr(llrs, labels), abs=1e-3)
    assert cal["cllr"] < cllr(raw, labels)  # raw cosine scores are poor LLRs; held-out speakers, calibrated: better
    assert summary["calibration"]["monotone"] == (calibration.weights[0] > 0)
    if calibration.monotone:  # the untrained demo model's scores carry no information: the fitted slope may be < 0
        assert cal["eer"] == result["metrics"]["eer"]
    assert cal["min_cllr"] == pytest.approx(result["min_cllr"], abs=1e-3) or not calibration.monotone
    assert summary["calibration"]["trials"] == str(tmp_path / "cal.txt")

    # a fitted calibration applies again, to the scores it was fitted for only
    base = ["--checkpoint", str(checkpoint), "--trials", str(corpus.trials), "--audio", str(corpus.root), "--workers",
            "0", "--cache", str(out / "embeddings.safetensors")]
    assert evaluate_main([*base, "--out", str(tmp_path / "again"), "--calibration", str(out / "calibration.json")]) == 0
    assert (tmp_path / "again" / "llr-trials.txt").read_text() == (out / "llr-trials.txt").read_text()
    other = json.loads((out / "calibration.json").read_text())
    other["scoring"]["normalisation"] = "AS-Norm (top 300 of 2000 cohort speakers)"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SpeakeridError, match="other.json was fitted on other scores \\(normalisation differ"):
        run_command(checkpoint=str(checkpoint), audio=str(corpus.root), trials=[str(corpus.trials)],
                    out=str(tmp_path / "other"), embed_only=False, audio_list=None, model=None, loss=None, options=[],
                    cache=str(out / "embeddings.safetensors"), no_cache=False, workers=0,
                    calibration=str(tmp_path / "other.json"))
    assert set(cal["actual_dcf"]) == {"p_target_0.05", "p_target_0.01"}
    embeddings, _ = Embeddings.load(out / "calibration-embeddings.safetensors")
    cal_trials = read_trials(cal_path)
    assert len(embeddings.keys) == len({t.enroll for t in cal_trials} | {t.test for t in cal_trials})

    qmf_out = tmp_path / "qmf"
    assert evaluate_main([*common, "--out", str(qmf_out), "--quality", "duration", "norm"]) == 0
    qmf = Calibration.load(qmf_out / "calibration.json")
    assert qmf.features == ("score", "duration_min", "duration_max", "norm_min", "norm_max")
    assert not json.loads((qmf_out / "summary.json").read_text())["calibration"]["monotone"]

    # the calibration audio can also be a folder (or eval shards) the list's relative paths name
    folder = [a if a != str(train_shards) else str(corpus.root) for a in common]
    folder[folder.index(str(cal_path))] = str(corpus.trials)
    assert evaluate_main([*folder, "--out", str(out)]) == 0
    assert Calibration.load(out / "calibration.json").trials == str(corpus.trials)


def test_calibration_options_are_checked_before_any_audio(corpus, checkpoint, tmp_path, capsys):
    common = ["--checkpoint", str(checkpoint), "--trials", str(corpus.trials), "--audio", str(corpus.root),
              "--out", str(tmp_path)]
    assert evaluate_main([*common, "--calibration-trials", str(corpus.trials)]) == 2
    assert "--calibration-trials needs --calibration-audio" in capsys.readouterr().err
    assert evaluate_main([*common, "--quality", "norm"]) == 2
    assert "give --calibration-trials LIST" in capsys.readouterr().err
    assert evaluate_main([*common, "--calibration", str(corpus.trials), "--quality", "norm"]) == 2
    assert "give one or the other" in capsys.readouterr().err
    assert evaluate_main([*common, "--calibration", str(corpus.trials)]) == 2
    assert "cannot read the calibration" in capsys.readouterr().err
    assert evaluate_main([*common, "--calibration-trials", str(corpus.trials), "--calibration-audio",
                          str(tmp_path / "nowhere")]) == 2
    assert "nowhere: --calibration-audio must be the training shards" in capsys.readouterr().err
    assert not (tmp_path / "embeddings.safetensors").exists()  # refused before any audio was read
