"""Inference checkpoints and `python -m evaluate`: real files, real shards, real processes.

EER/minDCF against a slow reference live in test_metrics.py and AS-Norm against a direct formula in
test_scoring.py; here we check that evaluation wires them up: extraction, cache, processes, options, errors.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO, run_module

from evaluate.__main__ import main as evaluate_main
from speakerid.data.eval_reader import eval_crops
from speakerid.data.lists import entries_from_trials, read_train_list, read_trials, utterance_key
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.errors import SpeakeridError
from speakerid.evaluation import (GRID_START, Embedder, Embeddings, ExtractConfig, ScoreConfig, evaluate,
                                  speaker_means, trim_length)
from speakerid.features import int16_to_float
from speakerid.inference import load_inference_checkpoint, save_inference_checkpoint
from speakerid.models import build_model
from speakerid.evaluation.scoring import as_norm, cosine_scores, crop_scores, subtract_mean

OPTIONS = {"n_out": 32}
FAST = ["--workers", "0"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the test machine's cores are shared: spinning OpenMP threads crawl


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def demo_model(seed: int = 0) -> torch.nn.Module:
    """A small ResNetSE34L whose BatchNorm statistics are not the identity (an untrained 'demo' checkpoint)."""
    torch.manual_seed(seed)
    model = build_model("ResNetSE34L", **OPTIONS)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif key.endswith("running_mean"):
                tensor.normal_(0, 0.1)
    return model.eval()


def save(directory, seed: int = 0, loss: str = "angleproto"):
    return save_inference_checkpoint(directory, demo_model(seed), model_name="ResNetSE34L", model_options=OPTIONS,
                                     loss_name=loss, speakers={"id00001": 0, "id00002": 1}, extra={"epoch": 3})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(tmp_path_factory.mktemp("ckpt") / "demo")


@pytest.fixture(scope="module")
def eval_shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "shards"
    pack(make_plan(entries_from_trials([corpus.trials]), corpus.root, PackConfig(kind="eval", max_utts=5)),
         corpus.root, out)
    return out


@pytest.fixture(scope="module")
def tree_run(corpus, checkpoint, tmp_path_factory):
    """One `python -m evaluate` on the audio folder, as a user runs it."""
    out = tmp_path_factory.mktemp("tree_run")
    result = run_module("evaluate", "--checkpoint", checkpoint, "--trials", corpus.trials, "--audio", corpus.root,
                        "--out", out, *FAST, env=ONE_THREAD)
    return out, result


def scores_of(path) -> np.ndarray:
    return np.array([float(line.split()[0]) for line in open(path)])


def summary_of(out) -> dict:
    return json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_describes_itself(tmp_path):
    model = demo_model()
    directory = save(tmp_path / "ckpt")
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors", "speakerid.json"]
    loaded = load_inference_checkpoint(directory)
    meta = loaded.meta
    assert meta["format"] == "speakerid-inference" and meta["version"] == 1
    assert meta["model"] == {"name": "ResNetSE34L", "options": OPTIONS}
    assert meta["loss"] == {"name": "angleproto", "test_normalize": True}
    assert meta["embedding_dim"] == 32 and meta["speakers"] == {"id00001": 0, "id00002": 1}
    assert meta["extra"] == {"epoch": 3} and meta["sample_rate"] == 16000
    assert not loaded.model.training and loaded.test_normalize and len(loaded.fingerprint) == 64
    x = torch.randn(2, 24000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    assert load_inference_checkpoint(tmp_path / "ckpt" / "speakerid.json").fingerprint == loaded.fingerprint
    # proto does not normalise at test time (the seed's test_normalize), and the checkpoint says so
    assert not load_inference_checkpoint(save(tmp_path / "proto", loss="proto")).test_normalize


class Wrapper(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_saving_leaves_a_training_model_alone(tmp_path):
    model = demo_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = Wrapper(model)  # as DDP holds it: the bare module's keys are saved
    save_inference_checkpoint(tmp_path / "c", wrapped, model_name="ResNetSE34L", model_options=OPTIONS,
                              loss_name="softmax")
    assert model.training
    assert load_inference_checkpoint(tmp_path / "c").meta["loss"]["name"] == "softmax"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])  # BatchNorm statistics untouched by the probe forward
    assert not list(tmp_path.glob("c/.*tmp*"))


def test_run_directory_uses_its_export_or_says_what_is_missing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: ResNetSE34L}\n")
    with pytest.raises(SpeakeridError, match=r"training run directory without an inference export: .*export/speakerid.json"):
        load_inference_checkpoint(run)
    save(run / "export", seed=3)
    assert load_inference_checkpoint(run).fingerprint == load_inference_checkpoint(run / "export").fingerprint
    with pytest.raises(SpeakeridError, match="neither a speakerid checkpoint"):
        load_inference_checkpoint(tmp_path)


def test_config_and_weights_that_do_not_match_name_the_keys(tmp_path):
    directory = save(tmp_path / "ckpt")
    meta = json.loads((directory / "speakerid.json").read_text())
    meta["model"]["options"] = {"n_out": 64}
    (directory / "speakerid.json").write_text(json.dumps(meta))
    with pytest.raises(SpeakeridError, match=r"shape mismatch: fc.weight: file \(32, 128\), model ResNetSE34L"):
        load_inference_checkpoint(directory)

    directory = save(tmp_path / "ckpt2")
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(SpeakeridError, match="does not match"):  # the JSON records the weights' sha256
        load_inference_checkpoint(directory)
    meta = json.loads((directory / "speakerid.json").read_text())
    meta.pop("weights_sha256")
    (directory / "speakerid.json").write_text(json.dumps(meta))
    with pytest.raises(SpeakeridError, match=r"1 missing: fc.bias; 1 unexpected: extra.weight"):
        load_inference_checkpoint(directory)


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_voxceleb_trainer_model_files(tmp_path, corpus):
    model = demo_model(seed=5)
    path = tmp_path / "baseline.model"
    torch.save({f"__S__.{k}": v for k, v in model.state_dict().items()}, path)
    loaded = load_inference_checkpoint(path, model="ResNetSE34L", loss="proto", options={"nOut": 32})
    x = torch.randn(1, 20000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    assert loaded.test_normalize is False and loaded.meta["model"]["options"] == {"n_out": 32}
    with pytest.raises(SpeakeridError, match="does not record its architecture; name it with --model"):
        load_inference_checkpoint(path)
    # the CLI: a pickle that would run code is refused with torch's reason, and nothing runs
    marker = tmp_path / "pwned"
    torch.save({"__S__.conv1.weight": torch.zeros(1), "hook": Payload(marker)}, tmp_path / "evil.model")
    result = run_module("evaluate", "--checkpoint", tmp_path / "evil.model", "--model", "ResNetSE34L",
                        "--option", "nOut=32", "--trials", corpus.trials, "--audio", corpus.root, check=False,
                        env=ONE_THREAD)
    assert result.returncode == 2
    assert "refused by torch.load(weights_only=True)" in result.stderr and "Unsupported global" in result.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- extraction


def test_trim_grid_loses_at_most_the_tolerance_and_depends_on_the_length_alone():
    rng = np.random.default_rng(0)
    for n in [*rng.integers(GRID_START, 16000 * 150, 2000), GRID_START, GRID_START + 1]:
        t = trim_length(int(n), 0.02)
        assert n * 0.98 <= t <= n
        assert trim_length(t, 0.02) == t  # a grid point
    assert trim_length(5000, 0.02) == 5000 and trim_length(123456, 0.0) == 123456
    lengths = {trim_length(int(n), 0.02) for n in range(4 * 16000, 20 * 16000, 97)}
    assert len(lengths) < 90  # 4–20 s fall on few grid lengths: that is what makes batches


def test_batched_embeddings_equal_one_forward_per_trimmed_utterance():
    model = demo_model()
    config = ExtractConfig(batch_seconds=30, channels_last=False)
    embedder = Embedder(model, torch.device("cpu"), config)
    rng = np.random.default_rng(1)
    audio = {f"u{i}": (rng.standard_normal(n) * 3000).astype(np.int16)
             for i, n in enumerate([40000, 40100, 40500, 40800, 41000, 52000, 9000])}
    from speakerid.evaluation import prepare_item

    got = {}
    for key, samples in audio.items():
        for keys, values in embedder.add(key, prepare_item(key, samples, config)):
            got.update(zip(keys, values))
    for keys, values in embedder.flush():
        got.update(zip(keys, values))
    batch_sizes = {trim_length(len(a), 0.02) for a in audio.values()}
    assert len(batch_sizes) < len(audio)  # some utterances did share a batch
    with torch.no_grad():
        for key, samples in audio.items():
            trimmed = samples[:trim_length(len(samples), 0.02)]
            alone = model(int16_to_float(torch.from_numpy(trimmed)[None]))[0].numpy()
            np.testing.assert_allclose(got[key][0], alone, rtol=1e-4, atol=1e-5)
    # crops: (B, C, L) runs as (B·C, L) and equals a forward of each utterance's crops
    crop_config = ExtractConfig(eval_frames=20, num_eval=3, channels_last=False)
    batched = Embedder(model, torch.device("cpu"), crop_config).forward(
        torch.from_numpy(np.stack([eval_crops(a, 20, 3) for a in list(audio.values())[:3]])))
    with torch.no_grad():
        for row, samples in enumerate(list(audio.values())[:3]):
            alone = model(int16_to_float(torch.from_numpy(eval_crops(samples, 20, 3)))).numpy()
            np.testing.assert_allclose(batched[row], alone, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- the CLI


def test_audio_tree_and_eval_shards_give_the_same_eer(corpus, eval_shards, checkpoint, tree_run, tmp_path):
    tree_out, result = tree_run
    assert "EER %" in result.stdout and "trials" in result.stdout
    shards_out = tmp_path / "shards_run"
    run_module("evaluate", "--checkpoint", checkpoint, "--trials", corpus.trials, "--audio", eval_shards,
               "--out", shards_out, "--workers", "1", env=ONE_THREAD)
    a, b = summary_of(tree_out), summary_of(shards_out)
    assert a["lists"][0]["metrics"]["eer"] == b["lists"][0]["metrics"]["eer"]
    assert a["lists"][0]["trials"] == b["lists"][0]["trials"] == corpus.n_trials
    np.testing.assert_allclose(scores_of(tree_out / "scores-trials.txt"), scores_of(shards_out / "scores-trials.txt"),
                               atol=1e-5)
    lines = (tree_out / "scores-trials.txt").read_text().splitlines()
    trials = read_trials(corpus.trials)
    assert [line.split()[1:] for line in lines] == [[t.enroll, t.test] for t in trials]  # "score enroll test"
    assert a["extraction"]["embedded"] == 16 and a["protocol"]["whole_utterances"]
    assert set(a["lists"][0]["actual_dcf"]) == {"threshold", "p_target_0.05", "p_target_0.01"}
    try:
        import matplotlib  # noqa: F401

        assert (tree_out / "det.png").stat().st_size > 0
    except ImportError:
        assert a["det"] is None and "DET curve skipped" in result.stderr


def test_cache_is_reused_and_invalidated_by_another_checkpoint(corpus, checkpoint, tree_run, tmp_path):
    tree_out, _ = tree_run
    cache = tmp_path / "cache.safetensors"
    (tmp_path / "cache.safetensors").write_bytes((tree_out / "embeddings.safetensors").read_bytes())
    loaded = load_inference_checkpoint(checkpoint)
    report = evaluate(loaded, [corpus.trials], corpus.root, tmp_path / "again", ExtractConfig(workers=0), cache=cache)
    assert report.extraction.embedded == 0 and report.extraction.from_cache == 16
    np.testing.assert_array_equal(scores_of(tmp_path / "again" / "scores-trials.txt"),
                                  scores_of(tree_out / "scores-trials.txt"))
    other = load_inference_checkpoint(save(tmp_path / "other", seed=9))
    report = evaluate(other, [corpus.trials], corpus.root, tmp_path / "other_out", ExtractConfig(workers=0), cache=cache)
    assert report.extraction.embedded == 16 and "checkpoint changed" in report.extraction.cache_note
    report = evaluate(other, [corpus.trials], corpus.root, tmp_path / "other_out", ExtractConfig(workers=0,
                      trim_tolerance=0.05), cache=cache)
    assert report.extraction.embedded == 16 and "settings changed (trim_tolerance)" in report.extraction.cache_note
    # a second list sharing utterances embeds only what the cache lacks (here: nothing)
    half = tmp_path / "half.txt"
    half.write_text("".join(open(corpus.trials).readlines()[:20]))
    report = evaluate(other, [corpus.trials, half], corpus.root, tmp_path / "other_out",
                      ExtractConfig(workers=0, trim_tolerance=0.05), cache=cache)
    assert report.extraction.embedded == 0 and [r.n_trials for r in report.lists] == [40, 20]


def test_cache_is_keyed_by_the_audio_not_by_relative_paths(corpus, checkpoint, tree_run, tmp_path):
    tree_out, _ = tree_run
    other = tmp_path / "other_audio"  # the same relative paths holding other audio: each file gets another's
    files = sorted(corpus.root.rglob("*.wav"))
    for path, donor in zip(files, files[7:] + files[:7]):
        (other / path.relative_to(corpus.root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(donor, other / path.relative_to(corpus.root))
    cache = tmp_path / "cache.safetensors"
    cache.write_bytes((tree_out / "embeddings.safetensors").read_bytes())
    loaded = load_inference_checkpoint(checkpoint)
    report = evaluate(loaded, [corpus.trials], other, tmp_path / "b", ExtractConfig(workers=0), cache=cache)
    assert report.extraction.embedded == 16 and "holds embeddings of other audio" in report.extraction.cache_note
    fresh = evaluate(loaded, [corpus.trials], other, tmp_path / "fresh", ExtractConfig(workers=0), cache=None)
    assert report.lists[0].metrics.eer == fresh.lists[0].metrics.eer
    assert not np.allclose(scores_of(tmp_path / "b" / "scores-trials.txt"), scores_of(tree_out / "scores-trials.txt"))
    again = evaluate(loaded, [corpus.trials], other, tmp_path / "b", ExtractConfig(workers=0), cache=cache)
    assert again.extraction.embedded == 0 and again.extraction.cache_note == f"reused {cache}"
    # one file rewritten in place (a new size or mtime): that utterance alone is embedded again
    trial = read_trials(corpus.trials)[0]
    shutil.copyfile(corpus.root / trial.test, other / trial.enroll)
    changed = evaluate(loaded, [corpus.trials], other, tmp_path / "b", ExtractConfig(workers=0), cache=cache)
    assert changed.extraction.embedded == 1 and "1 utterance(s) whose audio changed" in changed.extraction.cache_note
    donor = Embeddings.load(tree_out / "embeddings.safetensors")[0]
    np.testing.assert_allclose(Embeddings.load(cache)[0].rows([utterance_key(trial.enroll)]),
                               donor.rows([utterance_key(trial.test)]), atol=1e-5)


def dead_pid() -> int:
    """The PID of a process that has exited (as a writer killed by a job's time limit has)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_temporaries_of_a_killed_run_are_removed_by_the_next(corpus, checkpoint, tree_run, tmp_path):
    tree_out, _ = tree_run
    out, export = tmp_path / "out", tmp_path / "export"
    out.mkdir()
    shutil.copyfile(tree_out / "embeddings.safetensors", out / "embeddings.safetensors")
    dead = dead_pid()
    stale = [out / f".{name}.tmp-{dead}" for name in ("embeddings.safetensors", "scores-trials.txt", "summary.json")]
    stale += [out / f".det.tmp-{dead}.png", tmp_path / f".cohort-cache.safetensors.tmp-{dead}",
              tmp_path / f".cache.safetensors.tmp-{dead}", tmp_path / f".e.safetensors.tmp-{dead}"]
    stale += [export / f".model.safetensors.tmp-{dead}", export / f".speakerid.json.tmp-{dead}"]
    with subprocess.Popen(["sleep", "120"]) as writer:  # a live writer's temporary stays
        live = out / f".scores-trials.txt.tmp-{writer.pid}"
        other = out / f".notes.txt.tmp-{dead}"  # not an output of evaluate: not its to remove
        export.mkdir()
        for path in stale + [live, other]:
            path.write_bytes(b"half written")
        loaded = load_inference_checkpoint(checkpoint)
        report = evaluate(loaded, [corpus.trials], corpus.root, out, ExtractConfig(workers=0))
        assert report.extraction.from_cache == 16
        evaluate(loaded, [corpus.trials], corpus.root, out, ExtractConfig(workers=0), cache=tmp_path / "cache.safetensors")
        listed = tmp_path / "one.txt"
        listed.write_text(corpus.test_list.read_text().split()[0] + "\n")
        assert evaluate_main(["--embed", "--checkpoint", str(checkpoint), "--audio", str(corpus.root), "--list",
                              str(listed), "--out", str(tmp_path / "e.safetensors"), *FAST]) == 0
        save(export)
        assert live.exists() and other.exists()
        writer.kill()
    assert [p for p in stale if p.exists()] == []
    assert (out / "scores-trials.txt").exists() and (export / "model.safetensors").exists()


def test_two_processes_give_the_scores_of_one(corpus, checkpoint, tree_run, tmp_path):
    tree_out, _ = tree_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "-m", "evaluate",
         "--checkpoint", str(checkpoint), "--trials", str(corpus.trials), "--audio", str(corpus.root),
         "--out", str(tmp_path), "--workers", "0"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    summary = summary_of(tmp_path)
    assert summary["processes"] == 2 and summary["extraction"]["embedded"] == 16
    np.testing.assert_allclose(scores_of(tmp_path / "scores-trials.txt"), scores_of(tree_out / "scores-trials.txt"),
                               atol=1e-5)
    assert launched.stdout.count("EER %") == 1  # one table, from the main process


@pytest.fixture(scope="module")
def train_shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "shards"
    plan = make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(kind="train", chunk_size=2, max_utts=24))
    pack(plan, corpus.root, out)
    return out


