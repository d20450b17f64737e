"""The N-speaker × M-utterance reader on real shards: invariants, epochs, determinism, skip-ahead, faults."""

from __future__ import annotations

import functools
import http.server
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from speakerid.audio import crop_start, wrap_pad
from speakerid.data.batch_config import BatchConfig
from speakerid.data.batches import TrainStream, batches_per_epoch, train_loader, usable_utterances
from speakerid.data.lists import read_train_list
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.data.shardset import ShardSet, assign_streams
from speakerid.data.loader import BUFFER_SLOTS
from speakerid.data.stages import Batcher, Utterance
from speakerid.errors import SpeakeridError
from tests.conftest import REPO

CONFIG = BatchConfig(n_speakers=4, utts_per_speaker=2, max_frames=40, open_shards=2, seed=3)


def _pack(corpus, out: Path, encoding: str, **options) -> Path:
    plan = make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(encoding=encoding, **options))
    pack(plan, corpus.root, out)
    return out


@pytest.fixture(scope="session")
def wav_shards(corpus, tmp_path_factory):
    # 6 utterances a speaker in chunks of 4 + 2, at most 5 a shard: shards of 2 to 4 utterances
    return _pack(corpus, tmp_path_factory.mktemp("wav") / "shards", "wav", chunk_size=4, max_utts=5)


@pytest.fixture(scope="session")
def flac_shards(corpus, tmp_path_factory):
    return _pack(corpus, tmp_path_factory.mktemp("flac") / "shards", "flac", chunk_size=4, max_utts=5)


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def flat_keys(batches) -> list[str]:
    return [k for b in batches for t in b["keys"] for k in t]


@pytest.mark.parametrize("encoding", ["wav", "flac"])
def test_every_batch_is_n_distinct_speakers_by_m_crops_of_their_own_audio(corpus, encoding, request):
    labels = {spk: i for i, spk in enumerate(sorted({e.spk for e in read_train_list(corpus.train_list)}))}
    shards = request.getfixturevalue(f"{encoding}_shards")
    batches = take(train_loader(ShardSet.open(shards), CONFIG), 12)
    for b in batches:
        assert b["audio"].shape == (4, 2, CONFIG.crop_samples) and b["audio"].dtype == torch.int16
        assert len(set(b["labels"].tolist())) == 4
        for row, keys in enumerate(b["keys"]):
            assert len(keys) == 2 and len(set(keys)) == 2
            assert {labels[k.split("/")[0]] for k in keys} == {int(b["labels"][row])}
            for j, key in enumerate(keys):  # the crop is a window of that utterance's own samples
                original, _ = soundfile.read(corpus.root / f"{key}.wav", dtype="int16")
                crop = b["audio"][row, j].numpy()
                padded = wrap_pad(original, CONFIG.crop_samples)
                windows = np.lib.stride_tricks.sliding_window_view(padded, CONFIG.crop_samples)
                assert (windows == crop).all(axis=1).any(), f"{key}: crop is not a window of the file"


def test_crop_start_follows_the_seed():
    L = 200 * 160 + 240
    assert crop_start(10 * L, L, 0.5) == int(0.5 * (10 * L - L))
    assert crop_start(100, L, 0.99) == 0  # short file: padded to L + 1, the only start is 0
    short = np.arange(5, dtype=np.int16)
    assert wrap_pad(short, 7).tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


