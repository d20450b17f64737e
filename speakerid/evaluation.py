"""Embedding extraction and trial scoring: the library behind ``python -m evaluate``.

    loaded = load_inference_checkpoint("runs/demo")                      # speakerid.inference
    report = evaluate(loaded, ["veri_test2.txt"], "shards/vox1-O", "eval/demo")
    report.lists[0].metrics.eer

Extraction embeds each unique utterance of all trial lists once, on every process of an ``accelerate
launch`` (each reads its share; the main process gathers, scores and writes). Two protocols:

* **whole utterances** (default). Zero padding would change embeddings (instance norm and pooling see the
  zeros), so utterances are never padded: each is trimmed to the largest length on a fixed geometric grid
  (ratio 1/(1 − ``trim_tolerance``), from 0.5 s) not above its own, losing less than ``trim_tolerance``
  (default 2 %) of its samples from its end, and utterances trimmed to the same grid length are batched.
  The trimmed length depends on the utterance alone, so its embedding does not depend on its batch, rank,
  world size or cache state. ``trim_tolerance=0`` batches only utterances of identical length.
* **the seeds' crops** (``eval_frames`` > 0): ``num_eval`` crops of ``eval_frames·160 + 240`` samples per
  utterance (voxceleb_trainer's positions), all of one length: ``(B, C, L)`` runs as ``(B·C, L)``, and a
  trial's score is the seeds' −mean of the C×C crop distances (after L2 normalisation when the loss's
  ``test_normalize`` says so).

Embeddings are cached in a safetensors file keyed by the sha256 of the weights, the extraction settings and
the audio (its resolved folder, index path or URL, and per utterance its file's size and mtime or its shard's
sha256): a second run embeds only what the cache lacks or what changed; another checkpoint, other settings or
other audio rebuild it.
Scoring is a matrix product over all trials (``speakerid.scoring``), optionally after subtracting a cohort's
mean embedding and with adaptive s-norm (AS-Norm) against per-speaker cohort means (whole utterances only).
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from speakerid.audio import MIN_SECONDS, decode, read_audio
from speakerid.data.shardio import Faults, read_shard
from speakerid.data.eval_reader import AudioTree, EvalConfig, eval_crops, eval_loader
from speakerid.data.index import write_json_atomic
from speakerid.data.lists import (MAX_LISTED, Trial, read_eval_list, read_trials, scan_audio_tree, speaker_of,
                                  utterance_key)
from speakerid.data.shardset import ShardSet
from speakerid.errors import SpeakeridError
from speakerid.features import int16_to_float
from speakerid.inference import LoadedModel
from speakerid.metrics import DCF_P_TARGETS, Metrics, actual_dcf, check_trials, det_curve
from speakerid.scoring import as_norm, cohort_mean, cosine_scores, crop_scores, subtract_mean, trial_indices
from speakerid.tempfiles import remove_dead_temporaries

log = logging.getLogger(__name__)

GRID_START = 8000  # samples (0.5 s at 16 kHz): shorter utterances are batched only with equal lengths
MIN_SAMPLES = round(MIN_SECONDS * 16000)  # shorter audio is an error rather than a meaningless embedding
CACHE_FORMAT = "speakerid-embeddings"
CACHE_VERSION = "1"
Progress = Callable[[str, int, int | None], None]  # (stage, done, total or None) on the main process


# --------------------------------------------------------------------------------------------- configuration


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


@dataclass(frozen=True)
class ScoreConfig:
    cohort: str | None = None  # training shards (or an audio folder) whose embeddings form the cohort
    cohort_speakers: int = 2000  # speakers taken from the cohort source (in reading order), at most
    cohort_utts_per_speaker: int = 4  # utterances embedded per cohort speaker, at most
    mean_subtraction: bool = False  # subtract the cohort's mean embedding before scoring
    as_norm: bool = False  # adaptive s-norm against the per-speaker cohort means
    top_k: int = 300  # AS-Norm: the k highest cohort scores of each side
    threshold: float | None = None  # actual DCF threshold; None: the EER threshold of the first labelled list

    def __post_init__(self) -> None:
        if (self.mean_subtraction or self.as_norm) and not self.cohort:
            raise SpeakeridError("--mean-subtraction and --as-norm need a cohort: --cohort TRAIN_SHARDS")
        if self.cohort_speakers < 1 or self.cohort_utts_per_speaker < 1:
            raise SpeakeridError("--cohort-speakers and --cohort-utts must be at least 1")


# ------------------------------------------------------------------------------------------------ embeddings


@dataclass
class Embeddings:
    """Embeddings keyed by utterance: ``values`` (U, D) for whole utterances, (U, C, D) for crops."""

    keys: list[str]
    values: np.ndarray
    speakers: list[str] | None = None  # cohort embeddings: each row's speaker

    def rows(self, keys: Iterable[str]) -> np.ndarray:
        position = {k: i for i, k in enumerate(self.keys)}
        return self.values[[position[k] for k in keys]]

    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """safetensors (keys and metadata in its header) or, for a ``.npy`` path, the array + ``.keys.txt``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if path.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, self.values)
            path.with_suffix(".keys.txt").write_text("".join(f"{k}\n" for k in self.keys))
        else:
            from safetensors.numpy import save_file

            header = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "keys": json.dumps(self.keys),
                      "speakers": json.dumps(self.speakers),
                      **{k: json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}}
            save_file({"embeddings": np.ascontiguousarray(self.values, dtype=np.float32)}, str(tmp), metadata=header)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["Embeddings", dict]:
        """(embeddings, metadata) from a file written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".npy":
            keys = path.with_suffix(".keys.txt").read_text().split()
            return cls(keys, np.load(path)), {}
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                header = f.metadata() or {}
                values = f.get_tensor("embeddings")
        except Exception as error:  # SafetensorError, OSError, a missing tensor
            raise SpeakeridError(f"{path}: not a speakerid embeddings file: {error}") from error
        if header.get("format") != CACHE_FORMAT:
            raise SpeakeridError(f"{path}: not a speakerid embeddings file (format {header.get('format')!r})")
        meta = {k: json.loads(v) for k, v in header.items() if k not in ("format", "version", "keys", "speakers")}
        return cls(json.loads(header["keys"]), values, json.loads(header.get("speakers", "null"))), meta


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


def _precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


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
            else:
                yield key, prepare_item(where(key), audio[row, :length], config)


# ------------------------------------------------------------------------------------------- processes


@dataclass
class _World:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def current(cls, accelerator=None) -> "_World":
        if accelerator is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch / torchrun
            from accelerate import Accelerator

            accelerator = Accelerator()  # Accelerator (not PartialState) honours ACCELERATE_USE_CPU
        if accelerator is None:
            use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
            return cls(device=torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu"))
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        if self.size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on the main process (None elsewhere)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out


# --------------------------------------------------------------------------------------------- audio sources


@dataclass
class AudioSource:
    """Evaluation audio: eval shards (``shardify pack --kind eval``) or a folder of files named by relative path."""

    location: str
    shards: ShardSet | None = None
    root: Path | None = None

    @classmethod
    def open(cls, location: str | os.PathLike) -> "AudioSource":
        text = str(location)
        path = Path(text)
        if text.startswith(("http://", "https://")) or text.endswith(".json") or (path / "index.json").exists():
            return cls(text, shards=ShardSet.open(text))
        if path.is_dir():
            return cls(text, root=path)
        raise SpeakeridError(f"{text}: --audio must be an audio folder, an eval shard directory (with index.json) "
                             "or its URL; nothing is there")

    def available_keys(self) -> set[str]:
        if self.shards is not None:
            if self.shards.kind != "eval":
                raise SpeakeridError(f"{self.location}: evaluation reads eval shards (shardify pack --kind eval), "
                                     f"these are of kind {self.shards.kind!r}")
            return {k for s in self.shards.index["shards"] for k in s["keys"]}
        return {utterance_key(e.relpath) for e in scan_audio_tree(self.root)}

    def identity(self) -> str:
        """The audio as the embedding cache records it: the resolved folder or index path, or the URL."""
        if self.location.startswith(("http://", "https://")):
            return self.location
        return str(Path(self.location).resolve())

    def fingerprints(self, relpaths: dict[str, str]) -> dict[str, str]:
        """key → a cheap content fingerprint: its file's size and mtime, or its shard's sha256 (from the index)."""
        if self.shards is None:
            stats = {key: (self.root / rel).stat() for key, rel in relpaths.items()}  # one stat per file
            return {key: f"{st.st_size}-{st.st_mtime_ns}" for key, st in stats.items()}
        shard_of = {k: s["sha256"][:16] for s in self.shards.index["shards"] for k in s["keys"]}
        return {key: shard_of[key] for key in relpaths}

    def describe(self, key: str, relpath: str) -> str:
        """An utterance as an error names it: with its file, or with its eval shards."""
        return f"{key} ({self.root / relpath})" if self.shards is None else f"{key} in {self.location}"

    def check(self, wanted: dict[str, tuple[str, str]]) -> None:
        """``wanted``: key → (relpath, where it is named). Raise, counting every missing one, listing ten."""
        if self.shards is not None:
            present = self.available_keys()
            missing = [(rel, where) for key, (rel, where) in wanted.items() if key not in present]
        else:
            missing = [(rel, where) for rel, where in wanted.values() if not (self.root / rel).is_file()]
        if missing:
            shown = "\n".join(f"  {rel}  (named at {where})" for rel, where in missing[:MAX_LISTED])
            more = f"\n  … and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
            raise SpeakeridError(
                f"{len(missing)} of {len(wanted)} utterances are not in {self.location}:\n{shown}{more}\n"
                "Point --audio at the folder (or eval shards) that holds them, pack them with `python -m shardify "
                "pack --kind eval --trials …`, or remove those trials from the list")

    def items(self, relpaths: dict[str, str], config: ExtractConfig, world: _World) -> Iterator[tuple[str, np.ndarray]]:
        """This rank's share of the utterances ``relpaths`` (key → relpath), as Embedder items."""
        loader_config = EvalConfig(eval_frames=config.eval_frames, num_eval=config.num_eval,
                                   max_batch_samples=int(40 * config.sample_rate))
        if self.shards is not None:
            source = self.shards
            keys = set(relpaths)
        else:
            source = AudioTree(self.root, [relpaths[k] for k in sorted(relpaths)], config.sample_rate)
            keys = None
        if not relpaths:
            return iter(())
        loader = eval_loader(source, loader_config, keys=keys, rank=world.rank, world_size=world.size,
                             workers=config.workers)
        return _loader_items(loader, config, lambda key: self.describe(key, relpaths[key]))


