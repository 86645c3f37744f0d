"""Data layer: synthetic triplets, tar shards, tokenizer, loaders and packing."""

from omni_core.data.sample import Sample

__all__ = ["Sample"]
