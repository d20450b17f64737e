"""Data: the synthetic speaker corpus, shard writing (plan, write, index, verify) and shard reading."""
