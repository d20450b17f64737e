"""speakerid: train speaker-recognition networks on VoxCeleb-scale data from WebDataset shards, and evaluate them.

The library behind one installed command, ``speakerid``, whose subcommands are the jobs (``cli``): ``speakerid shardify``
(audio → tar shards), ``speakerid train`` (shards → checkpoint) and ``speakerid evaluate`` (checkpoint → EER/minDCF);
from the checkout also ``python -m shardify|train|evaluate``.
Importing it never needs torchaudio (its PyPI wheels are CUDA builds that fail next to a CPU-only torch).

Where each idea lives, in the order data flows: ``data`` (audio lists → shards → shard I/O → reader stages → N×M
batches; evaluation audio; augmentation banks; the synthetic corpus), ``audio`` (decoding, crops), ``speed``
(speed perturbation: batched resampling, each speed its own speakers), ``augment`` (MUSAN/RIR on the device),
``features`` (front-ends), ``specaugment`` (time/frequency masks after them, in training), ``models`` and
``losses`` (registries, one family a file), ``training`` (the Accelerate loop and its parts; checkpoint averaging,
whose front door is ``average``: ``python -m speakerid.average``), ``inference`` and ``checkpoint`` (checkpoints
in, and the seeds' ``.model`` files), ``evaluation`` (extraction → scoring → calibration → report) with
``metrics`` (EER, minDCF, Cllr, DET), ``config`` and ``options`` (the typed run config), ``demo`` (``make demo``),
``errors``, ``tempfiles`` and ``runtime`` (small shared pieces), and ``api`` (the Python API:
``speakerid.load_model(path)`` → embed, score, verify, score_trials; docs/python-api.md) and ``export`` (TorchScript and
ONNX files; docs/export.md). docs/layout.md ("How the
code is laid out") draws the same map.
"""

__version__ = "0.1.0"

from speakerid.errors import SpeakeridError

_API = ("load_model", "SpeakerModel")  # from speakerid.api, imported on first use: `import speakerid` stays cheap


def __getattr__(name: str):
    if name in _API:
        from speakerid import api

        return getattr(api, name)
    raise AttributeError(f"module 'speakerid' has no attribute {name!r}")


__all__ = ["SpeakeridError", "SpeakerModel", "__version__", "load_model"]