def test_the_cli_applies_mean_subtraction_and_as_norm(corpus, checkpoint, train_shards, tmp_path):
    code = evaluate_main(["--checkpoint", str(checkpoint), "--trials", str(corpus.trials), "--audio", str(corpus.root),
                          "--out", str(tmp_path), "--cohort", str(train_shards), "--cohort-speakers", "8",
                          "--cohort-utts", "2", "--mean-subtraction", "--as-norm", "--top-k", "4", *FAST])
    assert code == 0
    embeddings, _ = Embeddings.load(tmp_path / "embeddings.safetensors")
    cohort, _ = Embeddings.load(tmp_path / "cohort-embeddings.safetensors")
    assert len(set(cohort.speakers)) == 8 and len(cohort.keys) == 16
    assert not {s for s in cohort.speakers} & {utterance_key(e.relpath).split("/")[0]
                                               for e in entries_from_trials([corpus.trials])}
    emb, coh = embeddings.values[:, 0], cohort.values[:, 0]
    mean = coh.mean(axis=0)
    emb, coh = subtract_mean(emb, mean), subtract_mean(coh, mean)
    means = speaker_means(Embeddings(cohort.keys, coh, cohort.speakers))
    position = {k: i for i, k in enumerate(embeddings.keys)}
    pairs = np.array([[position[utterance_key(t.enroll)], position[utterance_key(t.test)]]
                      for t in read_trials(corpus.trials)])
    expected = as_norm(emb, pairs, means, top_k=4)
    np.testing.assert_allclose(scores_of(tmp_path / "scores-trials.txt"), expected, atol=2e-6)
    assert not np.allclose(expected, cosine_scores(embeddings.values[:, 0], pairs), atol=1e-3)
    assert "AS-Norm (top 4 of 8 cohort speakers)" in summary_of(tmp_path)["normalisation"]