def test_a_pass_uses_each_utterance_at_most_once_and_respects_the_cap(wav_shards):
    shards = ShardSet.open(wav_shards)
    config = BatchConfig(n_speakers=3, utts_per_speaker=2, max_frames=20, max_seg_per_spk=4, seed=1)
    per_pass: dict[int, Counter] = defaultdict(Counter)
    stream = TrainStream(shards, config, 0, 1)
    for b in itertools.islice(stream.batches(), 60):
        for t, p in zip(b["keys"], b["tuple_passes"]):
            per_pass[p].update(t)
    assert len(per_pass) >= 3
    for p, used in per_pass.items():
        assert max(used.values()) == 1, f"pass {p} used an utterance twice"
        by_speaker = Counter(k.split("/")[0] for k in used)
        assert max(by_speaker.values()) <= 4, f"pass {p}: max_seg_per_spk exceeded {by_speaker}"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_equal_batch_counts_disjoint_ranks_and_coverage(wav_shards, world_size):
    shards = ShardSet.open(wav_shards)
    sizes = [s["samples"] for s in shards.index["shards"]]
    assert len(set(sizes)) > 1, "the fixture must have uneven shards"
    n = batches_per_epoch(shards.index, CONFIG, world_size, workers=1)
    assert n >= 1
    seen = []
    for rank in range(world_size):
        loader = train_loader(shards, CONFIG, rank=rank, world_size=world_size, workers=1)
        assert loader.dataset.batches_per_epoch == n
        batches = take(loader, n)
        assert len(batches) == n
        seen.append(set(flat_keys(batches)))
    for a, b in itertools.combinations(seen, 2):
        assert not a & b, "two ranks received the same utterance in one epoch"
    usable = usable_utterances(shards.index, CONFIG, world_size)
    coverage = len(set().union(*seen)) / usable
    print(f"world {world_size}: {n} batches/rank, coverage {coverage:.1%} of {usable} usable utterances")
    assert coverage >= (0.95 if world_size == 1 else 0.75)  # tiny corpus: 4 ranks leave 3 tuples a stream


def test_same_seed_same_stream_other_seed_other_stream(flac_shards):
    shards = ShardSet.open(flac_shards)
    a = take(train_loader(shards, CONFIG, workers=2), 8)
    b = take(train_loader(shards, CONFIG, workers=2), 8)
    c = take(train_loader(shards, BatchConfig(**{**CONFIG.__dict__, "seed": 4}), workers=2), 8)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["audio"], y["audio"]) for x, y in zip(a, b))
    assert [x["keys"] for x in a] != [x["keys"] for x in c]


def test_a_worker_refills_a_batch_buffer_once_the_consumer_let_go_of_it_and_never_one_still_held(wav_shards):
    shards = ShardSet.open(wav_shards)
    reference = [(b["keys"], b["audio"].clone()) for b in take(train_loader(shards, CONFIG), 40)]  # no workers
    tickets, loader = [], iter(train_loader(shards, CONFIG, workers=1))  # one stream either way: same batches
    for keys, audio in reference[:24]:  # each batch dropped before the next, as a training loop does
        batch = next(loader)
        assert batch["keys"] == keys and torch.equal(batch["audio"], audio)
        tickets.append(tuple(batch["buffer"]))  # (the DataLoader hands tuples over as lists)
        del batch
    assert None not in tickets and len({ticket[:2] for ticket in tickets}) <= BUFFER_SLOTS  # slots reused
    assert len({ticket[2] for ticket in tickets}) == 24  # each use its own token
    kept = [next(loader) for _ in range(16)]  # a consumer that keeps its batches: none is overwritten
    assert all(b["keys"] == keys and torch.equal(b["audio"], audio) for b, (keys, audio) in zip(kept, reference[24:]))
    assert sum(b["buffer"] is None for b in kept) >= 16 - BUFFER_SLOTS  # fresh buffers once every slot is held


@pytest.mark.parametrize("start", [0, 1, 5, 6])
def test_skip_ahead_equals_iterate_and_discard(flac_shards, start):
    shards = ShardSet.open(flac_shards)
    reference = take(train_loader(shards, CONFIG, workers=2), start + 4)[start:]
    resumed = take(train_loader(shards, CONFIG, workers=2, start_batch=start), 4)
    assert [x["keys"] for x in resumed] == [x["keys"] for x in reference]
    assert all(torch.equal(x["audio"], y["audio"]) for x, y in zip(resumed, reference))


def test_skipped_batches_are_not_decoded(flac_shards):
    stream = TrainStream(ShardSet.open(flac_shards), CONFIG, 0, 1)
    calls = Counter()
    import speakerid.data.stages as stages_module

    original = stages_module.read_crop
    try:
        stages_module.read_crop = lambda *a, **k: calls.update(["decode"]) or original(*a, **k)
        next(stream.batches(skip=10))
    finally:
        stages_module.read_crop = original
    assert calls["decode"] == CONFIG.n_speakers * CONFIG.utts_per_speaker  # the yielded batch only


def test_too_few_speakers_for_a_batch_is_an_error_at_start_up(wav_shards):
    with pytest.raises(SpeakeridError, match="batch needs 40 distinct speakers"):
        train_loader(ShardSet.open(wav_shards), BatchConfig(n_speakers=40))


