"""One driver per run: an exclusive lock held for as long as a ``search``, ``resume`` or ``calibrate`` runs.

Design. The lock is an ``flock`` on a lock file (:data:`LOCK_NAME`) in the run directory, taken
before anything else is written there, plus, for a run database on PostgreSQL, a session-level
advisory lock on that database. Both are released by the kernel or the server when their holder
ends, however it ends: a driver killed with SIGKILL (or a crashed machine, once its connection
times out) leaves no lock behind, so there is no lease to renew and no staleness guess to get wrong
(a pid that was reused, a clock that jumped). The lock file holds the holder's host, pid, command and
start time only to name it in the refusal; a file with a holder but no ``flock`` on it is a driver
that ended without releasing, and the next driver says so and takes over.

- A SQLite database also gets a lock file of its own next to it (``.<name>.cellsearch-lock``,
  wherever it lies: in the run directory or elsewhere with ``--storage sqlite:///...``), so two run
  directories can never drive the same database file.
- A PostgreSQL database gets ``pg_try_advisory_lock`` on a connection held open by the driver (its
  ``application_name`` names host and pid, which is how a refusal names the holder). Two run
  directories (a copied one, say) pointing to the same database therefore exclude each other too.
  The session sets the server's TCP keepalives (30 s idle, 3 probes 10 s apart): a driver on another
  machine that died without closing its connection loses the lock within about a minute; that is
  the lease, kept by the server, not by a clock of ours.

Linux's NFS client maps ``flock`` to NFS byte-range locks, which the server drops when a client's lease
expires; a file system without locks at all (``ENOLCK``) is refused in one line rather than run unlocked.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

from cellsearch.errors import UserError

__all__ = ["RunLock", "RunInUse", "LOCK_NAME", "DATABASE_LOCK_SUFFIX", "acquire", "check_free", "database_lock_path",
           "holder_text"]

#: The lock file in a run (or study) directory.
LOCK_NAME = ".cellsearch.lock"
#: Suffix of a SQLite database's own lock file (``.run.db.cellsearch-lock``).
DATABASE_LOCK_SUFFIX = ".cellsearch-lock"
#: The advisory lock key on a PostgreSQL run database (one run per database).
_PG_KEY = zlib.crc32(b"cellsearch run database") & 0x7FFFFFFF


class RunInUse(UserError):
    """Another cellsearch driver holds the run (it names which: host, pid, since when)."""


def _since(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def holder_text(holder: dict[str, Any]) -> str:
    """``cellsearch search (pid 123 on host h, since 2026-01-01 10:00:00 UTC)`` from a lock file's record."""
    parts = []
    if holder.get("pid") is not None:
        parts.append(f"pid {holder['pid']}")
    if holder.get("host"):
        parts.append(f"on host {holder['host']}")
    since = holder.get("since")
    if isinstance(since, (int, float)):
        parts.append(f"since {_since(since)}")
    command = holder.get("command") or "another cellsearch driver"
    return f"{command} ({', '.join(parts)})" if parts else command


