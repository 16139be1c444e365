"""Build stages, in order. Each takes the build context and returns a short note for the log."""