def test_assignment_balances_uneven_shards():
    streams = assign_streams([10, 1, 1, 1, 9, 2, 2], 3)
    loads = sorted(sum([10, 1, 1, 1, 9, 2, 2][i] for i in s) for s in streams)
    assert loads == [7, 9, 10] and sorted(i for s in streams for i in s) == list(range(7))
    with pytest.raises(SpeakeridError, match="2 shard.*4 reader streams"):
        assign_streams([1, 1], 4)


# -------------------------------------------------------------------------------------------- faults


def test_truncated_shard_and_corrupt_member_are_skipped_and_counted(flac_shards, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(flac_shards, damaged)
    index = json.loads((damaged / "index.json").read_text())
    victim = damaged / index["shards"][2]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    index["shards"][2]["bytes"] = victim.stat().st_size  # an index that agrees on size: only reading can tell
    other = damaged / index["shards"][5]["name"]
    data = bytearray(other.read_bytes())
    at = data.find(b"fLaC")
    data[at + 200:at + 2000] = b"\x00" * 1800  # a member whose audio does not decode
    other.write_bytes(bytes(data))
    (damaged / "index.json").write_text(json.dumps(index))

    stream = TrainStream(ShardSet.open(damaged), CONFIG, 0, 1)
    batches = list(itertools.islice(stream.batches(), 40))
    assert len(batches) == 40 and all(len(set(b["labels"].tolist())) == 4 for b in batches)
    faults = batches[-1]["faults"]
    assert faults["damaged_shards"] >= 1 and faults["corrupt_members"] >= 1, faults


def test_unopenable_shard_and_mismatched_index_fail_at_start_up(flac_shards, tmp_path):
    with pytest.raises(SpeakeridError, match="named by exactly one|names 0 shards"):
        ShardSet.open(flac_shards, urls=[str(flac_shards / "train-000000.tar"), "/nowhere/else.tar"])
    broken = tmp_path / "b"
    shutil.copytree(flac_shards, broken)
    (broken / "train-000003.tar").write_bytes(b"short")
    with pytest.raises(SpeakeridError, match="train-000003.tar: 5 bytes, the index says"):
        ShardSet.open(broken)
    (broken / "train-000003.tar").unlink()
    with pytest.raises(SpeakeridError, match="train-000003.tar: shard named by the index is missing"):
        ShardSet.open(broken)


# -------------------------------------------------------------------------------------------- transports


@pytest.fixture
def http_server(flac_shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(flac_shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_shards_over_http_give_the_same_batches(flac_shards, http_server):
    local = take(train_loader(ShardSet.open(flac_shards), CONFIG), 6)
    remote = take(train_loader(ShardSet.open(http_server + "/"), CONFIG), 6)
    assert [x["keys"] for x in remote] == [x["keys"] for x in local]
    assert all(torch.equal(x["audio"], y["audio"]) for x, y in zip(remote, local))
    with pytest.raises(SpeakeridError, match="cannot read the shard index"):
        ShardSet.open(http_server + "/nothing-here/")


def test_pipe_and_brace_urls(flac_shards):
    n = len(ShardSet.open(flac_shards))
    pattern = f"pipe:cat {flac_shards}/train-{{000000..{n - 1:06d}}}.tar"
    piped = take(train_loader(ShardSet.open(flac_shards, urls=pattern), CONFIG), 4)
    local = take(train_loader(ShardSet.open(flac_shards), CONFIG), 4)
    assert [x["keys"] for x in piped] == [x["keys"] for x in local]


def test_two_processes_under_accelerate_get_disjoint_utterances_and_equal_counts(wav_shards, tmp_path):
    script = REPO / "tests" / "scripts" / "read_epoch.py"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(script), str(wav_shards), str(tmp_path)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == ranks[0]["batches_per_epoch"] >= 1
    assert ranks[0]["world_size"] == 2 and {r["rank"] for r in ranks} == {0, 1}
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])


def _zero_flac_frames(shard: Path) -> None:
    """Zero every flac member's frames in place (headers and json intact): the tar parses, the audio does not decode."""
    with tarfile.open(shard) as tar:
        members = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".flac")]
    data = bytearray(shard.read_bytes())
    for offset, size in members:
        data[offset + 100:offset + size] = bytes(size - 100)
    shard.write_bytes(bytes(data))


