"""Sweeps: ``sweep.py --sweep configs/sweeps/NAME.py[:ARG]`` (vit_jax/scaling/sweep.py)."""