# -------------------------------------------------------------------------------------------------- caching


def _cache_settings(loaded: LoadedModel, config: ExtractConfig, device: torch.device, **extra) -> dict:
    protocol = ({"eval_frames": config.eval_frames, "num_eval": config.num_eval} if config.eval_frames
                else {"trim_tolerance": config.trim_tolerance})
    return {"weights_sha256": loaded.fingerprint, "model": loaded.meta.get("model"), **protocol,
            "precision": _precision_name(_autocast_dtype(config.precision, device)),
            "channels_last": config.channels_last, "sample_rate": config.sample_rate, **extra}


def _read_cache(path: Path | None, settings: dict) -> tuple[Embeddings | None, dict, str]:
    """(cached embeddings, their per-key audio fingerprints, why the cache was (not) reused)."""
    if path is None:
        return None, {}, "no cache"
    if not path.exists():
        return None, {}, f"new cache {path}"
    try:
        cached, meta = Embeddings.load(path)
    except SpeakeridError as error:
        return None, {}, f"unreadable cache rebuilt ({error})"
    stored = meta.get("settings", {})
    if stored.get("weights_sha256") != settings["weights_sha256"]:
        return None, {}, f"the checkpoint changed since {path} was written: cache rebuilt"
    if stored.get("audio") != settings.get("audio"):
        return None, {}, f"{path} holds embeddings of other audio ({stored.get('audio')}): cache rebuilt"
    if stored != settings:
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        return None, {}, f"extraction settings changed ({', '.join(changed)}): cache rebuilt"
    return cached, meta.get("fingerprints") or {}, f"reused {path}"


