"""benchmarks/run_all.py: every benchmark runs (tiny sizes) and lands in the one table; the README's table is its output.

The figures of a smoke run mean nothing and are never compared with numbers: what is checked is that each
benchmark script still runs against the current code, writes its figures, and that run_all turns them into
one row set with a baseline, a ratio and a physical limit where the benchmark has them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_all  # benchmarks/run_all.py: pytest puts benchmarks/ on the path (pyproject.toml, pythonpath)

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_smoke_runs_every_benchmark_into_one_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\nafter\n")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--out",
                           str(tmp_path / "out"), "--readme", str(readme), "--markdown", str(tmp_path / "table.md")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == []
    assert set(summary["seconds"]) == {"shardify", "loader", "model", "train", "eval"}
    rows = summary["rows"]
    by_start = {name: [r for r in rows if r["benchmark"].startswith(name)]
                for name in ("shardify pack", "loader", "ResNetSE34L forward+backward", "training step", "evaluate")}
    assert all(by_start.values()), by_start
    for row in rows:
        assert math.isfinite(row["speakerid"]) and row["speakerid"] >= 0, row
    # every benchmark with a baseline reports the ratio; every one with a limit reports its share
    for name in ("shardify pack", "loader", "training step", "evaluate"):
        assert all(r["baseline"] > 0 and r["ratio"] > 0 for r in by_start[name]), by_start[name]
    with_limit = [r for r in rows if r["limit"] is not None]
    for name in ("shardify pack", "loader", "training step"):
        assert all(r in with_limit for r in by_start[name] if "data-wait" not in r["benchmark"]), by_start[name]
    assert [r["figure"] for r in by_start["evaluate"] if r in with_limit] == ["seconds (lower is better)"]  # crops
    for r in with_limit:
        assert r["limit"] > 0 and r["limit_what"] and r["of_limit"] > 0, r
    # on a CPU the network alone is the training limit; the counted-FLOP figure (no bound there) is not used
    assert all(r["limit_what"].startswith("the network alone") for r in by_start["training step"] if r in with_limit)
    # the README gets the same Markdown, between its markers, with the date, the machine and the command
    table = (tmp_path / "table.md").read_text()
    text = readme.read_text()
    assert "old table" not in text and table in text and text.endswith("<!-- bench:end -->\n\nafter\n")
    assert "run_all.py --smoke" in table and "cores" in table
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row


def test_flac_decode_compares_both_decoders_on_the_same_samples(tmp_path):
    """benchmarks/flac_decode.py (not in run_all: a micro-benchmark of one function): it runs, checks the samples of
    both decoders against the source before timing them, and writes a row per member and case."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flac_decode.py"), "--calls", "3", "--seconds", "2.5",
                           "--json", str(tmp_path / "flac.json")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "flac.json").read_text())["rows"]
    assert [(r["member"], r["case"]) for r in rows] == [(m, c) for m in ("speech-like", "random walk") for c in ("crop", "whole")]
    assert all(r["libsndfile_ms"] > 0 and r["dr_flac_ms"] > 0 for r in rows)


def test_missing_readme_markers_are_one_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="bench:begin"):
        run_all.replace_between_markers(readme, "table\n")
    assert readme.read_text() == "no markers here\n"


def test_the_readme_table_is_run_all_output():
    text = (ROOT / "README.md").read_text()
    begin, end = text.index("<!-- bench:begin -->"), text.index("<!-- bench:end -->")
    block = text[begin:end]
    assert "by `python benchmarks/run_all.py" in block and "| benchmark | figure |" in block



def test_a_failed_benchmark_fails_the_run_and_leaves_the_readme_alone(tmp_path):
    """--device cuda on this CPU-only torch: the model benchmark fails for real; no partial table lands."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where --device cuda fails")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:begin -->\nold table\n<!-- bench:end -->\n")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--device", "cuda",
                           "--only", "model", "--out", str(tmp_path / "out"), "--readme", str(readme)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "model failed" in done.stdout and str(tmp_path / "out" / "model.log") in done.stdout.replace("\n", "")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failed"] == ["model"]
    assert readme.read_text() == "<!-- bench:begin -->\nold table\n<!-- bench:end -->\n"


def test_techniques_smoke_runs_every_row(tmp_path):
    """benchmarks/techniques.py --smoke: every technique trains, is scored against the baseline, lands in the JSON."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "techniques.py"), "--smoke", "--out",
                           str(tmp_path / "out"), "--json", str(tmp_path / "techniques.json")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "techniques.json").read_text())
    assert [r["technique"] for r in result["rows"]] == [
        "speed perturbation", "SpecAugment", "MUSAN/RIR", "large-margin fine-tuning", "checkpoint averaging",
        "score calibration"]
    for row in result["rows"]:
        assert math.isfinite(row["without"]) and math.isfinite(row["with"]), row
        assert row["without"] == result["baseline"]["eer"] or row["figure"] == "Cllr", row
    # the smoke's untrained model can get a falling calibration map (EER → 100 − EER): only the figures are checked
    assert all(math.isfinite(eer) for eer in result["rows"][-1]["eer"])
    assert "techniques.py --smoke" in result["command"] and "technique" in done.stdout


