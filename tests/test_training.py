"""The training loop through its front door (real subprocesses): exact resume and bad-input errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from speakerid.data.lists import read_train_list
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.errors import SpeakeridError
from tests.conftest import REPO, run_module
from tests.test_batches import _zero_flac_frames


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


def _data_reports(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("data_")} for r in records if "data_coverage" in r]


def test_resume_with_undecodable_members_gives_the_same_weights_and_data_reports(train_shards, tmp_path):
    """Skipped batches drop the same damaged tuples as decoded ones; the report of the epoch cut by the stop covers
    all of it."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(train_shards, damaged)
    for shard in sorted(damaged.glob("*.tar"))[:3]:  # every flac member's frames zeroed: it parses, it does not decode
        _zero_flac_frames(shard)
    run_module("train", *_args(damaged, tmp_path / "whole"))
    run_module("train", *_args(damaged, tmp_path / "resumed"), "--stop-after-steps", "13")  # in the second epoch
    run_module("train", *_args(damaged, tmp_path / "resumed"))
    whole, resumed = _data_reports(tmp_path / "whole"), _data_reports(tmp_path / "resumed")
    assert len(whole) == 2 and whole[1]["data_corrupt_members"] > 0
    assert resumed == whole
    model_a, loss_a, name_a = _final_weights(tmp_path / "whole")
    model_b, loss_b, name_b = _final_weights(tmp_path / "resumed")
    assert name_a == name_b
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(loss_a[k], loss_b[k]) for k in loss_a)