def test_skipping_drops_the_same_undecodable_tuples_as_decoding(flac_shards, tmp_path):
    """Resume skips batches without yielding them: the tuples it drops (and counts) must be the decoded run's."""
    damaged = tmp_path / "damaged"
    shutil.copytree(flac_shards, damaged)
    for shard in sorted(damaged.glob("*.tar"))[:4]:
        _zero_flac_frames(shard)
    shards = ShardSet.open(damaged)
    whole = list(itertools.islice(TrainStream(shards, CONFIG, 0, 1).batches(), 12))
    resumed = list(itertools.islice(TrainStream(shards, CONFIG, 0, 1).batches(skip=6), 6))
    assert whole[5]["faults"]["corrupt_members"] > 0  # damaged members were met in the skipped part
    assert [b["keys"] for b in resumed] == [b["keys"] for b in whole[6:]]
    assert [b["faults"] for b in resumed] == [b["faults"] for b in whole[6:]]
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(resumed, whole[6:]))


def test_every_undecodable_member_of_a_tuple_is_counted(flac_shards):
    stream = TrainStream(ShardSet.open(flac_shards), CONFIG, 0, 1)
    batcher = Batcher(CONFIG, stream.stream, stream.faults)
    pool = batcher.pool
    good = np.zeros(CONFIG.crop_samples, dtype=np.int16)
    for label in range(3):
        pool.add([Utterance(f"good{label}/{j}", label, 99999, 0.5, good, 0) for j in range(2)])
    pool.add([Utterance(f"bad/{j}", 7, 99999, 0.5, b"not a flac file", 0) for j in range(2)])
    assert batcher.draw(np.random.default_rng(0), 0, decode=True) is None  # 3 good speakers < N = 4
    assert stream.faults.corrupt_members == 2 and pool.size == 3  # both bad members counted, good tuples kept


# ------------------------------------------------------------------------------------ crop-only wav reads


@pytest.mark.parametrize("max_frames", [40, 300])  # 300: crops of 3 s, longer than some utterances (wrap-padded)
def test_later_passes_read_only_the_crops_of_local_wav_shards_and_give_the_same_batches(
        wav_shards, tmp_path, monkeypatch, max_frames):
    """Local shards read whole once are then read crop by crop; a pipe: stream reads them whole every pass."""
    from speakerid.data import stages
    from tests.test_reader_faults import flip_pcm_byte

    damaged = tmp_path / "damaged"
    shutil.copytree(wav_shards, damaged)
    flip_pcm_byte(damaged / "train-000001.tar")  # a crc32 failure met in every pass, counted in each
    config = BatchConfig(n_speakers=4, utts_per_speaker=2, max_frames=max_frames, open_shards=2, seed=3)
    calls = []
    monkeypatch.setattr(stages, "read_wav_crop_at", lambda *a: calls.append(a) or stages_read(*a))
    stages_read = __import__("speakerid.audio", fromlist=["read_wav_crop_at"]).read_wav_crop_at
    local = ShardSet.open(damaged)
    piped = ShardSet.open(damaged, urls=[f"pipe:cat {u}" for u in local.urls])
    whole = list(itertools.islice(TrainStream(piped, config, 0, 1).batches(), 30))
    assert not calls
    cropped = list(itertools.islice(TrainStream(local, config, 0, 1).batches(), 30))
    assert whole[-1]["pass"] >= 2 and len(calls) > 0
    assert [b["keys"] for b in cropped] == [b["keys"] for b in whole]
    assert [b["faults"] for b in cropped] == [b["faults"] for b in whole]
    assert whole[-1]["faults"]["corrupt_members"] >= 3  # once a pass
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(cropped, whole))
    resumed = list(itertools.islice(TrainStream(local, config, 0, 1).batches(skip=20), 10))
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(resumed, whole[20:]))
    assert [b["faults"] for b in resumed] == [b["faults"] for b in whole[20:]]


