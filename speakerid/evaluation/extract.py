"""Embedding extraction: each wanted utterance through the model once, across the processes, with a cache.

Two protocols:

* **whole utterances** (default). Zero padding would change embeddings (instance norm and pooling see the
  zeros), so utterances are never padded: each is trimmed to the largest length on a fixed geometric grid
  (ratio 1/(1 − ``trim_tolerance``), from 0.5 s) not above its own, losing less than ``trim_tolerance``
  (default 2 %) of its samples from its end, and utterances trimmed to the same grid length are batched.
  The trimmed length depends on the utterance alone, so its embedding does not depend on its batch, rank,
  world size or cache state. ``trim_tolerance=0`` batches only utterances of identical length.
* **the seeds' crops** (``eval_frames`` > 0): ``num_eval`` crops of ``eval_frames·160 + 240`` samples per
  utterance (voxceleb_trainer's positions), all of one length: ``(B, C, L)`` runs as ``(B·C, L)``.

:func:`extract` embeds on every process of an ``accelerate launch`` (each reads its share); the main
process gathers, and reads and rewrites the cache (:mod:`speakerid.evaluation.embeddings`), whose key
:func:`cache_settings` spells out.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env

from speakerid.audio import MIN_SECONDS
from speakerid.data.eval_reader import AudioSource, EvalConfig, eval_crops
from speakerid.data.lists import MAX_LISTED
from speakerid.errors import SpeakeridError
from speakerid.evaluation.embeddings import Embeddings, drop_changed, read_cache
from speakerid.features import int16_to_float
from speakerid.inference import LoadedModel

GRID_START = 8000  # samples (0.5 s at 16 kHz): shorter utterances are batched only with equal lengths
MIN_SAMPLES = round(MIN_SECONDS * 16000)  # shorter audio is an error rather than a meaningless embedding
Progress = Callable[[str, int, int | None], None]  # (stage, done, total or None) on the main process


@dataclass(frozen=True)
class ExtractConfig:
    eval_frames: int = 0  # 0: whole utterances; else the seeds' crops of eval_frames·160 + 240 samples
    num_eval: int = 10  # crops per utterance when eval_frames > 0
    trim_tolerance: float = 0.02  # whole utterances: at most this fraction of an utterance is trimmed to batch it
    batch_seconds: float = 0.0  # audio per forward pass; 0: 40 s on a CPU, 1200 s on a GPU
    precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True  # channels_last weights for the 2-D CNNs (faster with oneDNN and on tensor cores)
    workers: int = 1  # DataLoader workers decoding audio, per process
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        if self.eval_frames < 0 or (self.eval_frames and self.num_eval < 1):
            raise SpeakeridError(f"--eval-frames {self.eval_frames} --num-eval {self.num_eval}: need eval_frames ≥ 0 "
                                 "and at least one crop")
        if not (self.trim_tolerance == 0 or 0.001 <= self.trim_tolerance <= 0.2):
            raise SpeakeridError(f"--trim-tolerance must be 0 (no trimming) or between 0.001 and 0.2, "
                                 f"got {self.trim_tolerance}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise SpeakeridError(f"--precision {self.precision!r}: choose auto, fp32, bf16 or fp16")
        if self.batch_seconds < 0 or self.workers < 0:
            raise SpeakeridError("--batch-seconds and --workers must not be negative")

    @property
    def crop_samples(self) -> int:
        return self.eval_frames * 160 + 240 if self.eval_frames else 0


@dataclass
class ExtractionStats:
    utterances: int = 0  # embeddings wanted
    embedded: int = 0  # computed by this run (all processes)
    from_cache: int = 0
    audio_seconds: float = 0.0  # audio that went through the model (after trimming; crops counted in full)
    seconds: float = 0.0
    cache: str | None = None
    cache_note: str = ""  # why the cache was (not) used


@functools.lru_cache(maxsize=8)
def _trim_grid(tolerance: float, longest: int) -> tuple[int, ...]:
    grid = [GRID_START]
    while grid[-1] <= longest:
        grid.append(max(grid[-1] + 1, int(grid[-1] / (1.0 - tolerance))))  # consecutive ratio ≤ 1/(1 − tol)
    return tuple(grid)


def trim_length(n_samples: int, tolerance: float) -> int:
    """The largest length on the fixed grid not above ``n_samples``: at most ``tolerance`` of it is lost."""
    if tolerance <= 0 or n_samples < GRID_START:
        return n_samples
    longest = 1 << max(20, int(n_samples).bit_length())  # grids are cached per power of two
    grid = _trim_grid(tolerance, longest)
    return grid[bisect.bisect_right(grid, n_samples) - 1]


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def precision_name(precision: str, device: torch.device) -> str:
    """The precision ``precision`` (auto, fp32, bf16, fp16) runs at on ``device``, as summaries and caches name it."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[_autocast_dtype(precision, device)]