@pytest.mark.parametrize("extra, message", [
    (["model.name=ResNet999"], "unknown model 'ResNet999'"),
    (["loss.name=angleprot"], "angleprot"),
    (["batch_size=40"], "data.n_speakers (batch_size) is 40 but the training shards hold 12 speakers"),
    (["nPerSpeaker=1"], "angleproto"),
    (["loss.name=triplet", "nPerSpeaker=3"], "triplet"),
    (["data.workers=-1"], "data.workers is -1: give 0"),
    (["model.options.n_outt=32"], "n_outt"),
    (["optim.name=sgd", "loss.margin_warmup_end=3"], "has no margin to warm up"),
    (["augment.enabled=true"], "augment.enabled needs augment.musan_shards"),
])
def test_bad_configurations_fail_before_training(train_shards, tmp_path, extra, message):
    result = run_module("train", *_args(train_shards, tmp_path / "run"), *extra, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing claimed: the corrected command is not refused


def test_a_typo_leaves_the_run_directory_free_for_the_corrected_command(train_shards, tmp_path):
    typo = run_module("train", *_args(train_shards, tmp_path / "run"), "model.options.encoder_typ=ASP", check=False)
    assert typo.returncode == 2 and "encoder_typ" in typo.stderr, typo.stderr
    corrected = run_module("train", *_args(train_shards, tmp_path / "run"), "model.options.encoder_type=ASP",
                           "--stop-after-steps", "1")
    assert "step 1" in corrected.stderr


def test_a_run_directory_of_another_config_is_refused_unless_forced(train_shards, tmp_path):
    run_module("train", *_args(train_shards, tmp_path / "run"), "--stop-after-steps", "1")
    result = run_module("train", *_args(train_shards, tmp_path / "run"), "optim.lr=0.5", check=False)
    assert result.returncode == 2 and "another configuration (optim.lr: 0.01 → 0.5)" in result.stderr
    assert "--force" in result.stderr
    run_module("train", *_args(train_shards, tmp_path / "run"), "optim.lr=0.5", "--force", "--stop-after-steps", "2")


def test_force_with_another_model_size_says_which_tensors_do_not_fit(train_shards, tmp_path):
    run_module("train", *_args(train_shards, tmp_path / "run"), "--stop-after-steps", "1")
    result = run_module("train", *_args(train_shards, tmp_path / "run"), "model.options.n_out=48", "--force", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "does not fit the configured model" in result.stderr and "saved [32" in result.stderr, result.stderr
    assert "use a new train.run_dir" in result.stderr


class _RunsCode:
    """A pickle that creates a file when it is loaded: what a planted checkpoint file could do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_runs_no_code_from_a_planted_pickle(train_shards, tmp_path):
    import pickle

    run_dir, marker = tmp_path / "run", tmp_path / "code-ran"
    run_module("train", *_args(train_shards, run_dir), "--stop-after-steps", "2")
    (checkpoint,) = (run_dir / "checkpoints").glob("step-*")
    assert list(checkpoint.glob("training_state_0.json")) and not list(checkpoint.glob("custom_checkpoint_*"))
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):  # what accelerate would unpickle in full
        (checkpoint / name).write_bytes(pickle.dumps(_RunsCode(marker)))
    resumed = run_module("train", *_args(train_shards, run_dir), "--stop-after-steps", "3")
    assert "resuming from" in resumed.stdout + resumed.stderr and not marker.exists()
    latest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    for name in ("random_states_0.pkl", "optimizer.bin"):  # accelerate's own files, read with weights_only
        original = (latest / name).read_bytes()
        (latest / name).write_bytes(pickle.dumps(_RunsCode(marker)))
        refused = run_module("train", *_args(train_shards, run_dir), check=False)
        assert refused.returncode == 2 and "could run code; refused" in refused.stderr, refused.stderr
        assert not marker.exists()
        (latest / name).write_bytes(original)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args, machines: int = 1, rank: int = 0, port: int, processes: int = 2, log=None, **kw) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", *map(str, args)]
    out = open(log, "w") if log else subprocess.PIPE  # a file: a stuck child of a rank may hold a pipe open
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, **kw)


def test_ddp_step_equals_a_single_process_step_on_the_union_of_batches(train_shards, tmp_path):
    process = _launch(REPO / "tests" / "scripts" / "ddp_step.py", train_shards, tmp_path, port=_free_port())
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    result = json.loads((tmp_path / "ddp.json").read_text())
    assert result["world_size"] == 2 and result["ranks_identical"]
    assert result["mean_rank_loss"] == pytest.approx(result["union_loss"], rel=1e-5)
    assert result["max_param_change"] > 1e-4  # the step moved the weights …
    assert result["max_param_difference"] < 1e-5  # … exactly as one process on the union would


def test_two_processes_train_an_epoch_of_uneven_shards_without_hanging(train_shards, tmp_path):
    process = _launch("-m", "train", *_args(train_shards, tmp_path / "run", "max_epoch=1"), port=_free_port())
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "done: epoch 1" in output
    assert list((tmp_path / "run" / "checkpoints").glob("step-*/model.safetensors"))


def test_two_nodes_on_loopback(train_shards, tmp_path):
    port = _free_port()
    nodes = [_launch("-m", "train", *_args(train_shards, tmp_path / "run", "max_epoch=1"), machines=2, rank=r,
                     port=port, processes=2) for r in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert "done: epoch 1" in outputs[0]
    assert list((tmp_path / "run" / "checkpoints").glob("step-*/progress.json"))


def test_a_signal_to_accelerate_launch_checkpoints_on_every_rank_and_resumes_bit_identical(train_shards, tmp_path,
                                                                                             monkeypatch):
    """The launcher (torch's elastic agent) gets the group's signal and forwards it to each rank's own process group,
    DataLoader workers included; every rank checkpoints at the same step and exits 0 before the agent's deadline."""
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "180")  # a loaded test machine: the default 30 s is tight
    args = ["data.workers=1", "train.log_every=1", "max_epoch=3"]
    whole = _launch("-m", "train", *_args(train_shards, tmp_path / "whole", *args), port=_free_port())
    output, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0, output
    run_dir = tmp_path / "signalled"
    process = _launch("-m", "train", *_args(train_shards, run_dir, *args), port=_free_port(), start_new_session=True)
    try:
        _wait_for_lines(run_dir / "metrics.jsonl", 2, process, deadline=300)
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=240)
    finally:
        _end_group(process)
    assert output.count("stopped by signal; re-run the same command to resume") == 2, output
    assert "DataLoader worker" not in output and "Signal 15" not in output, output
    resumed = _launch("-m", "train", *_args(train_shards, run_dir, *args), port=_free_port())
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming from" in output, output
    (model_a, loss_a, name_a), (model_b, loss_b, name_b) = _final_weights(tmp_path / "whole"), _final_weights(run_dir)
    assert name_a == name_b
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(loss_a[k], loss_b[k]) for k in loss_a)


