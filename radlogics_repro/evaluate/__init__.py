"""Evaluation: metric functions on plain arrays (:mod:`.metrics`) and the evaluation entry point."""
