"""Speed perturbation: the resampling (a sine at f becomes f·s), a perturbed batch's speeds and labels, the reader's
longer crops, the label space in checkpoints and export, and exact resume (real training subprocesses)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from speakerid.augment import step_generator
from speakerid.config import load_config
from speakerid.data.meter import EpochMeter
from speakerid.errors import SpeakeridError
from speakerid.speed import EDGE, SpeedPerturb, label_space, read_samples, resample, speed_ratio
from speakerid.training.state import Progress, TrainingState
from tests.conftest import run_module
from tests.test_training import train_shards  # noqa: F401 (the fixture, shared)

SR = 16000
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _peak_hz(x: torch.Tensor) -> float:
    """The strongest frequency of each row (Hann-windowed FFT, parabolic interpolation between bins)."""
    spectrum = torch.fft.rfft(x.double() * torch.hann_window(x.shape[-1], dtype=torch.float64, device=x.device))
    mag = spectrum.abs().log()
    k = mag.argmax(-1)
    a, b, c = (mag.gather(-1, (k + d).unsqueeze(-1)).squeeze(-1) for d in (-1, 0, 1))
    return ((k + 0.5 * (a - c) / (a - 2 * b + c)) * SR / x.shape[-1]).cpu()


def _sines(freqs: torch.Tensor, length: int, phase: float = 0.3) -> torch.Tensor:
    t = torch.arange(length, dtype=torch.float64) / SR
    return torch.sin(2 * math.pi * freqs.double().unsqueeze(-1) * t + phase).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("speed", [0.9, 0.95, 1.1])
def test_speed_s_turns_a_sine_at_f_into_f_times_s_and_the_length_into_l_over_s(speed, device):
    length = 16000
    x = _sines(torch.tensor([440.0, 1000.0, 3000.0]), length).to(device)
    y = resample(x, *speed_ratio(speed))
    assert y.shape == (3, math.ceil(length / speed)) and y.device.type == device
    inner = y[:, EDGE: y.shape[1] - EDGE]
    assert torch.allclose(_peak_hz(inner), torch.tensor([440.0, 1000.0, 3000.0], dtype=torch.float64) * speed, atol=1.0)
    assert inner.abs().max().item() == pytest.approx(1.0, abs=0.01)  # in band: the level is kept
    played = _sines(torch.tensor([440.0, 1000.0, 3000.0]) * speed, y.shape[1])  # the same phase: no delay added
    assert (y.cpu() - played)[:, EDGE:-EDGE].abs().max() < 5e-3


def test_speed_ratios_are_reduced_and_read_lengths_cover_the_fastest_speed():
    assert speed_ratio(0.9) == (9, 10) and speed_ratio(1.1) == (11, 10) and speed_ratio(1.0) == (1, 1)
    assert read_samples(32240, []) == 32240  # off: the reader's crop is the crop
    longest = read_samples(32240, [0.9, 1.0, 1.1])
    assert math.ceil(longest * 10 / 11) >= 32240 + 2 * EDGE  # 1.1 still leaves the crop between the edges


def test_a_perturbed_batch_has_one_speed_per_speaker_row_and_labels_offset_by_speed():
    """N rows of a speaker each: every utterance of row i is played at speeds[k_i], label = label + k_i · n_speakers."""
    n, m, n_speakers, crop = 12, 3, 50, 4000
    perturb = SpeedPerturb([0.9, 1.0, 1.1], n_speakers, crop)
    assert perturb.speeds == (1.0, 0.9, 1.1)  # 1.0 is k = 0: the original labels stay
    freqs = torch.linspace(300, 2500, n)  # one tone per speaker row, its M utterances at different phases
    audio = torch.stack([_sines(freqs, perturb.read_samples, phase) for phase in (0.0, 1.0, 2.0)], dim=1)
    labels = torch.arange(n) * 4 + 1
    k = perturb.draw(n, step_generator(0, 0, 3))
    assert set(k.tolist()) == {0, 1, 2}
    out, new_labels = perturb.apply(audio, k), perturb.labels(labels, k)
    assert out.shape == (n, m, crop)
    assert torch.equal(new_labels, labels + k * n_speakers)
    assert len(set(new_labels.tolist())) == n  # still N distinct identities
    speeds = torch.tensor(perturb.speeds, dtype=torch.float64)[k]
    measured = _peak_hz(out.reshape(n * m, crop)).reshape(n, m)
    assert torch.allclose(measured, (freqs.double() * speeds).unsqueeze(1).expand(n, m), atol=2.0)
    same = k == 0  # speed 1.0: the crop itself, bit for bit
    assert torch.equal(out[same], audio[same][..., EDGE: EDGE + crop])


def test_speeds_come_from_the_step_generator():
    """A function of (seed, rank, step): the same step draws the same speeds (what makes resume exact)."""
    perturb = SpeedPerturb([1.0, 0.9, 1.1], 10, 400, seed=5, stream=1)
    first = perturb.draw(64, perturb.at_step(7))
    assert torch.equal(first, perturb.draw(64, perturb.at_step(7)))
    assert torch.equal(first, perturb.draw(64, step_generator(5, 1, 7)))
    assert not torch.equal(first, perturb.draw(64, perturb.at_step(8)))
    counts = torch.bincount(perturb.draw(30000, perturb.at_step(0)), minlength=3)
    assert (counts - 10000).abs().max() < 400  # uniform over the speeds


@pytest.mark.parametrize("speeds, message", [([0.9, 1.1], "including 1.0"), ([1.0, 1.0], "distinct"),
                                             ([1.0, 0.0], "between 0.5 and 2.0"), (["fast", 1.0], "numbers"),
                                             (0.9, "expected a list")])
def test_bad_speed_lists_are_refused_naming_the_option(speeds, message):
    with pytest.raises(SpeakeridError, match=message) as error:
        load_config(None, [f"augment.speed_perturb={json.dumps(speeds)}"]).batch_config()
    assert "augment.speed_perturb" in str(error.value)


def test_the_reader_reads_longer_crops_only_with_speed_perturbation():
    off = load_config(None, ["max_frames=200"]).batch_config()
    assert off.extra_samples == 0 and off.read_samples == off.crop_samples == 32240
    on = load_config(None, ["max_frames=200", "augment.speed_perturb=[0.9, 1.0, 1.1]"]).batch_config()
    assert on.crop_samples == 32240 and on.read_samples == read_samples(32240, [0.9, 1.0, 1.1])
    assert label_space([0.9, 1.0, 1.1], 5994)["n_classes"] == 3 * 5994 and label_space([], 5994)["n_classes"] == 5994


def test_a_checkpoint_of_another_label_space_is_refused(tmp_path):
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                                  lambda i: 1.0)
    saved = TrainingState(Progress(), scheduler, EpochMeter(10), label_space([0.9, 1.0, 1.1], 12))
    saved.save(tmp_path, 0)
    assert TrainingState(Progress(), scheduler, EpochMeter(10), label_space([0.9, 1.1, 1.0], 12)).load(tmp_path, 0) is None
    for other in ([], [1.1, 0.9, 1.0]):  # no speeds; the same speeds with another k per speed
        with pytest.raises(SpeakeridError, match="label space"):
            TrainingState(Progress(), scheduler, EpochMeter(10), label_space(other, 12)).load(tmp_path, 0)


# --- through the front door: real shards, real training subprocesses -------------------------------------------------

def _args(shards, run_dir, *extra):
    return ["data.train_shards=" + str(shards), f"train.run_dir={run_dir}", "batch_size=4", "max_frames=20",
            "model.options.n_out=32", "data.workers=0", "max_epoch=2", "train.mixed_precision=no", "optim.lr=0.01",
            "loss.name=aamsoftmax", "augment.speed_perturb=[0.9,1.0,1.1]", *extra]


def _last_checkpoint(run_dir):
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


def test_training_with_speed_perturbation_resumes_bit_identical_and_records_its_label_space(train_shards, tmp_path):
    """12 speakers × 3 speeds = 36 classes for AAM-softmax; a stop at step 7 and a resume give the same weights."""
    from safetensors.torch import load_file

    run_module("train", *_args(train_shards, tmp_path / "whole"))
    run_module("train", *_args(train_shards, tmp_path / "resumed"), "--stop-after-steps", "7")
    resumed = run_module("train", *_args(train_shards, tmp_path / "resumed"))
    assert "resuming from" in resumed.stdout + resumed.stderr
    whole, again = _last_checkpoint(tmp_path / "whole"), _last_checkpoint(tmp_path / "resumed")
    assert whole.name == again.name
    for name in ("model.safetensors", "model_1.safetensors"):
        a, b = load_file(whole / name), load_file(again / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), f"{name} differs after resume"
    (weight,) = load_file(whole / "model_1.safetensors").values()
    assert weight.shape[0] == 36 or weight.shape[1] == 36  # the loss's class weights span every (speaker, speed)
    space = {"n_speakers": 12, "speeds": [1.0, 0.9, 1.1], "n_classes": 36}
    saved = json.loads((whole / "training_state_0.json").read_text())["label_space"]
    exported = json.loads((tmp_path / "whole" / "export" / "speakerid.json").read_text())["extra"]["label_space"]
    assert all(saved[k] == exported[k] == v for k, v in space.items())


@pytest.mark.parametrize("loss_name", ["aamsoftmax", "softmaxproto", "mp_balance", "mmp_balance", "angleproto"])
def test_every_perturbed_label_fits_the_loss_built_for_the_label_space(loss_name):
    """Classification and proxy losses get speakers × speeds classes; the top speed's last speaker is a valid class."""
    from speakerid.training import build_model_and_loss

    config = load_config(None, [f"loss.name={loss_name}", "model.options.n_out=8", "augment.speed_perturb=[0.9,1.0,1.1]"])
    space = label_space(config.augment.speed_perturb, 7)
    _, loss = build_model_and_loss(config, n_classes=space["n_classes"])
    perturb = SpeedPerturb(config.augment.speed_perturb, 7, 400)
    labels = perturb.labels(torch.tensor([6, 0, 3]), torch.tensor([2, 1, 0]))
    assert labels.tolist() == [20, 7, 3]
    value, _ = loss(torch.randn(3, 2, 8), labels)
    assert torch.isfinite(value)
    for parameter in loss.parameters():
        if parameter.dim() == 2:  # class weights / proxies: one row (or column) per (speaker, speed)
            assert space["n_classes"] in parameter.shape


def test_an_explicit_nclasses_too_small_for_the_perturbed_labels_is_refused():
    from speakerid.training import build_model_and_loss

    config = load_config(None, ["loss.name=aamsoftmax", "loss.options.nClasses=7", "augment.speed_perturb=[0.9,1.0,1.1]"])
    with pytest.raises(SpeakeridError, match="nClasses is 7 but the labels need 21"):
        build_model_and_loss(config, n_classes=21)
