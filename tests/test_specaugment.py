"""SpecAugment: masks only where the plan says, within WeSpeaker's bounds, through every model's hook, in training
mode only, with no state added; and in training, off changes nothing while on resumes bit-identically."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from speakerid.augment import step_generator
from speakerid.config import AugmentSection
from speakerid.errors import SpeakeridError
from speakerid.models import MODELS, build_model
from speakerid.specaugment import SpecAugment, SpecAugmentConfig, attach
from tests.conftest import run_module
from tests.test_models import waveforms
from tests.test_training import _args, _assert_same_final_weights, _final_weights, train_shards  # noqa: F401


def reference_masking(features: torch.Tensor, plan) -> torch.Tensor:
    """WeSpeaker's loops, one utterance and one mask at a time, filling with the band means taken before masking."""
    out = features.clone()
    n_bins, n_frames = features.shape[-2], features.shape[-1]
    for b in range(features.shape[0]):
        if not plan.masked[b]:
            continue
        means = features[b].mean(dim=-1, keepdim=True)  # (…, n_bins, 1)
        for start, width in zip(plan.time_start[b].tolist(), plan.time_width[b].tolist()):
            end = min(n_frames, start + width)
            out[b, ..., start:end] = means.expand(*means.shape[:-1], end - start)
        for start, width in zip(plan.freq_start[b].tolist(), plan.freq_width[b].tolist()):
            end = min(n_bins, start + width)
            out[b, ..., start:end, :] = means[..., start:end, :].expand(*means.shape[:-2], end - start, n_frames)
    return out


@pytest.mark.parametrize("shape", [(16, 1, 40, 60), (16, 80, 60)], ids=["seed-2d", "fbank-1d"])
def test_masks_lie_only_in_the_drawn_spans_and_hold_the_band_means(shape):
    spec = SpecAugment(SpecAugmentConfig(prob=0.5, time_masks=2, time_width=12, freq_masks=2, freq_width=9), seed=3)
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) + 2.0  # not mean-normalised: fill ≠ 0
    plan = spec.draw(shape[0], shape[-2], shape[-1])
    assert 0 < int(plan.masked.sum()) < shape[0]  # some rows masked, some left alone
    out = SpecAugment.apply(features, plan)
    assert torch.equal(out, reference_masking(features, plan))
    changed = (out != features).reshape(shape[0], shape[-2], shape[-1])
    assert not (changed & ~plan.mask(shape[-2], shape[-1])).any()  # nothing outside the plan's spans moves
    assert torch.equal(out[~plan.masked], features[~plan.masked])


def test_counts_widths_and_starts_follow_wespeakers_bounds():
    config = SpecAugmentConfig()  # WeSpeaker's spec_aug_conf
    assert (config.prob, config.time_masks, config.time_width, config.freq_masks, config.freq_width) == (0.6, 1, 10, 1, 8)
    plan = SpecAugment(config).draw(6000, 40, 200, torch.Generator().manual_seed(0))
    assert abs(plan.masked.double().mean().item() - 0.6) < 0.03
    assert plan.time_start.shape == plan.time_width.shape == (6000, 1) and plan.freq_start.shape == (6000, 1)
    assert set(plan.time_width.unique().tolist()) == set(range(1, 11))  # randint(1, max_t), both ends
    assert set(plan.freq_width.unique().tolist()) == set(range(1, 9))
    assert plan.time_start.min() == 0 and plan.time_start.max() == 199  # randint(0, frames − 1)
    assert plan.freq_start.min() == 0 and plan.freq_start.max() == 39
    mask = plan.mask(40, 200)
    frames_masked = mask.all(dim=1).sum(dim=1)  # whole-column (time) masks per row
    bins_masked = mask.all(dim=2).sum(dim=1)
    assert frames_masked.max() <= 10 and bins_masked.max() <= 8
    assert not mask[~plan.masked].any()
    none = SpecAugment(SpecAugmentConfig(time_masks=0, freq_masks=3)).draw(50, 40, 200)
    assert none.time_start.shape == (50, 0) and not none.mask(40, 200).all(dim=1).any()  # no time masks at all


def test_eval_mode_and_prob_zero_return_the_features_unchanged():
    features = torch.randn(4, 1, 40, 30)
    spec = SpecAugment(SpecAugmentConfig(prob=1.0))
    assert spec.eval()(features) is features
    assert not torch.equal(spec.train()(features), features)
    assert torch.equal(SpecAugment(SpecAugmentConfig(prob=0.0)).train()(features), features)


class Recording(SpecAugment):
    """SpecAugment that remembers the shape it was called on: the model's features, after its front-end."""

    def forward(self, features):
        self.seen = tuple(features.shape)
        return super().forward(features)


# one case per model: (options, samples, feature bins the front-end gives)
HOOK_CASES = {
    "ResNetSE34L": ({"nOut": 32}, 8000, 40),
    "ResNetSE34V2": ({"nOut": 32, "n_mels": 64}, 8000, 64),
    "ResNetSE34": ({"nOut": 32}, 6400, 257),
    "VGGVox40": ({"nOut": 32, "encoder_type": "TAP"}, 16240, 40),
    "ECAPA_TDNN": ({"channels": 64, "mfa_channels": 96}, 8000, 80),
    "ResNet34": ({"base_channels": 8}, 8000, 80),
}