class Embedder:
    """Batches items ``(key, int16 (C, L))`` by length and runs them through the model; C = 1 for whole utterances.

    Items of one length wait in a bucket until it holds ``batch_seconds`` of audio; at most four such batches
    wait in all (the fullest bucket runs first), and :meth:`flush` runs the rest.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, config: ExtractConfig) -> None:
        self.device, self.config = device, config
        self.dtype = _autocast_dtype(config.precision, device)
        seconds = config.batch_seconds or (1200.0 if device.type == "cuda" else 40.0)
        self.budget = int(seconds * config.sample_rate)
        self.model = model.to(device).eval()
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.pending: dict[int, list[tuple[str, np.ndarray]]] = {}
        self.pending_samples = 0
        self.audio_samples = 0

    def add(self, key: str, audio: np.ndarray) -> Iterator[tuple[list[str], np.ndarray]]:
        length = audio.shape[-1]
        bucket = self.pending.setdefault(length, [])
        bucket.append((key, audio))
        self.pending_samples += audio.size
        if (len(bucket) + 1) * audio.size > self.budget:  # the next one would not fit
            yield self._run(length)
        while self.pending_samples > 4 * self.budget:
            yield self._run(max(self.pending, key=lambda n: len(self.pending[n]) * n))

    def flush(self) -> Iterator[tuple[list[str], np.ndarray]]:
        for length in sorted(self.pending):
            yield self._run(length)

    def _run(self, length: int) -> tuple[list[str], np.ndarray]:
        items = self.pending.pop(length)
        self.pending_samples -= sum(a.size for _, a in items)
        keys = [k for k, _ in items]
        audio = torch.from_numpy(np.stack([a for _, a in items]))  # (B, C, L)
        return keys, self.forward(audio)

    def forward(self, audio: torch.Tensor) -> np.ndarray:
        """int16 (B, C, L) → float32 embeddings (B, C, D), in chunks of at most ``batch_seconds`` of audio."""
        b, c, length = audio.shape
        flat = audio.reshape(b * c, length)
        rows = max(1, self.budget // length)
        out = []
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                                     enabled=self.dtype is not None):
            for start in range(0, len(flat), rows):
                waveforms = int16_to_float(flat[start:start + rows].to(self.device, non_blocking=True))
                out.append(self.model(waveforms).float().cpu())
        self.audio_samples += flat.numel()
        embeddings = torch.cat(out)
        return embeddings.reshape(b, c, embeddings.shape[-1]).numpy()


def prepare_item(key: str, samples: np.ndarray, config: ExtractConfig) -> np.ndarray:
    """One utterance as the model sees it: ``(num_eval, L)`` crops, or ``(1, trimmed length)``."""
    if len(samples) < MIN_SAMPLES:
        raise SpeakeridError(f"utterance {key} has {len(samples)} samples; at least {MIN_SAMPLES} "
                             f"({MIN_SAMPLES / config.sample_rate:.1f} s) are needed for an embedding: replace it "
                             "with the full recording, or remove the trials naming it")
    if config.eval_frames:
        return eval_crops(samples, config.eval_frames, config.num_eval)
    return samples[None, :trim_length(len(samples), config.trim_tolerance)].copy()  # not a view of its batch


def _loader_items(loader, config: ExtractConfig, where: Callable[[str], str]) -> Iterator[tuple[str, np.ndarray]]:
    """Unpad eval_loader batches back into utterances (whole-utterance mode) and cut them the Embedder's way;
    ``where(key)`` names an utterance in an error."""
    for batch in loader:
        audio = batch["audio"].numpy()
        for row, (key, length) in enumerate(zip(batch["keys"], batch["lengths"].tolist())):
            if config.eval_frames:
                if length < MIN_SAMPLES:
                    prepare_item(where(key), np.zeros(length, np.int16), config)  # raises
                yield key, audio[row]
            else:  # the length before trimming rides along: the utterance's duration (quality measures)
                yield key, prepare_item(where(key), audio[row, :length], config), length


def source_items(source: AudioSource, relpaths: dict[str, str], config: ExtractConfig,
                 state: PartialState) -> Iterator[tuple[str, np.ndarray]]:
    """This rank's share of the utterances ``relpaths`` (key → relpath) of ``source``, as Embedder items."""
    if not relpaths:
        return iter(())
    loader_config = EvalConfig(eval_frames=config.eval_frames, num_eval=config.num_eval,
                               max_batch_samples=int(40 * config.sample_rate))
    loader = source.loader(relpaths, loader_config, rank=state.process_index, world_size=state.num_processes,
                           workers=config.workers, sample_rate=config.sample_rate)
    return _loader_items(loader, config, lambda key: source.describe(key, relpaths[key]))


