"""Retrieval and zero-shot evaluation, and embedding export."""
