"""shardify's planning at VoxCeleb2 scale, on small real lists: chunked stats, compact records, balanced shards,
one directory listing to resume. (Its speed and memory are measured in benchmarks/shardify_scale.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from speakerid.data import plan as plan_module
from speakerid.data.index import STATE_DIR, finished_shards, is_finished
from speakerid.data.pack import pack
from speakerid.data.lists import read_train_list
from speakerid.data.plan import PackConfig, make_plan
from speakerid.errors import SpeakeridError


def tree(root: Path, n_speakers: int, utts: int, size: int = 100) -> Path:
    """``n_speakers`` × ``utts`` files of ``size`` bytes (planning only stats them) and their train list."""
    lines = []
    for s in range(n_speakers):
        for u in range(utts):
            rel = f"id{s:03d}/v0/{u:03d}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x" * size)
            lines.append(f"id{s:03d} {rel}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt"


def test_chunked_parallel_stats_plan_as_the_plain_loop_and_name_each_bad_line(tmp_path, monkeypatch):
    listing = tree(tmp_path, 6, 5)
    (tmp_path / "id001/v0/002.wav").unlink()
    (tmp_path / "id004/v0/000.wav").write_bytes(b"")
    entries = read_train_list(listing)
    config = PackConfig(chunk_size=2, max_utts=4)
    monkeypatch.setattr(plan_module, "STAT_CHUNK", 4)  # 30 files: 8 chunks for 3 threads
    loop = make_plan(entries, tmp_path, config, skip_bad=True)
    pooled = make_plan(entries, tmp_path, config, skip_bad=True, stat_threads=3)
    assert pooled.digest == loop.digest and pooled.skipped == loop.skipped
    assert sorted(s["src"] for s in loop.skipped) == ["id001/v0/002.wav", "id004/v0/000.wav"]
    with pytest.raises(SpeakeridError, match=rf"{listing}:8: .*002.wav: No such file(.|\n)*{listing}:21: .*empty file"):
        make_plan(entries, tmp_path, config, stat_threads=3)
    # a million of each: no __dict__ per record
    assert not hasattr(entries[0], "__dict__") and not hasattr(loop.shards[0][0], "__dict__")
    assert entries[7].where == f"{listing}:8"


@pytest.mark.parametrize("limit", ["max_utts", "shard_size"])
def test_the_last_shard_is_as_full_as_the_others(tmp_path, limit):
    # 50 speakers × 4 utterances in chunks of 4, at most 48 utterances (or 48 files' bytes) a shard: filling each
    # shard to the limit gave 48, 48, 48, 48 and a tail of 8 (2 speakers); now 5 shards of 40 (10 speakers each).
    listing = tree(tmp_path, 50, 4, size=1000)
    config = (PackConfig(encoding="wav", chunk_size=4, max_utts=48) if limit == "max_utts"
              else PackConfig(encoding="wav", chunk_size=4, shard_size=48 * 1000))
    plan = make_plan(read_train_list(listing), tmp_path, config)
    sizes = [len(items) for items in plan.shards]
    assert len(sizes) == 5 and sum(sizes) == 200
    assert max(sizes) <= 48 and max(sizes) - min(sizes) <= config.chunk_size  # within a chunk of each other
    assert min(len({i.spk for i in items}) for items in plan.shards) >= 9


def test_uneven_chunks_stay_within_a_chunk_of_the_mean_and_under_the_limit(tmp_path):
    # 37 speakers × 7 utterances in chunks of 3 (chunks of 3 and 1): 259 utterances, at most 50 a shard
    listing = tree(tmp_path, 37, 7)
    plan = make_plan(read_train_list(listing), tmp_path, PackConfig(chunk_size=3, max_utts=50))
    sizes = [len(items) for items in plan.shards]
    assert len(sizes) == 6 and sum(sizes) == 259 and max(sizes) <= 50
    assert all(abs(n - 259 / 6) <= 3 for n in sizes)


def filled_to_the_limit(sizes: list[int], limit: int) -> list[int]:
    """Shard sizes when each shard is filled to the limit (the old packing; the fewest shards for chunks in order)."""
    shards = [0]
    for size in sizes:
        if shards[-1] and shards[-1] + size > limit:
            shards.append(0)
        shards[-1] += size
    return shards


@pytest.mark.parametrize("seed", range(40))
def test_chunks_near_the_limit_take_as_few_shards_as_filling_and_a_larger_one_is_alone(seed):
    rng = np.random.default_rng(seed)
    limit = int(rng.integers(10, 60))
    # chunk sizes from a tenth of the limit to all of it, now and then one over it
    sizes = [int(n) for n in rng.integers(max(1, limit // 10), limit + 1, size=int(rng.integers(1, 80)))]
    if seed % 4 == 0:
        sizes[int(rng.integers(len(sizes)))] = limit + 7
    chunks = [[f"{c}.{u}" for u in range(size)] for c, size in enumerate(sizes)]
    shards = plan_module._pack(chunks, PackConfig(chunk_size=1, max_utts=limit))
    assert [u for shard in shards for u in shard] == [u for chunk in chunks for u in chunk]  # in order, whole
    assert len(shards) == len(filled_to_the_limit(sizes, limit))
    starts = {chunk[0] for chunk in chunks}
    assert all(shard[0] in starts for shard in shards)  # no chunk split
    assert all(len(shard) <= limit or len({u.split(".")[0] for u in shard}) == 1 for shard in shards)


def test_one_listing_tells_finished_shards_and_a_rerun_rewrites_only_the_others(tmp_path):
    listing = tree(tmp_path / "audio", 6, 4)
    one = tmp_path / "one.wav"
    soundfile.write(one, (np.arange(1600) % 200 * 50).astype(np.int16), 16000, subtype="PCM_16")
    for line in listing.read_text().split():
        if line.endswith(".wav"):
            shutil.copy(one, tmp_path / "audio" / line)
    plan = make_plan(read_train_list(listing), tmp_path / "audio", PackConfig(encoding="wav", chunk_size=2, max_utts=4))
    out = tmp_path / "shards"
    pack(plan, tmp_path / "audio", out)
    first = (out / "index.json").read_text()
    names = plan.names
    assert finished_shards(out, names) == set(names) and len(names) == 6
    with open(out / names[1], "r+b") as f:  # truncated: its size no longer matches its stats
        f.truncate(1024)
    (out / STATE_DIR / f"{names[3]}.json").unlink()  # stats lost
    (out / names[4]).unlink()  # tar lost
    (out / "index.json").unlink()
    unfinished = {names[1], names[3], names[4]}
    assert finished_shards(out, names) == set(names) - unfinished == {n for n in names if is_finished(out, n)}
    assert finished_shards(tmp_path / "nowhere", names) == set()
    report = pack(plan, tmp_path / "audio", out)
    assert set(report.written) == unfinished and set(report.resumed) == set(names) - unfinished
    assert (out / "index.json").read_text() == first


def test_shares_near_the_limit_leave_no_small_shard_behind_a_split(tmp_path):
    # VoxCeleb2's shape in small: chunks of 16 and 6, shares close to the limit; splitting at the limit mid-share
    # left a shard of the share's few remaining chunks
    listing = tree(tmp_path, 20, 22)
    plan = make_plan(read_train_list(listing), tmp_path, PackConfig(chunk_size=16, max_utts=64))
    sizes = [len(items) for items in plan.shards]
    assert sum(sizes) == 440 and max(sizes) <= 64
    assert max(sizes) - min(sizes) <= 16, sizes
