"""Data: audio files → tar shards → training batches and evaluation utterances, one module an idea.

Where each idea lives, in the order data flows. Writing (``python -m shardify pack``): ``lists.py`` reads the
inputs (training, evaluation and trial lists, or a scanned audio tree; ``pack_inputs`` picks one); ``plan.py``
decides which utterance goes into which shard before any audio is read; ``pack.py`` is the pack job, which claims
and locks the directory (``resume.py``, so a re-run resumes), runs one ``writer.py`` job a shard (decode, encode,
tar, rename when whole) in worker processes (``pool.py``), and writes ``index.json`` (``index.py``, which also
loads the index and ``verify``-checks every shard against it). Reading: ``shardset.py`` is a shard set as a
reader sees it (the index, one URL a shard, which stream reads which shard); ``shardio.py`` is the shard I/O
every reader uses (local, ``pipe:`` and http(s) shards with stall timeouts; ``read_shard`` iterates a shard's
samples on ``tarstream.py``'s lean tar parser, counting ``Faults`` and ``ShardFailures``). Training batches:
``batch_config.py`` declares the batch options once (the run config's ``data.*`` and ``shardify read``'s flags
are made from it); ``stages.py`` holds the reader stages (interleave → parse → quota → M-tuples → ``Batcher``:
pool, batch draw, crops); ``batches.py`` plans each stream from the index (``plan_streams``,
``batches_per_epoch``) and chains those stages in ``TrainStream.stages``, the one list to extend;
``loader.py`` holds the DataLoaders (worker errors as one message, worker signals, closing); ``meter.py`` the
per-epoch coverage and fault report; ``read_check.py`` reads epochs as training would (``shardify read``).
Evaluation and augmentation: ``eval_reader.py`` yields every evaluation utterance once across ranks and
workers, batched by length; ``noise.py`` keeps the MUSAN/RIR augmentation banks. ``synthetic/`` writes the
built-in VoxCeleb-shaped synthetic corpus (see its own map).
"""
