"""The REST routes of image updates: the image store (bundles in, bundles out) and rollouts.

Uploads are the bundle file itself as the body (`application/octet-stream`), streamed to disk and
checked whole before the hub keeps it (hub/images.py); the hub's 1 MiB limit on bodies is for JSON,
an upload has its own (`--max-image-bytes`). Downloads serve the kept file with HTTP ranges, to
admins and to agents with their own host token, which is how a host fetches its update and resumes
a cut download; a host gets only the bundles a rollout has sent it.
"""

from __future__ import annotations

import logging

from aiohttp import ClientError, hdrs, web

from hub import api, edge
from hub.access import Route, agent, caller
from hub.edge import respond
from hub.errors import HubError, NotFound, UnsupportedMediaType
from hub.images import ImageFiles
from hub.roles import ADMIN, OPERATOR, VIEWER, VIEWER_OR_HOST
from hub.rollouts import image_view
from hub.sockets import FLEET

log = logging.getLogger("rastos-hub")

IMAGES = web.AppKey("images", ImageFiles)
UPLOAD_CHUNK = 1 << 16
BUNDLE_CHUNK = 1 << 18  # what a download sends at a time
BUNDLE_TYPE = "application/octet-stream"


# Images


async def _images(request: web.Request) -> web.StreamResponse:
    # From the database, not the fleet's copy: an image `rastos-hub image add` put there shows at once.
    return respond([image_view(row) for row in await request.app[FLEET].rollouts.store.images()])


async def _image(request: web.Request) -> web.StreamResponse:
    row = await _image_row(request)
    return respond({**image_view(row), "manifest": row["manifest"]})


async def _image_row(request: web.Request) -> dict[str, object]:
    image_id = request.match_info["id"]
    row = await request.app[FLEET].rollouts.store.image(image_id)
    if row is None:
        raise _no_image(image_id)
    return row


def _no_image(image_id: str) -> NotFound:
    return NotFound(f"id: no image {image_id[:100]!r}")


async def _add_image(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    if request.content_type != BUNDLE_TYPE:
        raise UnsupportedMediaType(
            f"content-type: {request.content_type!r}; the body must be the bundle file, as {BUNDLE_TYPE}"
        )
    files = request.app[IMAGES]
    try:
        checked = await files.receive(request.content.iter_chunked(UPLOAD_CHUNK), request.content_length)
    except (ClientError, ConnectionError) as error:  # the client went away: nothing was kept
        raise HubError(f"body: the upload was cut off before its end ({type(error).__name__})") from None
    fleet = request.app[FLEET]
    try:
        async with fleet.lock:
            image, new = await fleet.rollouts.add_image(checked, admin)
    finally:
        files.discard(checked)  # its temporary name, if it was not kept
    return respond(image, status=201 if new else 200)


async def _remove_image(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    fleet = request.app[FLEET]
    async with fleet.lock:
        await fleet.rollouts.remove_image(request.match_info["id"], admin)
    return web.Response(status=204)


async def _bundle(request: web.Request) -> web.StreamResponse:
    host = None if (by := agent(request)) is None else by.host
    if host is not None and not await request.app[FLEET].rollouts.store.offered(host, request.match_info["id"]):
        # The same 404 as for an image the hub does not hold, not a 403: a host's token lives on the
        # host (and is carried across its updates), so one taken from a host learns nothing of the
        # images the hub keeps beyond those sent to that host. Decided before the file is looked at.
        raise _no_image(request.match_info["id"])
    row = await _image_row(request)
    path = request.app[IMAGES].path(str(row["sha256"]))
    if not path.is_file():
        log.error("the bundle of image %s is missing: %s", row["id"], path)
        raise NotFound(f"id: the bundle of image {row['id']} is missing from the hub's disk")
    name = f"rastos-{row['profile']}-{row['version']}"
    if row["parent_version"] is not None:
        name += f"-from-{row['parent_version']}"
    headers = {hdrs.CONTENT_TYPE: BUNDLE_TYPE, hdrs.CONTENT_DISPOSITION: f'attachment; filename="{name}.rbundle"'}
    return web.FileResponse(path, chunk_size=BUNDLE_CHUNK, headers=headers)


# Rollouts


async def _rollouts(request: web.Request) -> web.StreamResponse:
    return respond(list(request.app[FLEET].rollouts.rollouts.values()))


async def _rollout(request: web.Request) -> web.StreamResponse:
    return respond(request.app[FLEET].rollouts.get(request.match_info["id"]))


async def _start_rollout(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    body = await edge.json_body(request, api.NEW_ROLLOUT)
    fleet = request.app[FLEET]
    async with fleet.lock:
        rollout = await fleet.rollouts.start(admin, body)
    return respond(rollout, status=201)


async def _steer(request: web.Request) -> web.StreamResponse:
    admin = caller(request).name
    fleet = request.app[FLEET]
    action = request.path.rsplit("/", 1)[1]
    steer = {"pause": fleet.rollouts.pause, "resume": fleet.rollouts.resume, "abort": fleet.rollouts.abort}[action]
    async with fleet.lock:
        return respond(await steer(request.match_info["id"], admin))


ROUTES = (
    Route("GET", "/api/v1/images", _images, VIEWER),
    Route("POST", "/api/v1/images", _add_image, ADMIN),
    Route("GET", "/api/v1/images/{id}", _image, VIEWER),
    Route("DELETE", "/api/v1/images/{id}", _remove_image, ADMIN),
    # A host fetches its update here with its own token, and gets only the bundles sent it (_bundle).
    Route("GET", "/api/v1/images/{id}/bundle", _bundle, VIEWER_OR_HOST),
    Route("GET", "/api/v1/rollouts", _rollouts, VIEWER),
    Route("POST", "/api/v1/rollouts", _start_rollout, OPERATOR),
    Route("GET", "/api/v1/rollouts/{id}", _rollout, VIEWER),
    *(Route("POST", f"/api/v1/rollouts/{{id}}/{action}", _steer, OPERATOR) for action in ("pause", "resume", "abort")),
)
