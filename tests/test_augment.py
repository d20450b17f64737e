"""Batched augmentation against the seed's per-utterance formulas (AugmentWAV in voxceleb_trainer), on real noise shards."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from speakerid.augment import AUG_TYPES, AugmentConfig, Augmenter, fft_length
from speakerid.data.lists import scan_audio_tree
from speakerid.data.noise import NoiseBank
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.data.shardset import ShardSet
from speakerid.errors import SpeakeridError

L = 3200  # utterance length in samples (the seed uses max_frames·160 + 240)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _write_tree(root, files: dict[str, np.ndarray]) -> None:
    for relpath, samples in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, samples, 16000, subtype="PCM_16")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny MUSAN (noise/speech/music, loud so the +1e-4 dB floor is negligible) and a two-room RIR set, packed."""
    base = tmp_path_factory.mktemp("banks")
    rng = np.random.default_rng(0)
    musan = {}
    for category, n in (("noise", 3), ("speech", 5), ("music", 2)):
        for i in range(n):
            samples = rng.standard_normal(int(rng.integers(2000, 6000))) * rng.uniform(4000, 9000)
            musan[f"{category}/src/{category}-{i}.wav"] = samples.astype(np.int16)
    rirs = {}
    for i, (room, length) in enumerate((("smallroom", 300), ("smallroom", 900), ("largeroom", 4500))):
        decay = np.exp(-np.arange(length) / (length / 5))
        rir = rng.standard_normal(length) * decay
        rir[0] = 4.0  # the direct path
        rirs[f"{room}/Room{i:03d}/{room}-{i}.wav"] = (rir / np.abs(rir).max() * 20000).astype(np.int16)
    out = {}
    for name, files in (("musan", musan), ("rirs", rirs)):
        _write_tree(base / name, files)
        out[name] = base / f"{name}-shards"
        pack(make_plan(scan_audio_tree(base / name), base / name, PackConfig(kind="noise", max_utts=2)), base / name, out[name])
    return out


def _augmenter(shards, config=AugmentConfig(), clip_samples=L, rir_samples=16000, seed=0) -> Augmenter:
    noise = NoiseBank(ShardSet.open(shards["musan"]), clip_samples=clip_samples, seed=seed, reservoir=16)
    rir = NoiseBank(ShardSet.open(shards["rirs"]), clip_samples=None, seed=seed, max_samples=rir_samples, reservoir=16)
    return Augmenter(config, noise, rir)


def _speech_like(batch: int, seed: int = 1) -> torch.Tensor:
    """Full-scale float waveforms, |x| < 1, with per-row loudness from about −23 to −11 dB."""
    rng = np.random.default_rng(seed)
    envelope = 0.5 + 0.5 * np.sin(np.linspace(0, 6 * np.pi, L))[None] ** 2
    x = rng.standard_normal((batch, L)) * envelope * 10 ** rng.uniform(-1.0, -0.4, (batch, 1))
    return torch.from_numpy(np.clip(x, -0.99, 0.99)).float()


def _db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(x**2) + 1e-4)  # the seed's level


def seed_additive_noise(audio: np.ndarray, clips: list[np.ndarray], snrs: list[float]) -> np.ndarray:
    """AugmentWAV.additive_noise for one utterance, float64, given the clips and SNRs it would draw."""
    clean_db = _db(audio)
    noises = [np.sqrt(10 ** ((clean_db - _db(c) - snr) / 10)) * c for c, snr in zip(clips, snrs)]
    return np.sum(noises, axis=0) + audio


