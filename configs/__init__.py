"""Training configs (ml_collections): `bin/train.py --config=configs/NAME.py`."""
