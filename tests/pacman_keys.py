"""Throwaway package signing for the Arch tests: a packager key, a pacman keyring that trusts it (as
`pacman-key --populate archlinux` makes a keyring trust Arch's packagers), and a key it never saw."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def gpg(home: Path, *args: str) -> str:
    argv = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class Keys:
    keyring: Path  # pacman's, as `pacman-key --init` makes it, trusting `signer` alone
    signer: Path  # GnuPG homes with one signing key each
    stranger: Path

    @classmethod
    def make(cls, folder: Path) -> Keys:
        folder.mkdir(parents=True, exist_ok=True)
        made = cls(folder / "pacman", folder / "signer", folder / "stranger")
        for home, who in ((made.signer, "packager"), (made.stranger, "stranger")):
            home.mkdir(mode=0o700)
            gpg(home, "--quick-generate-key", f"rastOS test {who} <{who}@rastos.invalid>", "ed25519", "sign", "never")
        pacman_key = ["pacman-key", "--gpgdir", str(made.keyring)]
        subprocess.run([*pacman_key, "--init"], check=True, capture_output=True)
        (folder / "signer.asc").write_text(gpg(made.signer, "--armor", "--export"))
        subprocess.run([*pacman_key, "--add", str(folder / "signer.asc")], check=True, capture_output=True)
        subprocess.run([*pacman_key, "--lsign-key", made.key_id(made.signer)], check=True, capture_output=True)
        return made

    @staticmethod
    def key_id(home: Path) -> str:
        """The 16-digit id of the home's one key, as gpg --list-packets names a signature's issuer."""
        return gpg(home, "--with-colons", "--list-keys").split("pub:")[1].split(":")[3]

    def sign(self, package: Path, home: Path | None = None) -> None:
        """PACKAGE.sig beside it, which repo-add takes into the database."""
        gpg(home or self.signer, "--detach-sign", "--no-armor", "--output", f"{package}.sig", str(package))

    def close(self) -> None:
        for home in (self.keyring, self.signer, self.stranger):
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False)
