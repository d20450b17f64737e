"""What a rank's epoch covered: the share of usable utterances its batches held, and the faults met."""

from __future__ import annotations

import hashlib
import json

import numpy as np


class EpochMeter:
    """Per-epoch coverage (share of usable utterances seen) and faults, from the batches a rank consumed.

    Faults are cumulative per stream in each batch; the epoch's count is the growth of their sum. Utterance keys
    are kept as 64-bit hashes (8 bytes each) so the state a checkpoint saves stays small at VoxCeleb scale.
    """

    def __init__(self, usable: int) -> None:
        self.usable = usable
        self.seen: set[int] = set()
        self.crops = 0
        self._faults_at: dict[int, dict] = {}
        self._faults_start: dict[int, dict] = {}

    def update(self, batch: dict) -> None:
        for t in batch["keys"]:
            self.seen.update(key_hash(k) for k in t)
            self.crops += len(t)
        self._faults_at[batch["stream"]] = batch["faults"]

    def report(self) -> dict:
        faults = {k: sum(f[k] - self._faults_start.get(s, {}).get(k, 0) for s, f in self._faults_at.items())
                  for k in ("corrupt_members", "damaged_shards")}
        return {"coverage": len(self.seen) / max(1, self.usable), "utterances_seen": len(self.seen),
                "usable": self.usable, "crops": self.crops, **faults}

    def next_epoch(self) -> None:
        self.seen.clear()
        self.crops = 0
        self._faults_start = {s: dict(f) for s, f in self._faults_at.items()}

    def save(self, path) -> None:
        """The epoch so far as safetensors (hashes) + JSON metadata: a resumed run reports the whole epoch."""
        from safetensors.numpy import save_file

        state = {"crops": self.crops, "faults_at": self._faults_at, "faults_start": self._faults_start}
        seen = np.fromiter(sorted(self.seen), dtype=np.uint64, count=len(self.seen))
        save_file({"seen": seen}, str(path), metadata={"state": json.dumps(state)})

    def load(self, path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            state = json.loads(f.metadata()["state"])
            self.seen = set(f.get_tensor("seen").tolist())
        self.crops = state["crops"]
        self._faults_at = {int(s): f for s, f in state["faults_at"].items()}  # JSON keys are strings
        self._faults_start = {int(s): f for s, f in state["faults_start"].items()}


def key_hash(key: str) -> int:
    """A stable 64-bit hash of an utterance key (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
