"""Typed configuration: YAML + dotted overrides, seed aliases, and one clear error per mistake."""

from __future__ import annotations

import pytest
import yaml

from speakerid.config import Config, diff_configs, load_config, option_reference, save_config
from speakerid.errors import SpeakeridError


def test_yaml_then_overrides_with_seed_aliases(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  name: ResNetSE34L\n  options: {n_out: 64}\ntrainfunc: mp_balance\nbatch_size: 8\n"
                    "optim: {name: sgd, lr: 0.2}\n")
    config = load_config(path, ["nPerSpeaker=3", "optim.lr=0.1", "model.options.encoder_type=ASP", "mixedprec=true",
                                "lr_decay=0.97", "test_interval=1"])
    assert (config.model.name, config.model.options) == ("ResNetSE34L", {"n_out": 64, "encoder_type": "ASP"})
    assert config.loss.name == "mp_balance" and config.data.n_speakers == 8 and config.data.utts_per_speaker == 3
    assert (config.optim.name, config.optim.lr) == ("sgd", 0.1)
    assert (config.train.mixed_precision, config.schedule.gamma, config.train.test_interval) == ("auto", 0.97, 1)
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)  # ints are accepted where floats are
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 0.001  # PyYAML reads 1e-3 as a string


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr' (did you mean 'lr'?); valid keys of optim: grad_accum"),
    ("nPerSpeakr=2", "unknown key 'nPerSpeakr' (did you mean 'nPerSpeaker'?)"),
    ("data.n_speakers=many", "data.n_speakers: expected int, got 'many'"),
    ("optim.name=rmsprop", "optim.name: 'rmsprop' is not one of 'adam', 'adamw', 'sgd'"),
    ("data.workers", "expected KEY=VALUE"),
    ("optim.lr.x=1", "optim.lr has no sub-keys"),
])
def test_every_mistake_names_the_key_and_the_fix(override, message):
    with pytest.raises(SpeakeridError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  n_speakrs: 4\n")
    with pytest.raises(SpeakeridError, match=rf"{path}: unknown key 'data.n_speakrs' \(did you mean 'n_speakers'\?\)"):
        load_config(path)


def test_resolved_config_round_trips_and_diffs(tmp_path):
    config = load_config(None, ["batch_size=7"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == config.to_dict()
    assert diff_configs(Config().to_dict(), config.to_dict()) == ["data.n_speakers: 200 → 7"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["n_speakers"] == 7


def test_option_reference_lists_every_field_with_its_alias():
    reference = option_reference()
    assert "| `data.n_speakers` | `200` |" in reference and "(seed: batch_size)" in reference
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(vars(getattr(Config(), s))) for s in vars(Config()))


def test_every_recipe_loads_and_builds_its_model_and_loss():
    from pathlib import Path

    from speakerid.training import build_model_and_loss

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(recipes) >= 10
    for recipe in recipes:
        config = load_config(recipe)
        assert "Expected EER" in recipe.read_text() or recipe.name == "demo.yaml", recipe
        model, loss = build_model_and_loss(config, n_classes=10)
        assert model is not None and loss is not None


def test_margin_warmup_schedule():
    from speakerid.training import margin_at

    config = load_config(None, ["loss.margin_warmup_start=2", "loss.margin_warmup_end=6"])
    assert [margin_at(config, e, 0.2) for e in (0, 2, 4, 6, 9)] == [0.0, 0.0, 0.1, 0.2, 0.2]


def test_docs_option_reference_is_the_generated_one():
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "options.md").read_text()
    block = page.split("<!-- options:begin -->\n", 1)[1].split("\n<!-- options:end -->", 1)[0]
    assert block == option_reference().rstrip("\n"), "docs/options.md is stale: python -m speakerid.config > the block"


def test_a_recipe_is_found_by_name_wherever_the_command_runs(tmp_path, monkeypatch):
    """The recipes are package data: `--config resnet34_aamsoftmax` works outside the checkout; a wrong name lists them."""
    from speakerid.config import RECIPES, recipe_path

    monkeypatch.chdir(tmp_path)
    assert recipe_path("resnet34_aamsoftmax") == recipe_path("resnet34_aamsoftmax.yaml") == RECIPES / "resnet34_aamsoftmax.yaml"
    assert load_config("demo").loss.name == "mp_balance"
    (tmp_path / "demo.yaml").write_text("loss: {name: softmax}\n")  # a file of that name here wins
    assert load_config("demo.yaml").loss.name == "softmax"
    with pytest.raises(SpeakeridError, match=r"resnet43: no such config file.*resnet34_aamsoftmax"):
        load_config("resnet43")
    with pytest.raises(SpeakeridError, match="cannot read the config"):
        load_config("elsewhere/resnet34_aamsoftmax.yaml")  # a path is never looked up among the recipes
