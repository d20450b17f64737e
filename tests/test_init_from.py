"""Starting a run from weights (train.init_from) and the large-margin fine-tuning recipes that use it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from speakerid.config import load_config
from speakerid.data.lists import read_train_list
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.errors import SpeakeridError
from speakerid.training.build import build_model_and_loss
from speakerid.training.init_from import init_weights
from tests.conftest import REPO, run_module

# the recipes at a size that trains in seconds on a CPU, without augmentation banks
TINY = ["batch_size=4", "max_frames=20", "data.workers=0", "train.mixed_precision=no", "augment.enabled=false",
        "augment.speed_perturb=[]", "schedule.warmup=2"]  # one class per speaker; tests/test_recipes.py: with speeds
RESNET = ["model.options.base_channels=4", "model.options.n_mels=40", "model.options.n_out=32"]
ECAPA = ["model.options.channels=16", "model.options.mfa_channels=48", "model.options.attention_channels=8",
         "model.options.se_bottleneck=8", "model.options.scale=4", "model.options.n_mels=40", "model.options.n_out=32"]
N_SPEAKERS = 12  # tests/conftest.py's SMALL_SPEC


@pytest.fixture(scope="module")
def train_shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "shards"
    pack(make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(chunk_size=2, max_utts=6)), corpus.root, out)
    return out


def _base_args(shards, run_dir, size=RESNET):
    return ["--config", REPO / "configs/resnet34_aamsoftmax.yaml", f"data.train_shards={shards}",
            f"train.run_dir={run_dir}", "max_epoch=1", *TINY, *size]


@pytest.fixture(scope="module")
def base_run(train_shards, tmp_path_factory):
    """The base recipe (ResNet34 + AAM-softmax), one tiny epoch."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    run_module("train", *_base_args(train_shards, run_dir))
    return run_dir


def _config(shards, run_dir, *extra, recipe="configs/resnet34_aamsoftmax_lm.yaml", size=RESNET):
    return load_config(REPO / recipe, [f"data.train_shards={shards}", f"train.run_dir={run_dir}", *TINY, *size, *extra])


def _latest(run_dir):
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


def _assert_exact(module, state):
    got = module.state_dict()
    assert got.keys() == state.keys()
    for key in state:
        assert torch.equal(got[key], state[key]), f"{key} differs from the source"


def test_init_from_a_run_directory_loads_its_latest_checkpoint_exactly(train_shards, base_run, tmp_path):
    config = _config(train_shards, tmp_path / "lm", f"train.init_from={base_run}")
    model, loss = build_model_and_loss(config, n_classes=N_SPEAKERS)
    record = init_weights(config, model, loss, n_classes=N_SPEAKERS)
    latest = _latest(base_run)
    assert record["source"] == str(latest) and record["loss"] == "1 tensor loaded"
    _assert_exact(model, load_file(latest / "model.safetensors"))  # weights and BatchNorm statistics
    _assert_exact(loss, load_file(latest / "model_1.safetensors"))  # the AAM class weights


def test_init_from_an_inference_checkpoint_loads_the_model_and_says_the_loss_starts_afresh(train_shards, base_run,
                                                                                          tmp_path):
    config = _config(train_shards, tmp_path / "lm", f"train.init_from={base_run / 'export'}")
    model, loss = build_model_and_loss(config, n_classes=N_SPEAKERS)
    record = init_weights(config, model, loss, n_classes=N_SPEAKERS)
    assert record["kind"] == "inference checkpoint" and "starts from its initialisation" in record["loss"]
    _assert_exact(model, load_file(base_run / "export" / "model.safetensors"))