def test_two_ranks_stopped_while_waiting_on_a_stalled_shard_end_without_hanging(train_shards, tmp_path, monkeypatch):
    """Both ranks waiting at the same step agree (through the store) and checkpoint; a rank already inside the step
    cannot, and then the waiting rank gives up after its grace time with one message: the run never hangs."""
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "90")
    block = tmp_path / "BLOCK"
    names = ",".join(s["name"] for s in json.loads((train_shards / "index.json").read_text())["shards"])
    pids = tmp_path / "stuck-pids"
    # $$$$: torchrun expands its argument macros with string.Template, which turns $$ into $
    urls = (f"pipe:if [ -e {block} ]; then echo $$$$ >> {pids}; trap '' TERM INT USR1; exec sleep 600; fi; "
            f"cat {train_shards}/{{{names}}}")
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    args = _args(train_shards, run_dir, f"data.train_urls={urls}", "train.log_every=1", "max_epoch=50")
    process = _launch("-m", "train", *args, port=_free_port(), start_new_session=True, log=log)
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait_for_lines(metrics, 2, process, deadline=300)
        block.touch()
        lines, still = -1, time.monotonic()
        while time.monotonic() - still < 4:  # blocked: no step for 4 s
            assert process.poll() is None and time.monotonic() - still < 300
            if metrics.read_text().count("\n") != lines:
                lines, still = metrics.read_text().count("\n"), time.monotonic()
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=240)
    finally:
        _end_group(process)
        for pid in (pids.read_text().split() if pids.exists() else []):  # the ranks' stuck shard commands
            subprocess.run(["kill", "-9", pid], check=False)
    output = log.read_text()
    last_step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    if output.count("stopped by signal; re-run the same command to resume") == 2:
        assert sorted((run_dir / "checkpoints").glob("step-*"))[-1].name == f"step-{last_step:08d}", output
    else:
        assert "stopped while waiting for data that has not come 30 s later" in output, output
        assert "the run resumes from" in output


def test_a_nan_loss_stops_with_the_step_keys_and_last_checkpoint(train_shards, tmp_path):
    result = run_module("train", *_args(train_shards, tmp_path / "run", "optim.name=sgd", "optim.lr=1e30",
                                        "train.save_every_steps=1"), check=False)
    assert result.returncode == 2, result.stderr
    assert "loss is nan" in result.stderr.lower() and "at step" in result.stderr
    assert "batch keys: [['id0" in result.stderr and "last good checkpoint:" in result.stderr


def test_sigusr1_checkpoints_exits_0_and_the_resumed_run_is_bit_identical(train_shards, tmp_path):
    """SLURM pre-emption: SIGUSR1 saves at the next step and exits 0; re-running resumes exactly."""
    run_module("train", *_args(train_shards, tmp_path / "whole", "train.log_every=1"))
    run_dir = tmp_path / "signalled"
    process = subprocess.Popen([sys.executable, "-m", "train", *_args(train_shards, run_dir, "train.log_every=1")],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # a few steps into the first epoch
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped by signal; re-run the same command to resume" in stderr
    resumed = run_module("train", *_args(train_shards, run_dir, "train.log_every=1"))
    assert "resuming from" in resumed.stdout + resumed.stderr
    model_a, loss_a, name_a = _final_weights(tmp_path / "whole")
    model_b, loss_b, name_b = _final_weights(run_dir)
    assert name_a == name_b
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(loss_a[k], loss_b[k]) for k in loss_a)


