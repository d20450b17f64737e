"""Reader I/O faults on real shards, servers and commands: dead or stopped http servers, stalled and failing
pipe: commands, and member bytes damaged after packing (per-member crc32)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile

from speakerid.data.batch_config import BatchConfig
from speakerid.data.batches import TrainStream, train_loader
from speakerid.data.eval_reader import eval_loader
from speakerid.data.lists import entries_from_trials, read_train_list, scan_audio_tree
from speakerid.data.noise import NoiseBank
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.data.shardio import Faults, ShardUnavailable, read_shard
from speakerid.data.shardset import ShardSet
from speakerid.data.stages import parse
from speakerid.errors import SpeakeridError
from tests.conftest import REPO

CONFIG = BatchConfig(n_speakers=4, utts_per_speaker=2, max_frames=40, open_shards=2, seed=3)


@pytest.fixture(scope="module")
def wav_shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "shards"
    config = PackConfig(encoding="wav", chunk_size=4, max_utts=5)
    pack(make_plan(read_train_list(corpus.train_list), corpus.root, config), corpus.root, out)
    return out


@pytest.fixture(scope="module")
def eval_shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "eval"
    config = PackConfig(kind="eval", encoding="wav", max_utts=3)
    pack(make_plan(entries_from_trials([corpus.trials]), corpus.root, config), corpus.root, out)
    return out


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (the faults under test used to make readers wait forever)."""
    def hung(signum, frame):
        raise AssertionError(f"still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def shard_server(directory: Path, log=subprocess.DEVNULL):
    """``python -m http.server`` on 127.0.0.1 in its own process group; yields (process, base URL)."""
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                               str(directory), "0"], stdout=subprocess.PIPE, stderr=log, text=True,
                              start_new_session=True)
    try:
        port = re.search(r"port (\d+)", server.stdout.readline()).group(1)
        yield server, f"http://127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped server must be woken to die
            try:
                os.killpg(server.pid, sig)
            except ProcessLookupError:
                pass
        server.wait()


def kill_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def live_members(group: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting for init do not count)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_a_killed_server_ends_reading_with_one_error_naming_it(wav_shards):
    with shard_server(wav_shards) as (server, url):
        shards = ShardSet.open(url + "/", io_timeout=5)
        kill_server(server)
        with deadline(120), pytest.raises(SpeakeridError) as caught:
            next(iter(train_loader(shards, CONFIG, workers=1)))  # the error comes from a DataLoader worker
    message = str(caught.value)
    assert "without getting one batch" in message and f"{url}/train-" in message and "cannot connect" in message
    assert "Traceback" not in message, message


def test_evaluation_reading_from_a_killed_server_gets_one_error_naming_it(eval_shards):
    with shard_server(eval_shards) as (server, url):
        shards = ShardSet.open(url + "/", io_timeout=5)
        kill_server(server)
        with deadline(120), pytest.raises(SpeakeridError) as caught:
            list(eval_loader(shards, workers=1))
    message = str(caught.value)
    assert message.startswith(f"{url}/eval-") and "cannot connect" in message and "Traceback" not in message, message


def test_a_stopped_server_times_out_naming_the_url(wav_shards):
    with shard_server(wav_shards) as (server, url):
        shards = ShardSet.open(url + "/", io_timeout=1)
        os.kill(server.pid, signal.SIGSTOP)
        with deadline(60), pytest.raises(ShardUnavailable,
                                         match=re.escape(shards.urls[0]) + r": no data for 1 s.*data.io_timeout"):
            list(read_shard(shards.urls[0], Faults(), shards.io_timeout))
        with deadline(60), pytest.raises(SpeakeridError, match=r"cannot read the shard index: .*no data for 1 s"):
            ShardSet.open(url + "/", io_timeout=1)


def test_a_stalled_pipe_command_times_out_and_is_killed(wav_shards, tmp_path):
    pid_file = tmp_path / "pid"
    # half a shard, then silence: the reader waits inside a member
    url = f"pipe:echo $$ > {pid_file}; head -c 3000 {wav_shards / 'train-000000.tar'}; sleep 1000"
    try:
        with deadline(60), pytest.raises(ShardUnavailable, match=r"sleep 1000: no data for 1 s"):
            list(read_shard(url, Faults(), io_timeout=1))
        group = int(pid_file.read_text())
        for _ in range(100):
            if not live_members(group):
                break
            time.sleep(0.1)
        assert not live_members(group), "the stalled command was left running"
    finally:
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_shard_failing_k_passes_in_a_row_is_an_error_naming_it(wav_shards):
    names = [s["name"] for s in ShardSet.open(wav_shards).index["shards"]]
    urls = [f"pipe:cat {wav_shards / name}" for name in names]
    urls[3] = f"pipe:exit 1 # {names[3]}"  # the comment keeps the shard's name in its URL
    stream = TrainStream(ShardSet.open(wav_shards, urls=urls), dataclasses.replace(CONFIG, shard_retries=2), 0, 1)
    with deadline(120), pytest.raises(SpeakeridError, match=rf"{names[3]}: the command exited with status 1 "
                                                            r"— failed 2 times in a row \(data.shard_retries=2\)"):
        for _ in itertools.islice(stream.batches(), 300):
            pass


