"""Evaluation: bits per byte, tasks, classification metrics, embeddings and search, loss curves."""
