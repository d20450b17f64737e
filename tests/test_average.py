"""Checkpoint averaging (python -m speakerid.average): the exact mean of the checkpoints' tensors, integer buffers from
the last one, refusals, and an averaged checkpoint that python -m evaluate takes like a run's export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from speakerid.config import load_config, save_config
from speakerid.data.lists import read_train_list
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.errors import SpeakeridError
from speakerid.inference import load_inference_checkpoint
from speakerid.models import build_model
from speakerid.training.average import average_checkpoints
from tests.conftest import run_module

OPTIONS = ["model.name=ResNetSE34L", "model.options.n_out=32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _checkpoint(run_dir, step: int, seed: int, *, n_out: int = 32, complete: bool = True, prefix: str = "") -> dict:
    """A training checkpoint as accelerate writes the model: weights and BatchNorm statistics all different."""
    torch.manual_seed(seed)
    model = build_model("ResNetSE34L", n_out=n_out)
    state = {}
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            state[key] = tensor + torch.randn_like(tensor)
        else:
            state[key] = torch.full_like(tensor, step)  # num_batches_tracked
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    save_file({prefix + k: v for k, v in state.items()}, str(path / "model.safetensors"))
    if complete:
        (path / "progress.json").write_text(json.dumps({"epoch": step // 10, "step": step, "batch": step}))
    return state


@pytest.fixture
def run(tmp_path):
    """Four complete checkpoints (steps 10…40) and an incomplete newer one (step 50)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(overrides=OPTIONS), run_dir / "config.yaml")
    states = {step: _checkpoint(run_dir, step, seed=step) for step in (10, 20, 30, 40)}
    _checkpoint(run_dir, 50, seed=50, complete=False)
    return run_dir, states


def _mean(states: list[dict]) -> dict:
    """The float64 mean of each floating-point tensor, as float32 (integer tensors left out)."""
    return {key: (sum(s[key].double() for s in states) / len(states)).float() for key in states[0]
            if states[0][key].is_floating_point()}


def test_averaging_equals_the_mean_of_the_last_checkpoints_tensors(run, tmp_path):
    run_dir, states = run
    result = average_checkpoints(run_dir, tmp_path / "avg", last=3)
    assert [p.name for p in result.checkpoints] == ["step-00000020", "step-00000030", "step-00000040"]
    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    expected = _mean([states[20], states[30], states[40]])
    floating = [key for key in averaged if averaged[key].is_floating_point()]
    assert sorted(floating) == sorted(expected)
    assert any(key.endswith("running_var") for key in floating)  # BatchNorm statistics are averaged like weights
    for key in floating:
        assert torch.equal(averaged[key], expected[key]), key
        torch.testing.assert_close(averaged[key].double(), torch.stack([states[s][key].double() for s in (20, 30, 40)])
                                   .mean(0), rtol=1e-6, atol=1e-6)
        assert not torch.equal(averaged[key], states[40][key]), key
    integers = [key for key in averaged if not averaged[key].is_floating_point()]
    assert integers and all(averaged[key].item() == 40 for key in integers)  # num_batches_tracked: the last one's

    loaded = load_inference_checkpoint(run_dir / ".." / "avg")
    assert loaded.meta["model"]["name"] == "ResNetSE34L" and loaded.meta["embedding_dim"] == 32
    assert loaded.meta["extra"]["averaged"]["steps"] == [20, 30, 40]
    assert loaded.meta["extra"]["averaged"]["checkpoints"][-1].endswith("step-00000040")


def test_chosen_checkpoints_and_wrapped_keys_average(run, tmp_path):
    run_dir, states = run
    ddp = _checkpoint(run_dir, 60, seed=60, prefix="module.")  # saved from a DDP-wrapped model
    result = average_checkpoints(run_dir, tmp_path / "avg", chosen=["step-00000010", run_dir / "checkpoints" /
                                                                     "step-00000060"])
    assert result.steps == [10, 60]
    averaged = load_file(tmp_path / "avg" / "model.safetensors")
    expected = _mean([states[10], ddp])
    assert all(torch.equal(averaged[k], expected[k]) for k in expected)


def test_checkpoints_of_another_shape_are_refused_naming_the_checkpoint_and_tensor(run, tmp_path):
    run_dir, _ = run
    _checkpoint(run_dir, 70, seed=70, n_out=48)
    with pytest.raises(SpeakeridError) as error:
        average_checkpoints(run_dir, tmp_path / "avg", last=2)
    message = str(error.value)
    assert "step-00000070/model.safetensors" in message and "step-00000040" in message
    assert "(48," in message and "(32," in message and "cannot be averaged" in message
    assert not (tmp_path / "avg").exists()


@pytest.mark.parametrize("chosen, message", [
    (["step-00000050"], "not a complete training checkpoint"),
    (["step-00000010", "step-00000010"], "named twice"),
])
def test_incomplete_or_repeated_checkpoints_are_refused(run, tmp_path, chosen, message):
    with pytest.raises(SpeakeridError, match=message):
        average_checkpoints(run[0], tmp_path / "avg", chosen=chosen)


def test_fewer_checkpoints_than_asked_says_how_many_and_how_to_keep_more(run, tmp_path):
    result = run_module("speakerid.average", run[0], "--last", "5", "--out", tmp_path / "avg", check=False,
                        env=ONE_THREAD)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "holds 4 complete" in result.stderr and "--last 4" in result.stderr
    assert "train.keep_checkpoints=5" in result.stderr


def test_the_average_of_a_trained_run_evaluates(corpus, tmp_path):
    shards = tmp_path / "shards"
    pack(make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(chunk_size=2, max_utts=6)), corpus.root,
         shards)
    run_dir = tmp_path / "run"
    run_module("train", f"data.train_shards={shards}", f"train.run_dir={run_dir}", "batch_size=4", "max_frames=20",
               "model.options.n_out=32", "data.workers=0", "train.max_steps=4", "train.save_every_steps=1",
               "train.mixed_precision=no", env=ONE_THREAD)
    averaged = run_module("speakerid.average", run_dir, "--last", "3", "--out", tmp_path / "avg", env=ONE_THREAD)
    assert "averaged 3 checkpoint(s)" in averaged.stderr
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000002", "step-00000003", "step-00000004"]  # keep_checkpoints=3
    expected = _mean([load_file(c / "model.safetensors") for c in checkpoints])
    weights = load_file(tmp_path / "avg" / "model.safetensors")
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    meta = json.loads((tmp_path / "avg" / "speakerid.json").read_text())
    assert meta["extra"]["label_space"]["speeds"] == [1.0]  # the run's label space, as its own export records it
    run_module("evaluate", "--checkpoint", tmp_path / "avg", "--trials", corpus.trials, "--audio", corpus.root,
               "--out", tmp_path / "eval", "--workers", "0", env=ONE_THREAD)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert 0 <= summary["lists"][0]["metrics"]["eer"] <= 100