def test_techniques_stops_at_a_signal_to_its_process_group(tmp_path):
    """Slurm/Kubernetes SIGTERM the whole group: the trainer checkpoints and the script ends, not its next row."""
    log = tmp_path / "log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "techniques.py"), "--out", str(tmp_path / "out"), "--speakers", "6",
             "--utts", "3", "--test-speakers", "3", "--batch", "4", "--frames", "40", "--steps", "100000",
             "--seeds", "0", "--workers", "1"], stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path,
            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while "epoch" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert process.poll() is None, log.read_text()[-3000:]
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = " ".join(log.read_text().split())
    assert "stopped by a signal while training" in text and "no table written" in text
    assert not (tmp_path / "out" / "seed-0" / "runs" / "speed").exists()  # the next row never started


# ---- the device check (benchmarks/gpu_check.sh), rehearsed on the CPU

GPU_CHECK_SECTIONS = {"train_resnetse34l_bf16", "train_resnetse34l_fp16", "train_ecapa_c1024_aam_bf16", "eval_vox1o",
                      "frontend_torchaudio", "losses_amp"}


def test_gpu_check_rehearses_every_section_on_the_cpu(tmp_path):
    """`bash benchmarks/gpu_check.sh OUT --tiny --device cpu`: the device's one command, every section at tiny sizes;
    each has figures or a stated reason it did not run here; one table on stdout, OUT/gpu_check.json with the
    environment. Its figures mean nothing; ~100 s of CPU time, so minutes of wall time on a loaded machine."""
    from speakerid.losses import LOSSES

    env = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--tiny",
                           "--device", "cpu"], capture_output=True, text=True, timeout=2700, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    sections = report["sections"]
    assert set(sections) == GPU_CHECK_SECTIONS and report["failed"] == []
    for name, section in sections.items():
        assert section["status"] in ("ok", "skipped"), (name, section)
        if section["status"] == "ok":
            assert section["rows"], name
        else:
            assert section["error"].startswith("skipped: "), (name, section)
    assert "CUDA path" in sections["train_resnetse34l_fp16"]["error"]
    for name in ("train_resnetse34l_bf16", "train_ecapa_c1024_aam_bf16"):
        utts = [r for r in sections[name]["rows"] if r["figure"].startswith("utterances/s")]
        assert utts and all(r["speakerid"] > 0 and r["baseline"] > 0 and r["ratio"] > 0 for r in utts), name
    assert "--model ECAPA_TDNN_C1024" in sections["train_ecapa_c1024_aam_bf16"]["figures"]["command"]
    # --tiny: augmentation on for ResNetSE34L, off for ECAPA (each path once); utterances/s and data-wait each
    assert [r["figure"] for r in sections["train_resnetse34l_bf16"]["rows"]] == [
        "utterances/s, augmentation on", "data-wait %, augmentation on"]
    assert [r["figure"] for r in sections["train_ecapa_c1024_aam_bf16"]["rows"]] == [
        "utterances/s, augmentation off", "data-wait %, augmentation off"]
    evaluation = sections["eval_vox1o"]["rows"]
    assert [r["figure"].split(",")[0] for r in evaluation] == ["seconds", "seconds"]
    assert all(r["baseline"] > 0 and "EER" in r["note"] for r in evaluation)
    try:
        import torchaudio  # noqa: F401
    except Exception:  # noqa: BLE001 (its CUDA wheels fail to load next to a CPU torch)
        assert "torchaudio not importable here" in sections["frontend_torchaudio"]["error"]
    losses = {r["figure"].split(":")[0]: r["speakerid"] for r in sections["losses_amp"]["rows"]}
    assert set(losses) == set(LOSSES) and all(cell.startswith("ok / ") for cell in losses.values()), losses
    assert report["environment"]["torch"] and report["environment"]["python"] and report["tiny"]
    assert "gpu_check (cpu, tiny)" in done.stdout and "6 of 6 sections without failure" in done.stdout
    assert all(name in done.stdout for name in GPU_CHECK_SECTIONS)  # the table
    assert "===== losses_amp" in (tmp_path / "out" / "gpu_check.log").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.log"]


