"""Stage `initrd`: a small initramfs of our own for profiles with `kernel.initramfs = "virtio"`.

Debian's initramfs-tools image runs udev, scripts and hooks for every kind of hardware: under
emulation that costs many seconds. This one holds busybox (from the image's busybox-static, or Arch's
busybox, with the libraries it links if it is not static), the modules a virtio disk with btrfs needs
(resolved through the image's modules.dep, decompressed so busybox's insmod can load them: Debian
compresses them with xz, Arch with zstd), and `imagebuilder/initrd/init`, which also mounts the
subvolumes that fstab names so that systemd does not wait for udev before mounting them. Written as a
newc cpio archive with fixed timestamps, so the same inputs give the same bytes.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imagebuilder.checkout import CHECKOUT
from imagebuilder.chroot import chroot_run
from imagebuilder.context import BuildContext
from imagebuilder.profile.model import InitramfsModules
from rastos.errors import RastosError
from rastos.process import run

INIT_SCRIPT = CHECKOUT / "imagebuilder" / "initrd" / "init"
BUSYBOX = "usr/bin/busybox"
APPLETS = (
    "sh", "mount", "insmod", "findfs", "switch_root", "sleep", "cat", "reboot", "echo", "[", "test", "mkdir", "nice",
)  # fmt: skip
# What the root needs, in the order given; dependencies are added before each. Also efivarfs:
# Debian builds it as a module, and systemd-bless-boot-generator decides whether a boot is counted by
# looking for LoaderBootCountPath in /sys/firmware/efi/efivars before anything had loaded it on
# demand: about one fresh boot in three went unblessed. Loaded here, systemd mounts it at once.
# overlay: read-only snapshot boots (`rastos.overlay`, see the init script).
REQUIRED_MODULES = ("virtio_blk", "btrfs", "efivarfs", "overlay")
# crc32c must be available before btrfs asks the crypto API for it: there is no modprobe to load
# it on demand. The accelerated one only loads on CPUs with SSE 4.2.
# i6300esb: QEMU's watchdog, there before systemd starts, so systemd arms it at once.
# autofs4: systemd loads it at its start (the ESP is an automount) before anything else can run, from
# Debian's xz-compressed file; from here it is already plain, and under emulation that is faster.
OPTIONAL_MODULES = ("crc32c_intel", "i6300esb", "autofs4")
FIRST_MODULES = ("crc32c_generic",)


@dataclass(frozen=True)
class KernelModules:
    directory: Path
    dependencies: dict[str, list[str]]  # relative path -> relative paths it needs
    builtin: set[str]  # module names compiled into the kernel

    @classmethod
    def read(cls, directory: Path) -> KernelModules:
        dependencies = {}
        for line in (directory / "modules.dep").read_text().splitlines():
            path, _, needs = line.partition(":")
            dependencies[path] = needs.split()
        builtin = {module_name(p) for p in (directory / "modules.builtin").read_text().split()}
        return cls(directory, dependencies, builtin)

    def path_of(self, name: str) -> str | None:
        wanted = name.replace("-", "_")
        return next((p for p in self.dependencies if module_name(p) == wanted), None)

    def load_order(self, names: tuple[str, ...]) -> list[str]:
        """Module files for `names` with their dependencies, each after what it needs."""
        order: list[str] = []

        def visit(path: str) -> None:
            if path in order:
                return
            for dependency in self.dependencies.get(path, []):
                visit(dependency)
            order.append(path)

        for name in names:
            path = self.path_of(name)
            if path is None:
                if name.replace("-", "_") in self.builtin:
                    continue
                raise RastosError(f"kernel module {name} is neither in modules.dep nor built in ({self.directory})")
            visit(path)
        return order


def module_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".xz", ".gz", ".zst"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def decompressed(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        # Python 3.11 has no zstd; the zstd program is on every build host (./setup-host).
        with tempfile.TemporaryDirectory(prefix="rastos-module-") as scratch:
            plain = Path(scratch) / path.stem
            run(["zstd", "--decompress", "--quiet", "--force", path, "-o", plain])
            return plain.read_bytes()
    return data


PT_INTERP = 3  # the program header of a dynamically linked executable that names its loader


def is_dynamic(executable: Path) -> bool:
    """Whether an x86-64 ELF executable needs a dynamic loader (and so its libraries in the initrd)."""
    with executable.open("rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            raise RastosError(f"{executable} is not a 64-bit ELF executable")
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == PT_INTERP for i in range(phnum))


def shared_libraries(root: Path, executable: str) -> list[str]:
    """The loader and libraries `executable` (a path inside `root`) links, as the image's own ldd
    resolves them: absolute paths inside `root`."""
    return parse_ldd(chroot_run(root, ["ldd", executable], capture=True).stdout)


def parse_ldd(out: str) -> list[str]:
    """Every absolute path in ldd's lines, both sides of `=>`: the loader as the executable names it
    (`/lib64/ld-linux-x86-64.so.2`, where the kernel looks) and where it really is (`/usr/lib64/...`)."""
    found: list[str] = []
    for line in out.splitlines():
        head = line.split("(0x")[0].replace("=>", " ")
        found += [word for word in head.split() if word.startswith("/") and word not in found]
    return found


def inside(root: Path, path: str) -> Path:
    """`path` resolved as the image sees it: symbolic links, absolute ones too, stay inside `root`."""
    parts, resolved, hops = list(PurePosixPath(path).parts[1:]), PurePosixPath("/"), 0
    while parts:
        part = parts.pop(0)
        candidate = resolved / part
        host = root / str(candidate).lstrip("/")
        if host.is_symlink():
            hops += 1
            if hops > 40:
                raise RastosError(f"{path} in the image: too many levels of symbolic links")
            target = PurePosixPath(host.readlink())
            parts = list(target.parts[1:] if target.is_absolute() else target.parts) + parts
            resolved = PurePosixPath("/") if target.is_absolute() else resolved
        elif part == "..":
            resolved = resolved.parent
        else:
            resolved = candidate
    return root / str(resolved).lstrip("/")


class CpioWriter:
    """The newc format the kernel unpacks: a header per entry, then its name and data, 4-byte aligned."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = [self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(f"{value:08X}".encode() for value in fields)
        self.chunks += [header, encoded, b"\0" * (-(len(header) + len(encoded)) % 4), data, b"\0" * (-len(data) % 4)]
        self.inode += 1

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def parents(self, name: str, made: set[str]) -> None:
        """Directory entries for each parent of `name` not made yet."""
        for parent in reversed(PurePosixPath(name).parents[:-1]):
            if str(parent) not in made:
                made.add(str(parent))
                self.directory(str(parent))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.chunks)


