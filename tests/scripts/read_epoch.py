"""Run under `accelerate launch`: read one epoch of training batches on this rank, write what it saw."""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from speakerid.data.batch_config import BatchConfig
from speakerid.data.batches import train_loader
from speakerid.runtime import exit_process
from speakerid.data.shardset import ShardSet

state = Accelerator()  # reads ACCELERATE_USE_CPU (PartialState alone does not)
shards, out = ShardSet.open(sys.argv[1]), Path(sys.argv[2])
config = BatchConfig(n_speakers=4, utts_per_speaker=2, max_frames=40, open_shards=2, seed=3)
loader = train_loader(shards, config, rank=state.process_index, world_size=state.num_processes, workers=1)
keys, batches = [], 0
iterator = iter(loader)
for _ in range(loader.dataset.batches_per_epoch):
    batch = next(iterator)
    keys += [k for t in batch["keys"] for k in t]
    batches += 1
state.wait_for_everyone()  # both ranks reach the end of the epoch: no rank is left waiting (an uneven count hangs DDP)
(out / f"rank{state.process_index}.json").write_text(json.dumps({
    "rank": state.process_index, "world_size": state.num_processes, "batches": batches,
    "batches_per_epoch": loader.dataset.batches_per_epoch, "keys": keys,
}))
exit_process(0)  # see speakerid/runtime.py: gloo can abort a normal interpreter exit
