"""Shared fixtures: a small built-in corpus (made once per session) and a real `python -m shardify` runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from speakerid.data.synthetic import CorpusSpec, generate_corpus

REPO = Path(__file__).resolve().parents[1]

SMALL_SPEC = CorpusSpec(
    n_speakers=12, utts_per_speaker=6, n_test_speakers=4, test_utts_per_speaker=4, videos_per_speaker=3,
    min_seconds=2.0, max_seconds=4.0, n_trials=40, seed=7,
)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """12 training speakers × 6 utterances (2–4 s) + 4 held-out speakers, as a VoxCeleb-shaped tree."""
    return generate_corpus(tmp_path_factory.mktemp("corpus"), SMALL_SPEC, workers=2)


def run_module(module: str, *args, check: bool = True, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m module args…`` from the repository root, as a user would."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, env=full_env, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"python -m {module} {' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def shardify():
    return lambda *args, **kw: run_module("shardify", *args, **kw)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (their timings and results do not depend on the cores' load)."""
    import torch  # noqa: PLC0415 (only the modules that ask for it pay its import here)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
