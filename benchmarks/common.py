"""What the benchmarks share: the machine, the physical limits measured in the same run, the synthetic corpora
and the voxceleb_trainer-style training loader that the loader and train benchmarks compare against.

Where each idea lives: ``machine`` describes the machine. Limits: reading bytes from the page cache
(``cat_seconds``, ``page_cache_seconds``) bounds everything that reads audio or shards; the machine's measured
matrix-multiply rate (``matmul_flops_per_s``; float32 on a CPU, bf16 on a GPU) times a step's counted FLOPs
(``step_flops``), or the network alone (``network_seconds``), bounds the network. Corpora: ``train_corpus`` (the
synthetic corpus and its train list as files and labels), ``pack_shards`` (shardify's library API), ``write_banks``
and ``pack_banks`` (MUSAN- and RIR-like augmentation banks, as files and as noise shards). The baseline, written from
the description of voxceleb_trainer's DatasetLoader.py: ``load_crop`` (its loadWAV), ``SeedAugment`` (AugmentWAV),
``SeedTrainSet`` (train_dataset_loader), ``SpeakerTupleSampler`` (train_dataset_sampler), ``seed_loader`` (its
DataLoader); ``shutdown`` stops a DataLoader iterator's workers.

The scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``: ``from common import …``.
"""

from __future__ import annotations

import glob
import os
import platform
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
from scipy import signal
from torch.utils.flop_counter import FlopCounterMode

import checkout  # noqa: F401 (this checkout's speakerid first on sys.path)
from speakerid.data.lists import ListEntry, read_train_list, scan_audio_tree
from speakerid.data.plan import PackConfig, make_plan
from speakerid.data.synthetic import CorpusInfo, CorpusSpec, generate_corpus, speaker_params, synthesize_utterance
from speakerid.data.pack import pack

SAMPLE_RATE = 16000


# --------------------------------------------------------------------------------------- the machine, its limits


def machine() -> str:
    """CPU model, cores, memory, Python, torch, the GPU if any and the load average now."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB{gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start")


def cat_seconds(files: list[Path]) -> float:
    """Wall time of ``cat FILES > /dev/null`` (in batches, to stay under the argument-length limit)."""
    start = time.perf_counter()
    for i in range(0, len(files), 2000):
        subprocess.run(["cat", *map(str, files[i:i + 2000])], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def page_cache_seconds(files: list[Path], repeats: int = 3) -> float:
    """Time to read FILES from the page cache: one warming pass, then the best of ``repeats``."""
    cat_seconds(files)
    return min(cat_seconds(files) for _ in range(repeats))


def matmul_flops_per_s(device: torch.device | str, dtype: torch.dtype | None = None, size: int | None = None,
                       seconds: float = 1.0) -> float:
    """Measured dense matmul rate: float32 on a CPU (what training there runs), bf16 on a GPU by default."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def step_flops(model: torch.nn.Module, batch: torch.Tensor, backward: bool = True) -> float:
    """FLOPs of one forward (and backward of a scalar of the output) counted by torch's FlopCounterMode.

    Matrix multiplies and convolutions are counted; the FFT front-end, norms and activations are not, so the
    resulting limit is slightly optimistic (a faster-than-possible bound is still a bound)."""
    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            model(batch).square().mean().backward()
        else:
            with torch.no_grad():
                model(batch)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def network_seconds(model: torch.nn.Module, batch: torch.Tensor, steps: int, warmup: int = 1, bf16: bool = False,
                    backward: bool = True) -> float:
    """Seconds per step of the network alone (no data, loss or optimizer): forward, and backward of a stand-in
    scalar (the mean square of the embeddings) unless ``backward`` is false; ``steps`` timed after ``warmup``."""
    device = batch.device

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                                              enabled=bf16):
            embeddings = model(batch)
        if backward:
            embeddings.float().square().mean().backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


# ------------------------------------------------------------------------------------------------------ corpora


@dataclass
class TrainCorpus:
    """A synthetic training corpus as both sides read it: list entries, their files, labels 0..S−1 (sorted ids)."""

    info: CorpusInfo
    entries: list[ListEntry]
    inputs: list[Path]
    labels: list[int]

    @property
    def paths(self) -> list[str]:
        return [str(p) for p in self.inputs]

    @property
    def n_speakers(self) -> int:
        return len(set(self.labels))


def train_corpus(root: Path, n_speakers: int, utts_per_speaker: int, **spec) -> TrainCorpus:
    """Generate (or reuse) a corpus of training speakers only under ``root``; ``spec``: other CorpusSpec fields."""
    spec = CorpusSpec(n_speakers=n_speakers, utts_per_speaker=utts_per_speaker, n_test_speakers=0, n_trials=0, **spec)
    info = generate_corpus(root, spec, workers=os.cpu_count() or 1)
    entries = read_train_list(info.train_list)
    label_of = {spk: i for i, spk in enumerate(sorted({e.spk for e in entries}))}
    return TrainCorpus(info, entries, [info.root / e.relpath for e in entries], [label_of[e.spk] for e in entries])


