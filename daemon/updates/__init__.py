"""Image updates on the host: staging a bundle into a new deployment (docs/updates.md)."""
