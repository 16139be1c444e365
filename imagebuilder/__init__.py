"""rastos-image: turns a TOML profile into a bootable btrfs disk image."""
