"""Model files: the typed config, the on-disk layout, checkpoint reading and writing, GGUF, synthetic models."""