def test_the_seeds_crop_protocol_scores_with_their_distance(corpus, checkpoint, tmp_path):
    loaded = load_inference_checkpoint(checkpoint)
    report = evaluate(loaded, [corpus.trials], corpus.root, tmp_path, ExtractConfig(eval_frames=40, num_eval=4, workers=0))
    embeddings, _ = Embeddings.load(tmp_path / "embeddings.safetensors")
    assert embeddings.values.shape == (16, 4, 32)
    position = {k: i for i, k in enumerate(embeddings.keys)}
    pairs = np.array([[position[utterance_key(t.enroll)], position[utterance_key(t.test)]]
                      for t in read_trials(corpus.trials)])
    np.testing.assert_allclose(scores_of(tmp_path / "scores-trials.txt"),
                               crop_scores(embeddings.values, pairs, normalize=True), atol=2e-6)
    assert report.lists[0].metrics is not None
    with pytest.raises(SpeakeridError, match="--as-norm normalises cosine scores"):
        evaluate(loaded, [corpus.trials], corpus.root, tmp_path, ExtractConfig(eval_frames=40),
                 ScoreConfig(cohort=str(corpus.root), as_norm=True))


def test_embed_writes_embeddings_for_any_audio_list(corpus, checkpoint, eval_shards, tmp_path):
    test_list = tmp_path / "list.txt"
    relpaths = corpus.test_list.read_text().split()[:5]
    test_list.write_text("".join(f"{r}\n" for r in relpaths))
    assert evaluate_main(["--embed", "--checkpoint", str(checkpoint), "--audio", str(corpus.root), "--list",
                          str(test_list), "--out", str(tmp_path / "e.safetensors"), *FAST]) == 0
    embeddings, meta = Embeddings.load(tmp_path / "e.safetensors")
    assert embeddings.keys == sorted(utterance_key(r) for r in relpaths) and embeddings.values.shape == (5, 32)
    assert meta["checkpoint"]["model"]["name"] == "ResNetSE34L"
    assert evaluate_main(["--embed", "--checkpoint", str(checkpoint), "--audio", str(eval_shards),
                          "--out", str(tmp_path / "all.npy"), *FAST]) == 0
    values = np.load(tmp_path / "all.npy")
    keys = (tmp_path / "all.keys.txt").read_text().split()
    assert values.shape == (16, 32) and len(keys) == 16
    np.testing.assert_allclose(values[[keys.index(k) for k in embeddings.keys]], embeddings.values, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_trial_lists_are_refused_before_any_audio_is_read(corpus, checkpoint, tmp_path, capsys):
    loaded = load_inference_checkpoint(checkpoint)
    real = corpus.trials.read_text()
    missing = tmp_path / "missing.txt"
    missing.write_text(real + "".join(f"1 id10001/none/{i:05d}.wav id10001/none/x{i}.wav\n" for i in range(6)))
    with pytest.raises(SpeakeridError, match=r"12 of 28 utterances are not in .*\n  id10001/none/00000.wav  "
                                             r"\(named at .*missing.txt:41\)(.|\n)*… and 2 more"):
        evaluate(loaded, [missing], corpus.root, tmp_path / "out")
    with pytest.raises(SpeakeridError, match="12 of 28 utterances are not in"):
        evaluate(loaded, [missing], corpus.root, tmp_path / "out")

    bad_label = tmp_path / "labels.txt"
    bad_label.write_text(real + "2 a.wav b.wav\n")
    assert evaluate_main(["--checkpoint", str(checkpoint), "--trials", str(bad_label), "--audio", str(corpus.root),
                          "--out", str(tmp_path / "out")]) == 2
    assert "labels.txt:41: '2 a.wav b.wav'" in capsys.readouterr().err

    one_class = tmp_path / "targets.txt"
    one_class.write_text("".join(line + "\n" for line in real.splitlines() if line.startswith("1 ")))
    with pytest.raises(SpeakeridError, match=r"targets.txt: EER is undefined: all 20 trials are target trials"):
        evaluate(loaded, [one_class], corpus.root, tmp_path / "out")

    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("".join(" ".join(line.split()[1:]) + "\n" for line in real.splitlines()))
    report = evaluate(loaded, [unlabelled], corpus.root, tmp_path / "out", ExtractConfig(workers=0))
    assert report.lists[0].metrics is None and len(scores_of(report.lists[0].scores_path)) == 40


def damage_first_member(shard_dir, tmp_path):
    """A copy of eval shards whose first audio member's bytes are overwritten (tar headers intact): (copy, key)."""
    copy = tmp_path / "damaged_shards"
    shutil.copytree(shard_dir, copy)
    shard = sorted(copy.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".flac", ".wav")))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\x55" * member.size)
    return copy, shard.name, member.name.rsplit(".", 1)[0]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_damaged_utterance_is_one_clear_message(corpus, checkpoint, eval_shards, tmp_path, workers):
    tree = tmp_path / "tree"
    shutil.copytree(corpus.root, tree)
    trial = read_trials(corpus.trials)[0]
    (tree / trial.enroll).write_bytes(os.urandom(5000))  # garbage where a wav should be
    shards, shard_name, key = damage_first_member(eval_shards, tmp_path)
    for audio, named in ((tree, [trial.enroll, "replace the file"]), (shards, [shard_name, key])):
        result = run_module("evaluate", "--checkpoint", checkpoint, "--trials", corpus.trials, "--audio", audio,
                            "--out", tmp_path / "out", "--no-cache", "--workers", workers, check=False, env=ONE_THREAD)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and all(n in result.stderr for n in named), result.stderr
    soundfile.write(tree / trial.enroll, np.zeros(100, np.int16), 16000)  # a cut recording: too short to embed
    with pytest.raises(SpeakeridError, match=rf"utterance {utterance_key(trial.enroll)} \(.*{trial.enroll}\) has 100 "
                                             "samples; .* replace it"):
        evaluate(load_inference_checkpoint(checkpoint), [corpus.trials], tree, tmp_path / "out",
                 ExtractConfig(workers=int(workers)), cache=None)


