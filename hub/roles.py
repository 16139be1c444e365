"""What an admin may do through the API and the UI: one of three roles, each allowing everything the
one before it allows (hub/access.py checks them; docs/hub.md has the table of routes).

- viewer: reads the fleet: its state, hosts, events, runs, rollouts and images, and follows the stream;
- operator: and acts on hosts through the hub: starts and cancels runs (dry runs too), starts, pauses,
  resumes and aborts rollouts;
- admin: and changes what the hub trusts and keeps: hosts and their tokens, and images.

Admins themselves are managed from the shell (`rastos-hub admin`), by whoever can write the hub's
database; no route of the API does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"

    def allows(self, needed: Role) -> bool:
        return RANKS.index(self) >= RANKS.index(needed)


RANKS = (Role.viewer, Role.operator, Role.admin)  # lowest first


@dataclass(frozen=True)
class Admin:
    """Someone who may use the API and the UI, as the store knows them."""

    name: str
    role: Role


@dataclass(frozen=True)
class Access:
    """What a route needs of its caller: an admin whose role allows `role`, or none (`role` None);
    with `hosts`, a host's own agent token is let in too (the route limits what a host gets)."""

    role: Role | None
    hosts: bool = False

    @property
    def label(self) -> str:
        """The OpenAPI document's `x-rastos-role`: the role, or `none` or `host` for routes no admin role
        governs."""
        if self.role is not None:
            return self.role.value
        return "host" if self.hosts else "none"

    @property
    def sentence(self) -> str:
        """The same, said in the operation's description."""
        if self.role is None:
            return "Needs a host's own agent token (no admin role opens it)." if self.hosts else "Needs no credentials."
        *lower, highest = [role.value for role in RANKS if role.allows(self.role)]
        allowed = f"{', '.join(lower)} or {highest}" if lower else highest
        hosts = ", or a host's own agent token" if self.hosts else ""
        return f"Needs the role {self.role.value}: an admin whose role is {allowed}{hosts}."


PUBLIC = Access(None)
AGENT = Access(None, hosts=True)
VIEWER = Access(Role.viewer)
OPERATOR = Access(Role.operator)
ADMIN = Access(Role.admin)
VIEWER_OR_HOST = Access(Role.viewer, hosts=True)