def test_init_from_a_voxceleb_trainer_model_file(train_shards, base_run, tmp_path):
    latest = _latest(base_run)
    state = {**{f"__S__.{k}": v for k, v in load_file(latest / "model.safetensors").items()},
             **{f"module.__L__.{k}": v for k, v in load_file(latest / "model_1.safetensors").items()}}
    torch.save({"model_state_dict": state, "epoch": 3}, tmp_path / "baseline.model")
    config = _config(train_shards, tmp_path / "lm", f"initial_model={tmp_path / 'baseline.model'}")  # the seed's name
    model, loss = build_model_and_loss(config, n_classes=N_SPEAKERS)
    record = init_weights(config, model, loss, n_classes=N_SPEAKERS)
    assert record["kind"] == "voxceleb_trainer .model file"
    _assert_exact(model, load_file(latest / "model.safetensors"))
    _assert_exact(loss, load_file(latest / "model_1.safetensors"))


def test_a_loss_head_for_another_number_of_speakers_is_refused_unless_skipped(train_shards, base_run, tmp_path):
    config = _config(train_shards, tmp_path / "lm", f"train.init_from={base_run}")
    model, loss = build_model_and_loss(config, n_classes=10)
    with pytest.raises(SpeakeridError) as error:
        init_weights(config, model, loss, n_classes=10)
    message = str(error.value)
    assert "weight: file (12, 32), loss aamsoftmax (10, 32)" in message and "this run's 10" in message, message
    assert "train.init_skip=[loss]" in message
    skipped = _config(train_shards, tmp_path / "lm", f"train.init_from={base_run}", "train.init_skip=[loss]")
    fresh = loss.weight.detach().clone()
    record = init_weights(skipped, model, loss, n_classes=10)
    assert record["loss"] == "not loaded (train.init_skip)" and torch.equal(loss.weight, fresh)
    _assert_exact(model, load_file(_latest(base_run) / "model.safetensors"))


def test_class_weights_of_other_speakers_are_refused_unless_skipped(train_shards, base_run, tmp_path):
    """Same number of speakers, other names (or labels): the AAM rows would belong to other speakers."""
    ours = json.loads((train_shards / "index.json").read_text())["speakers"]  # name → label
    assert len(ours) == N_SPEAKERS
    config = _config(train_shards, tmp_path / "lm", f"train.init_from={base_run}")
    model, loss = build_model_and_loss(config, n_classes=N_SPEAKERS)
    assert init_weights(config, model, loss, n_classes=N_SPEAKERS, speakers=ours)["loss"] == "1 tensor loaded"
    others = {**{k: v for k, v in ours.items() if v != 3}, "id99999": 3}
    with pytest.raises(SpeakeridError, match=r"2 speakers are in one run and not the other, or have another label \(id00003, id99999\)"):
        init_weights(config, model, loss, n_classes=N_SPEAKERS, speakers=others)
    skipped = _config(train_shards, tmp_path / "lm", f"train.init_from={base_run}", "train.init_skip=[loss]")
    assert init_weights(skipped, model, loss, n_classes=N_SPEAKERS, speakers=others)["loss"].startswith("not loaded")