def _start_in_own_group(cmd, log, env=None) -> subprocess.Popen:
    """A run in its own process group (as a Slurm step or a container), its output in a file."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "COLUMNS": "200", **(env or {})})


def _wait_for_lines(path, n, process, deadline=180):
    end = time.monotonic() + deadline
    while not (path.exists() and path.read_text().count("\n") >= n):
        assert process.poll() is None and time.monotonic() < end, f"{path}: fewer than {n} lines"
        time.sleep(0.05)


def _end_group(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever the test left behind (a stuck shard command)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def whole_run_with_workers(train_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole-workers") / "run"
    run_module("train", *_args(train_shards, run_dir, "data.workers=2", "train.log_every=1"))
    return run_dir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_with_workers_checkpoints_and_resumes_bit_identical(
        train_shards, tmp_path, whole_run_with_workers, sig):
    """scancel / a time limit / Kubernetes / Ctrl-C signal every process of the group, DataLoader workers included."""
    run_dir, log = tmp_path / "signalled", tmp_path / "train.log"
    args = _args(train_shards, run_dir, "data.workers=2", "train.log_every=1")
    process = _start_in_own_group([sys.executable, "-m", "train", *args], log)
    try:
        _wait_for_lines(run_dir / "metrics.jsonl", 3, process)
        os.killpg(process.pid, sig)
        assert process.wait(timeout=120) == 0, log.read_text()
    finally:
        _end_group(process)
    assert "stopped by signal; re-run the same command to resume" in log.read_text(), log.read_text()
    assert "Traceback" not in log.read_text()
    resumed = run_module("train", *args)
    assert "resuming from" in resumed.stdout + resumed.stderr
    (model_a, loss_a, name_a), (model_b, loss_b, name_b) = _final_weights(whole_run_with_workers), _final_weights(run_dir)
    assert name_a == name_b
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(loss_a[k], loss_b[k]) for k in loss_a)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_signal_while_waiting_on_a_stalled_shard_stops_with_a_checkpoint(train_shards, tmp_path, workers):
    """Shards behind a command that hangs (a dead server, an NFS stall) and ignores signals: the stop request ends
    the wait, the checkpoint holds the last batch trained, and no stuck worker keeps the run from exiting."""
    block = tmp_path / "BLOCK"
    names = ",".join(s["name"] for s in json.loads((train_shards / "index.json").read_text())["shards"])
    urls = (f"pipe:if [ -e {block} ]; then touch {tmp_path}/blocked; trap '' TERM INT USR1; sleep 600; fi; "
            f"cat {train_shards}/{{{names}}}")
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    args = _args(train_shards, run_dir, f"data.train_urls={urls}", f"data.workers={workers}", "train.log_every=1",
                 "max_epoch=50")
    process = _start_in_own_group([sys.executable, "-m", "train", *args], log)
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait_for_lines(metrics, 2, process)
        block.touch()
        lines, still = -1, time.monotonic()
        while time.monotonic() - still < 3:  # blocked: no step for 3 s
            assert process.poll() is None and time.monotonic() - still < 300, log.read_text()
            if metrics.read_text().count("\n") != lines:
                lines, still = metrics.read_text().count("\n"), time.monotonic()
            time.sleep(0.1)
        assert (tmp_path / "blocked").exists()
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log.read_text()
    finally:
        _end_group(process)
    assert "stopped by signal" in log.read_text() and "Traceback" not in log.read_text(), log.read_text()
    last_step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert checkpoint.name == f"step-{last_step:08d}" and (checkpoint / "progress.json").exists()
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == last_step


@pytest.fixture(scope="module")
def noise_banks(tmp_path_factory):
    """MUSAN-like (noise/speech/music) and RIR banks packed by shardify: the augment.* options that use them."""
    import numpy as np
    import soundfile

    from speakerid.data.lists import scan_audio_tree

    base = tmp_path_factory.mktemp("banks")
    rng = np.random.default_rng(0)
    banks = {}
    for bank, categories in (("musan", ("noise", "speech", "music")), ("rirs", ("smallroom",))):
        root = base / bank
        for category in categories:
            for i in range(3):
                path = root / category / f"{category}-{i}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                length = 4000 if bank == "rirs" else 24000
                soundfile.write(path, (rng.standard_normal(length) * 3000).astype(np.int16), 16000)
        banks[bank] = base / f"{bank}-shards"
        pack(make_plan(scan_audio_tree(root), root, PackConfig(kind="noise")), root, banks[bank])
    return ["augment.enabled=true", f"augment.musan_shards={banks['musan']}", f"augment.rir_shards={banks['rirs']}"]


def test_training_with_on_device_augmentation_from_noise_shards(train_shards, noise_banks, tmp_path):
    """MUSAN-like and RIR banks packed by shardify feed the batched augmentation inside the training loop."""
    result = run_module("train", *_args(train_shards, tmp_path / "run", "max_epoch=1", "train.log_every=1", *noise_banks))
    assert "done: epoch 1" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    augmented = [r["augmented"] for r in records if "augmented" in r]
    assert augmented and sum(augmented) > 0  # 4 of 5 utterances are augmented on average (the seed's 1/5 clean)
    (epoch,) = [r for r in records if "data_coverage" in r]  # the reader's per-epoch report
    assert epoch["data_coverage"] >= 0.9 and epoch["data_corrupt_members"] == epoch["data_damaged_shards"] == 0
    missing = run_module("train", *_args(train_shards, tmp_path / "run2", "augment.enabled=true"), check=False)
    assert missing.returncode == 2 and "augment.enabled needs augment.musan_shards" in missing.stderr


def _assert_same_final_weights(run_a, run_b):
    model_a, loss_a, name_a = _final_weights(run_a)
    model_b, loss_b, name_b = _final_weights(run_b)
    assert name_a == name_b
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), "model weights differ after resume"
    assert all(torch.equal(loss_a[k], loss_b[k]) for k in loss_a), "loss weights differ after resume"


def test_resume_with_augmentation_is_bit_identical(train_shards, noise_banks, tmp_path):
    """The step's augmentation (draws and noise-bank clips) is a function of (seed, rank, step): nothing to restore."""
    run_module("train", *_args(train_shards, tmp_path / "whole", *noise_banks))
    run_module("train", *_args(train_shards, tmp_path / "resumed", *noise_banks), "--stop-after-steps", "7")
    run_module("train", *_args(train_shards, tmp_path / "resumed", *noise_banks))
    _assert_same_final_weights(tmp_path / "whole", tmp_path / "resumed")


