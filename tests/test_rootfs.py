"""ops/rootfs.py on a real directory tree: what it refuses, what it follows, and that no op
module reaches a file any other way."""

from __future__ import annotations

import ast
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.errors import UnsafePath
from ops.rootfs import MAX_READ, Links, Root

CHECKOUT = Path(__file__).resolve().parents[1]
NOBODY = 65534


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "home/alice").mkdir(parents=True)
    os.chown(root / "home/alice", NOBODY, NOBODY)
    (root / "etc/hostname").write_text("web-1\n")
    (root / "secret").write_text("root only\n")
    (root / "secret").chmod(0o600)
    return root


def link(place: Path, points_to: str, uid: int = NOBODY) -> None:
    place.symlink_to(points_to)
    os.lchown(place, uid, uid)


def test_reads_and_writes_plain_files(tmp_path: Path) -> None:
    root = Root(tree(tmp_path))
    assert root.read_text("/etc/hostname") == "web-1\n"
    assert root.read_text("/etc/missing") is None
    assert root.read_text("/nowhere/missing") is None
    root.write("/etc/new/deeper/file", "x\n", 0o640, NOBODY, NOBODY)
    made = root.root / "etc/new/deeper/file"
    status = made.stat()
    assert made.read_text() == "x\n" and status.st_mode & 0o7777 == 0o640 and status.st_uid == NOBODY
    assert (root.root / "etc/new").stat().st_mode & 0o7777 == 0o755, "parents made root's, 0755"
    assert sorted(p.name for p in (root.root / "etc/new/deeper").iterdir()) == ["file"], "no temporary left"
    assert root.remove("/etc/new/deeper/file") and not root.remove("/etc/new/deeper/file")


@pytest.mark.parametrize("where", ["/home/alice/.ssh", "/home/alice", "/home"])
def test_a_link_on_the_way_is_refused_for_reads_and_writes(tmp_path: Path, where: str) -> None:
    base = tree(tmp_path)
    place = base / where.lstrip("/")
    if place.exists():
        place.rename(place.with_name(place.name + ".moved"))
    else:
        place.parent.mkdir(parents=True, exist_ok=True)
    link(place, str(base / "elsewhere"))
    (base / "elsewhere").mkdir()
    root = Root(base)
    path = "/home/alice/.ssh/authorized_keys"
    for attempt in (
        lambda: root.read_text(path),
        lambda: root.write(path, "key\n", 0o600),
        lambda: root.remove(path),
        lambda: root.make_directory("/home/alice/.ssh", 0o700),
        lambda: root.kind(path),
    ):
        with pytest.raises(UnsafePath, match="symbolic link"):
            attempt()
    assert list((base / "elsewhere").iterdir()) == []


def test_a_link_in_place_of_the_file_is_refused_for_reads_and_replaced_by_writes(tmp_path: Path) -> None:
    base = tree(tmp_path)
    link(base / "home/alice/keys", "../../secret")
    root = Root(base)
    with pytest.raises(UnsafePath, match="/home/alice/keys: is a symbolic link"):
        root.read_text("/home/alice/keys")
    with pytest.raises(UnsafePath):
        root.remove("/home/alice/keys")
    root.write("/home/alice/keys", "mine\n", 0o600)  # the link itself is replaced, not written through
    assert (base / "secret").read_text() == "root only\n"
    assert not (base / "home/alice/keys").is_symlink()


def test_reads_take_regular_files_only_and_bounded(tmp_path: Path) -> None:
    base = tree(tmp_path)
    os.mkfifo(base / "home/alice/fifo")  # would block an open without O_NONBLOCK
    (base / "home/alice/huge").write_bytes(b"x" * (MAX_READ + 1))
    os.link(base / "secret", base / "home/alice/hard")  # what protected_hardlinks stops a user from making
    root = Root(base)
    with pytest.raises(UnsafePath, match="not a regular file"):
        root.read_text("/home/alice/fifo")
    with pytest.raises(UnsafePath, match="larger than"):
        root.read_text("/home/alice/huge")
    with pytest.raises(UnsafePath, match="hard links in a directory root does not own"):
        root.read_text("/home/alice/hard")
    assert root.read_text("/secret") == "root only\n", "a hard link in root's own directory is root's business"


