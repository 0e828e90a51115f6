"""The embedded world: a procedural renderer of nameable concepts and the small model trained on it."""
