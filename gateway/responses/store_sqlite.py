"""Stored responses in SQLite (Python's own `sqlite3`): a file by default, so a
box keeps its conversations across restarts, or memory (`RESPONSES_STORE=memory`).

Every call runs on one thread of its own, so the event loop never waits on the
disk. Totals (bytes, responses) are kept by triggers in the same transaction as
the rows, so several gateways on one box may share the file (WAL mode) and the
bounds still hold."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import time

from vllm_gateway.gateway.config import StoreSettings
from vllm_gateway.gateway.responses.backend import Backend, StoreUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    running INTEGER NOT NULL,
    expires REAL,                       -- finished: when it goes; running: NULL (never evicted)
    lease REAL NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0,
    ev_count INTEGER NOT NULL DEFAULT 0,
    ev_bytes INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL               -- body and events
);
CREATE INDEX IF NOT EXISTS finished ON responses (running, expires);
CREATE TABLE IF NOT EXISTS events (
    id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (one INTEGER PRIMARY KEY CHECK (one = 1), bytes INTEGER NOT NULL,
                                   count INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS added AFTER INSERT ON responses BEGIN
    UPDATE totals SET bytes = bytes + new.size, count = count + 1;
END;
CREATE TRIGGER IF NOT EXISTS removed AFTER DELETE ON responses BEGIN
    UPDATE totals SET bytes = bytes - old.size, count = count - 1;
    DELETE FROM events WHERE id = old.id;
END;
CREATE TRIGGER IF NOT EXISTS resized AFTER UPDATE OF size ON responses BEGIN
    UPDATE totals SET bytes = bytes - old.size + new.size;
END;
"""


class SQLiteBackend(Backend):
    def __init__(self, limits: StoreSettings) -> None:
        super().__init__(limits)
        self.path = ":memory:" if limits.kind == "memory" else limits.location
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="responses-sqlite")
        self._db: sqlite3.Connection | None = None

    # ------------------------------------------------------------ the thread

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            if self.path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash, cheap commits
            db.execute("PRAGMA journal_size_limit=67108864")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn, *args):
        def call():
            try:
                return fn(self._conn(), *args)
            except sqlite3.Error as e:
                raise StoreUnavailable(f"SQLite file {self.path}: {e}") from None
            except OSError as e:
                raise StoreUnavailable(f"SQLite file {self.path}: {e.strerror or e}") from None

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _write(self, db: sqlite3.Connection, fn, *args):
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db, *args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    def _make_room(self, db: sqlite3.Connection, need: int, new_rows: int, keep: str) -> bool:
        """Drop the expired, then the oldest finished, until `need` more bytes
        and `new_rows` more responses fit; False if they cannot."""
        db.execute("DELETE FROM responses WHERE running = 0 AND expires < ?", (time.time(),))
        limits = self.limits
        while True:
            total, count = db.execute("SELECT bytes, count FROM totals").fetchone()
            if total + need <= limits.max_bytes and count + new_rows <= limits.max_count:
                return True
            oldest = db.execute("SELECT id FROM responses WHERE running = 0 AND id != ? ORDER BY expires LIMIT 1",
                                (keep,)).fetchone()
            if oldest is None:
                return False
            db.execute("DELETE FROM responses WHERE id = ?", oldest)

    def _expiry(self, lease: float | None) -> float | None:
        return None if lease is not None else time.time() + self.limits.ttl_s

    # ------------------------------------------------------------ the calls

    async def create(self, rid: str, body: bytes, lease: float | None) -> bool:
        def create(db: sqlite3.Connection) -> bool:
            if not self._make_room(db, len(body), 1, rid):
                return False
            db.execute("INSERT OR REPLACE INTO responses (id, body, running, expires, lease, size) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (rid, body, int(lease is not None), self._expiry(lease), lease or 0, len(body)))
            return True

        return await self._run(self._write, create)

    async def update(self, rid: str, body: bytes, lease: float | None) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT size, ev_bytes FROM responses WHERE id = ?", (rid,)).fetchone()
            if row is None:
                return False
            size, ev_bytes = row
            self._make_room(db, max(0, ev_bytes + len(body) - size), 0, rid)  # a running one is kept regardless
            db.execute("UPDATE responses SET body = ?, running = ?, expires = ?, lease = ?, size = ? WHERE id = ?",
                       (body, int(lease is not None), self._expiry(lease), lease or 0, ev_bytes + len(body), rid))
            return True

        return await self._run(self._write, update)

    async def get(self, rid: str) -> tuple[bytes, float, bool] | None:
        def get(db: sqlite3.Connection):
            row = db.execute("SELECT body, lease, cancel, expires FROM responses WHERE id = ?", (rid,)).fetchone()
            if row is None or (row[3] is not None and row[3] < time.time()):
                return None
            return bytes(row[0]), row[1], bool(row[2])

        return await self._run(get)

    async def delete(self, rid: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount > 0

        return await self._run(self._write, delete)

    async def append(self, rid: str, events: list[bytes]) -> None:
        def append(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT ev_count FROM responses WHERE id = ?", (rid,)).fetchone()
            if row is None:
                return
            n = sum(len(e) for e in events)
            self._make_room(db, n, 0, rid)
            db.executemany("INSERT OR REPLACE INTO events (id, seq, data) VALUES (?, ?, ?)",
                           [(rid, row[0] + i, e) for i, e in enumerate(events)])
            db.execute("UPDATE responses SET ev_count = ev_count + ?, ev_bytes = ev_bytes + ?, size = size + ? "
                       "WHERE id = ?", (len(events), n, n, rid))

        await self._run(self._write, append)

    async def events(self, rid: str, after: int) -> list[bytes]:
        def events(db: sqlite3.Connection) -> list[bytes]:
            return [bytes(r[0]) for r in db.execute("SELECT data FROM events WHERE id = ? AND seq > ? ORDER BY seq",
                                                    (rid, after))]

        return await self._run(events)

    async def request_cancel(self, rid: str) -> None:
        def cancel(db: sqlite3.Connection) -> None:
            db.execute("UPDATE responses SET cancel = 1 WHERE id = ? AND running = 1", (rid,))

        await self._run(self._write, cancel)

    async def heartbeat(self, rids: list[str], lease_until: float) -> set[str]:
        def heartbeat(db: sqlite3.Connection) -> set[str]:
            marks = ",".join("?" * len(rids))
            db.execute(f"UPDATE responses SET lease = ? WHERE running = 1 AND id IN ({marks})", (lease_until, *rids))
            alive = {r[0] for r in db.execute(f"SELECT id FROM responses WHERE cancel = 0 AND id IN ({marks})", rids)}
            return set(rids) - alive

        return await self._run(self._write, heartbeat) if rids else set()

    async def usage(self) -> tuple[int, int]:
        def usage(db: sqlite3.Connection) -> tuple[int, int]:
            return db.execute("SELECT bytes, count FROM totals").fetchone()

        return tuple(await self._run(usage))  # type: ignore[return-value]

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, close)
        self._pool.shutdown(wait=False)