def test_a_noise_bank_shard_failing_k_passes_in_a_row_is_an_error_naming_it(tmp_path):
    root = tmp_path / "musan"
    for category in ("noise", "music"):
        for i in range(2):
            (root / category).mkdir(parents=True, exist_ok=True)
            soundfile.write(root / category / f"{i}.wav", np.full(8000, 100 * (i + 1), dtype=np.int16), 16000)
    out = tmp_path / "shards"
    pack(make_plan(scan_audio_tree(root), root, PackConfig(kind="noise", max_utts=2)), root, out)
    names = [s["name"] for s in ShardSet.open(out).index["shards"]]
    urls = [f"pipe:exit 2 # {names[0]}", f"pipe:cat {out / names[1]}"]
    with deadline(60), pytest.raises(SpeakeridError, match=rf"{names[0]}: the command exited with status 2 "
                                                           r"— failed 3 times in a row"):
        bank = NoiseBank(ShardSet.open(out, urls=urls), clip_samples=4000, refresh=4)  # a step reads a pass
        for step in range(10):  # the fill reads pass 0, each step one more pass: the third fails for good
            bank.seek(step)


def test_training_with_a_server_killed_mid_run_exits_with_the_url(wav_shards, tmp_path):
    """Workers ≥ 1: the error crosses the DataLoader to the front door as one message; nothing hangs."""
    with shard_server(wav_shards, log=subprocess.PIPE) as (server, url):
        train = subprocess.Popen(
            [sys.executable, "-m", "train", f"data.train_shards={url}/", f"train.run_dir={tmp_path / 'run'}",
             "batch_size=4", "max_frames=20", "model.options.n_out=32", "data.workers=1", "data.io_timeout=5",
             "max_epoch=1000", "train.mixed_precision=no"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
        try:
            with deadline(180):
                for line in server.stderr:  # the request log: kill the server once training reads shards
                    if '"GET /train-' in line:
                        break
                kill_server(server)
            _, stderr = train.communicate(timeout=180)
        finally:
            train.kill()
    assert train.returncode == 2, stderr
    assert f"{url}/train-" in stderr and "cannot connect" in stderr and "Traceback" not in stderr, stderr


# ------------------------------------------------------------------------------------------- member crc32


def flip_pcm_byte(shard: Path) -> str:
    """Flip one byte inside the first wav member's samples (tar headers and sizes stay valid); its key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".wav"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + 44 + 1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    return member.name.removesuffix(".wav")


def test_shardify_writes_a_crc32_of_each_member(wav_shards):
    import zlib

    with tarfile.open(wav_shards / "train-000000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name, data in files.items():
        if name.endswith(".json"):
            assert json.loads(data)["crc32"] == zlib.crc32(files[name.removesuffix(".json") + ".wav"])


def test_a_member_damaged_after_packing_is_counted_once_and_not_used(wav_shards, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(wav_shards, damaged)
    victim = flip_pcm_byte(damaged / "train-000001.tar")
    faults = Faults()
    samples = read_shard(str(damaged / "train-000001.tar"), faults)
    keys = [u.key for u in parse(samples, "wav", CONFIG.crop_samples, np.random.default_rng(0), 0, faults)]
    assert faults.corrupt_members == 1 and victim not in keys
    assert len(keys) == ShardSet.open(wav_shards).index["shards"][1]["samples"] - 1


def test_verify_names_every_member_that_fails_its_crc32(wav_shards, tmp_path, shardify):
    damaged = tmp_path / "damaged"
    shutil.copytree(wav_shards, damaged)
    victims = [flip_pcm_byte(damaged / name) for name in ("train-000001.tar", "train-000004.tar")]
    result = shardify("verify", damaged, check=False)
    assert result.returncode == 1
    for victim in victims:
        assert f"1 member(s) fail their crc32: {victim}" in result.stderr, result.stderr


def test_the_eval_reader_stops_at_a_damaged_member_naming_it(eval_shards, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(eval_shards, out)
    victim = flip_pcm_byte(out / "eval-000000.tar")
    with pytest.raises(SpeakeridError, match=rf"member {re.escape(victim)} cannot be decoded \(its audio bytes fail "
                                             r"their crc32\)"):
        list(eval_loader(ShardSet.open(out)))
