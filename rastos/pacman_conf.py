"""pacman.conf: read from a root into libalpm options, and written into the Arch images rastOS builds.

Only what libalpm needs is read: the architecture, the signature levels, the paths, IgnorePkg,
NoUpgrade, NoExtract, and each repository's servers (from `Server` lines and the files `Include`
names, read inside the same root). pacman's own settings (Color, ParallelDownloads, ...) are left to
pacman. `$repo` and `$arch` in a server URL are replaced as pacman replaces them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rastos.alpm import (
    SIG_DATABASE,
    SIG_DATABASE_OPTIONAL,
    SIG_PACKAGE,
    SIG_PACKAGE_MARGINAL_OK,
    SIG_PACKAGE_OPTIONAL,
    SIG_PACKAGE_UNKNOWN_OK,
    AlpmOptions,
    Repository,
)
from rastos.errors import RastosError

CONF = "/etc/pacman.conf"
MIRRORLIST = "/etc/pacman.d/mirrorlist"
# pacman's compiled-in default, used where pacman.conf names no SigLevel.
DEFAULT_SIGLEVEL = SIG_PACKAGE | SIG_PACKAGE_OPTIONAL | SIG_DATABASE | SIG_DATABASE_OPTIONAL
ARCHITECTURES = {"amd64": "x86_64", "arm64": "aarch64"}  # Debian's names -> Arch's

# One SigLevel word: what it sets and clears, for packages (first) and databases (second).
_SIG_WORDS = {
    "Never": (0, SIG_PACKAGE | SIG_PACKAGE_OPTIONAL),
    "Optional": (SIG_PACKAGE | SIG_PACKAGE_OPTIONAL, 0),
    "Required": (SIG_PACKAGE, SIG_PACKAGE_OPTIONAL),
    "TrustedOnly": (0, SIG_PACKAGE_MARGINAL_OK | SIG_PACKAGE_UNKNOWN_OK),
    "TrustAll": (SIG_PACKAGE_MARGINAL_OK | SIG_PACKAGE_UNKNOWN_OK, 0),
}
_DATABASE_SHIFT = SIG_DATABASE.bit_length() - SIG_PACKAGE.bit_length()  # database bits = package bits << 10


class PacmanConfError(RastosError):
    """pacman.conf cannot be understood; the message names the file and line."""


def parse_siglevel(words: list[str], base: int, where: str = "SigLevel") -> int:
    """A SigLevel value (`Required DatabaseOptional`, `PackageTrustAll`, ...) applied to `base`."""
    level = base
    for word in words:
        scope = next((prefix for prefix in ("Package", "Database") if word.startswith(prefix)), None)
        name = word.removeprefix(scope or "")
        if name not in _SIG_WORDS:
            raise PacmanConfError(f"{where}: unknown SigLevel word {word!r}")
        setting, clearing = _SIG_WORDS[name]
        shifts = {"Package": (0,), "Database": (_DATABASE_SHIFT,), None: (0, _DATABASE_SHIFT)}[scope]
        for shift in shifts:
            level = (level & ~(clearing << shift)) | (setting << shift)
    return level


@dataclass
class _Section:
    name: str
    servers: list[str] = field(default_factory=list)
    siglevel: list[str] | None = None


@dataclass
class _Reader:
    """pacman.conf and the files it includes, read in order: an included file continues the section
    that included it, as in pacman."""

    root: Path
    options: dict[str, list[str]] = field(default_factory=dict)
    sections: list[_Section] = field(default_factory=list)
    current: str = ""

    def read(self, name: str, depth: int = 0) -> None:
        if depth > 8:
            raise PacmanConfError(f"{name}: Include nests deeper than 8 files")
        try:
            text = (self.root / name.lstrip("/")).read_text()
        except OSError as error:
            raise PacmanConfError(f"cannot read {name} in {self.root}: {error.strerror}") from None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if line.startswith("[") and line.endswith("]"):
                self.current = line[1:-1].strip()
                if self.current != "options":
                    self.sections.append(_Section(self.current))
            elif line:
                key, _, value = line.partition("=")
                self.setting(f"{name}:{number}", key.strip(), value.strip(), depth)

    def setting(self, where: str, key: str, value: str, depth: int) -> None:
        if not self.current:
            raise PacmanConfError(f"{where}: {key} comes before any [section]")
        if key == "Include":
            section, pattern = self.current, value.lstrip("/")
            wildcard = any(c in pattern for c in "*?[")
            for included in sorted(self.root.glob(pattern)) if wildcard else [self.root / pattern]:
                self.read(f"/{included.relative_to(self.root)}", depth + 1)
                self.current = section
        elif self.current == "options":
            self.options.setdefault(key, []).extend(value.split())
        elif key == "Server":
            self.sections[-1].servers.append(value)
        elif key == "SigLevel":
            self.sections[-1].siglevel = value.split()


def read_pacman_conf(root: Path, conf: str = CONF) -> AlpmOptions:
    """libalpm options for `root` from its pacman.conf; every path in it is taken inside `root`."""
    reader = _Reader(root)
    reader.read(conf)
    options = reader.options
    architecture = (options.get("Architecture") or ["auto"])[0]
    if architecture == "auto":
        architecture = os.uname().machine
    base = parse_siglevel(options.get("SigLevel", []), DEFAULT_SIGLEVEL, f"{conf}: [options] SigLevel")

    def inside(key: str, default: str) -> Path:
        return root / (options.get(key) or [default])[0].lstrip("/")

    def repository(section: _Section) -> Repository:
        servers = (server.replace("$repo", section.name).replace("$arch", architecture) for server in section.servers)
        where = f"{conf}: [{section.name}] SigLevel"
        siglevel = base if section.siglevel is None else parse_siglevel(section.siglevel, base, where)
        return Repository(section.name, tuple(servers), siglevel)

    return AlpmOptions(
        root=root,
        repositories=tuple(repository(section) for section in reader.sections),
        architecture=architecture,
        dbpath=inside("DBPath", "/var/lib/pacman/"),
        cachedir=inside("CacheDir", "/var/cache/pacman/pkg/"),
        gpgdir=inside("GPGDir", "/etc/pacman.d/gnupg/"),
        logfile=inside("LogFile", "/var/log/pacman.log"),
        ignore=tuple(options.get("IgnorePkg", [])),
        no_upgrade=tuple(options.get("NoUpgrade", [])),
        no_extract=tuple(options.get("NoExtract", [])),
    )


def render_pacman_conf(architecture: str, repositories: list[str], siglevel: str) -> str:
    """The pacman.conf rastOS writes into an Arch image: its repositories from the mirror list."""
    lines = [
        "# Written by rastos-image: the image's repositories, from the profile. Servers are in",
        f"# {MIRRORLIST}.",
        "[options]",
        "HoldPkg = pacman glibc",
        f"Architecture = {architecture}",
        "CheckSpace",
        f"SigLevel = {siglevel}",
        "LocalFileSigLevel = Optional",
    ]
    for name in repositories:
        lines += ["", f"[{name}]", f"Include = {MIRRORLIST}"]
    return "\n".join(lines) + "\n"


def render_mirrorlist(mirror: str) -> str:
    return f"# Written by rastos-image from the profile's distribution.mirror.\nServer = {mirror}\n"
