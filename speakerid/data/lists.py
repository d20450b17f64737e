"""The inputs shardify reads: training lists, evaluation lists and trial lists, or a scanned audio tree.

Formats are voxceleb_trainer's: ``train_list.txt`` holds ``speaker relpath`` lines; a trial list holds
``label enroll test`` lines (``enroll test`` without labels for scoring only). Every path is relative to an
audio root. Blank lines and lines starting with ``#`` are ignored, and so is a UTF-8 BOM.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from speakerid.audio import AUDIO_EXTENSIONS
from speakerid.errors import SpeakeridError

MAX_LISTED = 10


@dataclass(frozen=True, slots=True)
class ListEntry:
    spk: str
    relpath: str
    source: str  # the list it came from, or the scanned root
    line: int = 0  # its line in the list (0: none)

    @property
    def where(self) -> str:
        """"file:line" of the line it came from, or the scanned root (kept apart: VoxCeleb2's list has a million)."""
        return f"{self.source}:{self.line}" if self.line else self.source


def utterance_key(relpath: str) -> str:
    """The shard key of an utterance: its relative path without the audio extension.

    webdataset splits a member name at the first dot of its last component, so dots left in the stem
    become underscores (``a/b.c.wav`` → ``a/b_c``); the original path is kept in the member's JSON.
    """
    path = relpath.replace(os.sep, "/").removeprefix("./")
    stem, ext = os.path.splitext(path)
    if ext.lower() not in AUDIO_EXTENSIONS:
        stem = path
    head, _, name = stem.rpartition("/")
    return f"{head}/{name.replace('.', '_')}" if head else name.replace(".", "_")


def _lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the first field
    except (OSError, UnicodeDecodeError) as error:
        raise SpeakeridError(f"{path}: cannot read the list: {error}") from error
    binary = [number for number, line in enumerate(text.splitlines(), start=1) if "\0" in line] if "\0" in text else []
    if binary:
        raise SpeakeridError(
            f"{path}: NUL byte(s) on line(s) {', '.join(map(str, binary[:MAX_LISTED]))}"
            f"{' …' if len(binary) > MAX_LISTED else ''}: this is not a text list (a binary file, or one damaged "
            "by a crash); give the right file or rewrite those lines")
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield number, stripped


def listed(lines: list[str]) -> str:
    """The first MAX_LISTED lines of an error message's list, indented, and how many more there are."""
    shown = "\n".join(f"  {line}" for line in lines[:MAX_LISTED])
    return shown + (f"\n  … and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else "")


def _fail_on_bad_lines(path: Path, bad: list[tuple[int, str]], expected: str) -> None:
    if not bad:
        return
    raise SpeakeridError(
        f"{path}: {len(bad)} line(s) do not have the form {expected}:\n"
        f"{listed([f'{path}:{number}: {line!r}' for number, line in bad])}\n"
        "Fix or delete these lines and run the command again."
    )


def read_train_list(path: str | Path) -> list[ListEntry]:
    """``speaker relpath`` lines (voxceleb_trainer's train_list.txt)."""
    path = Path(path)
    source = str(path)
    entries, bad = [], []
    speakers: dict[str, str] = {}  # one string per speaker, not one per line
    for number, line in _lines(path):
        fields = line.split()
        if len(fields) != 2:
            bad.append((number, line))
            continue
        entries.append(ListEntry(speakers.setdefault(fields[0], fields[0]), fields[1], source, number))
    _fail_on_bad_lines(path, bad, "'speaker relpath' (2 fields)")
    if not entries:
        raise SpeakeridError(f"{path}: the list is empty; expected 'speaker relpath' lines")
    return entries


def read_eval_list(path: str | Path) -> list[ListEntry]:
    """``relpath`` or ``speaker relpath`` lines; the speaker defaults to the first path component."""
    path = Path(path)
    source = str(path)
    entries, bad = [], []
    for number, line in _lines(path):
        fields = line.split()
        if len(fields) == 1:
            entries.append(ListEntry(speaker_of(fields[0]), fields[0], source, number))
        elif len(fields) == 2:
            entries.append(ListEntry(fields[0], fields[1], source, number))
        else:
            bad.append((number, line))
    _fail_on_bad_lines(path, bad, "'relpath' or 'speaker relpath'")
    if not entries:
        raise SpeakeridError(f"{path}: the list is empty; expected 'relpath' or 'speaker relpath' lines")
    return entries


@dataclass(frozen=True)
class Trial:
    label: int | None  # 1 target, 0 non-target, None for an unlabelled list
    enroll: str
    test: str
    where: str


def read_trials(path: str | Path) -> list[Trial]:
    """``label enroll test`` lines (labels 0/1), or ``enroll test`` lines for scoring without labels."""
    path = Path(path)
    trials, bad = [], []
    for number, line in _lines(path):
        fields = line.split()
        where = f"{path}:{number}"
        if len(fields) == 3 and fields[0] in ("0", "1"):
            trials.append(Trial(int(fields[0]), fields[1], fields[2], where))
        elif len(fields) == 2:
            trials.append(Trial(None, fields[0], fields[1], where))
        else:
            bad.append((number, line))
    _fail_on_bad_lines(path, bad, "'label enroll test' with label 0 or 1, or 'enroll test'")
    if not trials:
        raise SpeakeridError(f"{path}: the trial list is empty")
    if len({t.label is None for t in trials}) > 1:
        raise SpeakeridError(f"{path}: some lines have a label and some do not; label every line or none")
    return trials


def entries_from_trials(paths: list[str | Path]) -> list[ListEntry]:
    """Each utterance named by any of the trial lists, once, in sorted order."""
    seen: dict[str, str] = {}
    for path in paths:
        for trial in read_trials(path):
            seen.setdefault(trial.enroll, trial.where)
            seen.setdefault(trial.test, trial.where)
    return [ListEntry(speaker_of(rel), rel, seen[rel]) for rel in sorted(seen)]


def scan_audio_tree(root: str | Path) -> list[ListEntry]:
    """Every audio file under ``root`` (sorted), speaker = first path component."""
    root = Path(root)
    if not root.is_dir():
        raise SpeakeridError(f"{root}: not a directory; --root must name the folder holding the audio")
    relpaths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
    )
    if not relpaths:
        raise SpeakeridError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found under it")
    return [ListEntry(speaker_of(rel), rel, str(root)) for rel in relpaths]


def speaker_of(relpath: str) -> str:
    """VoxCeleb layout: ``id10270/5r0dWxy17C8/00001.wav`` belongs to ``id10270``."""
    return re.split(r"[/\\]", relpath, maxsplit=1)[0]


def pack_inputs(kind: str, root: str | Path, list_path: str | Path | None = None,
                trials: list[str | Path] = ()) -> list[ListEntry]:
    """The utterances ``shardify pack`` packs, chosen from its --kind, --list, --trials and --root.

    train: the ``speaker relpath`` list, else every audio file under ``root``, its first folder the speaker;
    otherwise: the trial lists' utterances (and the list's), else the list, else every audio file under ``root``.
    """
    if kind == "train":
        if list_path:
            return read_train_list(list_path)
        entries = scan_audio_tree(root)  # VoxCeleb's layout: SPEAKER/VIDEO/UTT.ext, the speaker is the first folder
        flat = [e.relpath for e in entries if "/" not in e.relpath]
        if flat:
            raise SpeakeridError(
                f"{root}: {len(flat)} audio file(s) lie directly in --root (first: {flat[0]}), so their "
                "speaker is unknown; put each speaker's audio under a folder named after the speaker, or give "
                "--list with 'speaker relpath' lines")
        return entries
    if trials:
        entries = entries_from_trials(trials) + (read_eval_list(list_path) if list_path else [])
        return list({e.relpath: e for e in entries}.values())
    if list_path:
        return read_eval_list(list_path)
    return scan_audio_tree(root)
