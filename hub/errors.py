"""The hub's errors: each names the field or thing it is about; the API turns them into 4xx answers."""

from __future__ import annotations

from rastos.errors import RastosError


class HubError(RastosError):
    """Bad input or a request that cannot be carried out: 400 unless a subclass says otherwise."""

    status = 400


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


class UnsupportedMediaType(HubError):
    status = 415
