"""Images and rollouts in the hub's database (hub/schema.py), beside the rest of its state in
hub/store.py, whose transactions and event log they share: each change writes its event row in the
same transaction, so the log never disagrees with what it describes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from hub.errors import Conflict, HubError, NotFound
from hub.schema import images, rollout_hosts, rollouts
from hub.store import Store

ACTIVE_ROLLOUT_STATES = ("running", "paused", "halted")  # what may still send an update frame
FETCHING_HOST_STATES = ("sent", "staging")  # a host sent an update that may still be downloading its bundle
# What the image list shows; the manifest (its package list may be large) only with one image.
_LISTED = [column for column in images.c if column.name != "manifest"]
LoggedEvent = tuple[str, str, dict[str, Any], str | None]  # actor, method, detail, host


class RolloutStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # Images

    async def add_image(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Store an image; returns it and the logged event. The same content added again is the image
        stored already (and no event); another bundle of the same profile, version and parent is a
        Conflict: a version names one tree for ever (docs/updates.md)."""
        try:
            return await self._add_image(row)
        except Conflict:
            # The same bundle added beside this (`rastos-hub image add` while the hub takes an upload):
            # the first stands, and this is it.
            if (same := await self._image_by_sha256(row["sha256"])) is not None:
                return same, None
            raise

    async def _image_by_sha256(self, sha256: str) -> dict[str, Any] | None:
        async with self.store.engine.connect() as db:
            same = (await db.execute(select(*_LISTED).where(images.c.sha256 == sha256))).mappings().first()
        return None if same is None else dict(same)

    async def _add_image(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        async with self.store.transaction() as db:
            same = (await db.execute(select(*_LISTED).where(images.c.sha256 == row["sha256"]))).mappings().first()
            if same is not None:
                return dict(same), None
            query = select(images.c.id).where(
                images.c.profile == row["profile"],
                images.c.version == row["version"],
                images.c.parent_version.is_(None)
                if row["parent_version"] is None
                else images.c.parent_version == row["parent_version"],
            )
            if (other := (await db.execute(query)).first()) is not None:
                kind = _kind(row["parent_version"])
                raise Conflict(
                    f"bundle: image {other[0]} is {row['profile']} {row['version']} ({kind}) already, with other "
                    "contents; a version names one tree",
                    hint="remove that image first if this bundle replaces it",
                )
            try:
                await db.execute(insert(images).values(**row))
            except IntegrityError:
                raise Conflict(f"bundle: an image with id {row['id']} exists already") from None
            detail = {"image": row["id"], "profile": row["profile"], "version": row["version"],
                      "parent": row["parent_version"], "sha256": row["sha256"], "size": row["size"]}  # fmt: skip
            logged = await self.store.log(db, row["uploaded_by"], "ImageAdded", detail)
        return {key: value for key, value in row.items() if key != "manifest"}, logged

    async def images(self) -> list[dict[str, Any]]:
        async with self.store.engine.connect() as db:
            rows = (await db.execute(select(*_LISTED).order_by(images.c.uploaded))).mappings().all()
        return [dict(row) for row in rows]

    async def image(self, image_id: str) -> dict[str, Any] | None:
        async with self.store.engine.connect() as db:
            row = (await db.execute(select(images).where(images.c.id == image_id))).mappings().first()
        return None if row is None else dict(row)

    async def find_image(self, key: str) -> str:
        """The id of the image `key` names: an id, or a version exactly one image has (a version may name
        a full image and deltas to it, or images of several profiles: then its id is needed)."""
        async with self.store.engine.connect() as db:
            if (await db.execute(select(images.c.id).where(images.c.id == key))).first() is not None:
                return key
            query = select(images.c.id, images.c.profile, images.c.parent_version).where(images.c.version == key)
            rows = (await db.execute(query.order_by(images.c.uploaded))).all()
        if not rows:
            raise NotFound(f"image: no image with the id or version {key[:100]!r}")
        if len(rows) > 1:
            named = "; ".join(f"{row.id} ({row.profile} {key}, {_kind(row.parent_version)})" for row in rows)
            raise HubError(f"image: version {key!r} names {len(rows)} images: {named}; give the id of the one meant")
        return str(rows[0].id)

    async def remove_image(self, image_id: str, actor: str, field: str = "id") -> tuple[str, dict[str, Any]]:
        """Remove the row of an image no rollout needs; returns its sha256 (its file's name) and the event.

        The caller removes the file after this commits: a crash between the two leaves a file without a
        row, which the next start sweeps (ImageFiles.clean), never a row naming a missing file, with
        which a rollout could be started whose every host would then fail its download.

        A full image may go while it is the parent version of a delta the hub keeps: a host applies a
        delta to the deployment it runs, and the hub never serves the parent to make one apply."""
        async with self.store.transaction() as db:
            # Deleted first and checked after, in one transaction: the delete holds the row (on SQLite,
            # the database) against a rollout being started beside this, which inserts itself first and
            # checks for its image after (add_rollout). Whichever commits first, the other sees it.
            removed = delete(images).where(images.c.id == image_id).returning(images.c.sha256)
            found = (await db.execute(removed)).first()
            if found is None:
                raise NotFound(f"{field}: no image {image_id[:100]!r}")
            await self._refuse_needed(db, image_id, field)
            logged = await self.store.log(db, actor, "ImageRemoved", {"image": image_id, "sha256": found[0]})
        return str(found[0]), logged

    async def _refuse_needed(self, db: AsyncConnection, image_id: str, field: str) -> None:
        """A Conflict naming the rollout if one still needs the image: it has not ended (running, paused,
        or halted, which may be resumed), or it ended but a host of it is still fetching the bundle
        (an abort leaves updates under way to go on, until staged or past the health timeout)."""
        active = select(rollouts.c.id, rollouts.c.state).where(
            rollouts.c.image == image_id, rollouts.c.state.in_(ACTIVE_ROLLOUT_STATES)
        )
        if (rollout := (await db.execute(active.limit(1))).first()) is not None:
            raise Conflict(
                f"{field}: image {image_id} is in use by rollout {rollout.id}, which is {rollout.state}; "
                "abort it or let it finish"
            )
        fetching = (
            select(rollout_hosts.c.host, rollouts.c.id, rollouts.c.state, rollouts.c.health_timeout_s)
            .join(rollouts, rollouts.c.id == rollout_hosts.c.rollout_id)
            .where(rollouts.c.image == image_id, rollout_hosts.c.state.in_(FETCHING_HOST_STATES))
        )
        if (host := (await db.execute(fetching.limit(1))).first()) is not None:
            raise Conflict(
                f"{field}: image {image_id} is still being fetched by host {host.host} for rollout {host.id}, "
                f"which is {host.state}; try again once the host has staged it or failed (at the latest "
                f"{host.health_timeout_s} s after it was sent the update)"
            )

    async def offered(self, host: str, image_id: str) -> bool:
        """Whether a rollout has sent `host` the update to this image, now or in the past: the bundles a
        host may download. A host still pending in a later wave, or cancelled before its turn, was not."""
        query = (
            select(rollout_hosts.c.rollout_id)
            .join(rollouts, rollouts.c.id == rollout_hosts.c.rollout_id)
            .where(rollout_hosts.c.host == host, rollouts.c.image == image_id, rollout_hosts.c.sent.is_not(None))
            .limit(1)
        )
        async with self.store.engine.connect() as db:
            return (await db.execute(query)).first() is not None

    # Rollouts

    async def add_rollout(self, rollout: dict[str, Any], hosts: list[dict[str, Any]]) -> dict[str, Any]:
        row = {key: value for key, value in rollout.items() if key != "hosts"}
        async with self.store.transaction() as db:
            await db.execute(insert(rollouts).values(**row))
            try:
                if hosts:
                    await db.execute(insert(rollout_hosts), [{"rollout_id": rollout["id"], **host} for host in hosts])
            except IntegrityError:  # `rastos-hub host remove` ran beside this hub
                raise Conflict("target: a host of this rollout was removed meanwhile; try again") from None
            # Looked for after the insert, and held: `rastos-hub image remove` beside this hub then
            # either sees this rollout and refuses, or removed the image before this looks (remove_image).
            kept = select(images.c.id).where(images.c.id == rollout["image"]).with_for_update(read=True)
            if (await db.execute(kept)).first() is None:
                raise NotFound(f"image: no image {rollout['image']!r}; it was removed meanwhile")
            detail = {"rollout": rollout["id"], "image": rollout["image"], "version": rollout["version"],
                      "hosts": [host["host"] for host in hosts], "waves": rollout["waves"]}  # fmt: skip
            return await self.store.log(db, rollout["admin"], "RolloutStarted", detail)

    async def update_rollout(
        self, rollout_id: str, values: dict[str, Any], logged: LoggedEvent | None = None
    ) -> dict[str, Any] | None:
        """Change a rollout's row, with its event if one is given; returns the event as stored."""
        async with self.store.transaction() as db:
            await db.execute(update(rollouts).where(rollouts.c.id == rollout_id).values(**values))
            if logged is None:
                return None
            actor, method, detail, host = logged
            return await self.store.log(db, actor, method, detail, host=host)

    async def update_host(
        self, rollout_id: str, host: str, values: dict[str, Any], logged: LoggedEvent | None = None
    ) -> dict[str, Any] | None:
        async with self.store.transaction() as db:
            where = (rollout_hosts.c.rollout_id == rollout_id) & (rollout_hosts.c.host == host)
            await db.execute(update(rollout_hosts).where(where).values(**values))
            if logged is None:
                return None
            actor, method, detail, on = logged
            return await self.store.log(db, actor, method, detail, host=on)

    async def rollouts(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` rollouts and every active one however old, each with its hosts: a
        restarted hub goes on with all of them."""
        async with self.store.engine.connect() as db:
            newest = select(rollouts).order_by(rollouts.c.created.desc()).limit(limit)
            active = select(rollouts).where(rollouts.c.state.in_(ACTIVE_ROLLOUT_STATES))
            rows = [*(await db.execute(active)).mappings().all(), *(await db.execute(newest)).mappings().all()]
            by_id = {row["id"]: {**row, "hosts": []} for row in rows}
            if by_id:
                query = select(rollout_hosts).where(rollout_hosts.c.rollout_id.in_(list(by_id)))
                for host in (await db.execute(query.order_by(rollout_hosts.c.host))).mappings().all():
                    by_id[host["rollout_id"]]["hosts"].append(_host_view(host))
        return sorted(by_id.values(), key=lambda rollout: rollout["created"])


def _kind(parent_version: str | None) -> str:
    return "full" if parent_version is None else f"delta from {parent_version}"


def _host_view(row: Any) -> dict[str, Any]:
    return {key: value for key, value in dict(row).items() if key != "rollout_id"}