def _drop_changed(cached: Embeddings, stored: dict[str, str], current: dict[str, str]) -> tuple[Embeddings, int]:
    """The cached rows whose audio is unchanged (same fingerprint, or not asked for now); how many were dropped."""
    keep = [i for i, k in enumerate(cached.keys) if k not in current or stored.get(k) == current[k]]
    kept = Embeddings([cached.keys[i] for i in keep], cached.values[keep], cached.speakers)
    return kept, len(cached.keys) - len(keep)


def extract(loaded: LoadedModel, items_for: Callable[[list[str], _World], Iterable[tuple[str, np.ndarray]]],
            keys: list[str], config: ExtractConfig, world: _World, *, cache: Path | None = None,
            settings: dict | None = None, fingerprints: dict[str, str] | None = None,
            progress: Progress | None = None, stage: str = "embedding") -> tuple[Embeddings | None, ExtractionStats]:
    """Embed ``keys`` across all processes (each embeds what ``items_for(missing, world)`` yields on it).

    The main process reads the cache, tells every process what is missing, gathers the new embeddings,
    merges and rewrites the cache; it returns the embeddings of ``keys`` in sorted order (None elsewhere).
    ``fingerprints`` (main process, key → :meth:`AudioSource.fingerprints`): cached rows of changed audio
    are embedded again.
    """
    started = time.perf_counter()
    settings = settings or _cache_settings(loaded, config, world.device)
    cached, stored, note = None, {}, ""
    if world.is_main:
        cached, stored, note = _read_cache(cache, settings)
        if cached is not None and fingerprints is not None:
            cached, changed = _drop_changed(cached, stored, fingerprints)
            note += f"; {changed} utterance(s) whose audio changed embedded again" if changed else ""
    have = set(cached.keys) if cached is not None else set()
    missing = world.broadcast(sorted(set(keys) - have) if world.is_main else None)

    local = _embed_share(Embedder(loaded.model, world.device, config),
                         items_for(missing, world) if missing else (), world, progress, stage,
                         len(missing) if world.size == 1 else None)
    gathered = world.gather(local)
    if not world.is_main:
        return None, ExtractionStats()

    parts = [cached.keys] if cached is not None else []
    arrays = [cached.values] if cached is not None else []
    new_keys: list[str] = []
    for part_keys, part_values, _, _ in gathered:
        if part_values is not None:
            new_keys += part_keys
            parts.append(part_keys)
            arrays.append(part_values)
    if sorted(new_keys) != missing:  # a reader bug or a file that vanished: never score a partial set
        lost = sorted(set(missing) - set(new_keys))[:MAX_LISTED]
        raise SpeakeridError(f"{len(set(missing) - set(new_keys))} utterances were not embedded (e.g. "
                             f"{', '.join(lost)}); {len(new_keys) - len(set(new_keys))} twice")
    all_keys = [k for part in parts for k in part]
    values = np.concatenate(arrays) if arrays else np.zeros((0, 1, 0), np.float32)
    order = np.argsort(np.asarray(all_keys, dtype=object), kind="stable")
    merged = Embeddings([all_keys[i] for i in order], values[order])
    if cache is not None and missing:
        current = {**stored, **(fingerprints or {})}
        merged.save(cache, {"settings": settings, "fingerprints": {k: current[k] for k in merged.keys if k in current}})
    stats = ExtractionStats(
        utterances=len(keys), embedded=len(missing), from_cache=len(keys) - len(missing),
        audio_seconds=sum(g[2] for g in gathered) / config.sample_rate, seconds=time.perf_counter() - started,
        cache=str(cache) if cache else None, cache_note=note)
    wanted = Embeddings(sorted(keys), merged.rows(sorted(keys)))
    return wanted, stats


