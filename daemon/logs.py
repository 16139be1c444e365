"""Logging to the journal with structured fields when systemd started us, to stderr otherwise."""

from __future__ import annotations

import logging
import os
import sys


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device and inode of the stream it connected stderr to."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        status = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


def setup_logging(debug: bool) -> None:
    handler: logging.Handler
    if stderr_is_journal():
        from systemd.journal import JournalHandler

        # Fields given as `extra={"JOB_ID": 7}` become journal fields: `journalctl JOB_ID=7`.
        handler = JournalHandler(SYSLOG_IDENTIFIER="rastosd")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("rastosd: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True)
