"""The score-normalisation cohort: a few utterances of many training speakers, embedded like the trials.

The cohort source is training shards (or an audio folder); ``cohort_speakers`` speakers with up to
``cohort_utts_per_speaker`` utterances each are embedded across the processes and cached beside the trials'
embeddings. :mod:`speakerid.evaluation.scoring` turns them into a mean embedding or per-speaker means for
AS-Norm.

Which speakers and which shards (:func:`plan_cohort`) is decided from ``index.json`` alone, which says how many
utterances of each speaker every shard holds (training shards: ``labels``; evaluation shards: ``keys``): a
speaker's *home* is the first shard (in index order) holding at least ``cohort_utts_per_speaker`` of its
utterances; speakers are taken by home shard, then by name, and those with no such shard (too few
utterances in any one shard) only after all that have one, from their first shards on. Each chosen speaker
gives the first utterances of it in its home shard (in tar order), so only those shards are read, each
only up to its last wanted member, and each process reads its share of them (shard j of the plan by process
j mod world size). An index that lists neither (or an audio folder) is read in order, every process reading
it all: the first ``cohort_speakers`` speakers met, until each has its utterances.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def _speaker_of_sample(sample: dict) -> str:
    try:
        return json.loads(sample["json"]).get("spk") or speaker_of(sample["__key__"])
    except (KeyError, ValueError):
        return speaker_of(sample["__key__"])


def _loader(sample: dict, encoding: str) -> Callable[[], np.ndarray]:
    return functools.partial(lambda data: decode(data)[0], sample[encoding])


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
                yield sample["__key__"], _speaker_of_sample(sample), _loader(sample, encoding)
        if faults.damaged_shards or faults.corrupt_members:
            log.warning("cohort %s: %s (damaged parts skipped)", location, faults.as_dict())
        return
    if not path.is_dir():
        raise SpeakeridError(f"{location}: --cohort must be training shards (a directory with index.json, or its URL) "
                             "or an audio folder; nothing is there")
    for entry in scan_audio_tree(path):
        yield (utterance_key(entry.relpath), entry.spk,
               functools.partial(read_audio, path / entry.relpath, sample_rate))


def _speaker_counts(index: dict) -> list[dict[str, int]] | None:
    """Per shard, speaker → utterances in it, from the index alone; None when the index does not say."""
    shards = index.get("shards", [])
    if shards and all("labels" in s for s in shards) and isinstance(index.get("speakers"), dict):
        name = {label: spk for spk, label in index["speakers"].items()}
        return [{name[int(label)]: n for label, n in s["labels"].items()} for s in shards]
    if shards and all("keys" in s for s in shards):
        counts = [defaultdict(int) for _ in shards]
        for i, s in enumerate(shards):
            for key in s["keys"]:
                counts[i][speaker_of(key)] += 1
        return [dict(c) for c in counts]
    return None


@dataclass(frozen=True)
class CohortPlan:
    """What to read: shard position in the index → {speaker: utterances to take from that shard}."""

    take: dict[int, dict[str, int]]

    @property
    def shards(self) -> list[int]:
        return sorted(self.take)

    @property
    def speakers(self) -> set[str]:
        return {spk for wanted in self.take.values() for spk in wanted}


def plan_cohort(index: dict, speakers: int, utts_per_speaker: int) -> CohortPlan | None:
    """The cohort's speakers and the shards that hold their utterances, from the index (see the module's
    docstring); None when the index does not record each shard's speakers. Linear in the index's entries."""
    counts = _speaker_counts(index)
    if counts is None:
        return None
    where: dict[str, list[tuple[int, int]]] = defaultdict(list)  # speaker → [(shard, utterances in it)]
    home: dict[str, int] = {}
    for i, shard_counts in enumerate(counts):
        for spk, n in shard_counts.items():
            where[spk].append((i, n))
            if n >= utts_per_speaker:
                home.setdefault(spk, i)
    ranked = sorted(where, key=lambda spk: (spk not in home, home.get(spk, where[spk][0][0]), spk))
    take: dict[int, dict[str, int]] = defaultdict(dict)
    for spk in ranked[:speakers]:
        if spk in home:
            take[home[spk]][spk] = utts_per_speaker
            continue
        need = utts_per_speaker
        for i, n in where[spk]:
            take[i][spk] = min(need, n)
            need -= take[i][spk]
            if not need:
                break
    return CohortPlan(dict(take))


def _planned_candidates(shards: ShardSet, plan: CohortPlan, rank: int, world: int,
                        faults: Faults) -> Iterator[tuple[str, str, Callable[[], np.ndarray]]]:
    """This process's share of the plan's shards, each read only up to its last wanted member."""
    for i in plan.shards[rank::world]:
        left = dict(plan.take[i])
        samples = read_shard(shards.urls[i], faults)
        for sample in samples:
            if shards.encoding not in sample:
                continue
            speaker = _speaker_of_sample(sample)
            if left.get(speaker, 0) > 0:
                left[speaker] -= 1
                yield sample["__key__"], speaker, _loader(sample, shards.encoding)
                if not any(left.values()):
                    break
        samples.close()  # stops reading the tar here
        short = {spk: n for spk, n in left.items() if n}
        if short:
            log.warning("cohort: %s holds fewer utterances than index.json says of %s (%d missing): the cohort is "
                        "smaller; `speakerid shardify verify` checks the shards against their index", shards.urls[i],
                        ", ".join(sorted(short)[:5]) + (" …" if len(short) > 5 else ""), sum(short.values()))


def _in_reading_order(location: str, sample_rate: int, speakers: int, utts_per_speaker: int,
                      rank: int, world: int) -> Iterator[tuple[str, str, Callable[[], np.ndarray]]]:
    """Up to ``utts_per_speaker`` utterances of each of the first ``speakers`` speakers read; utterance i of
    the selection is this process's when i mod world size is its rank."""
    counts: dict[str, int] = {}
    full = selected = 0
    for key, speaker, load in _cohort_candidates(location, sample_rate):
        if full >= speakers:
            break
        count = counts.get(speaker)
        if count is None and len(counts) >= speakers:
            continue
        if (count or 0) >= utts_per_speaker:
            continue
        counts[speaker] = (count or 0) + 1
        full += counts[speaker] == utts_per_speaker
        if selected % world == rank:
            yield key, speaker, load
        selected += 1