def _embed_share(embedder: Embedder, items: Iterable[tuple], world: _World, progress: Progress | None, stage: str,
                 total: int | None) -> tuple[list[str], np.ndarray | None, int, list]:
    """Run this process's items (``(key, audio)`` or ``(key, audio, extra)``) through the embedder."""
    keys: list[str] = []
    values: list[np.ndarray] = []
    extras: dict[str, object] = {}

    def take(batch: tuple[list[str], np.ndarray]) -> None:
        keys.extend(batch[0])
        values.append(batch[1])
        if progress is not None and world.is_main:
            progress(stage, len(keys), total)

    for item in items:
        if len(item) == 3:
            extras[item[0]] = item[2]
        for batch in embedder.add(item[0], item[1]):
            take(batch)
    for batch in embedder.flush():
        take(batch)
    return keys, (np.concatenate(values) if values else None), embedder.audio_samples, [extras.get(k) for k in keys]


# ---------------------------------------------------------------------------------------------------- cohort


def _cohort_candidates(location: str, sample_rate: int) -> Iterator[tuple[str, str, Callable[[], np.ndarray]]]:
    """(key, speaker, load audio) of every utterance of a cohort source, in reading order, decoding nothing yet."""
    path = Path(location)
    if location.startswith(("http://", "https://")) or location.endswith(".json") or (path / "index.json").exists():
        shards = ShardSet.open(location)
        encoding, faults = shards.encoding, Faults()
        for url in shards.urls:
            for sample in read_shard(url, faults):
                if encoding not in sample:
                    continue
                try:
                    speaker = json.loads(sample["json"]).get("spk") or speaker_of(sample["__key__"])
                except (KeyError, ValueError):
                    speaker = speaker_of(sample["__key__"])
                yield sample["__key__"], speaker, functools.partial(lambda data: decode(data)[0], sample[encoding])
        if faults.damaged_shards or faults.corrupt_members:
            log.warning("cohort %s: %s (damaged parts skipped)", location, faults.as_dict())
        return
    if not path.is_dir():
        raise SpeakeridError(f"{location}: --cohort must be training shards (a directory with index.json, or its URL) "
                             "or an audio folder; nothing is there")
    for entry in scan_audio_tree(path):
        yield (utterance_key(entry.relpath), entry.spk,
               functools.partial(read_audio, path / entry.relpath, sample_rate))


