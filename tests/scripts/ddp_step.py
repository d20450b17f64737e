"""Under `accelerate launch` with 2 processes: one DDP step equals a single-process step on the union batch.

softmax's loss is a mean over rows, so with equal rank batches the DDP-averaged gradient is the gradient
on the union. BatchNorm runs in eval mode so both sides normalise with the same statistics.
"""

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from speakerid.config import load_config
from speakerid.runtime import exit_process
from speakerid.data.batch_config import BatchConfig
from speakerid.data.batches import train_loader
from speakerid.data.shardset import ShardSet
from speakerid.features import int16_to_float
from speakerid.training import build_model_and_loss, training_step

accelerator = Accelerator()  # reads ACCELERATE_USE_CPU (PartialState alone does not)
shards, out = ShardSet.open(sys.argv[1]), Path(sys.argv[2])
config = load_config(None, ["model.options.n_out=16", "loss.name=softmax", "train.mixed_precision=no"])
torch.manual_seed(0)
model, loss = build_model_and_loss(config, n_classes=len(shards.index["speakers"]))
reference = (copy.deepcopy(model).eval(), copy.deepcopy(loss))  # float32: the front-end always computes in float32
initial = torch.cat([p.detach().flatten() for p in [*reference[0].parameters(), *reference[1].parameters()]]).clone()
model.eval()
optimizer = torch.optim.SGD(list(model.parameters()) + list(loss.parameters()), lr=0.1)
model, loss, optimizer = accelerator.prepare(model, loss, optimizer)

data = BatchConfig(n_speakers=4, utts_per_speaker=2, max_frames=20, seed=5)
batch = next(iter(train_loader(shards, data, rank=accelerator.process_index, world_size=accelerator.num_processes)))
value, _, _ = training_step(model, loss, batch, accelerator, config)
optimizer.step()

params = torch.cat([p.detach().flatten() for p in [*model.parameters(), *loss.parameters()]])
every_rank = accelerator.gather(params[None])
audio = accelerator.gather(batch["audio"].int()).short()  # gloo cannot gather int16
labels = accelerator.gather(batch["labels"])
losses = accelerator.gather(torch.tensor([value]))
if accelerator.is_main_process:
    ref_model, ref_loss = reference
    n, m, length = audio.shape
    embeddings = ref_model(int16_to_float(audio.reshape(n * m, length)))
    ref_value, _ = ref_loss(embeddings.reshape(n, m, -1), labels)
    ref_value.backward()
    with torch.no_grad():
        for p in [*ref_model.parameters(), *ref_loss.parameters()]:
            if p.grad is not None:
                p -= 0.1 * p.grad
    ref_params = torch.cat([p.detach().flatten() for p in [*ref_model.parameters(), *ref_loss.parameters()]])
    (out / "ddp.json").write_text(json.dumps({
        "ranks_identical": bool((every_rank == every_rank[0]).all()),
        "world_size": accelerator.num_processes,
        "mean_rank_loss": float(losses.mean()), "union_loss": float(ref_value.detach()),
        "max_param_difference": float((params - ref_params).abs().max()),
        "max_param_change": float((ref_params - initial).abs().max()),
    }))
accelerator.wait_for_everyone()
exit_process(0)  # see speakerid/runtime.py: gloo can abort a normal interpreter exit
