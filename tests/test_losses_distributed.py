"""cross_rank_negatives under a real `accelerate launch` with two gloo processes on CPU.

Each rank holds half of a global batch (one speaker appears on both ranks). With cross_rank_negatives
every rank must report the loss of the whole batch, its own embeddings must receive world_size × the
single-process gradient (the gather's backward sums every rank's copy; DDP then divides by world_size),
and the loss's own parameters the single-process gradient.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from speakerid.losses import build_loss

    accelerator = Accelerator(cpu=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    N, M, D, C = 4, 3, 5, 12
    torch.manual_seed(0)
    x_all = torch.randn(world * N, M, D, dtype=torch.float64)
    labels_all = torch.tensor([0, 1, 2, 3, 4, 1, 5, 6])          # speaker 1 on both ranks
    mine = slice(rank * N, (rank + 1) * N)
    for name in ["angleproto", "ge2e", "proto", "mp", "mp_balance", "mmp", "mmp_balance"]:
        kwargs = dict(nOut=D, nClasses=C) if name.startswith(("mp", "mmp")) else {}
        torch.manual_seed(1)
        single = build_loss(name, **kwargs).double()
        spread = build_loss(name, cross_rank_negatives=True, **kwargs).double()
        spread.load_state_dict(single.state_dict())

        x_ref = x_all.clone().requires_grad_()
        ref_loss, ref_acc = single(x_ref, labels_all)
        ref_loss.backward()

        x_mine = x_all[mine].clone().requires_grad_()
        loss, acc = spread(x_mine, labels_all[mine])
        loss.backward()

        assert abs(loss.item() - ref_loss.item()) < 1e-10, (name, loss.item(), ref_loss.item())
        assert acc.item() == ref_acc.item(), name
        torch.testing.assert_close(x_mine.grad, world * x_ref.grad[mine], rtol=1e-9, atol=1e-12, msg=name)
        for (key, p), q in zip(spread.named_parameters(), single.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=f"{name}.{key}")
    print(f"rank {rank}: cross-rank losses match the single-process batch", flush=True)
    accelerator.wait_for_everyone()
    dist.destroy_process_group()   # a gloo group left to interpreter exit can abort the slower rank
''')


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="the accelerate launcher is not installed")
def test_cross_rank_negatives_match_single_process(tmp_path):
    script = tmp_path / "cross_rank_worker.py"
    script.write_text(WORKER)
    launcher = Path(sys.executable).parent / "accelerate"
    launcher = str(launcher) if launcher.exists() else "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "0", str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("match the single-process batch") == 2, result.stdout + result.stderr
