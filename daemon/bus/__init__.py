"""The D-Bus face of the daemon: interface declarations (shared with the client), errors, callers."""
