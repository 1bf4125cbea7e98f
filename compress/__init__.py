"""Shared core of the compress toolchain: recipes, the pass registry and the decoder-layer engine."""

__version__ = "0.1.0"
