"""The virtio initrd: module load order from modules.dep, and the newc cpio the kernel unpacks."""

from __future__ import annotations

import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from imagebuilder.stages.initrd import (
    CpioWriter,
    KernelModules,
    decompressed,
    inside,
    is_dynamic,
    module_name,
    parse_ldd,
    shared_libraries,
)
from rastos.errors import RastosError


def read_newc(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """An independent reader: name -> (mode, data)."""
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        assert archive[offset : offset + 6] == b"070701"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = archive[name_start : name_start + name_size - 1].decode()
        data_start = name_start + name_size + (-(110 + name_size) % 4)
        data = archive[data_start : data_start + size]
        offset = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data)


def fake_modules(tmp_path: Path) -> KernelModules:
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/btrfs/btrfs.ko.xz: kernel/crypto/xor.ko.xz kernel/lib/raid6/raid6_pq.ko.xz "
        "kernel/lib/libcrc32c.ko.xz\n"
        "kernel/crypto/xor.ko.xz:\n"
        "kernel/lib/raid6/raid6_pq.ko.xz:\n"
        "kernel/lib/libcrc32c.ko.xz:\n"
        "kernel/drivers/block/virtio_blk.ko.xz:\n"
        "kernel/arch/x86/crypto/crc32c-intel.ko.xz:\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    return KernelModules.read(tmp_path)


def test_dependencies_load_first_and_builtins_are_skipped(tmp_path: Path) -> None:
    modules = fake_modules(tmp_path)
    order = modules.load_order(("virtio_pci", "virtio_blk", "btrfs"))
    assert [module_name(p) for p in order] == ["virtio_blk", "xor", "raid6_pq", "libcrc32c", "btrfs"]
    assert modules.path_of("crc32c_intel") == "kernel/arch/x86/crypto/crc32c-intel.ko.xz"


def test_a_missing_module_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RastosError, match="kernel module nosuch is neither"):
        fake_modules(tmp_path).load_order(("nosuch",))


def test_modules_are_decompressed(tmp_path: Path) -> None:
    module = tmp_path / "m.ko.xz"
    module.write_bytes(lzma.compress(b"\x7fELF module"))
    assert decompressed(module) == b"\x7fELF module"


def test_arch_s_zstd_modules_are_decompressed(tmp_path: Path) -> None:
    plain = tmp_path / "m.ko"
    plain.write_bytes(b"\x7fELF module" * 100)
    subprocess.run(["zstd", "--quiet", "--rm", str(plain)], check=True)
    assert decompressed(tmp_path / "m.ko.zst") == b"\x7fELF module" * 100


def test_a_dynamic_busybox_brings_its_loader_and_libraries() -> None:
    assert not is_dynamic(Path("/bin/busybox")), "Debian's busybox-static (./setup-host)"
    assert is_dynamic(Path("/usr/bin/ls"))
    with pytest.raises(RastosError, match="not a 64-bit ELF"):
        is_dynamic(Path("/etc/os-release"))
    # The root's own ldd, run in it (here the host's root): the loader and libc, as absolute paths.
    libraries = shared_libraries(Path("/"), "/usr/bin/ls")
    assert any(Path(p).name.startswith("ld-linux") for p in libraries), libraries
    assert any(Path(p).name == "libc.so.6" for p in libraries), libraries


def test_ldd_s_lines_give_the_loader_where_the_kernel_looks_and_where_it_is() -> None:
    arch = (
        "\tlinux-vdso.so.1 (0x00007ffd1b7f2000)\n"
        "\tlibc.so.6 => /usr/lib/libc.so.6 (0x00007f0e2a000000)\n"
        "\t/lib64/ld-linux-x86-64.so.2 => /usr/lib64/ld-linux-x86-64.so.2 (0x00007f0e2a2f1000)\n"
    )
    assert parse_ldd(arch) == ["/usr/lib/libc.so.6", "/lib64/ld-linux-x86-64.so.2", "/usr/lib64/ld-linux-x86-64.so.2"]


def test_paths_resolve_inside_the_image_even_through_absolute_links(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/ld.so").write_bytes(b"loader")
    (tmp_path / "lib64").symlink_to("/usr/lib")  # absolute: on the host it would leave the image
    (tmp_path / "usr/lib/libc.so.6").symlink_to("../lib/libc-2.so")
    (tmp_path / "usr/lib/libc-2.so").write_bytes(b"libc")
    assert inside(tmp_path, "/lib64/ld.so") == tmp_path / "usr/lib/ld.so"
    assert inside(tmp_path, "/lib64/libc.so.6").read_bytes() == b"libc"
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(RastosError, match="too many levels"):
        inside(tmp_path, "/loop/x")


def test_cpio_holds_files_links_and_directories() -> None:
    cpio = CpioWriter()
    cpio.directory("bin")
    cpio.file("bin/busybox", b"binary!", 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    archive = cpio.finish()
    assert len(archive) % 4 == 0
    entries = read_newc(archive)
    assert entries["bin"][0] == 0o040755
    assert entries["bin/busybox"] == (0o100755, b"binary!")
    assert entries["bin/sh"] == (0o120777, b"busybox")
    assert entries["init"] == (0o100755, b"#!/bin/sh\n")
    assert CpioWriter().finish() == CpioWriter().finish()  # no timestamps: reproducible


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    cpio = CpioWriter()
    cpio.directory("etc")
    cpio.file("etc/hello", b"world\n")
    (tmp_path / "a.cpio").write_bytes(cpio.finish())
    listing = subprocess.run(
        ["cpio", "-it", "-F", str(tmp_path / "a.cpio")], capture_output=True, text=True, check=True
    )
    assert listing.stdout.split() == ["etc", "etc/hello"]