def pack_shards(corpus: TrainCorpus, encoding: str, chunk_size: int, shard_mb: int) -> Path:
    """shardify's library API: the corpus into CORPUS/shards-ENCODING-cCHUNK-MBmb (resumes, keeps finished shards)."""
    out = corpus.info.root.parent / f"shards-{encoding}-c{chunk_size}-{shard_mb}mb"
    plan = make_plan(corpus.entries, corpus.info.root,
                     PackConfig(encoding=encoding, chunk_size=chunk_size, shard_size=shard_mb * 1024**2))
    pack(plan, corpus.info.root, out, workers=os.cpu_count() or 1)
    return out


def write_banks(root: Path, files_per_category: int = 32, rirs_per_room: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """A small MUSAN-like bank and an RIR bank as wav files, laid out as the seed globs them.

    musan/<category>/<source>/<file>/<segment>.wav (the seed's musan_split: '*/*/*/*.wav', category = 4th from
    the end; shardify's noise kind: category = first component), 5-s segments: coloured noise, babble-like
    speech (the synthetic corpus's source-filter voices, other speakers), music (chords of harmonic notes).
    rirs/<room>/<RoomNNN>/<RoomNNN-NNNNN>.wav (simulated_rirs: '*/*/*.wav'): exponentially decaying noise after
    a direct path, 0.25 / 0.5 / 1 s for small / medium / large rooms.
    """
    musan, rirs = root / "musan", root / "rirs"
    done = root / ".complete"
    if done.exists():
        return musan, rirs
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng([seed, 31])
    n = 5 * SAMPLE_RATE
    t = np.arange(n) / SAMPLE_RATE

    def write(path: Path, x: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), x, SAMPLE_RATE, subtype="PCM_16")

    def to_int16(x: np.ndarray, peak: float) -> np.ndarray:
        return np.round(x / (np.abs(x).max() + 1e-9) * peak * 32767).astype(np.int16)

    for i in range(files_per_category):
        pole = rng.uniform(0.0, 0.97)
        noise = signal.lfilter([1.0 - pole], [1.0, -pole], rng.standard_normal(n))
        write(musan / "noise" / "free-sound" / f"noise-free-sound-{i:04d}" / "00000.wav",
              to_int16(noise, rng.uniform(0.2, 0.8)))
        speech = synthesize_utterance(speaker_params(seed, 9000 + i), [seed, 9000 + i], 5.0)
        write(musan / "speech" / "librivox" / f"speech-librivox-{i:04d}" / "00000.wav", speech)
        music = np.zeros(n)
        for start in np.arange(0.0, 5.0, rng.uniform(0.25, 0.6)):
            f0 = 110.0 * 2 ** (rng.integers(0, 36) / 12)
            note = (t >= start) * np.exp(-3.0 * np.clip(t - start, 0, None))
            music += sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6)) * note
        write(musan / "music" / "fma" / f"music-fma-{i:04d}" / "00000.wav", to_int16(music, rng.uniform(0.2, 0.8)))
    for room, seconds in (("smallroom", 0.25), ("mediumroom", 0.5), ("largeroom", 1.0)):
        for j in range(rirs_per_room):
            length = int(seconds * SAMPLE_RATE)
            rir = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 6))
            rir[0] = 5.0  # the direct path
            write(rirs / room / f"Room{j:03d}" / f"Room{j:03d}-{j:05d}.wav", to_int16(rir, 0.9))
    done.write_text("")
    return musan, rirs


def pack_banks(src: Path, out: Path, encoding: str = "wav") -> Path:
    """shardify's library API: pack --kind noise --root SRC --out OUT (resumes / keeps finished shards)."""
    plan = make_plan(scan_audio_tree(src), src, PackConfig(kind="noise", encoding=encoding, max_utts=16))
    pack(plan, src, out, workers=os.cpu_count() or 1)
    return out


# ------------------------------------------------------------- the baseline: voxceleb_trainer's training loader


def round_down(value: int, divisor: int) -> int:
    return value - value % divisor


def load_crop(path: str, crop_samples: int) -> np.ndarray:
    """voxceleb_trainer's training read: the whole file as float64, wrap-padded to L+1 if short, one random crop."""
    audio, _ = soundfile.read(path)
    if len(audio) <= crop_samples:
        audio = np.pad(audio, (0, crop_samples + 1 - len(audio)), mode="wrap")
    start = int(random.random() * (len(audio) - crop_samples))
    return np.stack([audio[start:start + crop_samples]], axis=0).astype(np.float64)  # (1, L) float64


