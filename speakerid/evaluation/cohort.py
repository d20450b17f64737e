"""The score-normalisation cohort: a few utterances of many training speakers, embedded like the trials.

The cohort source is training shards (or an audio folder); up to ``cohort_utts_per_speaker`` utterances of
each of the first ``cohort_speakers`` speakers read are embedded across the processes and cached beside
the trials' embeddings. :mod:`speakerid.evaluation.scoring` turns them into a mean embedding or per-speaker
means for AS-Norm.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from speakerid.audio import decode, read_audio
from speakerid.data.shardio import Faults, read_shard
from speakerid.data.eval_reader import names_shards
from speakerid.data.lists import scan_audio_tree, speaker_of, utterance_key
from speakerid.data.shardset import ShardSet
from speakerid.errors import SpeakeridError
from speakerid.evaluation.embeddings import Embeddings, read_cache
from speakerid.evaluation.extract import Embedder, ExtractConfig, Progress, cache_settings, embed_share, prepare_item
from speakerid.evaluation.scoring import ScoreConfig
from speakerid.inference import LoadedModel

log = logging.getLogger(__name__)


def _cohort_candidates(location: str, sample_rate: int) -> Iterator[tuple[str, str, Callable[[], np.ndarray]]]:
    """(key, speaker, load audio) of every utterance of a cohort source, in reading order, decoding nothing yet."""
    path = Path(location)
    if names_shards(location):
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


def _cohort_items(scoring: ScoreConfig, config: ExtractConfig,
                  state: PartialState) -> Iterator[tuple[str, np.ndarray, str]]:
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
        if selected % state.num_processes == state.process_index:
            yield key, prepare_item(f"{scoring.cohort}: {key}", load(), config), speaker
        selected += 1


def cohort_embeddings(loaded: LoadedModel, scoring: ScoreConfig, config: ExtractConfig, state: PartialState, *,
                      cache: Path | None = None, progress: Progress | None = None) -> Embeddings | None:
    """The cohort's utterance embeddings (with their speakers) on the main process; cached like the trials'."""
    remote = scoring.cohort.startswith(("http://", "https://"))
    settings = cache_settings(loaded, config, state.device,
                              cohort=scoring.cohort if remote else str(Path(scoring.cohort).resolve()),
                              cohort_speakers=scoring.cohort_speakers,
                              cohort_utts_per_speaker=scoring.cohort_utts_per_speaker)
    cached = read_cache(cache, settings)[0] if state.is_main_process else None
    if broadcast_object_list([cached is not None])[0]:
        return cached
    local = embed_share(Embedder(loaded.model, state.device, config), _cohort_items(scoring, config, state), state,
                        progress, "cohort", None)
    gathered = gather_object([local])
    if not state.is_main_process:
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
