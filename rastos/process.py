"""The single place that starts external processes.

Every command is an argv list (never a shell string), is logged as `+ cmd` at debug level, has its
output streamed into the log as it runs, and turns a failure into one `CommandError` that carries the
tail of the output. A missing program becomes an error naming the Debian package that provides it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from rastos.errors import CommandError, RastosError

log = logging.getLogger("rastos.run")

# Which Debian package provides each program we run, so a missing one can be named.
PACKAGE_OF_PROGRAM: dict[str, str] = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.btrfs": "btrfs-progs",
    "btrfs": "btrfs-progs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mdir": "mtools",
    "mtype": "mtools",
    "sfdisk": "fdisk",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "bwrap": "bubblewrap",
    "unshare": "util-linux",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "dpkg-query": "dpkg",
    "dbus-daemon": "dbus",
    "busctl": "systemd",
    "make": "make",
    "dpkg-deb": "dpkg",
    "xz": "xz-utils",
    "zstd": "zstd",
    "rsync": "rsync",
    "pg_dump": "postgresql-client",
    "pg_restore": "postgresql-client",
    "psql": "postgresql-client",
}

TAIL_LINES = 25

Argv = Sequence[str | os.PathLike[str]]


def missing_program_error(program: str) -> RastosError:
    package = PACKAGE_OF_PROGRAM.get(program)
    hint = (
        f"install the Debian package '{package}' (or run ./setup-host)"
        if package
        else "install it, or run ./setup-host"
    )
    return RastosError(f"required program '{program}' was not found", hint=hint)


@contextlib.contextmanager
def _program_lookup(program: str) -> Iterator[None]:
    """Turn "no such program" into an error that names the package to install."""
    try:
        yield
    except FileNotFoundError as e:
        if e.filename == program:
            raise missing_program_error(program) from None
        raise


def run(
    argv: Argv,
    *,
    check: bool = True,
    capture: bool = False,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion.

    With `capture`, stdout is returned in `.stdout` and stderr goes to the log; otherwise stdout and
    stderr are merged and streamed into the log line by line (so a long command's progress is in the
    build log while it runs, and its last lines are in the error if it fails); `on_line` sees each
    line as it comes (a progress display).
    """
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    full_env = None if env is None else {**os.environ, **env}
    with _program_lookup(args[0]):
        if capture:
            return _run_captured(args, check=check, input=input, env=full_env, cwd=cwd)
        return _run_streamed(args, check=check, input=input, env=full_env, cwd=cwd, on_line=on_line)


