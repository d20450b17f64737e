"""Data: audio files → tar shards → training batches and evaluation utterances, one module an idea.

Writing shards (``python -m shardify``): ``lists`` reads training, evaluation and trial lists or scans an audio
tree; ``plan`` decides which utterance goes into which shard before any audio is read; ``writer`` packs the
planned shards atomically (resume, worker processes, SLURM parts and their merge); ``index`` writes
``index.json`` and verifies shards against it; ``synthetic`` generates the VoxCeleb-shaped synthetic corpus of
the demo, tests and benchmarks. Reading shards: ``shardset`` is a shard set as a reader sees it (the index, one
URL a shard, which stream reads which shard); ``shardio`` is the shard I/O every reader uses (opening local,
``pipe:`` and http shards with stall timeouts, iterating a shard's samples with ``read_shard`` on
``tarstream``'s lean tar parser, counting ``Faults`` and ``ShardFailures``). Training batches: ``stages`` holds
the reader stages (interleave → parse → quota → M-tuples → ``Batcher``: pool, batch draw, crops);
``batches`` holds ``BatchConfig``, the per-stream plan from the index (``plan_streams``,
``batches_per_epoch``), ``TrainStream``, whose ``stages`` method lists those stages in order, ``TrainBatches``
and ``train_loader``; ``loader`` the DataLoaders (worker errors as one message, worker signals, closing);
``meter`` the per-epoch coverage and fault report. Evaluation and augmentation: ``eval_reader`` yields every
evaluation utterance once across ranks and workers, batched by length; ``noise`` keeps the MUSAN/RIR
augmentation banks.
"""