def test_gpu_check_reports_a_failing_section_and_runs_the_rest(tmp_path):
    """A section that crashes or outlives its budget is a failed row with its error; the next still runs."""
    import gpu_check

    sections = [gpu_check.Section("crashes", 60, [sys.executable, "-c", "import sys; print('boom: no such file x.tar'); "
                                                   "sys.exit(3)"], gpu_check.own_rows),
                gpu_check.Section("hangs", 1, [sys.executable, "-c", "import time; time.sleep(30)"], gpu_check.own_rows),
                gpu_check.Section("runs", 60, [sys.executable, "-c", "import json, sys; open(sys.argv[-1], 'w')"
                                               ".write(json.dumps({'status': 'ok', 'rows': []}))"], gpu_check.own_rows),
                gpu_check.Section("late", 60, [sys.executable, "-c", "pass"], gpu_check.own_rows)]
    with open(tmp_path / "log", "w") as log:
        results = [gpu_check.run_section(s, left, tmp_path, log) for s, left in zip(sections, (60, 60, 60, 1))]
    assert results[0]["status"] == "failed" and "exit status 3" in results[0]["error"]
    assert "boom: no such file x.tar" in results[0]["error"]
    assert results[1]["status"] == "failed" and "timed out after 1 s" in results[1]["error"]
    assert results[2]["status"] == "ok"
    assert results[3]["status"] == "skipped" and "total budget ran out" in results[3]["error"]


def _torchaudio_stand_in(scale: float = 1.0):
    """torchaudio's two front-end calls, as gpu_sections.py uses them, over speakerid's own (torchaudio cannot load
    next to a CPU torch): the section's plumbing is rehearsed here, its figures come from the device."""
    import types

    import torch

    from speakerid.features import KaldiFbank, MelSpectrogram

    class Mel(torch.nn.Module):
        def __init__(self, *, sample_rate, n_fft, win_length, hop_length, window_fn, n_mels):
            super().__init__()
            window = "hann" if window_fn is torch.hann_window else "hamming"
            self.inner = MelSpectrogram(n_mels=n_mels, window=window, n_fft=n_fft, win_length=win_length,
                                        hop_length=hop_length, sample_rate=sample_rate)

        def forward(self, x):
            return self.inner(x) * scale

    def fbank(waveform, num_mel_bins, dither):
        assert dither == 0.0 and waveform.shape[0] == 1
        return KaldiFbank(num_mel_bins).to(waveform.device)(waveform / 32768)[0].t()

    module = types.ModuleType("torchaudio")
    module.__version__ = "stand-in"
    module.transforms = types.SimpleNamespace(MelSpectrogram=Mel)
    module.compliance = types.SimpleNamespace(kaldi=types.SimpleNamespace(fbank=fbank))
    return module


def test_gpu_check_frontend_section_compares_with_torchaudio(monkeypatch):
    import torch

    import gpu_sections

    monkeypatch.setitem(sys.modules, "torchaudio", _torchaudio_stand_in())
    result = gpu_sections.frontend(torch.device("cpu"), tiny=True)
    assert result["status"] == "ok" and result["error"] is None, result
    assert [r["figure"].split(":")[0] for r in result["rows"]] == [
        "MelSpectrogram hamming 40 mels", "MelSpectrogram hann 40 mels", "MelSpectrogram hamming 64 mels",
        "KaldiFbank 80"]
    assert all(r["speakerid"] < 1e-6 for r in result["rows"]) and "ms vs torchaudio" in result["rows"][0]["note"]
    monkeypatch.setitem(sys.modules, "torchaudio", _torchaudio_stand_in(scale=1.01))  # a front-end that drifted
    result = gpu_sections.frontend(torch.device("cpu"), tiny=True)
    assert result["status"] == "failed" and "differs from torchaudio by 9.9" in result["error"], result
