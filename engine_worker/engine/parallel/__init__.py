"""Tensor parallelism: one engine's model split across N ranks (processes), rank 0 leading."""
