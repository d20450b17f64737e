"""Front door: accelerate launch train --config configs/X.yaml [key=value …] (see __main__.py)."""
