"""The command-line front doors' code: parsing and printing only, the work is done by the library.

``shardify`` (audio → tar shards), ``train`` (shards → checkpoint) and ``evaluate`` (checkpoint → EER/minDCF), each
with ``build_parser()`` and ``main(argv=None)``. The checkout's ``python -m shardify|train|evaluate`` are shims
that call them.
"""
