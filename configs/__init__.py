"""Training configs for `python -m launch.train --config=configs/NAME.py` (base.py is shared)."""
