"""The Python API (speakerid.load_model → embed, score, verify, score_trials) against what `python -m evaluate`
computes for the same checkpoint and audio: real checkpoints, real wav/flac files, real eval shards."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO
from scipy.signal import resample_poly
from test_evaluation import eval_shards, save  # noqa: F401  (eval_shards: a fixture used here)

import speakerid
from speakerid.data.lists import read_trials, utterance_key
from speakerid.errors import SpeakeridError
from speakerid.evaluation import Calibration, Embeddings, ExtractConfig, evaluate, trim_length
from speakerid.evaluation.calibration import CalibrationConfig
from speakerid.inference import load_inference_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(tmp_path_factory.mktemp("api") / "demo")


@pytest.fixture(scope="module")
def evaluated(corpus, checkpoint, tmp_path_factory):
    """evaluate() on the built-in trial list, with a calibration fitted on the same list (scores, llrs, cache)."""
    out = tmp_path_factory.mktemp("evaluated")
    evaluate(load_inference_checkpoint(checkpoint), [corpus.trials], corpus.root, out, ExtractConfig(workers=0),
             calibration=CalibrationConfig(calibration_trials=str(corpus.trials), calibration_audio=str(corpus.root)))
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    return speakerid.load_model(checkpoint, device="cpu")


def column(path) -> np.ndarray:
    return np.array([float(line.split()[0]) for line in open(path)])


def test_import_speakerid_stays_cheap_and_load_model_is_there():
    code = ("import sys, speakerid; assert 'torch' not in sys.modules and 'speakerid.api' not in sys.modules; "
            "assert callable(speakerid.load_model) and 'speakerid.api' in sys.modules; "
            "assert speakerid.SpeakerModel.__name__ == 'SpeakerModel'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_embeddings_and_scores_are_evaluates(corpus, evaluated, model):
    cached, _ = Embeddings.load(evaluated / "embeddings.safetensors")
    trials = read_trials(corpus.trials)
    relpaths = sorted({t.enroll for t in trials} | {t.test for t in trials})
    files = [corpus.root / rel for rel in relpaths]
    batched = model.embed(files)
    assert batched.shape == (len(files), model.embedding_dim) and batched.dtype == torch.float32
    np.testing.assert_allclose(batched.numpy(), cached.rows([utterance_key(r) for r in relpaths])[:, 0],
                               rtol=1e-4, atol=1e-5)
    # batching never changes a result: some utterances share a trimmed length (a batch), and each alone agrees
    assert len({trim_length(soundfile.info(str(f)).frames, 0.02) for f in files}) < len(files)
    for row, path in enumerate(files):
        torch.testing.assert_close(model.embed(path), batched[row], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.embed(files, batch_size=1), batched, rtol=1e-4, atol=1e-5)
    # an array is embedded as the file it came from: soundfile's floats and int16 alike, numpy or torch
    floats, rate = soundfile.read(str(files[0]))
    torch.testing.assert_close(model.embed(floats, sample_rate=rate), batched[0], rtol=1e-4, atol=1e-5)
    ints, _ = soundfile.read(str(files[0]), dtype="int16")
    torch.testing.assert_close(model.embed(torch.from_numpy(ints), sample_rate=rate), batched[0], rtol=1e-4, atol=1e-5)

    scores = model.score_trials(corpus.trials, audio=corpus.root)
    expected = column(evaluated / f"scores-{corpus.trials.stem}.txt")
    assert scores.shape == (len(trials),)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    first = trials[0]
    assert model.score(corpus.root / first.enroll, corpus.root / first.test) == pytest.approx(expected[0], abs=1e-5)


def test_score_trials_reads_eval_shards(corpus, eval_shards, evaluated, model):  # noqa: F811
    expected = column(evaluated / f"scores-{corpus.trials.stem}.txt")
    np.testing.assert_allclose(model.score_trials(corpus.trials, audio=eval_shards), expected, atol=1e-5)
    np.testing.assert_allclose(model.score_trials(corpus.trials, audio=eval_shards / "index.json"), expected,
                               atol=1e-5)


def test_a_folder_embeds_to_a_dict_by_relative_path(corpus, model, tmp_path):
    sources = sorted(corpus.root.rglob("*.wav"))[:3]
    (tmp_path / "audio" / "sub").mkdir(parents=True)
    shutil.copy(sources[0], tmp_path / "audio" / "b.wav")
    shutil.copy(sources[1], tmp_path / "audio" / "sub" / "a.wav")
    samples, rate = soundfile.read(str(sources[2]), dtype="int16")
    soundfile.write(str(tmp_path / "audio" / "a.flac"), samples, rate)
    (tmp_path / "audio" / "notes.txt").write_text("not audio")
    found = model.embed(tmp_path / "audio")
    assert list(found) == ["a.flac", "b.wav", "sub/a.wav"]
    for rel, source in zip(["b.wav", "sub/a.wav", "a.flac"], sources):
        torch.testing.assert_close(found[rel], model.embed(source), rtol=1e-4, atol=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpeakeridError, match=r"empty: no audio files \(.wav"):
        model.embed(tmp_path / "empty")


def test_model_describes_itself(checkpoint, model):
    assert model.embedding_dim == 32 and model.sample_rate == 16000 and model.device == torch.device("cpu")
    assert repr(model) == (f"SpeakerModel(ResNetSE34L, embedding_dim=32, sample_rate=16000, device='cpu', "
                           f"source={str(checkpoint)!r})")
    if not torch.cuda.is_available():
        with pytest.raises(SpeakeridError, match="sees no CUDA GPU; use device='cpu'"):
            speakerid.load_model(checkpoint, device="cuda")
    with pytest.raises(SpeakeridError, match="not a device"):
        speakerid.load_model(checkpoint, device="gpu0")


def test_verify_decides_with_the_checkpoints_calibration_or_a_threshold(corpus, checkpoint, evaluated, model, tmp_path):
    trials = read_trials(corpus.trials)
    a, b = corpus.root / trials[0].enroll, corpus.root / trials[0].test
    score = model.score(a, b)
    assert model.verify(a, b, threshold=score - 0.01) and not model.verify(a, b, threshold=score + 0.01)
    with pytest.raises(SpeakeridError, match="no calibration to decide with.*calibration-trials.*calibration="):
        model.verify(a, b)

    calibration = Calibration.load(evaluated / "calibration.json")
    expected_llr = column(evaluated / f"llr-{corpus.trials.stem}.txt")[0]
    bayes = -math.log(calibration.p_target / (1 - calibration.p_target))
    inside = tmp_path / "calibrated"
    shutil.copytree(checkpoint, inside)
    shutil.copy(evaluated / "calibration.json", inside / "calibration.json")
    for calibrated in (speakerid.load_model(inside, device="cpu"),  # found in the checkpoint directory
                       speakerid.load_model(checkpoint, device="cpu", calibration=evaluated / "calibration.json")):
        assert calibrated.llr(a, b) == pytest.approx(expected_llr, abs=1e-4)
        assert calibrated.bayes_threshold == pytest.approx(bayes)
        assert calibrated.verify(a, b) == (expected_llr > bayes)
        assert calibrated.verify(a, b, threshold=score + 0.01) is False  # a threshold given wins
        assert "calibration=" in repr(calibrated)

    other = tmp_path / "other"
    save(other, seed=1)
    shutil.copy(evaluated / "calibration.json", other / "calibration.json")
    with pytest.raises(SpeakeridError, match="was fitted on other scores \\(weights_sha256 differ"):
        speakerid.load_model(other, device="cpu").verify(a, b)
    with pytest.raises(SpeakeridError, match="calibration='nope.json': no such file"):
        speakerid.load_model(checkpoint, calibration="nope.json")


def test_verify_computes_the_quality_measures_its_calibration_needs(corpus, checkpoint, evaluated, model, tmp_path):
    out = tmp_path / "qmf"
    out.mkdir()
    shutil.copy(evaluated / "embeddings.safetensors", out)  # evaluate reuses it: the same checkpoint and audio
    evaluate(load_inference_checkpoint(checkpoint), [corpus.trials], corpus.root, out, ExtractConfig(workers=0),
             calibration=CalibrationConfig(calibration_trials=str(corpus.trials), calibration_audio=str(corpus.root),
                                           quality=("duration", "norm")))
    calibrated = speakerid.load_model(checkpoint, device="cpu", calibration=out / "calibration.json")
    assert calibrated.calibration.quality == ("duration", "norm")
    llrs = column(out / f"llr-{corpus.trials.stem}.txt")
    tolerance = 1e-4 * (1 + sum(map(abs, calibrated.calibration.weights)))  # embeddings agree to ~1e-5, not exactly
    for trial, expected in list(zip(read_trials(corpus.trials), llrs))[:3]:
        llr = calibrated.llr(corpus.root / trial.enroll, corpus.root / trial.test)
        assert llr == pytest.approx(expected, abs=tolerance)


def test_other_rates_are_resampled_and_channels_averaged_with_one_warning_each(corpus, model, tmp_path):
    source = sorted(corpus.root.rglob("*.wav"))[0]
    samples, rate = soundfile.read(str(source), dtype="int16")
    low = np.clip(np.round(resample_poly(samples.astype(np.float64), 1, 2)), -32768, 32767).astype(np.int16)
    soundfile.write(str(tmp_path / "low.wav"), low, 8000)
    with pytest.warns(UserWarning, match=r"low.wav: resampled from 8000 Hz to the model's 16000 Hz"):
        resampled = model.embed(tmp_path / "low.wav")
    back = np.clip(np.round(resample_poly(low.astype(np.float64), 2, 1)), -32768, 32767).astype(np.int16)
    torch.testing.assert_close(resampled, model.embed(back, sample_rate=16000), rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per rate: the second file at 8 kHz is quiet
        model.embed(low, sample_rate=8000)

    stereo = np.stack([samples, (samples // 2)], axis=1)
    soundfile.write(str(tmp_path / "stereo.wav"), stereo, rate)
    with pytest.warns(UserWarning, match="stereo.wav: 2 channels averaged to one"):
        averaged = model.embed(tmp_path / "stereo.wav")
    mean = np.round(stereo.astype(np.float64).mean(axis=1)).astype(np.int16)
    torch.testing.assert_close(averaged, model.embed(mean, sample_rate=rate), rtol=1e-4, atol=1e-5)


def test_bad_input_is_one_clear_error_naming_it(corpus, checkpoint, model, tmp_path):
    wav = sorted(corpus.root.rglob("*.wav"))[0]
    with pytest.raises(SpeakeridError, match=f"{wav}: not a speakerid checkpoint.*speakerid.json and "
                                             "model.safetensors.*model='ResNetSE34L'"):
        speakerid.load_model(wav)
    with pytest.raises(SpeakeridError, match=f"{tmp_path}: neither a speakerid checkpoint"):
        speakerid.load_model(tmp_path)
    with pytest.raises(SpeakeridError, match="nowhere: no such checkpoint"):
        speakerid.load_model(tmp_path / "nowhere")
    with pytest.raises(SpeakeridError, match="describes its own model; model=, nOut= name the architecture of a "
                                             "voxceleb_trainer .model file only"):
        speakerid.load_model(checkpoint, model="ResNetSE34L", nOut=32)

    soundfile.write(str(tmp_path / "empty.wav"), np.zeros(0, np.int16), 16000)
    with pytest.raises(SpeakeridError, match="empty.wav: no audio samples"):
        model.embed(tmp_path / "empty.wav")
    with pytest.raises(SpeakeridError, match=r"array of shape \(0,\): no audio samples"):
        model.embed(np.zeros(0, np.float32), sample_rate=16000)
    soundfile.write(str(tmp_path / "silent.wav"), np.zeros(32000, np.int16), 16000)
    with pytest.raises(SpeakeridError, match="silent.wav: silent \\(every sample is zero\\)"):
        model.score(wav, tmp_path / "silent.wav")
    soundfile.write(str(tmp_path / "short.wav"), np.ones(800, np.int16), 16000)
    with pytest.raises(SpeakeridError, match="short.wav has 800 samples; at least 1600"):
        model.embed(tmp_path / "short.wav")
    with pytest.raises(SpeakeridError, match="missing.wav: no such audio file"):
        model.embed(tmp_path / "missing.wav")
    noise = np.random.default_rng(0).standard_normal(16000)
    with pytest.raises(SpeakeridError, match=r"pass its sample_rate= \(the model was trained at 16000 Hz\)"):
        model.embed(noise)
    with pytest.raises(SpeakeridError, match=r"float samples reach .*outside \[-1, 1\]"):
        model.embed(noise * 1000, sample_rate=16000)
    with pytest.raises(SpeakeridError, match=r"shape \(2, 16000\): give one channel as a 1-D array"):
        model.embed(np.stack([noise, noise]) * 0.1, sample_rate=16000)
    with pytest.raises(SpeakeridError, match="cannot embed a int"):
        model.embed(3)
    with pytest.raises(SpeakeridError, match="the list is empty"):
        model.embed([])
    with pytest.raises(SpeakeridError, match="utterances are not in"):
        model.score_trials(corpus.trials, audio=tmp_path)
    (tmp_path / "trials.txt").write_text("1 a.wav\n")
    with pytest.raises(SpeakeridError, match="trials.txt"):
        model.score_trials(tmp_path / "trials.txt", audio=corpus.root)


def test_a_voxceleb_trainer_model_file_loads_with_its_architecture_named(tmp_path, corpus, model):
    from test_evaluation import demo_model

    path = tmp_path / "baseline.model"
    torch.save({f"__S__.{k}": v for k, v in demo_model().state_dict().items()}, path)
    seed = speakerid.load_model(path, device="cpu", model="ResNetSE34L", loss="angleproto", nOut=32)
    wav = sorted(corpus.root.rglob("*.wav"))[0]
    torch.testing.assert_close(seed.embed(wav), model.embed(wav), rtol=1e-4, atol=1e-5)
    assert json.dumps(seed.loaded.meta["model"]) == json.dumps(model.loaded.meta["model"])


def test_the_example_of_docs_python_api_runs(corpus, checkpoint, evaluated, tmp_path, monkeypatch):
    text = (REPO / "docs" / "python-api.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    trials = read_trials(corpus.trials)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(corpus.root, tmp_path / "wav")
    shutil.copy(corpus.trials, tmp_path / "veri_test2.txt")
    shutil.copy(corpus.root / trials[0].enroll, tmp_path / "a.wav")
    shutil.copy(corpus.root / trials[0].test, tmp_path / "b.wav")
    shutil.copytree(checkpoint, tmp_path / "runs" / "resnet34")
    shutil.copy(evaluated / "calibration.json", tmp_path / "runs" / "resnet34")  # verify decides with it
    namespace: dict = {}
    exec(compile(example, "docs/python-api.md", "exec"), namespace)
    assert namespace["e"].shape == (32,) and namespace["scores"].shape == (len(trials),)


def test_the_seeds_crop_protocol_is_evaluates_eval_frames(corpus, tmp_path):
    checkpoint = save(tmp_path / "proto", loss="proto")  # proto scores crops without L2-normalising them
    out = tmp_path / "crops"
    settings = ExtractConfig(eval_frames=20, num_eval=3, workers=0)
    evaluate(load_inference_checkpoint(checkpoint), [corpus.trials], corpus.root, out, settings)
    model = speakerid.load_model(checkpoint, device="cpu", eval_frames=20, num_eval=3)
    assert model.crops and "eval_frames=20, num_eval=3" in repr(model)
    cached, _ = Embeddings.load(out / "embeddings.safetensors")
    trial = read_trials(corpus.trials)[0]
    embedding = model.embed(corpus.root / trial.enroll)
    assert embedding.shape == (3, 32)
    np.testing.assert_allclose(embedding.numpy(), cached.rows([utterance_key(trial.enroll)])[0], rtol=1e-4, atol=1e-5)
    expected = column(out / f"scores-{corpus.trials.stem}.txt")
    np.testing.assert_allclose(model.score_trials(corpus.trials, audio=corpus.root), expected, atol=1e-5)
    assert model.score(corpus.root / trial.enroll, corpus.root / trial.test) == pytest.approx(expected[0], abs=1e-5)
    whole = speakerid.load_model(checkpoint, device="cpu").score(corpus.root / trial.enroll, corpus.root / trial.test)
    assert whole != pytest.approx(expected[0], abs=1e-3)  # the protocol does change the score
