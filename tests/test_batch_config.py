"""The batch options, declared once: seed aliases, and the run config and `shardify read` built from them."""

from __future__ import annotations

import pytest

from speakerid.config import Config, load_config
from speakerid.data.batch_config import BatchConfig
from speakerid.errors import SpeakeridError


def test_seed_option_names_are_aliases():
    config = BatchConfig.from_dict({"batch_size": 7, "nPerSpeaker": 3, "max_frames": 100, "max_seg_per_spk": 50})
    assert (config.n_speakers, config.utts_per_speaker, config.crop_samples) == (7, 3, 16240)
    with pytest.raises(SpeakeridError, match="unknown batch option 'nPerSpeakr'.*nPerSpeaker"):
        BatchConfig.from_dict({"nPerSpeakr": 2})


def test_the_run_config_and_shardify_read_default_to_the_declaration():
    from shardify.__main__ import build_parser

    assert Config().batch_config() == BatchConfig()
    read = build_parser().parse_args(["read", "shards"])
    assert BatchConfig(**{name: getattr(read, name) for name in vars(BatchConfig())}) == BatchConfig()


def test_the_run_config_hands_every_batch_option_and_train_seed_to_the_reader():
    config = load_config(None, ["batch_size=7", "nPerSpeaker=3", "max_frames=20", "data.max_seg_per_spk=9",
                                "data.open_shards=2", "data.pool_factor=1.5", "data.shard_retries=5", "seed=4"])
    assert config.batch_config() == BatchConfig(n_speakers=7, utts_per_speaker=3, max_frames=20, max_seg_per_spk=9,
                                                open_shards=2, pool_factor=1.5, shard_retries=5, seed=4)


def test_shardify_read_takes_the_seed_and_the_speakerid_spellings():
    from shardify.__main__ import build_parser

    parse = build_parser().parse_args
    seed = parse(["read", "s", "--batch-size", "7", "--nPerSpeaker", "3", "--max-frames", "20", "--pool-factor", "1.5"])
    ours = parse(["read", "s", "--n-speakers", "7", "--utts-per-speaker", "3", "--max-frames", "20", "--pool-factor", "1.5"])
    assert vars(seed) == vars(ours)
    assert (seed.n_speakers, seed.utts_per_speaker, seed.max_frames, seed.pool_factor) == (7, 3, 20, 1.5)