def _run_captured(
    args: list[str],
    *,
    check: bool,
    input: str | None,
    env: Mapping[str, str] | None,
    cwd: Path | None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, input=input, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    for line in result.stderr.splitlines():
        log.debug("  %s", line)
    if check and result.returncode != 0:
        tail = "\n".join(result.stderr.splitlines()[-TAIL_LINES:])
        raise CommandError(args, result.returncode, tail)
    return result


def _run_streamed(
    args: list[str],
    *,
    check: bool,
    input: str | None,
    env: Mapping[str, str] | None,
    cwd: Path | None,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    with subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env,
        cwd=cwd,
    ) as proc:
        if input is not None:
            assert proc.stdin is not None
            proc.stdin.write(input)
            proc.stdin.close()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                log.debug("  %s", line)
                if on_line is not None:
                    on_line(line)
            returncode = proc.wait()
        except BaseException:
            # Ctrl-C or an error in this process: the child must not outlive us, since it may hold
            # mounts or half-written files that our cleanup is about to remove.
            _stop(proc)
            raise
    if check and returncode != 0:
        raise CommandError(args, returncode, "\n".join(tail))
    return subprocess.CompletedProcess(args, returncode, "", "")


def run_pipeline(commands: Sequence[Argv], *, stdin: Path | None = None, stdout: Path | None = None) -> None:
    """Run `a | b | c` without a shell, for streams too large to hold in memory (`btrfs send | zstd`).

    The first command reads the file `stdin` (or nothing); the last writes the new file `stdout`, or,
    without one, into the log like every command's stderr. A failure raises CommandError for the
    command that failed of itself, not for one that only lost its reader (SIGPIPE, a broken pipe)
    because a later command had failed.
    """
    argvs = [[os.fspath(a) for a in argv] for argv in commands]
    shown = " | ".join(map(shlex.join, argvs))
    log.debug("+ %s%s%s", shown, f" < {stdin}" if stdin else "", f" > {stdout}" if stdout else "")
    with contextlib.ExitStack() as files:
        source = files.enter_context(stdin.open("rb")) if stdin else None
        sink = files.enter_context(stdout.open("xb")) if stdout else None
        outputs = [files.enter_context(tempfile.TemporaryFile()) for _ in argvs]
        codes = _run_connected(argvs, source, sink, outputs)
        tails = []
        for args, output in zip(argvs, outputs, strict=True):
            output.seek(0)
            lines = output.read().decode(errors="replace").splitlines()
            for line in lines:
                log.debug("  %s: %s", Path(args[0]).name, line)
            tails.append(lines[-TAIL_LINES:])
    failed = [i for i, code in enumerate(codes) if code != 0]
    if not failed:
        return
    of_itself = [i for i in failed if codes[i] != -signal.SIGPIPE and not any("Broken pipe" in t for t in tails[i])]
    first = (of_itself or failed)[0]
    raise CommandError(argvs[first], codes[first], "\n".join(tails[first]))


def _run_connected(argvs: list[list[str]], source: IO[bytes] | None, sink: IO[bytes] | None,
                   outputs: Sequence[IO[bytes]]) -> list[int]:  # fmt: skip
    """Start the commands with each one's stdout the next one's stdin; their exit statuses."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        previous: IO[bytes] | int | None = source if source is not None else subprocess.DEVNULL
        for index, args in enumerate(argvs):
            last = index == len(argvs) - 1
            out: IO[bytes] | int = (sink or outputs[index]) if last else subprocess.PIPE
            with _program_lookup(args[0]):
                proc = subprocess.Popen(args, stdin=previous, stdout=out, stderr=outputs[index])
            if index:
                # Only the next command may hold the read end: when it dies, the writer must see
                # its reader gone (SIGPIPE) instead of blocking on a full pipe for ever.
                assert isinstance(previous, io.BufferedReader)
                previous.close()
            previous = proc.stdout
            procs.append(proc)
        return [proc.wait() for proc in procs]
    except BaseException:
        for proc in procs:
            _stop(proc)
        raise


def _stop(proc: subprocess.Popen[Any]) -> None:
    # Every process below it as well, as systemd stops a unit: `unshare --fork` ignores SIGTERM while
    # it waits for its command, and the first process of a PID namespace ignores every signal it has
    # no handler for (Python has none for SIGTERM); what they wait for must be told itself, or the
    # stop waits out the whole grace period below.
    for pid in _descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def run_foreground(argv: Argv) -> int:
    """Run an interactive command attached to this terminal; returns its exit status.

    A SIGTERM or SIGHUP (the terminal closed, a supervisor stopping us) is passed on to the command as
    SIGTERM and its end awaited: it can put the terminal back, and the caller's cleanup (a VM's scratch
    directory) still runs, where dying at once would leave both behind."""
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    with _program_lookup(args[0]), subprocess.Popen(args) as child:

        def pass_on(signum: int, frame: object) -> None:
            del signum, frame
            child.send_signal(signal.SIGTERM)

        previous = {signum: signal.signal(signum, pass_on) for signum in (signal.SIGTERM, signal.SIGHUP)}
        try:
            return child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def start(argv: Argv, **popen: object) -> subprocess.Popen[bytes]:
    """Start a long-running command (a VM, a probe) that the caller supervises."""
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s &", shlex.join(args))
    with _program_lookup(args[0]):
        return subprocess.Popen(args, **popen)  # type: ignore[call-overload,no-any-return]
