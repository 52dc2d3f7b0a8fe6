"""Flax linen layers and helpers for compressed parameters."""

__all__ = []
