"""The benchmarks' console timer: it must end on a console that stays silent or a process that
exits, not block in a read for ever (mkosi's image printed nothing on ttyS0 before it was given a
console, and the first timer hung on it)."""

from __future__ import annotations

import time

import pytest

from bench.serial import seconds_until


def test_the_time_to_a_marker_split_between_two_writes() -> None:
    seconds = seconds_until(["sh", "-c", "printf 'lo'; sleep 0.3; printf 'gin: '; exec sleep 30"], b"login: ", 20)
    assert 0.3 <= seconds < 20


def test_a_marker_after_more_output_than_the_kept_tail_is_still_seen() -> None:
    seconds = seconds_until(["sh", "-c", "head -c 200000 /dev/zero; printf 'BdsDxe'; exec sleep 30"], b"BdsDxe", 20)
    assert seconds < 20


def test_a_silent_console_ends_in_an_error_at_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no b'login: ' after 1 s"):
        seconds_until(["sh", "-c", "printf 'EFI stub: Loaded initrd'; exec sleep 30"], b"login: ", 1)
    assert time.monotonic() - started < 10


def test_a_process_that_ends_without_the_marker_is_an_error_with_its_last_output() -> None:
    with pytest.raises(RuntimeError, match="the last words"):
        seconds_until(["sh", "-c", "printf 'the last words'"], b"login: ", 20)


def test_what_the_process_says_on_stderr_is_in_the_error() -> None:
    with pytest.raises(RuntimeError, match=r"exited \(1\)(.|\n)*unsupported machine type"):
        seconds_until(["sh", "-c", "echo 'unsupported machine type' >&2; exit 1"], b"login: ", 20)
