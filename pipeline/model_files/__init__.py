"""Model files: where a model comes from (default, path or URI) and weight means of checkpoints."""