def build_initrd_archive(rootfs: Path, kernel_version: str) -> bytes:
    modules = KernelModules.read(rootfs / "usr/lib/modules" / kernel_version)
    busybox = rootfs / BUSYBOX
    if not busybox.is_file():
        raise RastosError("the image has no busybox for its initrd", hint="the bootstrap adds busybox-static")
    cpio = CpioWriter()
    made = {"bin", "dev", "proc", "sys", "root", "overlay", "lib", "lib/modules"}
    for directory in sorted(made):
        cpio.directory(directory)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    if is_dynamic(busybox):
        for library in shared_libraries(rootfs, "/" + BUSYBOX):
            name = library.lstrip("/")
            if name.startswith("lib/") and name.count("/") == 1:
                name = "usr/" + name  # "lib" is a directory here, where the image has usr/lib
            cpio.parents(name, made)
            cpio.file(name, inside(rootfs, library).read_bytes(), 0o755)
    for applet in APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)

    required = modules.load_order(FIRST_MODULES + REQUIRED_MODULES)
    # A kernel built from a profile may not have them at all (minimal-vm has no crc32c_intel).
    present = tuple(name for name in OPTIONAL_MODULES if modules.path_of(name) is not None)
    optional = [p for p in modules.load_order(present) if p not in required]
    lines = []
    for path in optional + required:
        name = f"{module_name(path)}.ko"
        cpio.file(f"lib/modules/{name}", decompressed(modules.directory / path))
        lines.append(("?" if path in optional else "") + name)
    cpio.file("lib/modules/load-order", "".join(line + "\n" for line in lines).encode())
    return cpio.finish()


def build_initrd(ctx: BuildContext) -> str:
    assert ctx.kernel is not None
    if ctx.profile.kernel.initramfs is not InitramfsModules.virtio:
        if ctx.kernel.initrd is None:
            raise RastosError(
                f"kernel {ctx.kernel.version} has no initramfs of the distribution's in the image",
                hint='kernel.initramfs = "virtio" builds rastOS\'s own',
            )
        shutil.copyfile(ctx.kernel.initrd, ctx.initrd_image)
        return f"the distribution's, {ctx.initrd_image.stat().st_size // 1024} KiB"
    archive = build_initrd_archive(ctx.rootfs, ctx.kernel.version)
    ctx.initrd_image.write_bytes(archive)
    return f"rastos virtio initrd, {len(archive) // 1024} KiB"
