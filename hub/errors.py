"""The hub's errors: each names the field or thing it is about; the API turns them into 4xx answers."""

from __future__ import annotations

from rastos.errors import RastosError


class HubError(RastosError):
    """Bad input or a request that cannot be carried out: 400 unless a subclass says otherwise."""

    status = 400

    def document(self) -> dict[str, str]:
        """What the API answers with: the message, and for some errors fields a program can act on
        without parsing it."""
        return {"error": self.message}


class NotFound(HubError):
    status = 404


class Unauthorized(HubError):
    status = 401


class Conflict(HubError):
    status = 409


class Unprocessable(HubError):
    """Well-formed, but not something the hub can do: a run step its op refuses."""

    status = 422


class Forbidden(HubError):
    status = 403


class RoleRefused(Forbidden):
    """An admin whose role does not allow what they asked for."""

    def __init__(self, what: str, needed: str, name: str, role: str) -> None:
        super().__init__(f"role: {what} needs the role {needed}; {name} has the role {role}")
        self.needed = needed
        self.role = role

    def document(self) -> dict[str, str]:
        return {**super().document(), "needed_role": self.needed, "role": self.role}


class UnsupportedMediaType(HubError):
    status = 415
