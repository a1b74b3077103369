"""Scaling studies: the sweep results table, power-law fits and the scaling plots."""