def _read_holder(handle) -> dict[str, Any]:
    try:
        handle.seek(0)
        text = handle.read(4096)
        holder = json.loads(text) if text.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """Held locks (files and a database connection); :meth:`release` frees them all (idempotent)."""

    def __init__(self, command: str):
        self.command = command
        self._files: list[tuple[Path, Any]] = []
        self._pg: tuple[sa.Engine, sa.Connection] | None = None
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "since": time.time()}

    def lock_file(self, path: Path, what: str, log: Callable[[str], None]) -> None:
        """``flock`` ``path`` (created if needed) or raise :class:`RunInUse` naming its holder."""
        try:
            handle = open(path, "a+", encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot lock {what}: cannot open {path}: {error.strerror or error}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            handle.close()
            raise RunInUse(f"{what} is in use by {holder_text(holder)}; wait for it to end or stop it "
                           f"(Ctrl-C), then try again") from None
        except OSError as error:
            handle.close()
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise UserError(f"cannot lock {what}: its file system does not support locks ({path}); "
                                f"use a local directory") from None
            raise UserError(f"cannot lock {what}: {error.strerror or error}") from None
        previous = _read_holder(handle)
        if previous.get("pid") is not None and previous.get("released") is not True:
            log(f"note: {what} was last held by {holder_text(previous)}, which ended without releasing it "
                f"(killed?); taking it over")
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(self.record) + "\n")
            handle.flush()
        except OSError as error:
            handle.close()
            raise UserError(f"cannot lock {what}: cannot write {path}: {error.strerror or error}") from None
        self._files.append((path, handle))

    def lock_postgres(self, url: str, display: str) -> None:
        """Take the run database's advisory lock on a connection held until :meth:`release`."""
        from cellsearch.search.storage import _summary, engine_options

        options = engine_options(url)
        connect_args = dict(options.pop("connect_args", {}))
        connect_args.setdefault("application_name", f"cellsearch {self.record['host']} pid {os.getpid()}"[:63])
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=connect_args,
                                  **{k: v for k, v in options.items() if k != "pool_pre_ping"})
        try:
            connection = engine.connect()
            # the server's side of the lease: a driver whose machine died (no FIN, no RST) is dropped, and its
            # lock freed, after 30 s of silence and 3 unanswered probes 10 s apart, not after the OS's 2 hours
            for setting, value in (("tcp_keepalives_idle", 30), ("tcp_keepalives_interval", 10),
                                   ("tcp_keepalives_count", 3), ("tcp_user_timeout", 60000)):
                try:
                    with connection.begin_nested():
                        connection.execute(sa.text(f"SET {setting} = {value}"))
                except sa.exc.DBAPIError:  # an older server without the setting: the OS default applies
                    pass
            got = connection.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_KEY}).scalar()
            connection.commit()
        except sa.exc.SQLAlchemyError as error:
            engine.dispose()
            raise UserError(f"cannot use the run database {display}: {_summary(error)}") from None
        if not got:
            try:
                row = connection.execute(sa.text(
                    "SELECT a.application_name, a.client_addr, a.backend_start FROM pg_locks l "
                    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.objid = :k AND l.database = (SELECT oid FROM pg_database WHERE datname = "
                    "current_database())"), {"k": _PG_KEY}).first()
            except sa.exc.SQLAlchemyError:
                row = None
            connection.close()
            engine.dispose()
            if row is not None and row[0]:
                since = row[2].astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if row[2] else "?"
                who = f"{row[0]} (client {row[1] or 'local'}, since {since})"
            else:
                who = "another cellsearch driver"
            raise RunInUse(f"the run database {display} is in use by {who}; wait for it to end or stop it, "
                           f"then try again")
        self._pg = (engine, connection)

    def release(self) -> None:
        for path, handle in self._files:
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps({**self.record, "released": True}) + "\n")
                handle.flush()
            except OSError:
                pass
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()
            except OSError:
                pass
        self._files.clear()
        if self._pg is not None:
            engine, connection = self._pg
            self._pg = None
            try:
                connection.close()  # ends the session, and with it the advisory lock
            except Exception:  # the server may be gone; its side of the lock went with the session
                pass
            engine.dispose()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def database_lock_path(database: Path) -> Path:
    """The lock file of a SQLite database: ``.<name>.cellsearch-lock`` next to it."""
    return database.parent / f".{database.name}{DATABASE_LOCK_SUFFIX}"


def check_free(directory: Path, what: str) -> None:
    """Raise :class:`RunInUse` naming the holder when a driver holds ``directory``'s lock; write nothing."""
    try:
        handle = open(directory / LOCK_NAME, "r", encoding="utf-8")
    except OSError:
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(f"{what} is in use by {holder_text(_read_holder(handle))}; wait for it to end or stop it "
                           f"(Ctrl-C), then try again") from None
        except OSError:
            return


def acquire(directory: Path, what: str, storage_url: str | None = None, display_url: str | None = None,
            command: str | None = None, log: Callable[[str], None] | None = None) -> RunLock:
    """Lock ``directory`` (which must exist), and the database at ``storage_url`` when it is not inside it.

    Raises :class:`RunInUse` (one line naming the holder) when another driver holds either.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    lock = RunLock(command or _command_name())
    try:
        lock.lock_file(directory / LOCK_NAME, what, log)
        if storage_url is not None:
            from cellsearch.search.storage import sqlite_path

            parsed = sa.engine.make_url(storage_url)
            database = sqlite_path(storage_url)
            if database is not None:
                # the database file's own lock, wherever it lies: two run directories (or a run directory and a
                # --storage URL naming its run.db) can never drive one database
                database = database.resolve()
                if database.parent.is_dir():  # else SQLite cannot open it either, and says so
                    inside = database.parent == directory.resolve()  # then the run directory's note says it all
                    lock.lock_file(database_lock_path(database), f"the run database {database}",
                                   (lambda message: None) if inside else log)
            elif parsed.get_backend_name() == "postgresql":
                lock.lock_postgres(storage_url, display_url or storage_url)
    except BaseException:
        lock.release()
        raise
    return lock


def _command_name() -> str:
    argv = [os.path.basename(sys.argv[0])] + sys.argv[1:2] if sys.argv else []
    if argv and argv[0] in ("cli.py", "__main__.py", "-m", "-c"):
        argv[0] = "cellsearch"
    return " ".join(argv) or "cellsearch"
