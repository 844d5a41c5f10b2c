"""Hydra configuration package (kept importable so tests and console scripts can compose configs)."""
