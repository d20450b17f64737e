"""shardify on real tar files made from the built-in corpus: round trip, grouping, resume, parts, verify, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds

from speakerid.audio import read_audio
from speakerid.data.index import load_index
from speakerid.data.lists import read_train_list, read_trials, utterance_key
from speakerid.errors import SpeakeridError
from tests.conftest import REPO


def read_shards(shard_dir: Path) -> list[dict]:
    """Every sample of every shard, in index order, through webdataset (as the training reader will)."""
    index = load_index(shard_dir)
    urls = [str(shard_dir / s["name"]) for s in index["shards"]]
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        ext = index["encoding"]
        audio, rate = soundfile.read(io.BytesIO(sample[ext]), dtype="int16")
        samples.append({"key": sample["__key__"], "url": sample["__url__"], "audio": audio, "rate": rate,
                        "meta": json.loads(sample["json"])})
    return samples


def pack_train(shardify, corpus, out, *extra, **kw):
    return shardify("pack", "--list", corpus.train_list, "--root", corpus.root, "--out", out, *extra, **kw)


@pytest.mark.parametrize("encoding", ["wav", "flac"])
def test_round_trip_every_utterance_once_bit_exact_with_its_label(shardify, corpus, tmp_path, encoding):
    out = tmp_path / "shards"
    pack_train(shardify, corpus, out, "--encoding", encoding, "--max-utts", 16, "--chunk-size", 4)
    entries = read_train_list(corpus.train_list)
    labels = {spk: i for i, spk in enumerate(sorted({e.spk for e in entries}))}
    samples = read_shards(out)

    assert sorted(s["key"] for s in samples) == sorted(utterance_key(e.relpath) for e in entries)
    by_src = {e.relpath: e for e in entries}
    for s in samples:
        entry = by_src[s["meta"]["src"]]
        original, rate = soundfile.read(corpus.root / entry.relpath, dtype="int16")
        assert s["rate"] == rate == 16000
        np.testing.assert_array_equal(s["audio"], original)  # bit-exact, wav and flac alike
        assert s["meta"]["samples"] == len(original)
        assert s["meta"]["spk"] == entry.spk and s["meta"]["label"] == labels[entry.spk]
    index = load_index(out)
    assert index["speakers"] == labels
    assert index["totals"]["samples"] == len(entries)
    for shard in index["shards"]:  # utterances per label, per shard: what a reader sizes its epoch from
        in_shard = [s["meta"]["label"] for s in samples if s["url"].endswith(shard["name"])]
        assert shard["labels"] == {str(k): in_shard.count(k) for k in sorted(set(in_shard))}
    assert index["encoding"] == encoding


def test_chunks_are_contiguous_single_speaker_and_shards_mix_speakers(shardify, corpus, tmp_path):
    out = tmp_path / "shards"
    pack_train(shardify, corpus, out, "--max-utts", 24, "--chunk-size", 3)
    samples = read_shards(out)
    runs: dict[int, list[int]] = defaultdict(list)  # chunk → positions in the stream
    for position, s in enumerate(samples):
        runs[s["meta"]["chunk"]].append(position)
    for chunk, positions in runs.items():
        assert positions == list(range(positions[0], positions[0] + len(positions))), f"chunk {chunk} not contiguous"
        assert len(positions) <= 3
        assert len({samples[p]["meta"]["spk"] for p in positions}) == 1
        assert len({samples[p]["url"] for p in positions}) == 1, "a chunk never spans two shards"
    speakers_per_shard = defaultdict(set)
    for s in samples:
        speakers_per_shard[s["url"]].add(s["meta"]["spk"])
    assert min(len(v) for v in speakers_per_shard.values()) >= 4
    index = load_index(out)
    assert [len(v) for v in speakers_per_shard.values()] == [s["speakers"] for s in index["shards"]]


def test_shards_and_index_do_not_depend_on_workers_or_reruns(shardify, corpus, tmp_path):
    pack_train(shardify, corpus, tmp_path / "one", "--max-utts", 16, "--workers", 1)
    pack_train(shardify, corpus, tmp_path / "two", "--max-utts", 16, "--workers", 2)
    assert load_index(tmp_path / "one") == load_index(tmp_path / "two")
    again = pack_train(shardify, corpus, tmp_path / "one", "--max-utts", 16)
    assert "0 / 8 / 8" in again.stderr or "resuming" in again.stderr
    assert load_index(tmp_path / "one") == load_index(tmp_path / "two")


def _start_pack(corpus, out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "shardify", "pack", "--list", str(corpus.train_list), "--root", str(corpus.root),
           "--out", str(out), "--max-utts", "1", "--chunk-size", "1", *map(str, extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_shards(out: Path, n: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.tar"))) < n:
        assert process.poll() is None, f"pack ended before it could be interrupted:\n{process.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_resume_after_a_killed_run_gives_the_same_index(shardify, corpus, tmp_path):
    pack_train(shardify, corpus, tmp_path / "whole", "--max-utts", 1, "--chunk-size", 1)
    out = tmp_path / "killed"
    process = _start_pack(corpus, out)
    _wait_for_shards(out, 3, process)
    process.kill()  # SIGKILL: no clean-up at all, a temporary shard may be left behind
    process.wait()
    assert not (out / "index.json").exists()
    finished = len(list(out.glob("*.tar")))
    total = len(load_index(tmp_path / "whole")["shards"])
    assert 3 <= finished < total

    resumed = pack_train(shardify, corpus, out, "--max-utts", 1, "--chunk-size", 1)
    assert f"{finished} finished shard(s) kept" in resumed.stderr
    assert f"taking over the lock of host {socket.gethostname()} pid {process.pid}" in resumed.stderr
    assert load_index(out) == load_index(tmp_path / "whole")
    assert not list(out.glob(".*.tmp-*")), "temporaries of the killed run are cleaned up"
    for name in (s["name"] for s in load_index(out)["shards"]):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, 1), (signal.SIGTERM, 2)])
def test_ctrl_c_or_sigterm_leaves_nothing_verify_would_accept(shardify, corpus, tmp_path, sig, workers):
    out = tmp_path / "interrupted"
    process = _start_pack(corpus, out, "--encoding", "flac", "--workers", workers)
    _wait_for_shards(out, 2, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "re-run the same command to resume" in stderr
    result = shardify("verify", out, check=False)
    assert result.returncode == 2
    assert "packing has not finished" in result.stderr
    assert not list(out.glob(".*.tmp-*"))
    assert len(list(out.glob("*.tar"))) < 72, "the run stopped early"


def test_parts_then_merge_equal_a_single_run(shardify, corpus, tmp_path):
    pack_train(shardify, corpus, tmp_path / "single", "--max-utts", 8, "--chunk-size", 4)
    parts = tmp_path / "parts"
    for part in (0, 2):
        result = pack_train(shardify, corpus, parts, "--max-utts", 8, "--chunk-size", 4, "--part", part, "--parts", 3)
        assert "python -m shardify merge" in result.stderr
    early = shardify("merge", parts, check=False)
    assert early.returncode == 2
    assert "not finished" in early.stderr and "train-000001.tar" in early.stderr
    pack_train(shardify, corpus, parts, "--max-utts", 8, "--chunk-size", 4, "--part", 1, "--parts", 3)
    shardify("merge", parts)
    assert load_index(parts) == load_index(tmp_path / "single")
    shardify("verify", parts)


def test_verify_catches_a_flipped_byte(shardify, corpus, tmp_path):
    out = tmp_path / "shards"
    pack_train(shardify, corpus, out, "--max-utts", 16, "--encoding", "wav")
    assert shardify("verify", out, "--decode").returncode == 0
    victim = out / load_index(out)["shards"][1]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside audio: the tar still parses, only the hash can tell
    victim.write_bytes(bytes(data))
    result = shardify("verify", out, check=False)
    assert result.returncode == 1
    assert f"BAD {victim.name}" in result.stderr and "sha256" in result.stderr


def test_verify_catches_a_truncated_shard(shardify, corpus, tmp_path):
    out = tmp_path / "shards"
    pack_train(shardify, corpus, out, "--max-utts", 16)
    victim = out / load_index(out)["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    result = shardify("verify", out, check=False)
    assert result.returncode == 1 and f"BAD {victim.name}" in result.stderr and "bytes" in result.stderr


def test_eval_kind_packs_trial_utterances_keyed_by_path(shardify, corpus, tmp_path):
    out = tmp_path / "eval"
    shardify("pack", "--kind", "eval", "--trials", corpus.trials, "--root", corpus.root, "--out", out, "--max-utts", 5)
    needed = set()
    for line in Path(corpus.trials).read_text().split("\n"):
        if line.strip():
            needed.update(line.split()[1:])
    index = load_index(out)
    assert sorted(k for s in index["shards"] for k in s["keys"]) == sorted(utterance_key(p) for p in needed)
    samples = read_shards(out)
    assert {s["meta"]["src"] for s in samples} == needed
    assert all("label" not in s["meta"] and "chunk" not in s["meta"] for s in samples)
    assert [s["key"] for s in samples] == sorted(s["key"] for s in samples)


def test_noise_kind_scans_a_tree_and_records_categories(shardify, tmp_path):
    root = tmp_path / "musan"
    rng = np.random.default_rng(0)
    for category in ("noise", "speech", "music"):
        for i in range(2):
            path = root / category / "src" / f"{category}-{i:04d}.v1.wav"  # a dot in the stem too
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(path, (rng.standard_normal(8000) * 1000).astype(np.int16), 16000)
    out = tmp_path / "noise"
    shardify("pack", "--kind", "noise", "--root", root, "--out", out)
    samples = read_shards(out)
    assert sorted(s["meta"]["category"] for s in samples) == ["music"] * 2 + ["noise"] * 2 + ["speech"] * 2
    assert "noise/src/noise-0000_v1" in {s["key"] for s in samples}


# ---------------------------------------------------------------------------------------------- bad input

def _write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_list_line_with_wrong_field_count_names_file_and_line(shardify, corpus, tmp_path):
    lines = Path(corpus.train_list).read_text().splitlines()
    bad = _write_list(tmp_path / "list.txt", lines[:3] + ["id00001 a/b.wav extra"] + lines[3:])
    result = shardify("pack", "--list", bad, "--root", corpus.root, "--out", tmp_path / "o", check=False)
    assert result.returncode == 2
    assert f"{bad}:4" in result.stderr and "2 fields" in result.stderr
    assert not (tmp_path / "o").exists()


def test_empty_list_is_an_error(shardify, corpus, tmp_path):
    empty = _write_list(tmp_path / "empty.txt", ["# nothing here"])
    result = shardify("pack", "--list", empty, "--root", corpus.root, "--out", tmp_path / "o", check=False)
    assert result.returncode == 2 and "empty" in result.stderr


def test_duplicate_lines_are_an_error(shardify, corpus, tmp_path):
    lines = Path(corpus.train_list).read_text().splitlines()
    dup = _write_list(tmp_path / "dup.txt", lines + [lines[0]])
    result = shardify("pack", "--list", dup, "--root", corpus.root, "--out", tmp_path / "o", check=False)
    assert result.returncode == 2 and "more than once" in result.stderr and f"{dup}:1" in result.stderr


def test_missing_files_are_counted_and_listed_or_skipped_with_skip_bad(shardify, corpus, tmp_path):
    lines = Path(corpus.train_list).read_text().splitlines()
    missing = [f"id99999 id99999/nope/{i:05d}.wav" for i in range(12)]
    listed = _write_list(tmp_path / "list.txt", lines + missing)
    result = shardify("pack", "--list", listed, "--root", corpus.root, "--out", tmp_path / "o", check=False)
    assert result.returncode == 2
    assert "12 of" in result.stderr and "--skip-bad" in result.stderr and "and 2 more" in result.stderr
    assert not list((tmp_path / "o").glob("*.tar")) if (tmp_path / "o").exists() else True

    ok = shardify("pack", "--list", listed, "--root", corpus.root, "--out", tmp_path / "o", "--skip-bad")
    assert "skipped" in ok.stderr
    index = load_index(tmp_path / "o")
    assert index["totals"]["skipped"] == 12 and index["totals"]["samples"] == len(lines)
    assert {s["src"] for s in index["skipped"]} == {m.split()[1] for m in missing}


def test_undecodable_file_fails_keeping_finished_shards_then_skip_bad_resumes(shardify, corpus, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(corpus.root, root)
    lines = Path(corpus.train_list).read_text().splitlines()
    broken = lines[5].split()[1]
    (root / broken).write_bytes(b"RIFF not really a wav file")
    result = shardify("pack", "--list", corpus.train_list, "--root", root, "--out", tmp_path / "o",
                      "--max-utts", 6, "--chunk-size", 2, check=False)
    assert result.returncode == 2
    assert "1 audio file(s) cannot be decoded" in result.stderr and broken in result.stderr
    assert "finished shard(s) are kept" in result.stderr
    kept = len(list((tmp_path / "o").glob("*.tar")))
    assert kept > 0 and not (tmp_path / "o" / "index.json").exists()

    shardify("pack", "--list", corpus.train_list, "--root", root, "--out", tmp_path / "o",
             "--max-utts", 6, "--chunk-size", 2, "--skip-bad")
    index = load_index(tmp_path / "o")
    assert [s["src"] for s in index["skipped"]] == [broken]
    assert index["totals"]["samples"] == len(lines) - 1


def test_output_directory_of_another_configuration_is_refused(shardify, corpus, tmp_path):
    pack_train(shardify, corpus, tmp_path / "o", "--max-utts", 16, "--chunk-size", 4)
    result = pack_train(shardify, corpus, tmp_path / "o", "--max-utts", 16, "--chunk-size", 2, check=False)
    assert result.returncode == 2
    assert "different configuration" in result.stderr and "chunk_size: 4 there, 2 now" in result.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.tar").write_bytes(b"")
    result = pack_train(shardify, corpus, foreign, check=False)
    assert result.returncode == 2 and "did not plan" in result.stderr


def test_wrong_sample_rate_is_an_error_unless_resample(shardify, tmp_path):
    root = tmp_path / "root"
    (root / "spk1" / "v").mkdir(parents=True)
    tone = (np.sin(np.arange(8000 * 2) * 0.05) * 8000).astype(np.int16)
    soundfile.write(root / "spk1" / "v" / "a.wav", tone, 8000)
    listed = _write_list(tmp_path / "list.txt", ["spk1 spk1/v/a.wav"])
    result = shardify("pack", "--list", listed, "--root", root, "--out", tmp_path / "o", check=False)
    assert result.returncode == 2
    assert "spk1/v/a.wav: sample rate 8000 Hz, expected 16000 Hz; pass --resample" in result.stderr
    shardify("pack", "--list", listed, "--root", root, "--out", tmp_path / "r", "--resample")
    (sample,) = read_shards(tmp_path / "r")
    assert sample["meta"]["samples"] == 2 * len(tone)


def test_stereo_is_an_error_unless_downmix(shardify, tmp_path):
    root = tmp_path / "root"
    (root / "spk1" / "v").mkdir(parents=True)
    stereo = np.stack([np.full(16000, 1000, np.int16), np.full(16000, 3000, np.int16)], axis=1)
    soundfile.write(root / "spk1" / "v" / "a.flac", stereo, 16000)
    listed = _write_list(tmp_path / "list.txt", ["spk1 spk1/v/a.flac"])
    result = shardify("pack", "--list", listed, "--root", root, "--out", tmp_path / "o", check=False)
    assert result.returncode == 2 and "2 channels" in result.stderr and "--downmix" in result.stderr
    shardify("pack", "--list", listed, "--root", root, "--out", tmp_path / "d", "--downmix")
    (sample,) = read_shards(tmp_path / "d")
    assert (sample["audio"] == 2000).all()


# ---------------------------------------------------------------------------------------------- m4a (AAC)

def _write_m4a(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    av = pytest.importorskip("av", reason="PyAV (the m4a extra) is not installed")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_m4a_is_decoded_with_pyav(shardify, tmp_path):
    t = np.arange(16000 * 2) / 16000
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    _write_m4a(tmp_path / "root" / "id1" / "v" / "00001.m4a", tone)
    listed = _write_list(tmp_path / "list.txt", ["id1 id1/v/00001.m4a"])
    shardify("pack", "--list", listed, "--root", tmp_path / "root", "--out", tmp_path / "o", "--encoding", "wav")
    (sample,) = read_shards(tmp_path / "o")
    assert sample["key"] == "id1/v/00001"
    assert abs(len(sample["audio"]) - len(tone)) <= 2048  # AAC pads to whole 1024-sample frames
    decoded = read_audio(tmp_path / "root" / "id1" / "v" / "00001.m4a")
    np.testing.assert_array_equal(sample["audio"], decoded)
    # lossy, but a 440 Hz tone stays a 440 Hz tone
    spectrum = np.abs(np.fft.rfft(decoded[4000:20000].astype(float)))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 2


def test_missing_m4a_decoder_says_how_to_install_one(tmp_path):
    (tmp_path / "id1" / "v").mkdir(parents=True)
    (tmp_path / "id1" / "v" / "00001.m4a").write_bytes(b"\0" * 64)
    _write_list(tmp_path / "list.txt", ["id1 id1/v/00001.m4a"])
    # A real interpreter in which PyAV cannot be imported and no ffmpeg is on PATH.
    code = ("import sys; sys.modules['av'] = None; from shardify.__main__ import main; "
            f"sys.exit(main(['pack', '--list', {str(tmp_path / 'list.txt')!r}, '--root', {str(tmp_path)!r}, "
            f"'--out', {str(tmp_path / 'o')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PATH": os.path.dirname(sys.executable), "COLUMNS": "200"})
    assert result.returncode == 2, result.stderr
    assert "id1/v/00001.m4a" in result.stderr and "speakerid-toolkit[m4a]" in result.stderr
    assert "Nothing was written" in result.stderr and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- small parts

def test_utterance_keys_follow_webdataset_splitting():
    assert utterance_key("id00012/21Uxsk56VDQ/00001.wav") == "id00012/21Uxsk56VDQ/00001"
    assert utterance_key("./a.b/c.d.flac") == "a.b/c_d"  # webdataset would cut the key at "c."


def test_shard_size_targets_bytes(shardify, corpus, tmp_path):
    out = tmp_path / "o"
    pack_train(shardify, corpus, out, "--shard-size", "400kB", "--chunk-size", 2, "--encoding", "wav")
    sizes = [s["bytes"] for s in load_index(out)["shards"]]
    assert len(sizes) > 3
    assert max(sizes) < 400_000 * 1.05  # estimates are input file sizes; tar headers add ~1 kB an utterance
    assert np.mean(sizes[:-1]) > 400_000 * 0.6


def test_train_without_a_list_takes_the_speaker_from_the_first_folder(shardify, corpus, tmp_path):
    root = tmp_path / "tree"
    entries = read_train_list(corpus.train_list)
    for e in entries:  # only the training speakers (the corpus folder also holds the held-out ones)
        (root / e.relpath).parent.mkdir(parents=True, exist_ok=True)
        os.link(Path(corpus.root) / e.relpath, root / e.relpath)
    pack_train(shardify, corpus, tmp_path / "listed", "--max-utts", 16)
    result = shardify("pack", "--root", root, "--out", tmp_path / "scanned", "--max-utts", 16)
    assert f"{len(entries)} audio files" in result.stdout + result.stderr
    listed, scanned = load_index(tmp_path / "listed"), load_index(tmp_path / "scanned")
    assert scanned["speakers"] == listed["speakers"]
    assert scanned["totals"] == listed["totals"]
    assert sorted((s["key"], s["meta"]["label"]) for s in read_shards(tmp_path / "scanned")) == \
        sorted((s["key"], s["meta"]["label"]) for s in read_shards(tmp_path / "listed"))


def test_train_without_a_list_refuses_files_without_a_speaker_folder(shardify, corpus, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    first = read_train_list(corpus.train_list)[0]
    shutil.copy(Path(corpus.root) / first.relpath, root / "loose.wav")
    result = shardify("pack", "--root", root, "--out", tmp_path / "o", check=False)
    assert result.returncode == 2 and "loose.wav" in result.stderr and "--list" in result.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- issue 11 (C)

def test_a_list_saved_with_a_bom_packs_the_same_shards(shardify, corpus, tmp_path):
    text = Path(corpus.train_list).read_text()
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff".encode() + text.encode())
    pack_train(shardify, corpus, tmp_path / "plain", "--max-utts", 16)
    shardify("pack", "--list", bom, "--root", corpus.root, "--out", tmp_path / "bom", "--max-utts", 16)
    assert load_index(tmp_path / "bom") == load_index(tmp_path / "plain")
    trials = tmp_path / "trials.txt"
    trials.write_bytes("\ufeff".encode() + Path(corpus.trials).read_bytes())
    assert read_trials(trials)[0].label in (0, 1)


def test_a_nul_byte_in_a_list_names_the_file_and_line(shardify, corpus, tmp_path):
    lines = Path(corpus.train_list).read_text().splitlines()
    broken = _write_list(tmp_path / "list.txt", lines[:2] + [lines[2].replace("/", "\0", 1)] + lines[3:])
    result = shardify("pack", "--list", broken, "--root", corpus.root, "--out", tmp_path / "o", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{broken}: NUL byte(s) on line(s) 3" in result.stderr
    assert not (tmp_path / "o").exists()


def test_out_naming_a_file_and_a_damaged_index_or_plan_each_get_one_message(shardify, corpus, tmp_path):
    a_file = tmp_path / "shards.tar"
    a_file.write_bytes(b"")
    result = pack_train(shardify, corpus, a_file, check=False)
    assert result.returncode == 2 and f"--out {a_file} is a file" in result.stderr and "Traceback" not in result.stderr

    out = tmp_path / "o"
    pack_train(shardify, corpus, out, "--max-utts", 16)
    whole = load_index(out)
    (out / "index.json").write_bytes((out / "index.json").read_bytes()[:100])
    result = shardify("verify", out, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{out / 'index.json'}: cannot read it" in result.stderr and f"speakerid shardify merge {out}" in result.stderr
    shardify("merge", out)  # the fix the message gives
    assert load_index(out) == whole
    shardify("verify", out)

    plan = out / ".shardify" / "plan.json"
    plan.write_text(plan.read_text()[:50])
    result = pack_train(shardify, corpus, out, "--max-utts", 16, check=False)
    assert result.returncode == 2 and f"{plan}: cannot read it" in result.stderr and "Traceback" not in result.stderr


def test_leftover_temporary_json_of_a_killed_write_is_removed_by_the_next_run(shardify, corpus, tmp_path):
    out = tmp_path / "o"
    pack_train(shardify, corpus, out, "--max-utts", 16)
    names = [s["name"] for s in load_index(out)["shards"]]
    (out / names[-1]).unlink()  # an unfinished shard, as after a kill
    (out / "index.json").unlink()
    leftovers = [out / ".shardify" / f".{names[-1]}.json.tmp-4194999", out / ".shardify" / ".plan.json.tmp-4194999",
                 out / ".index.json.tmp-4194999", out / f".{names[-1]}.tmp-4194999"]
    for path in leftovers:  # what a kill -9 during write_json_atomic (or a shard write) leaves
        path.write_text('{"half": ')
    pack_train(shardify, corpus, out, "--max-utts", 16)
    assert [p for p in leftovers if p.exists()] == []
    shardify("verify", out)


def test_verify_decode_names_every_bad_member(shardify, corpus, tmp_path):
    import tarfile
    out = tmp_path / "o"
    pack_train(shardify, corpus, out, "--max-utts", 16, "--encoding", "wav")
    victim = out / load_index(out)["shards"][0]["name"]
    with tarfile.open(victim) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".wav")][:2]
    data = bytearray(victim.read_bytes())
    for member in members:  # the tar still parses, the wav headers do not
        data[member.offset_data:member.offset_data + 4] = b"JUNK"
    victim.write_bytes(bytes(data))
    result = shardify("verify", out, "--decode", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for member in members:
        assert f"BAD {victim.name}: member {member.name} does not decode" in result.stderr


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("limit", ["full tmpfs", "RLIMIT_FSIZE"])
def test_a_full_disk_is_one_message_and_leaves_no_tar(shardify, corpus, tmp_path, limit):
    with contextlib.ExitStack() as stack:
        if limit == "full tmpfs":  # ENOSPC, the real thing
            out = stack.enter_context(_small_tmpfs(tmp_path / "disk", "400k")) / "o"
            kw = {}
        else:  # EFBIG: a file size limit, as a quota would stop it; needs no root
            out = tmp_path / "o"
            kw = {"preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))}
        result = pack_train(shardify, corpus, out, "--max-utts", 16, "--encoding", "wav", "--workers", 2,
                            check=False, **kw)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"{out}: cannot write the shards" in result.stderr and "Free space" in result.stderr
        assert "re-run the same command" in result.stderr and not list(out.glob("*.tar"))


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid``, from /proc (zombies are dead)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid) and not fields.get("State", "").startswith("Z"):
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/status").read_text().split("State:\t", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="finds the pool workers through /proc")
def test_pool_workers_die_with_a_killed_parent(corpus, tmp_path):
    process = _start_pack(corpus, tmp_path / "o", "--workers", 2)
    _wait_for_shards(tmp_path / "o", 2, process)
    process.send_signal(signal.SIGSTOP)  # mid-pack for sure, however fast this machine
    workers = _children(process.pid)
    assert len(workers) == 2, workers
    process.kill()  # kill -9: no clean-up, no chance to stop the pool
    process.wait()
    deadline = time.monotonic() + 60
    try:
        while any(map(_alive, workers)):
            assert time.monotonic() < deadline, f"pool workers {workers} outlived their parent"
            time.sleep(0.1)
    finally:
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)


def test_a_second_identical_run_is_refused_while_other_parts_run_concurrently(shardify, corpus, tmp_path):
    out = tmp_path / "o"
    first = _start_pack(corpus, out, "--part", 0, "--parts", 2)
    _wait_for_shards(out, 2, first)
    first.send_signal(signal.SIGSTOP)  # holds its lock, mid-pack, however fast this machine
    try:
        second = pack_train(shardify, corpus, out, "--max-utts", 1, "--chunk-size", 1, "--part", 0, "--parts", 2,
                            check=False)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"is being packed by host {socket.gethostname()} pid {first.pid} since" in second.stderr
    assert "Let that run finish" in second.stderr
    other = pack_train(shardify, corpus, out, "--max-utts", 1, "--chunk-size", 1, "--part", 1, "--parts", 2)
    assert "python -m shardify merge" in other.stderr
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr  # the refused run took nothing from the first
    shardify("merge", out)
    shardify("verify", out)


def _one_speaker_list(tmp_path: Path, files: dict[str, bytes]) -> Path:
    for relpath, data in files.items():
        (tmp_path / "root" / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "root" / relpath).write_bytes(data)
    return _write_list(tmp_path / "list.txt", [f"{p.split('/')[0]} {p}" for p in files])


def _wav_bytes(seconds: float) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, (np.sin(np.arange(int(16000 * seconds)) * 0.05) * 8000).astype(np.int16), 16000, format="WAV")
    return buffer.getvalue()


def test_truncated_and_too_short_files_are_refused_or_skipped_and_counted(shardify, tmp_path):
    whole = _wav_bytes(2.0)
    listed = _one_speaker_list(tmp_path, {"spk1/v/ok.wav": whole, "spk1/v/cut.wav": whole[:len(whole) // 2],
                                          "spk1/v/short.wav": _wav_bytes(0.05)})
    root = tmp_path / "root"
    result = shardify("pack", "--list", listed, "--root", root, "--out", tmp_path / "o", check=False)
    assert result.returncode == 2 and "2 audio file(s) cannot be decoded or used" in result.stderr
    assert f"{root / 'spk1/v/cut.wav'}: truncated: its header announces 64000 bytes of audio, the file holds 31978" \
        in result.stderr
    assert f"{root / 'spk1/v/short.wav'}: 0.050 s of audio, shorter than the minimum 0.1 s" in result.stderr

    shardify("pack", "--list", listed, "--root", root, "--out", tmp_path / "skip", "--skip-bad")
    index = load_index(tmp_path / "skip")
    assert sorted(s["src"] for s in index["skipped"]) == ["spk1/v/cut.wav", "spk1/v/short.wav"]
    assert index["totals"]["samples"] == 1 and index["totals"]["skipped"] == 2

    (root / "spk1/v/cut.wav").unlink()
    listed = _write_list(listed, ["spk1 spk1/v/ok.wav", "spk1 spk1/v/short.wav"])
    shardify("pack", "--list", listed, "--root", root, "--out", tmp_path / "short-ok", "--min-seconds", "0.04")
    assert load_index(tmp_path / "short-ok")["totals"]["samples"] == 2


def test_evaluation_refuses_what_shardify_refuses():
    from speakerid.audio import MIN_SECONDS
    from speakerid.evaluation import ExtractConfig, prepare_item
    prepare_item("spk1/v/ok", np.zeros(int(MIN_SECONDS * 16000), np.int16), ExtractConfig())
    with pytest.raises(SpeakeridError, match="utterance spk1/v/short has 800 samples"):
        prepare_item("spk1/v/short", np.zeros(800, np.int16), ExtractConfig())


def test_removing_the_bad_line_as_the_message_says_resumes(shardify, corpus, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(corpus.root, root)
    lines = Path(corpus.train_list).read_text().splitlines()
    broken = lines[5].split()[1]
    (root / broken).write_bytes(b"RIFF not really a wav file")
    listed = _write_list(tmp_path / "list.txt", lines)
    args = ("pack", "--list", listed, "--root", root, "--out", tmp_path / "o", "--max-utts", 6, "--chunk-size", 2)
    result = shardify(*args, check=False)
    assert result.returncode == 2 and "Fix or remove them from the list" in result.stderr
    kept = {p.name: p.read_bytes() for p in (tmp_path / "o").glob("*.tar")}

    _write_list(listed, [line for line in lines if broken not in line])  # what the message says
    resumed = shardify(*args)
    assert f"{len(kept)} finished shard(s) kept" in resumed.stderr and "lost 1 utterance(s)" in resumed.stderr
    shardify("verify", tmp_path / "o", "--decode")
    index = load_index(tmp_path / "o")
    assert index["totals"]["samples"] == len(lines) - 1 and index["skipped"] == []
    assert all((tmp_path / "o" / name).read_bytes() == data for name, data in kept.items())
    assert "resuming" in shardify(*args).stderr  # the shorter list goes on resuming it

    victim = sorted(kept)[0]  # a line of a finished shard: not silently dropped, the message says what to do
    gone = next(s["meta"]["src"] for s in read_shards(tmp_path / "o") if s["url"].endswith(victim))
    _write_list(listed, [line for line in lines if broken not in line and gone not in line])
    refused = shardify(*args, check=False)
    assert refused.returncode == 2 and f"{gone} (in {victim})" in refused.stderr and f"delete {victim}" in refused.stderr
    (tmp_path / "o" / victim).unlink()
    (tmp_path / "o" / ".shardify" / f"{victim}.json").unlink()
    shardify(*args)
    shardify("verify", tmp_path / "o")
    assert load_index(tmp_path / "o")["totals"]["samples"] == len(lines) - 2


def test_merge_on_a_full_disk_is_one_message(shardify, corpus, tmp_path):
    out = tmp_path / "o"
    for part in (0, 1):
        pack_train(shardify, corpus, out, "--max-utts", 16, "--part", part, "--parts", 2)
    small = {"preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))}  # EFBIG on index.json
    result = shardify("merge", out, check=False, **small)
    assert result.returncode == 2 and "Traceback" not in result.stderr and f"{out}: cannot write" in result.stderr
    assert not (out / "index.json").exists()
    leftover = out / ".shardify" / ".plan.json.tmp-4194999"  # a part killed while it claimed the directory
    leftover.write_text('{"half": ')
    shardify("merge", out)
    assert not list(out.glob(".index.json.tmp-*")) and not leftover.exists()
    shardify("verify", out)


def test_a_directory_half_packed_before_min_seconds_existed_still_resumes(shardify, corpus, tmp_path):
    out = tmp_path / "shards"
    pack_train(shardify, corpus, out, "--max-utts", 1, "--chunk-size", 1)
    plan = json.loads((out / ".shardify" / "plan.json").read_text())
    assert "min_seconds" not in plan["config"], "an unset --min-seconds keeps the plan record of earlier versions"
    whole = load_index(out)
    (out / "index.json").unlink()
    (out / whole["shards"][-1]["name"]).unlink()  # half packed: the last shard was never written
    resumed = pack_train(shardify, corpus, out, "--max-utts", 1, "--chunk-size", 1)
    assert "finished shard(s) kept" in resumed.stderr
    assert load_index(out) == whole
