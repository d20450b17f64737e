"""Trial lists: read and checked before any audio is touched; the utterances they name, each once."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speakerid.data.lists import Trial, read_trials, utterance_key
from speakerid.errors import SpeakeridError
from speakerid.metrics import check_trials


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