def test_system_links_are_root_links_resolved_inside_the_root(tmp_path: Path) -> None:
    base = tree(tmp_path)
    (base / "usr/lib/os-release").write_text("ID=debian\n")
    link(base / "etc/os-release", "../usr/lib/os-release", uid=0)
    link(base / "etc/absolute", "/usr/lib/os-release", uid=0)  # the root's path, never the host's
    link(base / "etc/climbing", "../../../../../../usr/lib/os-release", uid=0)  # clamped at the root
    link(base / "etc/users", "../usr/lib/os-release")
    root = Root(base)
    for name in ("os-release", "absolute", "climbing"):
        assert root.read_text(f"/etc/{name}", links=Links.SYSTEM) == "ID=debian\n"
        with pytest.raises(UnsafePath):
            root.read_text(f"/etc/{name}")  # not without asking
    with pytest.raises(UnsafePath, match="a symbolic link root did not make"):
        root.read_text("/etc/users", links=Links.SYSTEM)
    link(base / "etc/loop", "loop", uid=0)
    with pytest.raises(UnsafePath, match="too many levels"):
        root.read_text("/etc/loop", links=Links.SYSTEM)


@pytest.mark.parametrize("path", ["relative", "/etc/../secret", "/etc/./hostname", "/etc//hostname", "/"])
def test_paths_with_dots_or_no_file_are_refused(tmp_path: Path, path: str) -> None:
    with pytest.raises(UnsafePath):
        Root(tree(tmp_path)).read_text(path)


def test_a_link_swapped_in_while_reading_is_never_followed(tmp_path: Path) -> None:
    """A user swaps ~/.ssh between a directory and a link to root's directory as fast as they can;
    every read either sees their own file or is refused, never root's."""
    base = tree(tmp_path)
    home = base / "home/alice"
    (home / "real").mkdir()
    (home / "real/keys").write_text("alice's\n")
    (base / "rootdir").mkdir()
    (base / "rootdir/keys").write_text("root only\n")
    stop = threading.Event()

    def swap() -> None:
        ssh = home / ".ssh"
        while not stop.is_set():
            (home / "real").rename(ssh)  # a directory of alice's
            ssh.rename(home / "real")
            ssh.symlink_to("../../rootdir")  # a link to root's
            ssh.unlink()

    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    root = Root(base)
    seen: set[str | None] = set()
    # At least 2,000 reads, and on until both sides of the swap were met: on a busy machine the
    # swapping thread may get few turns among the first reads.
    reads = 0
    try:
        while reads < 2000 or ({"alice's\n", "refused"} - seen and reads < 100_000):
            reads += 1
            try:
                seen.add(root.read_text("/home/alice/.ssh/keys"))
            except UnsafePath:
                seen.add("refused")
    finally:
        stop.set()
        thread.join()
    assert "root only\n" not in seen
    assert "alice's\n" in seen and "refused" in seen, f"the swap was seen both ways: {seen}"


@settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=60))
def test_any_path_string_is_answered_inside_the_root(tmp_path: Path, path: str) -> None:
    """Whatever the string, a read answers with a file of the root, None, or a refusal: nothing
    outside the root, and never an unexpected exception."""
    base = tmp_path / "fuzz"
    if not base.exists():
        tree(tmp_path.joinpath("fuzz-parent")).rename(base)
    try:
        content = Root(base).read_text(path)
    except (UnsafePath, NotADirectoryError, IsADirectoryError, ValueError):
        return
    assert content in (None, "web-1\n", "root only\n")


def op_modules() -> list[Path]:
    return sorted((CHECKOUT / "ops").glob("*.py")) + sorted((CHECKOUT / "daemon/compliance").glob("*.py"))


FILE_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "open", "exists", "is_dir", "is_file",
                "is_symlink", "stat", "lstat", "glob", "iterdir", "unlink", "mkdir", "chmod", "readlink", "touch",
                "rename", "replace", "rmdir", "symlink_to"}  # fmt: skip


def test_no_op_reaches_a_target_file_but_through_rootfs() -> None:
    """`host_path()` is for handing a path to a program; a pathlib call on it would follow links."""
    offenders = []
    for module in op_modules():
        for node in ast.walk(ast.parse(module.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            inner = node.func.value
            while isinstance(inner, ast.Attribute | ast.Subscript | ast.BinOp):
                inner = inner.value if not isinstance(inner, ast.BinOp) else inner.left
            on_target_path = isinstance(inner, ast.Call) and getattr(inner.func, "attr", "") == "host_path"
            if on_target_path and node.func.attr in FILE_METHODS:
                offenders.append(f"{module.relative_to(CHECKOUT)}:{node.lineno}")
            in_target = any("host_path" in ast.unparse(keyword.value) for keyword in node.keywords)
            if node.func.attr in ("mkdtemp", "NamedTemporaryFile") and in_target:
                offenders.append(f"{module.relative_to(CHECKOUT)}:{node.lineno} (a temporary file by path)")
    assert offenders == []
