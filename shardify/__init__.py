"""Front door: python -m shardify (see __main__.py)."""
