"""train.log_with: Accelerate's trackers, checked at start-up; TensorBoard's event files read back."""

from __future__ import annotations

import json
import sys

import accelerate.utils
import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from speakerid.config import load_config
from speakerid.errors import SpeakeridError
from speakerid.training.trackers import flat_config, tracker_names
from tests.conftest import run_module
from tests.test_training import _args, _free_port, _launch, train_shards  # noqa: F401  (the tiny training shards)


def test_log_with_names_every_tracker_and_the_deprecated_tensorboard_flag_folds_in():
    assert tracker_names(load_config(None, ["train.log_with=[tensorboard, tensorboard]"])) == ["tensorboard"]
    assert tracker_names(load_config(None, ["train.tensorboard=true"])) == ["tensorboard"]
    assert tracker_names(load_config(None, ["train.tensorboard=true", "train.log_with=[tensorboard]"])) == ["tensorboard"]
    assert tracker_names(load_config(None, [])) == []


def test_an_unknown_tracker_lists_the_valid_ones():
    with pytest.raises(SpeakeridError, match="unknown tracker 'tensorbaord'") as error:
        tracker_names(load_config(None, ["train.log_with=[tensorbaord]"]))
    for name in LOGGER_TYPE_TO_CLASS:  # the installed Accelerate's registry, not a copy
        assert name in str(error.value)


def test_the_deprecated_flag_disagreeing_with_log_with_is_an_error():
    with pytest.raises(SpeakeridError, match=r"train.tensorboard=true .* disagrees with train.log_with=\['mlflow'\]"):
        tracker_names(load_config(None, ["train.tensorboard=true", "train.log_with=[mlflow]"]))


def test_a_tracker_whose_package_is_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # hidden from accelerate's availability check
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    for flag in ("train.log_with=[tensorboard]", "train.tensorboard=true"):  # the silent no-op of old, now an error
        with pytest.raises(SpeakeridError, match=r"tensorboard is not installed; "
                                                 r"pip install 'speakerid-toolkit\[tensorboard\]'"):
            tracker_names(load_config(None, [flag]))


def _missing_tracker() -> str:
    missing = [n for n in LOGGER_TYPE_TO_CLASS if not getattr(accelerate.utils, f"is_{n}_available", lambda: True)()]
    if not missing:
        pytest.skip("every tracker Accelerate knows is installed here")
    return "wandb" if "wandb" in missing else missing[0]


def test_a_missing_tracker_fails_the_train_command_before_any_data_is_read(tmp_path):
    name = _missing_tracker()
    result = run_module("train", f"data.train_shards={tmp_path / 'no-shards'}", f"train.run_dir={tmp_path / 'run'}",
                        f"train.log_with=[{name}]", check=False)
    assert result.returncode == 2, result.stderr
    assert f"train.log_with: {name} is not installed; pip install" in result.stderr
    assert "no-shards" not in result.stderr and "Traceback" not in result.stderr  # the shards were never opened
    assert not (tmp_path / "run").exists()


def test_a_missing_tracker_stops_every_rank_of_a_launch_before_the_process_group_forms(tmp_path):
    name = _missing_tracker()
    process = _launch("-m", "train", f"data.train_shards={tmp_path / 'no-shards'}", f"train.run_dir={tmp_path / 'run'}",
                      f"train.log_with=[{name}]", port=_free_port())
    output, _ = process.communicate(timeout=120)  # a rank waiting for another in the process group would hang here
    assert process.returncode != 0
    assert f"train.log_with: {name} is not installed" in output, output  # the launcher ends the other rank
    assert "no-shards" not in output


def test_the_flat_config_holds_every_key_as_a_plain_value():
    flat = flat_config(load_config(None, ["model.options.n_out=32", "augment.speed_perturb=[0.9, 1.0]"]))
    assert flat["model.options.n_out"] == 32 and flat["augment.speed_perturb"] == "[0.9, 1.0]"
    assert flat["data.train_urls"] == "None" and flat["train.log_with"] == "[]"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_tensorboard_event_files_hold_the_step_metrics_the_validation_eer_and_the_config(corpus, train_shards,  # noqa: F811
                                                                                           tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_module("train", *_args(train_shards, run_dir, "max_epoch=1", "train.test_interval=1",
                               f"validation.trials={corpus.trials}", f"validation.audio={corpus.root}"),
               "train.log_with=[tensorboard]", "train.log_every=1")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = run_dir / "logs" / "speakerid"
    events = EventAccumulator(str(logs)).Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, max(steps) + 1))
    assert {"lr", "accuracy", "utterances_per_s", "data_wait", "eer", "min_dcf_01"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eer")] == [max(steps)]
    hparams = list(logs.glob("*/hparams.yml"))  # Accelerate's copy of the resolved config given to init_trackers
    assert len(hparams) == 1 and "train.log_with: '[''tensorboard'']'" in hparams[0].read_text()


def test_trackers_can_be_added_when_a_run_resumes(train_shards, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    run_module("train", *_args(train_shards, run_dir), "--stop-after-steps", "1")
    resumed = run_module("train", *_args(train_shards, run_dir), "train.log_with=[tensorboard]", "train.log_every=1",
                         "--stop-after-steps", "2")
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert list((run_dir / "logs" / "speakerid").glob("events.out.tfevents.*"))