def test_bad_init_from_stops_the_front_door_before_the_run_directory_is_written(train_shards, base_run, tmp_path):
    result = run_module("train", "--config", REPO / "configs/resnet34_aamsoftmax_lm.yaml", f"data.train_shards={train_shards}",
                        f"train.run_dir={tmp_path / 'lm'}", f"initial_model={base_run}", *TINY, *RESNET,
                        "model.options.n_out=48", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "fc.weight: file (32, 320), model ResNet34 (48, 320)" in result.stderr, result.stderr
    assert not (tmp_path / "lm" / "config.yaml").exists()


def test_model_options_that_change_no_tensor_are_said_when_they_differ_from_the_source(train_shards, tmp_path):
    from speakerid.inference import save_inference_checkpoint
    from speakerid.models import build_model
    from speakerid.training.init_from import describe

    options = {"n_out": 32, "log_input": False}
    source = save_inference_checkpoint(tmp_path / "source", build_model("ResNetSE34L", **options),
                                       model_name="ResNetSE34L", model_options=options, loss_name="aamsoftmax")
    config = _config(train_shards, tmp_path / "lm", f"train.init_from={source}", "model.name=ResNetSE34L",
                     "model.options={n_out: 32, log_input: true}")
    model, loss = build_model_and_loss(config, n_classes=N_SPEAKERS)
    record = init_weights(config, model, loss, n_classes=N_SPEAKERS)
    assert record["model_options_changed"] == {"log_input": [False, True]}
    assert "model options changed from the source's: log_input False → True" in describe(record)


@pytest.mark.parametrize("extra, message", [
    (["model.name=ResNetSE34L", "model.options={n_out: 32}"], "holds a ResNet34 model but this run configures ResNetSE34L"),
    (["model.options.n_out=48"], "2 shape mismatch: fc.weight: file (32, 320), model ResNet34 (48, 320), fc.bias"),
    (["model.options.base_channels=8"], "does not fit model ResNet34"),
    (["loss.name=amsoftmax"], "trained with loss aamsoftmax, this run uses amsoftmax"),
    (["train.init_skip=[model]"], "train.init_skip: ['model'] not understood"),
])
def test_weights_of_another_architecture_or_loss_are_refused_naming_what_differs(train_shards, base_run, tmp_path,
                                                                               extra, message):
    config = _config(train_shards, tmp_path / "lm", f"train.init_from={base_run}", *extra)
    model, loss = build_model_and_loss(config, n_classes=N_SPEAKERS)
    with pytest.raises(SpeakeridError) as error:
        init_weights(config, model, loss, n_classes=N_SPEAKERS)
    assert message in str(error.value), str(error.value)


def test_init_from_a_missing_path_or_a_run_without_checkpoints_says_so(train_shards, tmp_path):
    for source, message in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "neither a run directory")):
        config = _config(train_shards, tmp_path / "lm", f"train.init_from={source}")
        model, loss = build_model_and_loss(config, n_classes=N_SPEAKERS)
        with pytest.raises(SpeakeridError, match=message):
            init_weights(config, model, loss, n_classes=N_SPEAKERS)
    (tmp_path / "young").mkdir()
    (tmp_path / "young" / "config.yaml").write_text("model: {name: ResNet34}\n")
    config = _config(train_shards, tmp_path / "lm", f"train.init_from={tmp_path / 'young'}")
    with pytest.raises(SpeakeridError, match="has no complete checkpoint"):
        init_weights(config, *build_model_and_loss(config, n_classes=N_SPEAKERS), n_classes=N_SPEAKERS)


def _lm_args(shards, run_dir, base, recipe, size):
    return ["--config", REPO / recipe, f"data.train_shards={shards}", f"train.run_dir={run_dir}",
            f"train.init_from={base}", "max_epoch=1", *TINY, *size]


