"""Experiment configs: ``train.py --config configs/NAME.py``; importable as ``configs.NAME``."""