def _cohort_items(scoring: ScoreConfig, config: ExtractConfig, world: _World) -> Iterator[tuple[str, np.ndarray, str]]:
    """Up to ``cohort_utts_per_speaker`` utterances of each of the first ``cohort_speakers`` speakers read;
    utterance i of the selection is embedded by process i mod world size."""
    counts: dict[str, int] = {}
    full = selected = 0
    for key, speaker, load in _cohort_candidates(scoring.cohort, config.sample_rate):
        if full >= scoring.cohort_speakers:
            break
        count = counts.get(speaker)
        if count is None and len(counts) >= scoring.cohort_speakers:
            continue
        if (count or 0) >= scoring.cohort_utts_per_speaker:
            continue
        counts[speaker] = (count or 0) + 1
        full += counts[speaker] == scoring.cohort_utts_per_speaker
        if selected % world.size == world.rank:
            yield key, prepare_item(f"{scoring.cohort}: {key}", load(), config), speaker
        selected += 1


def cohort_embeddings(loaded: LoadedModel, scoring: ScoreConfig, config: ExtractConfig, world: _World, *,
                      cache: Path | None = None, progress: Progress | None = None) -> Embeddings | None:
    """The cohort's utterance embeddings (with their speakers) on the main process; cached like the trials'."""
    remote = scoring.cohort.startswith(("http://", "https://"))
    settings = _cache_settings(loaded, config, world.device,
                               cohort=scoring.cohort if remote else str(Path(scoring.cohort).resolve()),
                               cohort_speakers=scoring.cohort_speakers,
                               cohort_utts_per_speaker=scoring.cohort_utts_per_speaker)
    cached = _read_cache(cache, settings)[0] if world.is_main else None
    if world.broadcast(cached is not None):
        return cached
    local = _embed_share(Embedder(loaded.model, world.device, config), _cohort_items(scoring, config, world), world,
                         progress, "cohort", None)
    gathered = world.gather(local)
    if not world.is_main:
        return None
    keys = [k for part in gathered for k in part[0]]
    if len(set(keys)) < 2:
        raise SpeakeridError(f"{scoring.cohort}: the cohort holds {len(set(keys))} utterance(s); it needs at least 2")
    values = np.concatenate([part[1] for part in gathered if part[1] is not None])
    speakers = [s for part in gathered for s in part[3]]
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
    result = Embeddings([keys[i] for i in order], values[order], [speakers[i] for i in order])
    if cache is not None:
        result.save(cache, {"settings": settings})
    return result