def process_state(accelerator=None) -> PartialState:
    """This process among those of ``accelerate launch`` (the only one without it): the training Accelerator's
    state, or accelerate's PartialState, on the CPU when ACCELERATE_USE_CPU says so (as ``Accelerator()`` reads it)."""
    if accelerator is not None:
        return accelerator.state
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def cache_settings(loaded: LoadedModel, config: ExtractConfig, device: torch.device, **extra) -> dict:
    """Everything besides the audio that decides an embedding: the embedding cache's key (``extra``: the audio)."""
    protocol = ({"eval_frames": config.eval_frames, "num_eval": config.num_eval} if config.eval_frames
                else {"trim_tolerance": config.trim_tolerance})
    return {"weights_sha256": loaded.fingerprint, "model": loaded.meta.get("model"), **protocol,
            "precision": precision_name(config.precision, device),
            "channels_last": config.channels_last, "sample_rate": config.sample_rate, **extra}


def extract(loaded: LoadedModel, items_for: Callable[[list[str], PartialState], Iterable[tuple[str, np.ndarray]]],
            keys: list[str], config: ExtractConfig, state: PartialState, *, cache: Path | None = None,
            settings: dict | None = None, fingerprints: dict[str, str] | None = None,
            progress: Progress | None = None, stage: str = "embedding") -> tuple[Embeddings | None, ExtractionStats]:
    """Embed ``keys`` across all processes (each embeds what ``items_for(missing, state)`` yields on it).

    The main process reads the cache, tells every process what is missing, gathers the new embeddings,
    merges and rewrites the cache; it returns the embeddings of ``keys`` in sorted order (None elsewhere).
    ``fingerprints`` (main process, key → :meth:`AudioSource.fingerprints`): cached rows of changed audio
    are embedded again.
    """
    started = time.perf_counter()
    settings = settings or cache_settings(loaded, config, state.device)
    cached, stored, note = None, {}, ""
    if state.is_main_process:
        cached, stored, note = read_cache(cache, settings)
        if cached is not None and fingerprints is not None:
            cached, changed = drop_changed(cached, stored, fingerprints)
            note += f"; {changed} utterance(s) whose audio changed embedded again" if changed else ""
    have = set(cached.keys) if cached is not None else set()
    missing = broadcast_object_list([sorted(set(keys) - have) if state.is_main_process else None])[0]

    local = embed_share(Embedder(loaded.model, state.device, config),
                        items_for(missing, state) if missing else (), state, progress, stage,
                        len(missing) if state.num_processes == 1 else None)
    gathered = gather_object([local])  # every process's share, on every process
    if not state.is_main_process:
        return None, ExtractionStats()

    parts = [cached.keys] if cached is not None else []
    arrays = [cached.values] if cached is not None else []
    samples = dict(zip(cached.keys, cached.samples)) if cached is not None and cached.samples is not None else {}
    new_keys: list[str] = []
    for part_keys, part_values, _, part_samples in gathered:
        if part_values is not None:
            new_keys += part_keys
            parts.append(part_keys)
            arrays.append(part_values)
            samples.update(zip(part_keys, part_samples))
    if sorted(new_keys) != missing:  # a reader bug or a file that vanished: never score a partial set
        lost = sorted(set(missing) - set(new_keys))[:MAX_LISTED]
        raise SpeakeridError(f"{len(set(missing) - set(new_keys))} utterances were not embedded (e.g. "
                             f"{', '.join(lost)}); {len(new_keys) - len(set(new_keys))} twice")
    all_keys = [k for part in parts for k in part]
    values = np.concatenate(arrays) if arrays else np.zeros((0, 1, 0), np.float32)
    order = np.argsort(np.asarray(all_keys, dtype=object), kind="stable")
    merged_keys = [all_keys[i] for i in order]
    merged = Embeddings(merged_keys, values[order], samples=[samples.get(k) for k in merged_keys])
    if cache is not None and missing:
        current = {**stored, **(fingerprints or {})}
        merged.save(cache, {"settings": settings, "fingerprints": {k: current[k] for k in merged.keys if k in current}})
    stats = ExtractionStats(
        utterances=len(keys), embedded=len(missing), from_cache=len(keys) - len(missing),
        audio_seconds=sum(g[2] for g in gathered) / config.sample_rate, seconds=time.perf_counter() - started,
        cache=str(cache) if cache else None, cache_note=note)
    wanted = Embeddings(sorted(keys), merged.rows(sorted(keys)), samples=[samples.get(k) for k in sorted(keys)])
    return wanted, stats


def embed_share(embedder: Embedder, items: Iterable[tuple], state: PartialState, progress: Progress | None, stage: str,
                total: int | None) -> tuple[list[str], np.ndarray | None, int, list]:
    """Run this process's items (``(key, audio)`` or ``(key, audio, extra)``) through the embedder."""
    keys: list[str] = []
    values: list[np.ndarray] = []
    extras: dict[str, object] = {}

    def take(batch: tuple[list[str], np.ndarray]) -> None:
        keys.extend(batch[0])
        values.append(batch[1])
        if progress is not None and state.is_main_process:
            progress(stage, len(keys), total)

    for item in items:
        if len(item) == 3:
            extras[item[0]] = item[2]
        for batch in embedder.add(item[0], item[1]):
            take(batch)
    for batch in embedder.flush():
        take(batch)
    return keys, (np.concatenate(values) if values else None), embedder.audio_samples, [extras.get(k) for k in keys]
