"""Choosing the score-normalisation cohort from index.json: which speakers, which shards, which process reads them."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from speakerid.data.lists import read_train_list
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from speakerid.evaluation import cohort as cohort_module
from speakerid.evaluation.cohort import CohortPlan, cohort_selection, plan_cohort
from speakerid.evaluation.scoring import ScoreConfig


@pytest.fixture(scope="module")
def many_shards(corpus, tmp_path_factory):
    """12 speakers × 6 utterances in chunks of 2, 8 utterances a shard: 9 shards."""
    out = tmp_path_factory.mktemp("cohort") / "shards"
    plan = make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(kind="train", chunk_size=2, max_utts=8))
    pack(plan, corpus.root, out)
    return out


def recorded_reads(monkeypatch) -> list[str]:
    urls: list[str] = []
    real = cohort_module.read_shard

    def read_shard(url, *args, **kwargs):
        urls.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(cohort_module, "read_shard", read_shard)
    return urls


def members(path) -> list[str]:
    """The shard's sample keys in tar order."""
    with tarfile.open(path) as tar:
        return [m.name[:-5] for m in tar if m.name.endswith(".json")]


def selection(config: ScoreConfig, rank: int = 0, world: int = 1) -> list[tuple[str, str]]:
    return [(key, spk) for key, spk, _ in cohort_selection(config, 16000, rank, world)]


def test_the_plan_follows_the_index():
    index = {"speakers": {"a": 0, "b": 1, "c": 2, "d": 3},
             "shards": [{"labels": {"0": 1, "1": 3}}, {"labels": {"0": 1, "2": 2}}, {"labels": {"2": 5, "3": 1}}]}
    # b's home is shard 0, c's shard 1 (2 ≥ 2); a (1 + 1) and d (1) have none: they come last, from their first shards
    assert plan_cohort(index, 2, 2) == CohortPlan({0: {"b": 2}, 1: {"c": 2}})
    assert plan_cohort(index, 3, 2) == CohortPlan({0: {"b": 2, "a": 1}, 1: {"c": 2, "a": 1}})
    assert plan_cohort(index, 9, 2).speakers == {"a", "b", "c", "d"}
    assert plan_cohort(index, 9, 2).take[2] == {"d": 1}
    assert plan_cohort({"speakers": {}, "shards": [{"name": "x.tar"}]}, 2, 2) is None  # no per-shard speakers
    eval_index = {"shards": [{"keys": ["e/v/1", "e/v/2", "f/v/1"]}, {"keys": ["f/v/2", "g/v/1", "g/v/2"]}]}
    assert plan_cohort(eval_index, 2, 2) == CohortPlan({0: {"e": 2}, 1: {"g": 2}})


def test_the_cohort_reads_only_the_shards_that_hold_it(many_shards, monkeypatch):
    index = json.loads((many_shards / "index.json").read_text())
    plan = plan_cohort(index, 4, 2)
    urls = recorded_reads(monkeypatch)
    chosen = selection(ScoreConfig(cohort=str(many_shards), cohort_speakers=4, cohort_utts_per_speaker=2))
    assert sorted(urls) == sorted(str(many_shards / index["shards"][i]["name"]) for i in plan.shards)
    assert len(urls) < len(index["shards"]) == 9
    assert {spk for _, spk in chosen} == plan.speakers and len(plan.speakers) == 4
    assert len(chosen) == len(set(chosen)) == 8  # 2 utterances of each of the 4
    for i, wanted in plan.take.items():  # each from its home shard, the first of it there in tar order
        keys = members(many_shards / index["shards"][i]["name"])
        for spk, n in wanted.items():
            assert [k for k, s in chosen if s == spk] == [k for k in keys if k.startswith(spk + "/")][:n]


def test_each_process_reads_its_share_of_the_shards(many_shards, monkeypatch):
    config = ScoreConfig(cohort=str(many_shards), cohort_speakers=12, cohort_utts_per_speaker=3)
    alone = selection(config)
    urls = recorded_reads(monkeypatch)
    first = selection(config, 0, 2)
    read_by_first = set(urls)
    urls.clear()
    second = selection(config, 1, 2)
    assert read_by_first and set(urls) and not read_by_first & set(urls)  # no shard read by both
    assert sorted(first + second) == sorted(alone) and len({spk for _, spk in alone}) == 12


def test_an_index_without_shard_speakers_is_read_in_order(many_shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(many_shards, old)
    index = json.loads((old / "index.json").read_text())
    for shard in index["shards"]:
        del shard["labels"]
    (old / "index.json").write_text(json.dumps(index))
    chosen = selection(ScoreConfig(cohort=str(old), cohort_speakers=3, cohort_utts_per_speaker=2))
    read_order = []
    for name in (s["name"] for s in index["shards"]):
        read_order += members(old / name)
    first_three = list(dict.fromkeys(k.split("/")[0] for k in read_order))[:3]
    expected = [k for spk in first_three for k in [k for k in read_order if k.startswith(spk + "/")][:2]]
    assert sorted(k for k, _ in chosen) == sorted(expected)


def test_a_shard_that_holds_less_than_its_index_says_is_named(many_shards, tmp_path, caplog):
    changed = tmp_path / "changed"
    shutil.copytree(many_shards, changed)
    index = json.loads((changed / "index.json").read_text())
    first = index["shards"][0]
    label = next(iter(first["labels"]))
    first["labels"][label] += 5  # the index claims five utterances more of this speaker than the shard holds
    (changed / "index.json").write_text(json.dumps(index))
    speaker = {v: k for k, v in index["speakers"].items()}[int(label)]
    config = ScoreConfig(cohort=str(changed), cohort_speakers=12, cohort_utts_per_speaker=first["labels"][label])
    with caplog.at_level("WARNING"):
        chosen = selection(config)
    assert speaker in {s for _, s in chosen}
    assert f"{changed / first['name']} holds fewer utterances than index.json says of" in caplog.text
    assert speaker in caplog.text and "shardify verify" in caplog.text
