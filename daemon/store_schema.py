"""The daemon's state store's schema: the SQL that makes it, version by version (store.py applies
what a database lacks, by `PRAGMA user_version`)."""

from __future__ import annotations

# Each entry moves the schema from version N to N+1. Never edit a shipped entry; append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,            -- apply, pipeline
        request TEXT NOT NULL,         -- the steps as JSON
        flags INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        state TEXT NOT NULL,           -- queued, running, done, failed, cancelled, interrupted
        created REAL NOT NULL,
        started REAL,
        finished REAL,
        result TEXT                    -- JSON
    );
    CREATE TABLE steps (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        position INTEGER NOT NULL,
        op TEXT NOT NULL,
        params TEXT NOT NULL,
        state TEXT NOT NULL,           -- pending, running, changed, unchanged, planned, failed, skipped
        result TEXT,
        PRIMARY KEY (job_id, position)
    );
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY,
        created REAL NOT NULL,
        description TEXT NOT NULL,
        kind TEXT NOT NULL,            -- pre, post, manual
        job_id INTEGER,
        pre_id INTEGER,                -- for a post snapshot: its pre
        known_good INTEGER NOT NULL DEFAULT 0,
        deleted REAL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        uid INTEGER NOT NULL,
        method TEXT NOT NULL,
        job_id INTEGER,
        detail TEXT NOT NULL           -- JSON
    );
    CREATE TABLE boots (
        boot_id TEXT PRIMARY KEY,
        started REAL NOT NULL,
        root TEXT NOT NULL,
        marked_good REAL
    );
    """,
    # 2: what a boot fell back from, recorded once per boot.
    """
    ALTER TABLE boots ADD COLUMN fallback_from TEXT;
    """,
    # 3: the hub's command id a job was run for: the idempotency key that makes a resent command run once.
    """
    ALTER TABLE jobs ADD COLUMN hub_command TEXT;
    CREATE UNIQUE INDEX jobs_hub_command ON jobs(hub_command) WHERE hub_command IS NOT NULL;
    """,
    # 4: service actions owed after a step's writes, recorded before the writes (daemon/followups.py).
    """
    CREATE TABLE follow_ups (
        id INTEGER PRIMARY KEY,
        job_id INTEGER,
        verb TEXT NOT NULL,            -- systemctl's verb: reload, restart, ...
        unit TEXT NOT NULL,
        created REAL NOT NULL,
        finished REAL,
        outcome TEXT                   -- done, failed: ..., NULL while owed
    );
    """,
    # 5: risky changes waiting to be confirmed, and what puts them back (daemon/confirm.py).
    """
    CREATE TABLE confirmations (
        job_id INTEGER PRIMARY KEY,
        created REAL NOT NULL,
        deadline REAL NOT NULL,
        files TEXT NOT NULL,           -- JSON {path: {"content": old text or null, "mode": int}}
        ops TEXT NOT NULL,             -- JSON [op names whose revert actions run once the files are back]
        state TEXT NOT NULL,           -- pending, confirmed, reverted, revert-failed, superseded
        settled REAL,
        detail TEXT
    );
    """,
    # 6: image updates staged (daemon/updates): their ids, who asked, how each ended.
    """
    CREATE TABLE updates (
        id INTEGER PRIMARY KEY,
        uid INTEGER NOT NULL,
        source TEXT NOT NULL,          -- as shown: a URL without its query
        reboot INTEGER NOT NULL,
        state TEXT NOT NULL,           -- staging, staged, failed, cancelled
        version TEXT,                  -- once the manifest is read
        image TEXT,                    -- the image this staging received (@images/NAME), once it has
        created REAL NOT NULL,
        finished REAL,
        result TEXT                    -- JSON, as the Completed signal carries it
    );
    """,
    # 7: the deployment a staging places, recorded before it is placed: a version staged again gets a
    # name of its own (@deployments/VERSION@ID), and only this tells whose entry a cut left. Stagings
    # cut before it was recorded placed @deployments/VERSION, as every staging did then.
    """
    ALTER TABLE updates ADD COLUMN deployment TEXT;
    UPDATE updates SET deployment = '@deployments/' || version WHERE state = 'staging' AND version IS NOT NULL;
    """,
)