def speaker_means(cohort: Embeddings) -> np.ndarray:
    """One row per cohort speaker: the mean of its utterance embeddings (WeSpeaker's AS-Norm cohort)."""
    speakers = np.asarray(cohort.speakers if cohort.speakers is not None else cohort.keys, dtype=object)
    names, inverse = np.unique(speakers, return_inverse=True)
    flat = cohort.values.reshape(len(cohort.keys), -1, cohort.values.shape[-1]).mean(axis=1)
    sums = np.zeros((len(names), flat.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, flat)
    return (sums / np.bincount(inverse)[:, None]).astype(np.float32)


# ------------------------------------------------------------------------------------------------ trial lists


@dataclass
class TrialList:
    name: str
    path: Path
    trials: list[Trial]

    @property
    def labelled(self) -> bool:
        return self.trials[0].label is not None

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([t.label for t in self.trials], dtype=np.int64)


def read_trial_lists(paths: Iterable[str | os.PathLike]) -> list[TrialList]:
    """Read and check every list before any audio is touched (a one-class list fails here, with its name)."""
    lists: list[TrialList] = []
    names: set[str] = set()
    for path in map(Path, paths):
        trials = read_trials(path)
        name = path.stem
        suffix = 2
        while name in names:
            name, suffix = f"{path.stem}-{suffix}", suffix + 1
        names.add(name)
        trial_list = TrialList(name, path, trials)
        if trial_list.labelled:
            try:
                check_trials(np.zeros(len(trials)), trial_list.labels, "EER")
            except SpeakeridError as error:
                raise SpeakeridError(f"{path}: {error}; a list with one class gives no EER or minDCF: add the other "
                                     "class, or drop the labels to get scores only") from error
        lists.append(trial_list)
    if not lists:
        raise SpeakeridError("no trial list given: --trials veri_test2.txt [list_test_all2.txt …]")
    return lists


def wanted_utterances(lists: list[TrialList]) -> dict[str, tuple[str, str]]:
    """key → (relpath, "file:line" of its first mention), over all lists: shared utterances are embedded once."""
    wanted: dict[str, tuple[str, str]] = {}
    for trial_list in lists:
        for trial in trial_list.trials:
            for relpath in (trial.enroll, trial.test):
                wanted.setdefault(utterance_key(relpath), (relpath, trial.where))
    return wanted


# ---------------------------------------------------------------------------------------------------- scoring


@dataclass
class ListResult:
    name: str
    path: Path
    n_trials: int
    scores_path: Path
    metrics: Metrics | None = None  # None for an unlabelled list (scores only)
    actual_dcf: dict[str, float] | None = None  # p_target → actual DCF at `threshold`
    threshold: float | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "trials": self.n_trials, "scores": str(self.scores_path),
                "metrics": self.metrics.as_dict() if self.metrics else None,
                "actual_dcf": {"threshold": self.threshold, **(self.actual_dcf or {})} if self.actual_dcf else None}


def score_trials(embeddings: Embeddings, lists: list[TrialList], *, crops: bool = False, test_normalize: bool = True,
                 cohort: Embeddings | None = None, scoring: ScoreConfig = ScoreConfig()) -> list[np.ndarray]:
    """One score array per list: cosine (whole utterances, (U, D) or (U, 1, D)) or, with ``crops``, the seeds'
    crop score of (U, C, D) embeddings; then the normalisations ``scoring`` asks for."""
    values = embeddings.values if crops else embeddings.values.reshape(len(embeddings.keys), -1)
    cohort_values = None
    if cohort is not None:
        cohort_values = cohort.values if crops else cohort.values.reshape(len(cohort.keys), -1)
    if scoring.as_norm and crops:
        raise SpeakeridError("--as-norm normalises cosine scores of whole utterances; the crop protocol "
                             "(--eval-frames) scores by distances: drop one of them")
    if scoring.mean_subtraction:
        mean = cohort_mean(cohort_values)
        values = subtract_mean(values, mean.numpy())
        cohort_values = subtract_mean(cohort_values, mean.numpy())
    as_norm_cohort = None
    if scoring.as_norm:
        as_norm_cohort = speaker_means(Embeddings(cohort.keys, cohort_values, cohort.speakers))
        if not 2 <= scoring.top_k <= len(as_norm_cohort):
            raise SpeakeridError(f"--top-k {scoring.top_k}: the cohort has {len(as_norm_cohort)} speakers; choose "
                                 f"2 ≤ k ≤ {len(as_norm_cohort)} or raise --cohort-speakers")
    results = []
    for trial_list in lists:
        pairs = trial_indices([(utterance_key(t.enroll), utterance_key(t.test)) for t in trial_list.trials],
                              embeddings.keys)
        if crops:
            scores = crop_scores(values, pairs, normalize=test_normalize)
        else:
            scores = cosine_scores(values, pairs)
            if as_norm_cohort is not None:
                scores = as_norm(values, pairs, as_norm_cohort, top_k=scoring.top_k, scores=scores)
        results.append(np.asarray(scores, dtype=np.float64))
    return results


def write_scores(path: Path, trial_list: TrialList, scores: np.ndarray) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{s:.6f} {t.enroll} {t.test}\n" for s, t in zip(scores.tolist(), trial_list.trials)))
    os.replace(tmp, path)
    return path


