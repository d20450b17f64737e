"""Evaluation reader (shards and audio tree), augmentation banks, the epoch meter and `shardify read`."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from speakerid.data.batch_config import BatchConfig
from speakerid.data.batches import train_loader, usable_utterances
from speakerid.data.eval_reader import AudioTree, EvalConfig, EvalUtterances, eval_crops, eval_loader
from speakerid.data.lists import entries_from_trials, scan_audio_tree, utterance_key
from speakerid.data.meter import EpochMeter
from speakerid.data.noise import NoiseBank
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.data.shardset import ShardSet
from speakerid.errors import SpeakeridError


@pytest.fixture(scope="session")
def eval_shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "shards"
    entries = entries_from_trials([corpus.trials])
    pack(make_plan(entries, corpus.root, PackConfig(kind="eval", max_utts=3)), corpus.root, out)
    return out


def _trial_relpaths(corpus) -> list[str]:
    return [e.relpath for e in entries_from_trials([corpus.trials])]


def _collect(source, config=EvalConfig(), world_size=1, workers=0, keys=None) -> dict[str, np.ndarray]:
    got: dict[str, np.ndarray] = {}
    for rank in range(world_size):
        for batch in eval_loader(source, config, keys=keys, rank=rank, world_size=world_size, workers=workers):
            for key, audio, length in zip(batch["keys"], batch["audio"], batch["lengths"]):
                assert key not in got, f"{key} read twice"
                got[key] = audio[..., :length].numpy() if not config.eval_frames else audio.numpy()
    return got


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2)])
def test_each_utterance_exactly_once_and_shards_equal_the_tree(corpus, eval_shards, world_size, workers):
    relpaths = _trial_relpaths(corpus)
    from_shards = _collect(ShardSet.open(eval_shards), world_size=world_size, workers=workers)
    from_tree = _collect(AudioTree(corpus.root, relpaths), world_size=world_size, workers=workers)
    assert sorted(from_shards) == sorted(from_tree) == sorted(utterance_key(p) for p in relpaths)
    for relpath in relpaths:
        original, _ = soundfile.read(corpus.root / relpath, dtype="int16")
        np.testing.assert_array_equal(from_shards[utterance_key(relpath)], original)
        np.testing.assert_array_equal(from_tree[utterance_key(relpath)], original)


def test_batches_group_similar_lengths_under_the_budget(corpus, eval_shards):
    config = EvalConfig(max_batch_samples=16000 * 12)
    batches = list(eval_loader(ShardSet.open(eval_shards), config))
    assert len(batches) > 1
    for b in batches:
        assert b["audio"].shape[0] * b["audio"].shape[1] <= config.max_batch_samples or b["audio"].shape[0] == 1
    padded = sum(b["audio"].numel() for b in batches)
    real = sum(int(b["lengths"].sum()) for b in batches)
    assert real / padded > 0.8, "sorting by length should keep padding small"


def test_ten_crop_protocol_follows_the_seed(corpus, eval_shards):
    config = EvalConfig(eval_frames=100, num_eval=10)
    crops = _collect(ShardSet.open(eval_shards), config)
    relpath = _trial_relpaths(corpus)[0]
    original, _ = soundfile.read(corpus.root / relpath, dtype="int16")
    length = 100 * 160 + 240
    got = crops[utterance_key(relpath)]
    assert got.shape == (10, length)
    starts = np.linspace(0, len(original) - length, 10)
    for crop, start in zip(got, starts):
        np.testing.assert_array_equal(crop, original[int(start):int(start) + length])
    short = eval_crops(np.arange(100, dtype=np.int16), 1, 3)  # shorter than a crop: wrap-padded to L + 1
    assert short.shape == (3, 400) and short[0, 100] == 0


def test_keys_filter_and_missing_keys(corpus, eval_shards):
    wanted = {utterance_key(p) for p in _trial_relpaths(corpus)[:3]}
    assert set(_collect(ShardSet.open(eval_shards), keys=wanted)) == wanted
    with pytest.raises(SpeakeridError, match=r"1 utterance\(s\) asked for are not in the shards.*id99999/x/00001"):
        EvalUtterances(ShardSet.open(eval_shards), keys=wanted | {"id99999/x/00001"})
    with pytest.raises(SpeakeridError, match="1 of 2 utterances are not under"):
        AudioTree(corpus.root, [_trial_relpaths(corpus)[0], "id99999/x/00001.wav"])


def test_training_shards_are_not_eval_shards_and_vice_versa(corpus, eval_shards, tmp_path):
    with pytest.raises(SpeakeridError, match="training batches need a training shard set"):
        train_loader(ShardSet.open(eval_shards), BatchConfig(n_speakers=2))


def test_noise_bank_gives_clips_per_category(tmp_path):
    root = tmp_path / "musan"
    rng = np.random.default_rng(0)
    for category, n in (("noise", 3), ("music", 2), ("speech", 4)):
        for i in range(n):
            path = root / category / f"{category}-{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(path, (rng.standard_normal(int(16000 * rng.uniform(0.5, 3))) * 3000).astype(np.int16), 16000)
    out = tmp_path / "shards"
    pack(make_plan(scan_audio_tree(root), root, PackConfig(kind="noise", max_utts=2)), root, out)
    bank = NoiseBank(ShardSet.open(out), clip_samples=16000, reservoir=8)
    assert bank.categories == ["music", "noise", "speech"]
    clips = bank.take("speech", 5)
    assert clips.shape == (5, 16000) and clips.dtype == np.int16 and np.abs(clips).max() > 0
    rirs = NoiseBank(ShardSet.open(out), clip_samples=None, max_samples=8000).take("noise", 3)
    assert rirs.shape[0] == 3 and rirs.shape[1] <= 8000
    with pytest.raises(SpeakeridError, match="no clips of category 'babble'"):
        bank.take("babble", 1)


def test_epoch_meter_reports_coverage(corpus, tmp_path):
    out = tmp_path / "train"
    from speakerid.data.lists import read_train_list

    pack(make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(chunk_size=2, max_utts=6)), corpus.root, out)
    shards = ShardSet.open(out)
    config = BatchConfig(n_speakers=4, utts_per_speaker=2, max_frames=20)
    loader = train_loader(shards, config)
    meter = EpochMeter(usable_utterances(shards.index, config, 1))
    for batch in itertools.islice(loader, loader.dataset.batches_per_epoch):
        meter.update(batch)
    report = meter.report()
    assert report["coverage"] >= 0.95 and report["corrupt_members"] == 0
    assert report["crops"] == loader.dataset.batches_per_epoch * 8


def test_read_command_reports_an_epoch(shardify, corpus, tmp_path):
    out = tmp_path / "train"
    shardify("pack", "--list", corpus.train_list, "--root", corpus.root, "--out", out, "--chunk-size", 2, "--max-utts", 6)
    result = shardify("read", out, "--batch-size", 4, "--workers", 2, "--max-frames", 20)
    assert "batches per epoch" in result.stderr and "coverage" in result.stderr
