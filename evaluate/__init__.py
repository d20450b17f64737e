"""Front door: python -m evaluate --checkpoint CKPT --trials LIST --audio ROOT_OR_SHARDS (see __main__.py)."""