def test_a_local_wav_shards_layout_is_read_once_then_replayed_until_the_file_changes(wav_shards, tmp_path, monkeypatch):
    """Pass 0 reads each shard whole, pass 1 its tar headers, json members and wav headers, later passes only the
    crops' bytes (the layout of pass 1 replayed); a shard whose file changed is read by its headers again."""
    from speakerid.data import shardio

    local_shards = tmp_path / "shards"
    shutil.copytree(wav_shards, local_shards)
    header_reads = Counter()
    original = shardio.iter_tar_offsets

    def counting(fd):
        header_reads[os.readlink(f"/proc/self/fd/{fd}")] += 1
        return original(fd)

    monkeypatch.setattr(shardio, "iter_tar_offsets", counting)
    advised = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(shardio.os, "posix_fadvise", lambda *a: advised.append(a) or real_fadvise(*a))
    local = ShardSet.open(local_shards)
    piped = ShardSet.open(local_shards, urls=[f"pipe:cat {u}" for u in local.urls])
    whole = list(itertools.islice(TrainStream(piped, CONFIG, 0, 1).batches(), 60))
    assert whole[-1]["pass"] >= 5 and not header_reads
    stream = TrainStream(local, CONFIG, 0, 1).batches()
    cropped = []
    while len(cropped) < 60:
        cropped.append(next(stream))
        if cropped[-1]["pass"] == 3 and not header_reads.get("touched"):  # change one shard's file mid-run
            touched = str(local_shards / "train-000001.tar")
            os.utime(touched, ns=(1, 1))
            header_reads["touched"] = 1
    assert [b["keys"] for b in cropped] == [b["keys"] for b in whole]
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(cropped, whole))
    reads = {Path(path).name: n for path, n in header_reads.items() if path != "touched"}
    assert sorted(reads) == sorted(Path(u).name for u in local.urls)
    assert reads.pop("train-000001.tar") == 2 and set(reads.values()) == {1}
    assert advised and all(a[3] == os.POSIX_FADV_WILLNEED for a in advised)  # replays ask for their bytes ahead


def test_shards_past_the_remembered_budget_are_read_by_their_headers_every_pass(wav_shards, monkeypatch):
    from speakerid.data import shardio

    header_reads = Counter()
    original = shardio.iter_tar_offsets
    monkeypatch.setattr(shardio, "iter_tar_offsets", lambda fd: header_reads.update([fd]) or original(fd))
    local = ShardSet.open(wav_shards)
    remembered = list(itertools.islice(TrainStream(local, CONFIG, 0, 1).batches(), 40))
    with_layouts = sum(header_reads.values())
    header_reads.clear()
    monkeypatch.setattr(shardio, "REMEMBERED_UTTERANCES", 5)  # room for one or two shards' layouts
    bounded = list(itertools.islice(TrainStream(local, CONFIG, 0, 1).batches(), 40))
    assert remembered[-1]["pass"] >= 4 and with_layouts == len(local.urls)
    assert sum(header_reads.values()) > 2 * len(local.urls)
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(remembered, bounded))


def test_readahead_asks_for_a_window_ahead_of_the_reader_contiguously_and_seldom(monkeypatch):
    from speakerid.data import shardio

    asked = []
    monkeypatch.setattr(shardio.os, "posix_fadvise", lambda fd, offset, length, advice: asked.append((offset, length)))
    ahead = shardio.Readahead(fd=-1, window=100)
    for offset in range(0, 1000, 7):
        ahead.reach(offset)
        assert asked[-1][0] + asked[-1][1] >= offset + 100  # at least a window ahead of the reader
    assert asked[0] == (0, 200)
    assert all(a[0] + a[1] == b[0] for a, b in zip(asked, asked[1:]))  # each byte asked for once
    assert len(asked) <= 1000 // 100 + 1


def test_a_speakers_leftover_is_let_go_once_its_last_utterance_of_the_pass_has_come():
    """M = 2 and 3 utterances of speaker 0 in this pass: the third can never make a tuple and is not held."""
    import gc
    import weakref

    from speakerid.data.stages import group_tuples

    made = {}

    def utterances():  # made one at a time, as parse does: nothing else holds them
        for label, i in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]:
            utt = Utterance(f"s{label}/{i}", label, 99999, 0.5, np.zeros(10, np.int16), 0)
            made[utt.key] = weakref.ref(utt)
            yield utt

    tuples = group_tuples(utterances(), 2, quota={0: 3, 1: 4})
    assert [[u.key for u in t] for t in itertools.islice(tuples, 2)] == [["s0/0", "s0/1"], ["s1/0", "s1/1"]]
    gc.collect()
    assert made["s0/2"]() is None
    assert [[u.key for u in t] for t in tuples] == [["s1/2", "s1/3"]]
