"""The state one build carries from stage to stage."""

from __future__ import annotations

import datetime
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imagebuilder.profile import Profile
from rastos.bundle import Bundle, SigningKey

# The project checkout the builder runs from: the daemon, units and guest files come from here.


@dataclass(frozen=True)
class DiskIds:
    """Identifiers chosen before any file system exists, so fstab and boot entries can name them."""

    disk_guid: str
    esp_partuuid: str
    root_partuuid: str
    esp_volume_id: str  # vfat serial, as 8 hex digits; shown as XXXX-XXXX
    root_fs_uuid: str

    @classmethod
    def new(cls) -> DiskIds:
        return cls(
            disk_guid=str(uuid.uuid4()),
            esp_partuuid=str(uuid.uuid4()),
            root_partuuid=str(uuid.uuid4()),
            esp_volume_id=secrets.token_hex(4).upper(),
            root_fs_uuid=str(uuid.uuid4()),
        )

    @property
    def esp_fs_uuid(self) -> str:
        """The ESP's UUID as blkid and /dev/disk/by-uuid spell it."""
        return f"{self.esp_volume_id[:4]}-{self.esp_volume_id[4:]}"


@dataclass(frozen=True)
class KernelInfo:
    version: str
    vmlinuz: Path  # inside the root file system
    initrd: Path | None  # the distribution's; None where rastOS's own initrd is the only one (Arch)


@dataclass
class BuildContext:
    profile: Profile
    cache_dir: Path
    work_dir: Path  # scratch space, removed when the build ends
    staging_dir: Path  # outputs are written here and moved into output_dir only when complete
    output_dir: Path
    image_name: str
    refresh_bootstrap: bool = False
    btrfs_progs: tuple[int, ...] = (0,)
    # Fill the root file system by mounting it, as hosts with btrfs-progs < 6.7 must (a test seam).
    loop_fallback: bool = False
    ids: DiskIds = field(default_factory=DiskIds.new)
    kernel: KernelInfo | None = None
    kernel_package: Path | None = None  # a kernel built from a kernel profile (stage kernel-build)
    cmdline: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    bootstrap_key: str = ""
    # A long stage's progress notes ("installing systemd (45/150)") for the live display.
    progress: Callable[[str], None] = field(default=lambda note: None)
    packages: list[dict[str, str]] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)
    version: str = "0"
    built_at: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))
    signing_key: SigningKey | None = None  # None only where no bundle is made (tests of single stages)
    parent: Bundle | None = None  # --delta-from: the full bundle of the version a delta starts from
    subvolume_uuid: str = ""  # this version's identity, known once its root subvolume exists
    bundles: dict[str, Path] = field(default_factory=dict)

    @property
    def fs_tree(self) -> Path:
        """The top level of the btrfs file system as mkfs.btrfs makes it: each subvolume but the root
        is a directory in it (the root is received from this version's stream, stage root)."""
        return self.work_dir / "btrfs"

    @property
    def rootfs(self) -> Path:
        return self.work_dir / "root"

    @property
    def subvolume_name(self) -> str:
        """The root subvolume's name, on the builder and in every host's @images/."""
        return f"{self.image_name}-{self.version}"

    @property
    def root_stream(self) -> Path:
        """`btrfs send` of the root subvolume, zstd-compressed: the full bundle's root.btrfs.zst."""
        return self.work_dir / "root.btrfs.zst"

    @property
    def delta_stream(self) -> Path:
        """The same sent with the parent version (`--delta-from`) as its parent: the delta's."""
        return self.work_dir / "delta.btrfs.zst"

    @property
    def esp_tree(self) -> Path:
        return self.work_dir / "esp"

    @property
    def esp_image(self) -> Path:
        return self.work_dir / "esp.vfat"

    @property
    def btrfs_image(self) -> Path:
        return self.work_dir / "root.btrfs"

    @property
    def initrd_image(self) -> Path:
        """The initrd the boot entry uses: ours for virtio images, else the distribution's."""
        return self.work_dir / "initrd"

    @property
    def raw_image(self) -> Path:
        return self.staging_dir / f"{self.image_name}.raw"

    @property
    def entry_id(self) -> str:
        """Boot Loader Specification entry name of the image's first deployment."""
        return "rastos-0"

    @property
    def entry_token(self) -> str:
        return "rastos"