def _open_plan(scoring: ScoreConfig) -> tuple[ShardSet | None, CohortPlan | None]:
    if not names_shards(scoring.cohort):
        return None, None
    shards = ShardSet.open(scoring.cohort, check=False)  # only the planned shards are read; a missing one is named then
    return shards, plan_cohort(shards.index, scoring.cohort_speakers, scoring.cohort_utts_per_speaker)


def cohort_selection(scoring: ScoreConfig, sample_rate: int, rank: int = 0, world: int = 1,
                     opened: tuple[ShardSet | None, CohortPlan | None] | None = None,
                     ) -> Iterator[tuple[str, str, Callable[[], np.ndarray]]]:
    """(key, speaker, load audio) of process ``rank``'s share of the cohort, decoding nothing yet."""
    shards, plan = opened or _open_plan(scoring)
    if plan is None:
        yield from _in_reading_order(scoring.cohort, sample_rate, scoring.cohort_speakers,
                                     scoring.cohort_utts_per_speaker, rank, world)
        return
    faults = Faults()
    yield from _planned_candidates(shards, plan, rank, world, faults)
    if faults.damaged_shards or faults.corrupt_members:
        log.warning("cohort %s: %s (damaged parts skipped)", scoring.cohort, faults.as_dict())


def _cohort_items(scoring: ScoreConfig, config: ExtractConfig, state: PartialState,
                  opened: tuple[ShardSet | None, CohortPlan | None]) -> Iterator[tuple[str, np.ndarray, str]]:
    for key, speaker, load in cohort_selection(scoring, config.sample_rate, state.process_index,
                                               state.num_processes, opened):
        yield key, prepare_item(f"{scoring.cohort}: {key}", load(), config), speaker


def cohort_embeddings(loaded: LoadedModel, scoring: ScoreConfig, config: ExtractConfig, state: PartialState, *,
                      cache: Path | None = None, progress: Progress | None = None) -> Embeddings | None:
    """The cohort's utterance embeddings (with their speakers) on the main process; cached like the trials'."""
    remote = scoring.cohort.startswith(("http://", "https://"))
    opened = _open_plan(scoring)
    settings = cache_settings(loaded, config, state.device,
                              cohort=scoring.cohort if remote else str(Path(scoring.cohort).resolve()),
                              cohort_speakers=scoring.cohort_speakers,
                              cohort_utts_per_speaker=scoring.cohort_utts_per_speaker,
                              cohort_choice="reading order" if opened[1] is None else "index")
    cached = read_cache(cache, settings)[0] if state.is_main_process else None
    if broadcast_object_list([cached is not None])[0]:
        return cached
    local = embed_share(Embedder(loaded.model, state.device, config), _cohort_items(scoring, config, state, opened),
                        state, progress, "cohort", None)
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