def plot_det(curves: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> Path | None:
    """A DET plot (probit axes) of each labelled list; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from scipy.special import ndtri

    ticks = np.array([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 40, 60, 80, 95])
    figure, axes = plt.subplots(figsize=(5.5, 5.5))
    worst = 0.0
    for name, scores, labels in curves:
        fpr, fnr, _ = det_curve(scores, labels)
        keep = (fpr > 0) & (fpr < 1) & (fnr > 0) & (fnr < 1)
        worst = max(worst, float(np.min(np.maximum(fpr, fnr))))  # about the EER
        axes.plot(ndtri(fpr[keep]), ndtri(fnr[keep]), label=name)
    top = 0.5 if worst < 0.3 else 0.99  # a poor system still shows on the plot
    ticks = ticks[ticks / 100 < top]
    axes.plot(ndtri(ticks / 100), ndtri(ticks / 100), color="grey", linewidth=0.5, linestyle=":")
    axes.set_xticks(ndtri(ticks / 100), [f"{t:g}" for t in ticks])
    axes.set_yticks(ndtri(ticks / 100), [f"{t:g}" for t in ticks])
    axes.set_xlim(ndtri(0.0005), ndtri(top))
    axes.set_ylim(ndtri(0.0005), ndtri(top))
    axes.set_xlabel("false acceptance rate (%)")
    axes.set_ylabel("miss rate (%)")
    axes.grid(True, linewidth=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ the jobs


@dataclass
class EvaluationReport:
    lists: list[ListResult]
    out_dir: Path
    summary_path: Path
    det_path: Path | None
    extraction: ExtractionStats
    world_size: int
    seconds: float
    normalisation: str  # "none", "mean subtraction", "AS-Norm (top-k …)" …
    cohort_size: int = 0


def evaluate(loaded: LoadedModel, trials: Iterable[str | os.PathLike], audio: str | os.PathLike,
             out_dir: str | os.PathLike, extract_config: ExtractConfig = ExtractConfig(),
             scoring: ScoreConfig = ScoreConfig(), *, cache: str | os.PathLike | None = "default", accelerator=None,
             progress: Progress | None = None) -> EvaluationReport | None:
    """Embed every utterance of ``trials`` from ``audio``, score, and write scores, summary.json and det.png.

    ``cache``: "default" (``out_dir/embeddings.safetensors``), a path, or None. Under ``accelerate launch``
    every process embeds its share; the main process returns the report, the others return None.
    """
    started = time.perf_counter()
    world = _World.current(accelerator)
    lists = read_trial_lists(trials)  # every check that needs no audio comes first, on every process
    wanted = wanted_utterances(lists)
    source = AudioSource.open(audio)
    source.check(wanted)
    out_dir = Path(out_dir)
    cache_path = out_dir / "embeddings.safetensors" if cache == "default" else (Path(cache) if cache else None)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # what a run killed mid-write left of its outputs: scores, summary, DET plot, embedding caches
        remove_dead_temporaries(out_dir, [f"scores-{t.name}.txt" for t in lists] + ["summary.json", "det"])
        if cache_path is not None:
            remove_dead_temporaries(cache_path.parent, [cache_path.name, f"cohort-{cache_path.name}"])
    if scoring.as_norm and extract_config.eval_frames:
        raise SpeakeridError("--as-norm normalises cosine scores of whole utterances; the crop protocol "
                             "(--eval-frames) scores by distances: drop one of them")

    relpaths = {key: rel for key, (rel, _) in wanted.items()}
    settings = _cache_settings(loaded, extract_config, world.device, audio=source.identity())
    embeddings, stats = extract(
        loaded, lambda missing, w: source.items({k: relpaths[k] for k in missing}, extract_config, w),
        sorted(wanted), extract_config, world, cache=cache_path, settings=settings, progress=progress,
        fingerprints=source.fingerprints(relpaths) if world.is_main and cache_path else None)
    cohort = None
    if scoring.cohort and (scoring.mean_subtraction or scoring.as_norm):
        cohort_cache = cache_path.with_name(f"cohort-{cache_path.name}") if cache_path else None
        cohort = cohort_embeddings(loaded, scoring, extract_config, world, cache=cohort_cache, progress=progress)
    if not world.is_main:
        return None  # no barrier: the main process may fail while scoring, and nobody should wait for it

    all_scores = score_trials(embeddings, lists, crops=extract_config.eval_frames > 0,
                              test_normalize=loaded.test_normalize, cohort=cohort, scoring=scoring)
    results: list[ListResult] = []
    threshold = scoring.threshold
    for trial_list, scores in zip(lists, all_scores):
        result = ListResult(trial_list.name, trial_list.path, len(scores),
                            write_scores(out_dir / f"scores-{trial_list.name}.txt", trial_list, scores))
        if trial_list.labelled:
            result.metrics = Metrics.compute(scores, trial_list.labels)
            threshold = result.metrics.eer_threshold if threshold is None else threshold
            result.threshold = threshold
            result.actual_dcf = {f"p_target_{p:g}": actual_dcf(scores, trial_list.labels, threshold, p)
                                 for p in DCF_P_TARGETS}
        results.append(result)
    det = plot_det([(t.name, s, t.labels) for t, s in zip(lists, all_scores) if t.labelled], out_dir / "det.png") \
        if any(t.labelled for t in lists) else None

    parts = []
    if scoring.mean_subtraction:
        parts.append("cohort mean subtracted")
    if scoring.as_norm:
        parts.append(f"AS-Norm (top {scoring.top_k} of {len(speaker_means(cohort))} cohort speakers)")
    report = EvaluationReport(results, out_dir, out_dir / "summary.json", det, stats, world.size,
                              time.perf_counter() - started, ", ".join(parts) or "none",
                              len(cohort.keys) if cohort is not None else 0)
    write_json_atomic(report.summary_path, {
        "checkpoint": {"source": str(loaded.source), "model": loaded.meta.get("model"), "loss": loaded.meta.get("loss"),
                       "weights_sha256": loaded.fingerprint},
        "audio": str(audio),
        "protocol": ({"eval_frames": extract_config.eval_frames, "num_eval": extract_config.num_eval,
                      "score": "-mean crop distance", "test_normalize": loaded.test_normalize}
                     if extract_config.eval_frames else
                     {"whole_utterances": True, "trim_tolerance": extract_config.trim_tolerance, "score": "cosine"}),
        "precision": _precision_name(_autocast_dtype(extract_config.precision, world.device)),
        "normalisation": report.normalisation, "cohort": scoring.cohort, "cohort_utterances": report.cohort_size,
        "threshold_source": "given" if scoring.threshold is not None else "EER threshold of the first labelled list",
        "extraction": asdict(stats), "processes": world.size, "seconds": round(report.seconds, 3),
        "lists": [r.as_dict() for r in results], "det": str(det) if det else None,
    })
    return report


@dataclass
class EmbedReport:
    path: Path
    n_utterances: int
    embedding_dim: int
    extraction: ExtractionStats


def embed(loaded: LoadedModel, audio: str | os.PathLike, out_path: str | os.PathLike,
          extract_config: ExtractConfig = ExtractConfig(), *, audio_list: str | os.PathLike | None = None,
          accelerator=None, progress: Progress | None = None) -> EmbedReport | None:
    """Embed every utterance of ``audio`` (or of ``audio_list``: ``relpath`` / ``speaker relpath`` lines) into
    ``out_path``: safetensors (keys in its header) or ``.npy`` (+ ``.keys.txt``). (U, D), or (U, C, D) for crops."""
    world = _World.current(accelerator)
    source = AudioSource.open(audio)
    if world.is_main:
        remove_dead_temporaries(Path(out_path).parent, [Path(out_path).name])
    if audio_list is not None:
        wanted = {utterance_key(e.relpath): (e.relpath, e.where) for e in read_eval_list(audio_list)}
        source.check(wanted)
    elif source.shards is not None:
        wanted = {key: (key, source.location) for key in sorted(source.available_keys())}
    else:
        wanted = {utterance_key(e.relpath): (e.relpath, e.where) for e in scan_audio_tree(source.root)}
    relpaths = {key: rel for key, (rel, _) in wanted.items()}
    embeddings, stats = extract(
        loaded, lambda missing, w: source.items({k: relpaths[k] for k in missing}, extract_config, w),
        sorted(wanted), extract_config, world, progress=progress)
    if not world.is_main:
        return None
    if not extract_config.eval_frames:
        embeddings = Embeddings(embeddings.keys, embeddings.values[:, 0])
    path = embeddings.save(out_path, {"settings": _cache_settings(loaded, extract_config, world.device),
                                      "checkpoint": loaded.meta})
    return EmbedReport(path, len(embeddings.keys), int(embeddings.values.shape[-1]), stats)
