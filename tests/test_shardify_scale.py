"""shardify's planning at VoxCeleb2 scale, on small real lists: chunked stats, compact records, balanced shards,
one directory listing to resume. (Its speed and memory are measured in benchmarks/shardify_scale.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from speakerid.data import plan as plan_module
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
