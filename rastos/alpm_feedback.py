"""libalpm's callbacks (log lines, events, progress, downloads) turned into the notes a build shows:
one per package and phase, never one per percent; libalpm's last errors kept for the message of a
failed transaction."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("rastos.alpm")

Progress = Callable[[str], None]

LOG_ERROR, LOG_WARNING = 1, 2  # libalpm's log levels worth keeping (debug and function tracing are not)
DOWNLOAD_INIT, DOWNLOAD_RETRY = 0, 2  # alpm_download_event_type_t

# pyalpm's names for libalpm's events (its own fixed strings) -> what the notes call that phase.
PHASES = {
    "Resolving dependencies": "resolving dependencies",
    "Checking dependencies": "checking dependencies",
    "Checking keys in keyring": "checking keys",
    "Checking integrity": "checking package integrity",
    "Checking file conflicts": "checking file conflicts",
    "Checking disk space": "checking disk space",
    "Adding a package": "installing",
    "Upgrading a package": "upgrading",
    "Reinstalling a package": "reinstalling",
    "Downgrading a package": "downgrading",
    "Removing a package": "removing",
}


class Feedback:
    """libalpm's callbacks as notes: one per package and phase, never one per percent."""

    def __init__(self, progress: Progress | None, root: Path) -> None:
        self.progress = progress
        self.root = str(root).rstrip("/")
        self.phase = ""
        self.last = ""
        self.errors: collections.deque[str] = collections.deque(maxlen=8)

    def attach(self, handle: Any) -> None:
        self.phase, self.last = "", ""
        self.errors.clear()
        handle.logcb = self._guarded(self.on_log)
        handle.eventcb = self._guarded(self.on_event)
        handle.progresscb = self._guarded(self.on_progress)
        handle.dlcb = self._guarded(self.on_download)

    @staticmethod
    def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
        # An exception in a callback would be printed by pyalpm and lost; log it instead.
        def call(*args: Any) -> None:
            try:
                callback(*args)
            except Exception:
                log.exception("libalpm callback failed")

        return call

    def say(self, note: str) -> None:
        if note != self.last:
            self.last = note
            log.debug("%s", note)
            if self.progress is not None:
                self.progress(note)

    def on_log(self, level: int, message: str) -> None:
        text = message.strip().replace(self.root + "/", "/")
        if level == LOG_ERROR:
            self.errors.append(text)
            log.error("libalpm: %s", text)
        elif level == LOG_WARNING:
            log.warning("libalpm: %s", text)

    def on_event(self, event: int, text: str) -> None:
        if text in PHASES:
            self.phase = PHASES[text]

    def on_progress(self, target: str, percent: int, count: int, current: int) -> None:
        if self.phase:
            self.say(f"{self.phase} {target} ({current}/{count})" if target else f"{self.phase} ({current}/{count})")

    def on_download(self, filename: str, event: int, _data: int) -> None:
        # pyalpm hands libalpm 13+'s download events over in the shape of the old (file, sent, total)
        # callback: the second value is the event type, the third is meaningless.
        if event == DOWNLOAD_INIT:
            self.say(f"downloading {filename}")
        elif event == DOWNLOAD_RETRY:
            log.warning("libalpm: retrying the download of %s", filename)