def seed_reverberate(audio: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """AugmentWAV.reverberate for one utterance (signal.convolve 'full' = numpy.convolve), first len samples."""
    rir = rir / np.sqrt(np.sum(rir**2))
    return np.convolve(audio, rir)[: len(audio)]


def test_defaults_are_the_seeds():
    config = AugmentConfig()
    assert config.probabilities == (0.2,) * 5 and AUG_TYPES == ("none", "reverb", "music", "speech", "noise")
    assert (config.noise_snr, config.speech_snr, config.music_snr) == ((0, 15), (13, 20), (5, 15))
    assert (config.noise_clips, config.speech_clips, config.music_clips) == ((1, 1), (3, 7), (1, 1))
    with pytest.raises(SpeakeridError, match="sum to 1"):
        AugmentConfig(p_none=0.5)
    assert [fft_length(n) for n in (1, 7, 17, 48239)] == [1, 8, 18, 48600]


def test_noise_rows_follow_the_seed_formula_and_snr_ranges(shards):
    augmenter = _augmenter(shards)
    clean = _speech_like(80)
    plan = augmenter.draw(len(clean), torch.Generator().manual_seed(3))
    out = augmenter.apply(clean, plan).double().numpy()
    x = clean.double().numpy()
    config = augmenter.config
    for kind in ("noise", "speech", "music"):
        rows = plan.rows(kind).tolist()
        assert rows, kind
        low, high = config.snr(kind)
        for i, row in enumerate(rows):
            n = int(plan.n_clips[row])
            assert config.clips(kind)[0] <= n <= config.clips(kind)[1]
            snrs = plan.snr_db[row, :n].double().numpy()
            assert ((low <= snrs) & (snrs <= high)).all()
            clips = [c / 32768.0 for c in plan.clips[kind][i, :n].double().numpy()]
            np.testing.assert_allclose(out[row], seed_additive_noise(x[row], clips, snrs), atol=1e-5, rtol=0)
            if n == 1:  # the measured SNR of the row, clean against what was added, off only by the seed's 1e-4 floor
                added = out[row] - x[row]
                measured = 10 * np.log10(np.mean(x[row] ** 2) / np.mean(added**2))
                floor_shift = 10 * np.log10(1 + 1e-4 / np.mean(x[row] ** 2)) + 10 * np.log10(1 + 1e-4 / np.mean(clips[0] ** 2))
                assert floor_shift < 0.1 and low - floor_shift <= measured <= high + floor_shift
                assert abs(measured - snrs[0]) <= floor_shift + 1e-3
    np.testing.assert_array_equal(out[plan.rows("none")], x[plan.rows("none")])


def test_reverberation_equals_numpy_convolve(shards):
    augmenter = _augmenter(shards, AugmentConfig(p_none=0.5, p_reverb=0.5, p_music=0, p_speech=0, p_noise=0))
    clean = _speech_like(40, seed=2)
    plan = augmenter.draw(len(clean), torch.Generator().manual_seed(0))
    out = augmenter.apply(clean, plan).double().numpy()
    rows = plan.rows("reverb").tolist()
    rirs = plan.clips["reverb"].double().numpy() / 32768.0
    assert len(rows) > 5 and rirs.shape[1] > L  # one RIR is longer than the utterance
    for i, row in enumerate(rows):
        reference = seed_reverberate(clean[row].double().numpy(), rirs[i])
        np.testing.assert_allclose(out[row], reference, atol=1e-5, rtol=0)


def test_type_frequencies_clip_counts_and_snrs_follow_the_config(shards):
    batch = 20000
    plan = _augmenter(shards, clip_samples=8, rir_samples=1000).draw(batch, torch.Generator().manual_seed(5))
    frequencies = np.array(list(plan.counts().values())) / batch
    np.testing.assert_allclose(frequencies, 0.2, atol=0.02)
    speech = plan.rows("speech")
    counts = np.bincount(plan.n_clips[speech].numpy(), minlength=8)[3:] / len(speech)
    np.testing.assert_allclose(counts, 0.2, atol=0.03)  # k uniform on 3..7
    for kind, (low, high) in (("noise", (0, 15)), ("speech", (13, 20)), ("music", (5, 15))):
        snrs = plan.snr_db[plan.rows(kind), 0]
        assert low <= snrs.min() < low + 0.5 and high - 0.5 < snrs.max() <= high
    rirs = plan.clips["reverb"]
    assert rirs.shape[0] == len(plan.rows("reverb"))
    large = (rirs[:, 900:] != 0).any(1).float().mean()  # only largeroom's RIR is longer than 900 samples
    assert abs(large - 1 / 3) < 0.03  # rooms in proportion to their files: each RIR file equally likely

    skewed = AugmentConfig(p_none=0.7, p_reverb=0.0, p_music=0.0, p_speech=0.0, p_noise=0.3)
    plan = _augmenter(shards, skewed, clip_samples=8, rir_samples=16).draw(batch, torch.Generator().manual_seed(6))
    counts = plan.counts()
    assert counts["reverb"] == counts["music"] == counts["speech"] == 0 and abs(counts["noise"] / batch - 0.3) < 0.02


def test_same_generator_seed_gives_the_same_batch(shards):
    clean = _speech_like(32)
    first = _augmenter(shards)(clean, torch.Generator().manual_seed(11))
    again = _augmenter(shards)(clean, torch.Generator().manual_seed(11))
    other = _augmenter(shards)(clean, torch.Generator().manual_seed(12))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_output_keeps_shape_dtype_and_device(shards, device, dtype):
    clean = _speech_like(24).reshape(4, 6, L)  # an (N, M, L) training batch works as (B, L)
    reference = _augmenter(shards)(clean, torch.Generator().manual_seed(4))
    with torch.autocast(device, dtype=torch.bfloat16):  # a training step's context must not lower the precision
        out = _augmenter(shards)(clean.to(device, dtype), torch.Generator().manual_seed(4))
    assert out.shape == clean.shape and out.dtype == dtype and out.device.type == device
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float().cpu(), reference, atol=tolerance, rtol=tolerance)


def test_disabled_or_all_none_returns_the_batch_unchanged(shards):
    clean = _speech_like(8)
    assert Augmenter(AugmentConfig(enabled=False))(clean, torch.Generator()) is clean
    only_none = AugmentConfig(p_none=1.0, p_reverb=0, p_music=0, p_speech=0, p_noise=0)
    assert torch.equal(Augmenter(only_none)(clean, torch.Generator()), clean)