def test_a_trial_list_saved_with_a_bom_scores_as_without(corpus, checkpoint, tree_run, tmp_path):
    tree_out, _ = tree_run
    with_bom = tmp_path / "trials.txt"  # same stem: the same scores file name
    with_bom.write_bytes(b"\xef\xbb\xbf" + corpus.trials.read_bytes())  # as Windows Notepad saves UTF-8
    shutil.copyfile(tree_out / "embeddings.safetensors", tmp_path / "embeddings.safetensors")
    report = evaluate(load_inference_checkpoint(checkpoint), [with_bom], corpus.root, tmp_path, ExtractConfig(workers=0))
    assert report.lists[0].n_trials == corpus.n_trials and report.extraction.embedded == 0
    assert report.lists[0].metrics.eer == summary_of(tree_out)["lists"][0]["metrics"]["eer"]
    assert (tmp_path / "scores-trials.txt").read_text() == (tree_out / "scores-trials.txt").read_text()


def test_a_checkpoint_that_does_not_fit_fails_in_the_cli(corpus, tmp_path, capsys):
    directory = save(tmp_path / "ckpt")
    meta = json.loads((directory / "speakerid.json").read_text())
    meta["model"]["options"] = {"n_out": 32, "encoder_type": "ASP"}
    (directory / "speakerid.json").write_text(json.dumps(meta))
    assert evaluate_main(["--checkpoint", str(directory), "--trials", str(corpus.trials), "--audio",
                          str(corpus.root)]) == 2
    err = capsys.readouterr().err
    assert "does not fit model ResNetSE34L" in err and "shape mismatch: fc.weight: file (32, 128)" in err
