"""The modern recipes (configs/resnet34_*, configs/ecapa_*) train as written: speed perturbation, augmentation and
their loss on, at a size that runs in seconds (network width, crop and batch shrunk by overrides)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from speakerid.config import load_config
from speakerid.data.lists import read_train_list
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from tests.conftest import REPO, run_module
from tests.test_training import noise_banks  # noqa: F401  (a fixture: MUSAN-like and RIR banks)

TINY = ["batch_size=4", "max_frames=20", "data.workers=0", "train.mixed_precision=no", "max_epoch=1",
        "train.log_every=1"]
SIZE = {"resnet34": ["model.options.base_channels=4", "model.options.n_mels=40", "model.options.n_out=32"],
        "ecapa": ["model.options.channels=16", "model.options.mfa_channels=48", "model.options.attention_channels=8",
                  "model.options.se_bottleneck=8", "model.options.scale=4", "model.options.n_mels=40",
                  "model.options.n_out=32"]}
SPEEDS = [0.9, 1.0, 1.1]
MODERN = ["resnet34_aamsoftmax", "resnet34_aamsoftmax_lm", "ecapa_c512_aamsoftmax_sp",
          "ecapa_c512_aamsoftmax_sp_lm", "resnet34_angleproto", "resnet34_mmp_balance",
          "ecapa_angleproto", "ecapa_mmp_balance"]


@pytest.fixture(scope="module")
def train_shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "shards"
    pack(make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(chunk_size=2, max_utts=6)), corpus.root, out)
    return out


@pytest.mark.parametrize("recipe", MODERN)
def test_every_modern_recipe_has_speed_perturbation_and_augmentation(recipe):
    config = load_config(REPO / f"configs/{recipe}.yaml")
    # an LM stage trains unperturbed data on its base's perturbed class head (WeSpeaker's do_lm)
    assert config.augment.speed_perturb == ([] if recipe.endswith("_lm") else SPEEDS) and config.augment.enabled
    assert config.model.options["n_mels"] == 80
    if config.loss.name in ("angleproto", "mmp_balance"):
        assert config.data.utts_per_speaker >= 2  # a metric / masked-proxy loss needs M ≥ 2 utterances per speaker


def _train(recipe, shards, run_dir, banks, *extra):
    size = SIZE["ecapa" if recipe.startswith("ecapa") else "resnet34"]
    return run_module("train", "--config", REPO / f"configs/{recipe}.yaml", f"data.train_shards={shards}",
                      f"train.run_dir={run_dir}", *TINY, *size, *banks, *extra)


def test_the_ecapa_base_recipe_trains_with_speed_perturbation_and_augmentation(train_shards, noise_banks, tmp_path):
    """WeSpeaker's recipe as written: 12 speakers × 3 speeds = 36 AAM classes, augmented utterances, an export."""
    result = _train("ecapa_c512_aamsoftmax_sp", train_shards, tmp_path / "run", noise_banks, "schedule.warmup=2")
    assert "done: epoch 1" in result.stderr
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    space = json.loads((checkpoint / "training_state_0.json").read_text())["label_space"]
    assert space["n_speakers"] == 12 and space["n_classes"] == 36 and sorted(space["speeds"]) == SPEEDS
    (weight,) = load_file(checkpoint / "model_1.safetensors").values()
    assert 36 in weight.shape  # the AAM class weights span every (speaker, speed)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("augmented", 0) for r in records) > 0
    assert (tmp_path / "run" / "export" / "speakerid.json").is_file()
    # the LM recipe turns speed perturbation off and keeps the base's 36-row class head whole (WeSpeaker's do_lm)
    lm = _train("ecapa_c512_aamsoftmax_sp_lm", train_shards, tmp_path / "lm", noise_banks, "schedule.warmup=2",
                f"train.init_from={tmp_path / 'run'}")
    assert f"initialised from {checkpoint}" in lm.stdout and "done: epoch 1" in lm.stderr
    record = json.loads((tmp_path / "lm" / "init_from.json").read_text())
    assert record["loss"] == "1 tensor loaded", record
    lm_checkpoint = sorted((tmp_path / "lm" / "checkpoints").glob("step-*"))[-1]
    lm_space = json.loads((lm_checkpoint / "training_state_0.json").read_text())["label_space"]
    assert lm_space["n_classes"] == 36 and lm_space["data_speeds"] == [1.0]


def test_the_ecapa_masked_proxy_recipe_trains_with_speed_perturbation(train_shards, noise_banks, corpus, tmp_path):
    """The seeds' loss on the modern network: N × M = 2 × 2 tuples, 36 proxies, the plateau schedule on a validation."""
    result = _train("ecapa_mmp_balance", train_shards, tmp_path / "run", noise_banks, "batch_size=2",
                    f"validation.trials={corpus.trials}", f"validation.audio={corpus.root}")
    assert "done: epoch 1" in result.stderr
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    space = json.loads((checkpoint / "training_state_0.json").read_text())["label_space"]
    assert space["n_classes"] == 36
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eer" in r for r in records)


@pytest.mark.parametrize("aug_prob, clean", [(0.8, 0.2), (0.6, 0.4), (0.0, 1.0)])
def test_aug_prob_is_the_share_of_augmented_utterances_in_the_seeds_proportions(noise_banks, aug_prob, clean):
    """0.8 keeps the seed's 1/5 per type; WeSpeaker's 0.6 leaves 2 in 5 clean, the rest 0.15 each."""
    from types import SimpleNamespace

    from speakerid.training.build import build_augmenter

    config = load_config(None, [*noise_banks, f"augment.aug_prob={aug_prob}"])
    augmenter = build_augmenter(config, SimpleNamespace(process_index=0, num_processes=1))
    assert augmenter.config.probabilities == pytest.approx((clean, *[aug_prob / 4] * 4))


def test_the_modern_recipes_augment_as_wespeaker_does():
    for recipe in MODERN:
        assert load_config(REPO / f"configs/{recipe}.yaml").augment.aug_prob == 0.6, recipe


def test_an_aug_prob_outside_0_1_stops_train_before_the_run_directory(train_shards, noise_banks, tmp_path):
    result = run_module("train", "--config", REPO / "configs/ecapa_angleproto.yaml", f"data.train_shards={train_shards}",
                        f"train.run_dir={tmp_path / 'run'}", *TINY, *SIZE["ecapa"], *noise_banks, "augment.aug_prob=1.5",
                        check=False)
    assert result.returncode == 2 and "augment.aug_prob must be between 0 and 1" in result.stderr
    assert not (tmp_path / "run").exists()