def test_two_processes_with_augmentation_resume_bit_identical(train_shards, noise_banks, tmp_path):
    """Every rank resumes its own augmentation (rank 1 does not replay rank 0's): DDP's averaged steps match."""
    def launch(run_dir, *extra):
        process = _launch("-m", "train", *_args(train_shards, run_dir, *noise_banks), *extra, port=_free_port())
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output

    launch(tmp_path / "whole")
    launch(tmp_path / "resumed", "--stop-after-steps", "5")  # 4 steps an epoch on 2 ranks: inside the second
    launch(tmp_path / "resumed")
    _assert_same_final_weights(tmp_path / "whole", tmp_path / "resumed")


def test_train_called_from_python_gives_the_callers_signal_handlers_back(train_shards, tmp_path):
    """The demo and notebooks call train() in-process: afterwards Ctrl-C and SIGTERM must work as before."""
    from speakerid.config import load_config
    from speakerid.training import StopFlag, train

    before = {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS}
    train(load_config(None, _args(train_shards, tmp_path / "run", "train.max_steps=1")))
    assert {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS} == before
    with pytest.raises(SpeakeridError, match="loss is nan"):  # also when it fails inside the loop
        train(load_config(None, _args(train_shards, tmp_path / "nan", "optim.name=sgd", "optim.lr=1e30")))
    assert {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS} == before


def test_a_run_that_reached_max_steps_run_again_trains_nothing(train_shards, tmp_path):
    """Re-running a finished max_steps run (a requeued job, a re-submitted script) must not add a step."""
    from speakerid.config import load_config
    from speakerid.training import train

    config = load_config(None, _args(train_shards, tmp_path / "run", "train.max_steps=3"))
    assert train(config).progress.step == 3
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    again = train(config)
    assert again.progress.step == 3 and not again.stopped_by_signal
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_a_plateau_schedule_without_validation_says_its_rate_stays_constant(train_shards, tmp_path, capsys):
    """ReduceLROnPlateau steps on the validation EER: without a trial list it never steps, and the run says so."""
    from speakerid.config import load_config
    from speakerid.training import train

    train(load_config(None, _args(train_shards, tmp_path / "run", "schedule.name=plateau", "train.max_steps=1")))
    said = " ".join(capsys.readouterr().out.split())
    assert "schedule.name=plateau" in said and "validation.trials is unset" in said
