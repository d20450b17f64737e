"""Data: shard writing (plan, write, index, verify), shard reading, N×M speaker batches, the synthetic corpus.

Where each idea lives, in the order data flows. Writing (``python -m shardify pack``): ``lists.py`` reads
the inputs (training, evaluation and trial lists, or a scanned audio tree); ``plan.py`` decides which
utterance goes into which shard before any audio is read; ``pack.py`` is the pack job, which claims and
locks the directory (``resume.py``, so a re-run resumes), runs one ``writer.py`` job a shard (decode,
encode, tar, rename when whole) in worker processes (``pool.py``), and writes ``index.json``
(``index.py``, which also loads the index and ``verify``-checks every shard against it). Reading:
``shardio.py`` opens local, ``pipe:`` and http(s) shards with bounded waits; ``tarstream.py`` walks a tar's
members; ``shardset.py`` is a shard set as a reader sees it (index, URLs, which stream reads which shard);
``batches.py`` streams training batches of N speakers × M utterances; ``eval_reader.py`` streams whole
evaluation utterances; ``noise.py`` keeps the MUSAN/RIR augmentation banks. ``synthetic/`` writes the
built-in VoxCeleb-shaped synthetic corpus (see its own map).
"""
