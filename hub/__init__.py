"""rastos-hub: the fleet server."""
