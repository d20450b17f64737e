"""The training loop through its front door (real subprocesses): exact resume and bad-input errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from speakerid.data.lists import read_train_list
from speakerid.data.plan import PackConfig, make_plan
from speakerid.data.writer import pack
from tests.conftest import run_module


@pytest.fixture(scope="module")
def train_shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "shards"
    pack(make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(chunk_size=2, max_utts=6)), corpus.root, out)
    return out


def _args(shards, run_dir, *extra):
    return ["data.train_shards=" + str(shards), f"train.run_dir={run_dir}", "batch_size=4", "max_frames=20",
            "model.options.n_out=32", "data.workers=0", "max_epoch=2", "train.mixed_precision=no", "optim.lr=0.01",
            *extra]


def _final_weights(run_dir):
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(last / "model.safetensors"), load_file(last / "model_1.safetensors"), last.name


def test_resume_after_a_stop_is_bit_identical_to_an_uninterrupted_run(train_shards, tmp_path):
    run_module("train", *_args(train_shards, tmp_path / "whole"))
    stopped = run_module("train", *_args(train_shards, tmp_path / "resumed"), "--stop-after-steps", "7")
    assert "step 7" in stopped.stderr
    resumed = run_module("train", *_args(train_shards, tmp_path / "resumed"))
    assert "resuming from" in resumed.stdout + resumed.stderr
    model_a, loss_a, name_a = _final_weights(tmp_path / "whole")
    model_b, loss_b, name_b = _final_weights(tmp_path / "resumed")
    assert name_a == name_b
    for a, b in ((model_a, model_b), (loss_a, loss_b)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{key} differs after resume"


@pytest.mark.parametrize("extra, message", [
    (["model.name=ResNet999"], "unknown model 'ResNet999'"),
    (["batch_size=40"], "data.n_speakers (batch_size) is 40 but the training shards hold 12 speakers"),
    (["nPerSpeaker=1"], "angleproto"),
    (["loss.name=triplet", "nPerSpeaker=3"], "triplet"),
])
def test_bad_configurations_fail_before_training(train_shards, tmp_path, extra, message):
    result = run_module("train", *_args(train_shards, tmp_path / "run"), *extra, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_run_directory_of_another_config_is_refused_unless_forced(train_shards, tmp_path):
    run_module("train", *_args(train_shards, tmp_path / "run"), "--stop-after-steps", "1")
    result = run_module("train", *_args(train_shards, tmp_path / "run"), "optim.lr=0.5", check=False)
    assert result.returncode == 2 and "another configuration (optim.lr: 0.01 → 0.5)" in result.stderr
    assert "--force" in result.stderr
    run_module("train", *_args(train_shards, tmp_path / "run"), "optim.lr=0.5", "--force", "--stop-after-steps", "2")
