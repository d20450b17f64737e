"""Process exit for the front doors under ``accelerate launch``.

With torch.distributed on gloo, a process that finalises its interpreter normally can abort on the way
out ("terminate called without an active exception", exit −6): gloo's worker threads may still hold
tensors whose release needs the interpreter being torn down (pytorch/pytorch PR #179291). Seen here in
about one run in five of the two-process tests even after destroy_process_group. A process that ran
distributed therefore destroys the group, flushes its output and leaves with os._exit, which skips that
finalisation; a single process exits normally.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    import torch.distributed as dist

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized())
    if not distributed:
        sys.exit(code)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
