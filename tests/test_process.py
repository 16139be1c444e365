"""The one process boundary: commands are logged, failures carry their output, and a missing program
names the Debian package that provides it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from imagebuilder.host import BUILD_PROGRAMS, require_programs
from rastos.errors import CommandError, RastosError
from rastos.process import run, run_pipeline


def test_output_is_logged_and_captured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="rastos.run")
    result = run(["printf", "%s\\n", "hello"], capture=True)
    assert result.stdout == "hello\n"
    assert "+ printf '%s\\n' hello" in caplog.text


def test_failure_carries_the_tail_of_the_output() -> None:
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "for i in $(seq 1 40); do echo line$i; done; exit 3"])
    error = info.value
    assert error.returncode == 3
    assert "line40" in str(error) and "line1\n" not in error.output_tail
    assert "exit status 3" in str(error)


def test_input_reaches_the_command() -> None:
    assert run(["cat"], input="data", capture=True).stdout == "data"


def test_missing_program_names_its_package() -> None:
    with pytest.raises(RastosError) as info:
        run(["mkfs.btrfs", "--version"], env={"PATH": "/nonexistent"})
    assert "'mkfs.btrfs' was not found" in str(info.value)
    assert "btrfs-progs" in str(info.value.hint)


def test_host_check_names_the_package_of_a_missing_tool(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RastosError) as info:
        require_programs(BUILD_PROGRAMS)
    assert "'mmdebstrap' was not found" in str(info.value)
    assert "install the Debian package 'mmdebstrap'" in str(info.value)


def test_a_pipeline_streams_from_file_to_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="rastos.run")
    source, target = tmp_path / "in", tmp_path / "out"
    source.write_bytes(b"b\na\nb\n" * 1000)
    run_pipeline([["sort"], ["uniq", "-c"], ["sh", "-c", "cat; echo said >&2"]], stdin=source, stdout=target)
    assert target.read_text().split() == ["1000", "a", "2000", "b"]
    assert "+ sort | uniq -c | sh -c 'cat; echo said >&2'" in caplog.text
    assert "sh: said" in caplog.text


def test_a_pipeline_blames_the_command_that_failed_not_the_writer_it_left(tmp_path: Path) -> None:
    """`yes` dies of SIGPIPE when its reader fails; the reader's failure is the one reported."""
    with pytest.raises(CommandError) as info:
        run_pipeline([["yes"], ["sh", "-c", "head -c 10 >/dev/null; echo cannot find parent >&2; exit 4"]])
    assert info.value.argv[0] == "sh" and info.value.returncode == 4
    assert "cannot find parent" in info.value.output_tail
    with pytest.raises(CommandError) as info:
        run_pipeline([["sh", "-c", "echo corrupt >&2; exit 3"], ["cat"]], stdout=tmp_path / "out")
    assert info.value.argv[0] == "sh" and "corrupt" in info.value.output_tail
    with pytest.raises(RastosError, match="'no-such-program' was not found"):
        run_pipeline([["yes"], ["no-such-program"]])
