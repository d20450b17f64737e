"""speakerid: train speaker-recognition networks on VoxCeleb-scale data from WebDataset shards, and evaluate them.

The library behind three front doors run from the checkout: ``python -m shardify`` (audio → tar shards),
``accelerate launch train`` (shards → checkpoint) and ``python -m evaluate`` (checkpoint → EER/minDCF).
Importing it never needs torchaudio (its PyPI wheels are CUDA builds that fail next to a CPU-only torch).
"""

__version__ = "0.1.0"

from speakerid.errors import SpeakeridError

__all__ = ["SpeakeridError", "__version__"]
