"""Swappable backends behind small protocols: blob store, embedder, vector index."""