class SeedAugment:
    """voxceleb_trainer's AugmentWAV, per utterance on the CPU, float64, files read from disk on every use."""

    SNR = {"noise": (0.0, 15.0), "speech": (13.0, 20.0), "music": (5.0, 15.0)}
    CLIPS = {"noise": (1, 1), "speech": (3, 7), "music": (1, 1)}

    def __init__(self, musan_root: Path, rir_root: Path, crop_samples: int) -> None:
        self.crop_samples = crop_samples
        self.files: dict[str, list[str]] = {}
        for path in sorted(glob.glob(os.path.join(musan_root, "*/*/*/*.wav"))):
            self.files.setdefault(path.split("/")[-4], []).append(path)
        self.rirs = sorted(glob.glob(os.path.join(rir_root, "*/*/*.wav")))

    @staticmethod
    def level_db(x: np.ndarray) -> float:
        return 10 * np.log10(np.mean(x**2) + 1e-4)

    def additive_noise(self, category: str, audio: np.ndarray) -> np.ndarray:
        """audio (1, L): k distinct files of the category, each cropped, at its own SNR, summed and added."""
        clean_db = self.level_db(audio)
        chosen = random.sample(self.files[category], random.randint(*self.CLIPS[category]))
        mixed = np.zeros_like(audio)
        for path in chosen:
            clip = load_crop(path, self.crop_samples)
            snr = random.uniform(*self.SNR[category])
            mixed += np.sqrt(10 ** ((clean_db - self.level_db(clip[0]) - snr) / 10)) * clip
        return mixed + audio

    def reverberate(self, audio: np.ndarray) -> np.ndarray:
        rir, _ = soundfile.read(random.choice(self.rirs))
        rir = rir[np.newaxis].astype(np.float64)
        rir = rir / np.sqrt(np.sum(rir**2))
        return signal.convolve(audio, rir, mode="full")[:, : self.crop_samples]

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        kind = random.randint(0, 4)  # 0 clean, 1 reverb, 2 music, 3 speech, 4 noise
        if kind == 1:
            return self.reverberate(audio)
        if kind:
            return self.additive_noise(("music", "speech", "noise")[kind - 2], audio)
        return audio


class SeedTrainSet(torch.utils.data.Dataset):
    """Item = a speaker tuple of M file indices → (float32 (M, L), label), each utterance augmented if ``augment``."""

    def __init__(self, paths: list[str], labels: list[int], crop_samples: int,
                 augment: SeedAugment | None = None) -> None:
        self.paths, self.data_label, self.crop_samples, self.augment = paths, labels, crop_samples, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices: list[int]):
        feats = []
        for i in indices:
            audio = load_crop(self.paths[i], self.crop_samples)
            feats.append(self.augment(audio) if self.augment else audio)
        return torch.FloatTensor(np.concatenate(feats, axis=0)), self.data_label[indices[0]]


class SpeakerTupleSampler(torch.utils.data.Sampler):
    """The seed's train_dataset_sampler, single rank."""

    def __init__(self, labels: list[int], m: int, max_seg_per_spk: int, batch_size: int, seed: int = 0) -> None:
        self.labels, self.m, self.max_seg, self.batch_size, self.seed, self.epoch = labels, m, max_seg_per_spk, batch_size, seed, 0
        self.num_samples = len(self._tuples())

    def _tuples(self) -> list[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        by_speaker: dict[int, list[int]] = {}
        for index in torch.randperm(len(self.labels), generator=g).tolist():
            by_speaker.setdefault(self.labels[index], []).append(index)
        tuples, tuple_labels = [], []
        for label in sorted(by_speaker):
            files = by_speaker[label]
            used = round_down(min(len(files), self.max_seg), self.m)
            for start in range(0, used, self.m):
                tuples.append(files[start:start + self.m])
                tuple_labels.append(label)
        kept_labels: list[int] = []
        kept: list[list[int]] = []
        for i in torch.randperm(len(tuples), generator=g).tolist():
            batch_start = round_down(len(kept_labels), self.batch_size)
            if tuple_labels[i] not in kept_labels[batch_start:]:  # one tuple per speaker in a batch
                kept_labels.append(tuple_labels[i])
                kept.append(tuples[i])
        return kept[:round_down(len(kept), self.batch_size)]

    def __iter__(self):
        tuples = self._tuples()
        self.num_samples = len(tuples)
        return iter(tuples)

    def __len__(self) -> int:
        return self.num_samples


def seed_worker(worker_id: int) -> None:
    np.random.seed(np.random.get_state()[1][0] + worker_id)


def seed_loader(paths: list[str], labels: list[int], crop_samples: int, n_speakers: int, utts_per_speaker: int,
                max_seg_per_spk: int, seed: int, workers: int, augment: SeedAugment | None = None):
    """(DataLoader, sampler): the seed's ``DataLoader(batch_size=N, pin_memory=False, drop_last=True)`` over
    speaker tuples, default collation: float32 (N, M, L) and labels."""
    sampler = SpeakerTupleSampler(labels, utts_per_speaker, max_seg_per_spk, n_speakers, seed)
    loader = torch.utils.data.DataLoader(SeedTrainSet(paths, labels, crop_samples, augment), batch_size=n_speakers,
                                         num_workers=workers, sampler=sampler, pin_memory=False,
                                         worker_init_fn=seed_worker, drop_last=True)
    return loader, sampler


def shutdown(it) -> None:
    """Stop the workers of a DataLoader iterator now (they would otherwise linger until it is collected)."""
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
