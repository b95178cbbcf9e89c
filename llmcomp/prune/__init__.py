"""Pruning: parts of a model (experts) or of its KV cache (kv/)."""