def test_missing_banks_or_categories_fail_at_start(shards):
    with pytest.raises(SpeakeridError, match="p_reverb > 0 needs RIR shards"):
        Augmenter(AugmentConfig(), NoiseBank(ShardSet.open(shards["musan"]), clip_samples=L, reservoir=4))
    with pytest.raises(SpeakeridError, match="no 'music' clips"):
        Augmenter(AugmentConfig(), NoiseBank(ShardSet.open(shards["rirs"]), clip_samples=L, reservoir=4))
    with pytest.raises(SpeakeridError, match="no RIR category mediumroom"):
        _augmenter(shards, AugmentConfig(rir_categories=("mediumroom",)))


def _bank(shards, name, stream=0, n_streams=2, **options) -> NoiseBank:
    clip_samples = L if name == "musan" else None
    return NoiseBank(ShardSet.open(shards[name]), clip_samples=clip_samples, seed=3, stream=stream, n_streams=n_streams,
                     **options)


@pytest.mark.parametrize("name", ["musan", "rirs"])
def test_a_bank_rebuilt_at_a_step_holds_what_reading_through_gives(shards, name):
    """A resumed bank decodes only the files its slots hold after step s; the clips are those of a bank that read on."""
    walked = _bank(shards, name, reservoir=2, refresh=1)
    first = {k: walked.take(k, 40, torch.Generator().manual_seed(1)) for k in walked._capacity}
    for step in range(1, 13):
        walked.seek(step)
    resumed = _bank(shards, name, reservoir=2, refresh=1)
    resumed.seek(12)
    for k in walked._capacity:
        clips = walked.take(k, 40, torch.Generator().manual_seed(1))
        assert np.array_equal(clips, resumed.take(k, 40, torch.Generator().manual_seed(1)))
    if name == "musan":  # new crops came in (an RIR bank this small holds each of its files whole, always)
        assert any(not np.array_equal(first[k], walked.take(k, 40, torch.Generator().manual_seed(1))) for k in first)


NO_MUSIC = AugmentConfig(p_none=0.4, p_music=0.0)  # the two music files lie in one shard: one stream has none


def test_a_step_draws_the_same_on_a_fresh_augmenter_and_its_own_on_each_rank(shards):
    """(seed, rank, step) decide a step's augmentation: a resumed run replays it, another rank does not."""
    def plan(stream: int, step: int):  # one RIR bank for both ranks: this tiny set has one room per shard
        augmenter = Augmenter(NO_MUSIC, _bank(shards, "musan", stream, reservoir=4),
                              _bank(shards, "rirs", 0, 1, reservoir=4), seed=3, stream=stream)
        for earlier in range(step):  # the uninterrupted run's banks read on step by step
            augmenter.at_step(earlier)
        return augmenter.draw(64, augmenter.at_step(step))

    walked, resumed, other_rank = plan(0, 6), _resumed_plan(shards, 0, 6), plan(1, 6)
    assert torch.equal(walked.types, resumed.types) and torch.equal(walked.snr_db, resumed.snr_db)
    assert walked.clips.keys() == resumed.clips.keys()
    assert all(torch.equal(walked.clips[k], resumed.clips[k]) for k in walked.clips)
    assert not torch.equal(walked.types, other_rank.types)


def _resumed_plan(shards, stream: int, step: int):
    augmenter = Augmenter(NO_MUSIC, _bank(shards, "musan", stream, reservoir=4),
                          _bank(shards, "rirs", 0, 1, reservoir=4), seed=3, stream=stream)
    return augmenter.draw(64, augmenter.at_step(step))


def test_a_noise_file_that_does_not_decode_leaves_its_slot_alike_when_reading_on_or_rebuilding(shards, tmp_path):
    import shutil
    import tarfile

    damaged = tmp_path / "musan"
    shutil.copytree(shards["musan"], damaged)
    for shard in sorted(damaged.glob("*.tar")):  # the first audio member of every shard loses its magic number
        with tarfile.open(shard) as tar:
            offset = next(m.offset_data for m in tar.getmembers() if not m.name.endswith(".json"))
        data = bytearray(shard.read_bytes())
        data[offset:offset + 4] = b"XXXX"
        shard.write_bytes(bytes(data))

    def bank():
        return NoiseBank(ShardSet.open(damaged), clip_samples=L, seed=3, n_streams=1, reservoir=2, refresh=1)

    walked = bank()
    for step in range(15):
        walked.seek(step)
    resumed = bank()
    resumed.seek(14)
    assert walked.faults.corrupt_members > 0 and resumed.faults.corrupt_members > 0
    for k in walked._capacity:
        assert np.array_equal(walked.take(k, 40, torch.Generator().manual_seed(1)),
                              resumed.take(k, 40, torch.Generator().manual_seed(1)))