def _parameters(run_dir):
    """The trained tensors of a run's latest checkpoint (BatchNorm statistics move in any training forward)."""
    latest = _latest(run_dir)
    model = {k: v for k, v in load_file(latest / "model.safetensors").items()
             if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    return model, load_file(latest / "model_1.safetensors")


def test_the_resnet34_large_margin_recipe_fine_tunes_the_base_run_end_to_end(train_shards, base_run, tmp_path):
    lm_recipe = "configs/resnet34_aamsoftmax_lm.yaml"
    # the first step starts from the base weights: with the learning rate at 0 they come out of it unchanged
    still = tmp_path / "lr0"
    first = run_module("train", *_lm_args(train_shards, still, base_run, lm_recipe, RESNET), "optim.lr=0.0",
                       "optim.weight_decay=0.0", "schedule.name=constant", "--stop-after-steps", "1")
    assert f"initialised from {_latest(base_run)}" in first.stdout, first.stdout
    for ours, theirs in zip(_parameters(still), _parameters(base_run)):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    record = json.loads((still / "init_from.json").read_text())
    assert record["source"] == str(_latest(base_run)) and record["loss"] == "1 tensor loaded"
    # the recipe as written (sizes aside): stopped, resumed from its own checkpoint (not the base again), finished
    lm = tmp_path / "lm"
    run_module("train", *_lm_args(train_shards, lm, base_run, lm_recipe, RESNET), "--stop-after-steps", "2")
    resumed = run_module("train", *_lm_args(train_shards, lm, base_run, lm_recipe, RESNET))
    assert "resuming from" in resumed.stdout and "initialised from" not in resumed.stdout, resumed.stdout
    assert "applies to a new run only" in resumed.stdout
    assert "done: epoch 1" in resumed.stderr and (lm / "export" / "model.safetensors").exists()
    config = load_config(lm / "config.yaml")
    assert config.loss.options["margin"] == 0.5 and config.train.init_from == str(base_run)
    metrics = [json.loads(line) for line in (lm / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lr"] <= 2.0e-4 for r in metrics if "lr" in r)


def test_the_ecapa_large_margin_recipe_fine_tunes_its_base_run_end_to_end(train_shards, tmp_path):
    base, lm = tmp_path / "base", tmp_path / "lm"
    run_module("train", "--config", REPO / "configs/ecapa_aamsoftmax.yaml", f"data.train_shards={train_shards}",
               f"train.run_dir={base}", "max_epoch=1", *TINY, *ECAPA)
    done = run_module("train", *_lm_args(train_shards, lm, base, "configs/ecapa_aamsoftmax_lm.yaml", ECAPA))
    assert f"initialised from {_latest(base)}" in done.stdout and "done: epoch 1" in done.stderr, done.stdout
    assert json.loads((lm / "init_from.json").read_text())["loss"] == "1 tensor loaded"
    assert (lm / "export" / "model.safetensors").exists()


def test_a_fresh_run_differs_from_an_initialised_one(train_shards, base_run, tmp_path):
    """Without init_from the LM recipe starts from random weights: what the tests above tell apart."""
    config = _config(train_shards, tmp_path / "lm", "train.init_from=")
    model, _ = build_model_and_loss(config, n_classes=N_SPEAKERS)
    base = load_file(_latest(base_run) / "model.safetensors")
    assert not torch.equal(model.state_dict()["fc.weight"], base["fc.weight"])


def test_the_exponential_schedule_of_the_wespeaker_recipes_warms_up_from_0_and_decays_to_min_lr():
    from speakerid.training import build_scheduler

    config = load_config(REPO / "configs/resnet34_aamsoftmax_lm.yaml", ["schedule.warmup=10", "train.max_epoch=1"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.optim.lr)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=100)
    rates = []
    for _ in range(101):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[5] == pytest.approx(0.5 * 2e-4 * 0.25 ** 0.05)  # half-way up the warm-up
    assert rates[50] == pytest.approx(2e-4 * 0.25 ** 0.5) and rates[100] == pytest.approx(5e-5)  # geometric decay
    with pytest.raises(SpeakeridError, match="give a min_lr above 0"):
        build_scheduler(load_config(None, ["schedule.name=exponential"]), optimizer, steps_per_epoch=100)


# --- large-margin fine-tuning after a speed-perturbed base: the whole class head is kept (WeSpeaker's do_lm) ---------

SPEEDS = "augment.speed_perturb=[0.9,1.0,1.1]"


@pytest.fixture(scope="module")
def perturbed_base(train_shards, tmp_path_factory):
    """The base recipe with speed perturbation: its AAM head has 12 speakers × 3 speeds = 36 rows."""
    run_dir = tmp_path_factory.mktemp("perturbed") / "run"
    run_module("train", *_base_args(train_shards, run_dir), SPEEDS)
    return run_dir


def test_an_unperturbed_lm_run_keeps_the_whole_head_of_a_speed_perturbed_base_and_resumes(train_shards,
                                                                                          perturbed_base, tmp_path):
    space = {"n_speakers": N_SPEAKERS, "speeds": [1.0, 0.9, 1.1], "n_classes": 36, "data_speeds": [1.0]}
    lm = tmp_path / "lm"
    args = [*_lm_args(train_shards, lm, perturbed_base, "configs/resnet34_aamsoftmax_lm.yaml", RESNET), "optim.lr=0.0",
            "optim.weight_decay=0.0", "schedule.name=constant"]
    first = run_module("train", *args, "--stop-after-steps", "1")
    assert "class head: speeds [1.0, 0.9, 1.1] of the source kept (36 rows = 12 speakers × 3 speeds)" in first.stdout
    for ours, theirs in zip(_parameters(lm), _parameters(perturbed_base)):  # lr 0: every row is the base's
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    (weight,) = _parameters(lm)[1].values()
    assert 36 in weight.shape
    record = json.loads((lm / "init_from.json").read_text())
    assert record["loss"] == "1 tensor loaded" and "labels 0..11" in record["class_head"]
    # resumed from its own checkpoint: the same label space, recorded in the checkpoint and the export
    resumed = run_module("train", *args)
    assert "resuming from" in resumed.stdout and "done: epoch 1" in resumed.stderr, resumed.stdout
    assert json.loads((_latest(lm) / "training_state_0.json").read_text())["label_space"] == space
    assert json.loads((lm / "export" / "speakerid.json").read_text())["extra"]["label_space"] == space


def test_run_label_space_keeps_the_source_head_only_for_an_unperturbed_run_loading_the_loss(train_shards,
                                                                                            perturbed_base, tmp_path):
    from speakerid.training.init_from import run_label_space

    def space(*extra, n_speakers=N_SPEAKERS):
        return run_label_space(_config(train_shards, tmp_path / "lm", *extra), n_speakers, None)

    assert space(f"train.init_from={perturbed_base}")["n_classes"] == 36
    assert space(f"train.init_from={perturbed_base}", "train.init_skip=[loss]")["n_classes"] == 12
    assert space(f"train.init_from={perturbed_base}", "augment.speed_perturb=[1.0,1.2]")["n_classes"] == 24
    assert space(f"train.init_from={perturbed_base / 'export'}")["n_classes"] == 36  # its extra.label_space
    assert space(f"train.init_from={perturbed_base}", n_speakers=10) == {"n_speakers": 10, "speeds": [1.0],
                                                                         "n_classes": 10}


def test_a_speed_perturbed_head_of_other_speakers_is_still_refused(train_shards, perturbed_base, tmp_path):
    from speakerid.training.init_from import run_label_space

    ours = json.loads((train_shards / "index.json").read_text())["speakers"]
    config = _config(train_shards, tmp_path / "lm", f"train.init_from={perturbed_base}")
    others = {**{k: v for k, v in ours.items() if v != 3}, "id99999": 3}  # as many speakers, one another
    space = run_label_space(config, len(others), None)
    model, loss = build_model_and_loss(config, n_classes=space["n_classes"])
    with pytest.raises(SpeakeridError, match="2 speakers are in one run and not the other"):
        init_weights(config, model, loss, n_classes=space["n_classes"], speakers=others, space=space)
    space = run_label_space(config, 10, None)  # fewer speakers: a 1× head of 10 rows, which 36 rows do not fit
    model, loss = build_model_and_loss(config, n_classes=space["n_classes"])
    with pytest.raises(SpeakeridError, match=r"weight: file \(36, 32\), loss aamsoftmax \(10, 32\)"):
        init_weights(config, model, loss, n_classes=space["n_classes"], space=space)


def test_a_speed_perturbed_head_is_refused_by_a_run_of_other_speeds(train_shards, perturbed_base, tmp_path):
    """As many rows ([1.0, 1.1, 0.9] orders the speeds k otherwise), but row k would mean another speed."""
    from speakerid.training.init_from import run_label_space

    config = _config(train_shards, tmp_path / "lm", f"train.init_from={perturbed_base}", "augment.speed_perturb=[1.1,1.0,0.9]")
    space = run_label_space(config, N_SPEAKERS, None)
    model, loss = build_model_and_loss(config, n_classes=space["n_classes"])
    with pytest.raises(SpeakeridError, match=r"rows are speeds \[1.0, 0.9, 1.1\].*this run's are \[1.0, 1.1, 0.9\]"):
        init_weights(config, model, loss, n_classes=space["n_classes"], space=space)
    same = _config(train_shards, tmp_path / "lm", f"train.init_from={perturbed_base}", SPEEDS)
    assert init_weights(same, model, loss, n_classes=36, space=run_label_space(same, N_SPEAKERS, None))["loss"] \
        == "1 tensor loaded"
