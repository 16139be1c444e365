"""rastos-hub: the fleet server (issue: hub)."""