def test_hook_cases_cover_every_registered_model():
    assert set(HOOK_CASES) == set(MODELS)


@pytest.mark.parametrize("name", list(HOOK_CASES))
def test_every_model_masks_its_features_in_training_only_and_keeps_its_state_dict(name):
    options, samples, bins = HOOK_CASES[name]
    torch.manual_seed(0)
    model = build_model(name, **options)
    keys = list(model.state_dict())
    x = waveforms(3, samples)
    with torch.no_grad():
        plain_train = model.train()(x)
        spec = Recording(SpecAugmentConfig(prob=1.0, time_masks=2, time_width=20, freq_masks=2, freq_width=10))
        attach(model, spec, name)
        masked_train = model.train()(x)
        assert spec.seen[0] == 3 and spec.seen[-2] == bins  # called on (B, …, bins, frames), after the front-end
        assert spec.last_masked == 3
        assert not torch.allclose(masked_train, plain_train)
        hooked_eval = model.eval()(x)
        model.spec_augment = nn.Identity()
        assert torch.equal(hooked_eval, model(x))  # evaluation and export: no masks (same BN statistics)
        model.spec_augment = spec
    assert list(model.state_dict()) == keys and not list(spec.parameters()) and not list(spec.buffers())
    fresh = build_model(name, **options)
    fresh.load_state_dict(model.state_dict(), strict=True)  # inference checkpoints and the seeds' import unchanged


def test_attach_refuses_a_model_without_the_hook():
    with pytest.raises(SpeakeridError, match="has no SpecAugment hook.*self.spec_augment = nn.Identity"):
        attach(nn.Linear(2, 2), SpecAugment(SpecAugmentConfig()), "Linear")


def test_a_step_draws_the_same_masks_anew_and_apart_from_the_musan_draws():
    spec, again = SpecAugment(SpecAugmentConfig(), seed=5, stream=1), SpecAugment(SpecAugmentConfig(), seed=5, stream=1)
    spec.at_step(9)
    first = spec.draw(64, 40, 200)
    spec.at_step(10)
    spec.draw(64, 40, 200)
    again.at_step(9)
    replay = again.draw(64, 40, 200)
    for field in dataclasses.fields(first):
        assert torch.equal(getattr(first, field.name), getattr(replay, field.name))
    other_rank = SpecAugment(SpecAugmentConfig(), seed=5, stream=0)
    other_rank.at_step(9)
    assert not torch.equal(other_rank.draw(64, 40, 200).time_start, first.time_start)
    spec.at_step(9)
    musan = step_generator(5, 1, 9)  # the MUSAN/RIR draws of the same (seed, rank, step)
    assert not torch.equal(torch.rand(8, generator=musan), torch.rand(8, generator=spec.generator))


def test_run_config_defaults_are_the_modules_and_bad_values_name_the_key():
    section = AugmentSection()
    assert section.spec_augment is False  # off by default
    config = SpecAugmentConfig()
    assert (section.spec_prob, section.spec_time_masks, section.spec_time_width, section.spec_freq_masks,
            section.spec_freq_width) == (config.prob, config.time_masks, config.time_width, config.freq_masks,
                                         config.freq_width)
    for bad, key in (({"prob": 1.5}, "augment.spec_prob"), ({"time_width": 0}, "augment.spec_time_width"),
                     ({"freq_masks": -1}, "augment.spec_freq_masks")):
        with pytest.raises(SpeakeridError, match=key):
            SpecAugmentConfig(**bad)


def test_training_with_masks_is_logged_and_resumes_bit_identical(train_shards, tmp_path):  # noqa: F811
    """On, the masks change the weights, every step logs how many utterances it masked, and a stopped and resumed run
    ends bit-identical to an uninterrupted one: each step's masks come from (seed, rank, step). Off, the loop is the
    one every other training test runs (the hook is an nn.Identity)."""
    on = ("augment.spec_augment=true", "augment.spec_prob=1.0", "augment.spec_time_width=5", "augment.spec_freq_width=4")
    run_module("train", *_args(train_shards, tmp_path / "off", "train.log_every=1"))
    run_module("train", *_args(train_shards, tmp_path / "whole", *on, "train.log_every=1"))
    model_off, _, _ = _final_weights(tmp_path / "off")
    model_on, _, _ = _final_weights(tmp_path / "whole")
    assert any(not torch.equal(model_off[k], model_on[k]) for k in model_off)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    masked = [r["spec_masked"] for r in records if "spec_masked" in r]
    assert masked and all(m == 8 for m in masked)  # batch_size 4 × nPerSpeaker 2, prob 1
    off_records = (tmp_path / "off" / "metrics.jsonl").read_text()
    assert "spec_masked" not in off_records
    run_module("train", *_args(train_shards, tmp_path / "resumed", *on), "--stop-after-steps", "7")
    run_module("train", *_args(train_shards, tmp_path / "resumed", *on))
    _assert_same_final_weights(tmp_path / "whole", tmp_path / "resumed")


def test_a_bad_spec_augment_option_fails_before_the_run_directory_is_claimed(train_shards, tmp_path):  # noqa: F811
    result = run_module("train", *_args(train_shards, tmp_path / "run"), "augment.spec_augment=true",
                        "augment.spec_time_width=0", check=False)
    assert result.returncode == 2 and "augment.spec_time_width (the widest mask) must be ≥ 1" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "config.yaml").exists()
