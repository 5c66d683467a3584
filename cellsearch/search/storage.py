"""The run database: cells, steps, units, evaluations and population changes.

One database per run (SQLite in the run directory by default, any SQLAlchemy
URL otherwise). Hyperparameter trials also live there as Optuna studies, one per
cell and task (named ``<cell hash>/<task>``), so ``optuna-dashboard <url>``
browses them; the tables below (prefix ``cs_``) are this package's own.

Only the driver writes. Every state change the search depends on is one
transaction: a unit's evaluations, its ``done`` mark and the step's
bookkeeping commit together, so after a crash a unit either counts fully or
not at all (and is then re-run with the same settings).

Faults. Every transaction (and, through :meth:`RunStorage.retry`, every Optuna
call the driver makes) survives a dropped connection: a PostgreSQL restart or
failover, a reset connection, a locked SQLite file. Such *transient* errors are
retried with backoff for ``storage_retry_s`` seconds, each retry logged; after
that :class:`StorageUnreachable` stops the search. Each write is idempotent
under retry: a transaction that committed on the server but whose
acknowledgement was lost is recognised on the next attempt ("already done by
me") and not applied twice. A write that fails for lack of space or an I/O
error (SQLite "database or disk is full", ENOSPC, EFBIG, EROFS, EACCES,
PostgreSQL ``disk_full``) raises :class:`StorageFull` at once; a database file
SQLite cannot open at all ("unable to open database file": its directory gone,
a path it cannot use) is not a full disk and raises :class:`StorageCannotOpen`,
whose remedy says so. All are
:class:`~cellsearch.errors.UserError`: one line, never a traceback; nothing
committed is touched, and ``cellsearch resume`` continues once the cause is gone.

Credentials. A storage URL written anywhere (``run.json``, ``config.yaml``, the
``cs_run`` table) carries no password (:func:`redact_url`); connections take it
from the environment (:func:`connect_url`): libpq's ``PGPASSWORD`` or
``~/.pgpass``, or a full URL in ``$CELLSEARCH_STORAGE_URL`` naming the same
server and database.

Size: one module on purpose. The table declarations, the fault classification (what is transient,
what is a full disk) and the writes that rely on both (each idempotent under retry) are one contract;
split apart, a new write could easily miss the retry rules it must follow.
"""

from __future__ import annotations

import errno
import json
import os
import math
import shutil
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import sqlalchemy as sa

from cellsearch.errors import UserError
from cellsearch.scoring import PARTIAL_STATUSES

_T = TypeVar("_T")

#: The width at which ``params_per_width`` is measured.
PARAMETER_WIDTH = 128

__all__ = ["PARAMETER_WIDTH", "RunStorage", "metadata", "ensure_indexes", "sqlite_url", "sqlite_path", "normalize_url",
           "make_engine",
           "tune_sqlite", "engine_options", "redact_url", "connect_url", "remember_url", "has_password",
           "STORAGE_URL_ENV", "StorageError", "StorageFull", "StorageUnreachable", "StorageCannotOpen", "is_transient",
           "is_storage_full", "is_unopenable",
           "retry", "DEFAULT_RETRY_S", "is_damaged", "one_line_errors",
           "CELLS", "STEPS", "UNITS", "EVALUATIONS", "POPULATION", "PROMOTIONS", "STATE", "RUN", "ARCHIVE_KEY"]

#: Environment variable holding a full storage URL (with its password) for connecting; it is used only when it
#: names the same server and database as the stored URL.
STORAGE_URL_ENV = "CELLSEARCH_STORAGE_URL"

#: Seconds a transient error is retried when no config says otherwise (``SearchConfig.storage_retry_s``).
DEFAULT_RETRY_S = 300.0

#: Backoff between retries: the first wait, doubled each time up to the last.
_FIRST_WAIT_S = 0.5
_LONGEST_WAIT_S = 10.0

metadata = sa.MetaData()

#: One row per run: identity, resolved config and package versions.
RUN = sa.Table(
    "cs_run", metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("config_yaml", sa.Text, nullable=False),
    sa.Column("versions_json", sa.Text, nullable=False),
)

#: Driver counters (``next_step``) as integer key/value pairs.
STATE = sa.Table(
    "cs_driver_state", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

#: The ``cs_driver_state`` key that marks a run database as an archive (``SearchRun.archive``): it can be read,
#: not resumed (it holds no Optuna tables).
ARCHIVE_KEY = "archive"

#: Every cell the search has proposed. status: evaluating | population | evaluated | rejected.
#: params_per_width: parameter_count(H) / H**2 at H = PARAMETER_WIDTH (about the number of H x H matrices).
CELLS = sa.Table(
    "cs_cells", metadata,
    sa.Column("hash", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128)),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("parent_hash", sa.String(64)),
    sa.Column("mutation_json", sa.Text),
    sa.Column("step_created", sa.Integer, nullable=False),
    sa.Column("node_count", sa.Integer, nullable=False),
    sa.Column("params_per_width", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("rejected_by", sa.String(64)),
    sa.Column("duplicate_of", sa.String(64)),
    sa.Column("created_at", sa.Float, nullable=False),
)

#: One row per step. kind: seed | reevaluate | mutate; status: active | done.
STEPS = sa.Table(
    "cs_steps", metadata,
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("cell_hash", sa.String(64), nullable=False),
    sa.Column("parent_hash", sa.String(64)),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("outcome", sa.String(64)),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
)

#: One row per unit of work (cell x task x group of settings). status: pending | done.
UNITS = sa.Table(
    "cs_units", metadata,
    sa.Column("unit_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("cell_hash", sa.String(64), nullable=False),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("settings_json", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("told", sa.Boolean, nullable=False, default=False),
    sa.Column("submissions", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.UniqueConstraint("step", "stage", "task", "slot", name="uq_cs_units_slot"),
)

#: One row per trained setting; (cell, task, trial) is unique, so no setting counts twice.
EVALUATIONS = sa.Table(
    "cs_evaluations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("unit_id", sa.Integer, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("cell_hash", sa.String(64), nullable=False),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("trial_number", sa.Integer, nullable=False),
    sa.Column("params_json", sa.Text, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("duration_s", sa.Float),
    sa.Column("train_steps", sa.Integer),
    sa.Column("epochs", sa.Float),
    sa.Column("metrics_json", sa.Text),
    sa.Column("curve_json", sa.Text),
    sa.Column("node_id", sa.String(64)),
    sa.Column("worker_pid", sa.Integer),
    sa.Column("hostname", sa.String(255)),
    sa.Column("finished_at", sa.Float, nullable=False),
    sa.UniqueConstraint("cell_hash", "task", "trial_number", name="uq_cs_evaluations_trial"),
)
sa.Index("ix_cs_evaluations_cell_task", EVALUATIONS.c.cell_hash, EVALUATIONS.c.task)
# The readers' filters at a million evaluations: a unit's evaluations (the driver's rebuild and promotion
# decisions, ``evaluations_of_unit``) and a step's (``SearchRun.confirmations``). Runs made before these existed
# get them when next opened for writing (:func:`ensure_indexes`); readers work without them (a read-only archive).
sa.Index("ix_cs_evaluations_unit", EVALUATIONS.c.unit_id)
sa.Index("ix_cs_evaluations_step", EVALUATIONS.c.step)
# Covers the best score per cell and task (``best_scores``, ``SearchRun.best_scores``), the evaluation counts and
# the (cell, task, status) summary of ``SearchRun.cells``: read from the index, not from the table (whose rows
# carry the learning curves: gigabytes at a million evaluations).
sa.Index("ix_cs_evaluations_best", EVALUATIONS.c.cell_hash, EVALUATIONS.c.task, EVALUATIONS.c.status,
         EVALUATIONS.c.score)

#: Promotion decisions (``promotion`` config, ASHA across candidates): one row per candidate measured at the
#: cheap rung (and per initial cell, which competes with its full runs' curves read at the rung). ``score``: the
#: rung score (min over tasks of the ratio to the reference at the rung); ``trial_number``: its trial in the
#: Optuna study ``promotion``. Recorded once; a resumed driver reads the decision instead of asking again.
PROMOTIONS = sa.Table(
    "cs_promotions", metadata,
    sa.Column("step", sa.Integer, primary_key=True),
    sa.Column("cell_hash", sa.String(64), nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("promoted", sa.Boolean, nullable=False),
    sa.Column("trial_number", sa.Integer),
    sa.Column("at", sa.Float, nullable=False),
)

#: Population changes: action enter | leave, with the score that decided it.
POPULATION = sa.Table(
    "cs_population", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("cell_hash", sa.String(64), nullable=False),
    sa.Column("action", sa.String(8), nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("at", sa.Float, nullable=False),
)


def ensure_indexes(engine: sa.Engine) -> list[str]:
    """Create the indexes of :data:`metadata` that an existing run database lacks (one made by an older
    cellsearch); the names of those created. Tables that are not there are left alone."""
    inspector = sa.inspect(engine)
    created = []
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in present:
                index.create(engine, checkfirst=True)
                created.append(index.name)
    return created


def sqlite_url(path: str | Path, read_only: bool = False) -> str:
    """SQLAlchemy URL of a SQLite file (read-only through SQLite's URI mode).

    Built through SQLAlchemy's URL object, never by pasting the path into a string: a directory
    named ``q?mark``, ``hash#tag`` or ``pct%41x`` is escaped, and ``make_url`` gives back exactly
    this path. In URI mode SQLite itself parses the name as a URI, so there the path is
    percent-encoded once more, as SQLite expects (see :func:`sqlite_path`).
    """
    path = Path(path).resolve()
    if read_only:
        return sa.engine.URL.create("sqlite", database=f"file:{urllib.parse.quote(str(path))}",
                                    query={"mode": "ro", "uri": "true"}).render_as_string(hide_password=False)
    return sa.engine.URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def sqlite_path(url: str | sa.engine.URL) -> Path | None:
    """The file a SQLite URL names (plain or SQLite's ``file:`` URI form); None for other databases and ``:memory:``."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    database = parsed.database
    if database.startswith("file:"):
        # SQLite's own URI: the name is percent-encoded when SQLite parses it (uri=true) and ends at '?'
        database = database[len("file:"):]
        if _is_true(parsed.query.get("uri")):
            database = urllib.parse.unquote(database.split("?", 1)[0].split("#", 1)[0])
    return Path(database)


def _is_true(value: Any) -> bool:
    value = value[-1] if isinstance(value, tuple) else value
    return str(value).lower() in ("1", "true", "yes", "on")


def normalize_url(url: str) -> str:
    """``url`` with the PostgreSQL driver cellsearch connects through.

    SQLAlchemy 2.1 maps a plain ``postgresql://`` to psycopg 3. cellsearch's storage fault handling is
    tested with psycopg2, so where psycopg2 is installed (the ``postgres`` extra) a plain URL names it
    explicitly, and the driver, Optuna and ``load_run`` all connect the same way. The extra installs
    psycopg 3 too, so that Optuna's own tools (optuna-dashboard) work with the plain URL a user typed.
    """
    import importlib.util

    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as error:
        raise UserError(f"the storage URL cannot be used: {error}") from None
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg2") is not None:
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def tune_sqlite(engine: sa.Engine, read_only: bool = False) -> sa.Engine:
    """WAL journal (readers never block the driver), synchronous=NORMAL and a busy timeout on SQLite.

    NORMAL still survives a killed process (kill -9 loses nothing committed); only an OS crash
    or power cut can lose the last transactions. It makes each commit several times cheaper,
    and Optuna commits several times per trial.
    """
    if engine.dialect.name != "sqlite":
        return engine

    @sa.event.listens_for(engine, "connect")
    def _pragmas(connection, _record):
        cursor = connection.cursor()
        if not read_only:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    engine.dispose()  # connections opened before the listener existed would miss the pragmas
    return engine


def engine_options(url: str) -> dict[str, Any]:
    """Keyword arguments of ``create_engine`` for the run database (shared by our engine and Optuna's).

    Server databases get ``pool_pre_ping`` (a connection pooled before a server restart is replaced
    before use, not failed on), a connect timeout and TCP keepalives (a dead server is noticed in
    seconds, not after the kernel's two-hour default), unless the URL sets them itself.
    """
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return {}
    options: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "postgresql":
        libpq = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                 "keepalives_count": 3}
        options["connect_args"] = {key: value for key, value in libpq.items() if key not in parsed.query}
    return options


def make_engine(url: str) -> sa.Engine:
    """An engine for the run database (SQLite tuned by :func:`tune_sqlite`; see :func:`engine_options`)."""
    mode = sa.engine.make_url(url).query.get("mode")
    return tune_sqlite(sa.create_engine(url, **engine_options(url)), read_only=mode == "ro")


# -- credentials -------------------------------------------------------------------------------------------------

def has_password(url: str) -> bool:
    """Whether ``url`` carries a password."""
    return sa.engine.make_url(url).password is not None


def redact_url(url: str) -> str:
    """``url`` without its password: the only form of a storage URL that is ever written down or shown."""
    parsed = sa.engine.make_url(url)
    if parsed.password is None:
        return url
    stripped = sa.engine.URL.create(parsed.drivername, username=parsed.username, host=parsed.host, port=parsed.port,
                                    database=parsed.database, query=parsed.query)
    return stripped.render_as_string(hide_password=False)


def _database_identity(url: sa.engine.URL) -> tuple:
    default_ports = {"postgresql": 5432, "mysql": 3306}
    backend = url.get_backend_name()
    return backend, (url.host or "localhost"), url.port or default_ports.get(backend), url.database


#: URLs with a password that this process was given (``cellsearch search --storage URL``), by database, so
#: that the process that created a run can read it back (the summary at the end) though no file has the password.
_session_urls: dict[tuple, str] = {}


def remember_url(url: str) -> None:
    """Keep ``url`` (with its password) in this process's memory for :func:`connect_url`; never written."""
    _session_urls[_database_identity(sa.engine.make_url(url))] = url


def connect_url(stored: str, environ: Mapping[str, str] | None = None) -> str:
    """The URL to connect with for a stored (password-free) URL.

    ``$CELLSEARCH_STORAGE_URL`` wins when it names the same server (host, port) and database; then a URL
    given to this process (:func:`remember_url`); otherwise the stored URL is used as it is and the driver
    finds the password itself (libpq: ``PGPASSWORD``, ``~/.pgpass``).
    """
    environ = os.environ if environ is None else environ
    try:
        identity = _database_identity(sa.engine.make_url(stored))
    except sa.exc.ArgumentError as error:
        raise UserError(f"the stored storage URL cannot be used: {error}") from None
    override = environ.get(STORAGE_URL_ENV)
    if override:
        try:
            candidate = sa.engine.make_url(normalize_url(override))
        except sa.exc.ArgumentError as error:
            raise UserError(f"${STORAGE_URL_ENV} is not a database URL ({error})") from None
        if _database_identity(candidate) == identity:
            return candidate.render_as_string(hide_password=False)
    return _session_urls.get(identity, stored)


# -- faults ------------------------------------------------------------------------------------------------------

class StorageError(UserError):
    """The run database cannot be used right now; everything committed so far is intact."""

    #: Exit status of ``cellsearch search``/``resume`` stopped by this error.
    exit_status = 75
    #: What the user does before ``cellsearch resume``.
    remedy = "once the database is back"


class StorageUnreachable(StorageError):
    """Transient errors (a dropped connection, a restarting server, a locked file) outlasted the retry window."""

    exit_status = 75  # EX_TEMPFAIL: try again later
    remedy = "once the database is reachable"


class StorageFull(StorageError):
    """The database cannot be written: its disk is full (or below ``min_free_space_mb``), read-only or failing."""

    exit_status = 74  # EX_IOERR
    remedy = "after freeing space (or making the run directory writable)"


class StorageCannotOpen(StorageError):
    """The database file cannot be opened at all (SQLite's "unable to open database file"): its directory does not
    exist (any more), cannot be searched, or the path is not one this process can use. Not a full disk: freeing space
    would not help, and the message says so."""

    exit_status = 73  # EX_CANTCREAT
    remedy = ("once the database's path can be opened: its directory must exist and be writable from this process "
              "(give --run-dir as an absolute path on a local file system)")


#: PostgreSQL SQLSTATEs worth retrying: connection exceptions (class 08), admin/crash shutdown, the server
#: starting up, serialization failures and deadlocks (a retried transaction succeeds), too many connections.
_TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "40001", "40P01", "53300")
#: Messages of drivers that carry no SQLSTATE (libpq connection failures, SQLite), lower case.
_TRANSIENT_MESSAGES = (
    "connection refused", "could not connect", "server closed the connection", "terminating connection",
    "connection reset", "connection already closed", "connection is closed", "no connection to the server",
    "the database system is starting up", "the database system is shutting down",
    "the database system is in recovery mode", "the database system is not yet accepting connections",
    "ssl connection has been closed", "ssl syscall error", "could not receive data", "could not send data",
    "broken pipe", "connection timed out", "timeout expired", "lost synchronization with server",
    "database is locked", "database table is locked", "unexpectedly closed", "eof detected",
)
#: Disk full / read-only / I/O failure: retrying cannot help.
_FULL_SQLSTATES = ("53100", "58030")  # disk_full, io_error
_FULL_MESSAGES = (
    "database or disk is full", "disk i/o error", "attempt to write a readonly database",
    "no space left on device", "file too large", "read-only file system",
    "disk quota exceeded", "could not extend file", "could not write to file",
)
#: SQLite could not open (or create) the file: a path problem (SQLITE_CANTOPEN), not a lack of space.
_UNOPENABLE_MESSAGES = ("unable to open database file",)
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                getattr(errno, "EDQUOT", errno.ENOSPC)}
_DBAPI_MODULES = ("psycopg2", "psycopg", "sqlite3", "pg8000", "asyncpg")
_DRIVER_MODULES = (*_DBAPI_MODULES, "sqlalchemy", "optuna")


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and everything it wraps (``orig`` of SQLAlchemy errors, ``__cause__``, ``__context__``)."""
    found: list[BaseException] = []
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or any(current is seen for seen in found):
            continue
        found.append(current)
        stack.extend([getattr(current, "orig", None), current.__cause__, current.__context__])
    return [e for e in found if isinstance(e, BaseException)]


def _from_driver(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] in _DRIVER_MODULES


def _sqlstate(error: BaseException) -> str:
    return str(getattr(error, "pgcode", None) or getattr(error, "sqlstate", None) or "")


def is_storage_full(error: BaseException) -> bool:
    """Whether ``error`` means the database cannot be written (full disk, read-only, I/O error)."""
    for cause in _causes(error):
        if isinstance(cause, OSError) and not _from_driver(cause) and cause.errno in _FULL_ERRNOS:
            return True
        if _sqlstate(cause).startswith(_FULL_SQLSTATES):
            return True
        if _from_driver(cause) and any(text in str(cause).lower() for text in _FULL_MESSAGES):
            return True
    return False


def is_unopenable(error: BaseException) -> bool:
    """Whether ``error`` means the database file cannot be opened (a missing or inaccessible directory, a bad path)."""
    return any(_from_driver(cause) and any(text in str(cause).lower() for text in _UNOPENABLE_MESSAGES)
               for cause in _causes(error))


def is_transient(error: BaseException) -> bool:
    """Whether retrying ``error`` may succeed: a lost connection, a restarting server, a locked SQLite file."""
    if isinstance(error, StorageError):
        return False
    for cause in _causes(error):
        if isinstance(cause, sa.exc.DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, (sa.exc.DisconnectionError, ConnectionError)):
            return True
        if _sqlstate(cause).startswith(_TRANSIENT_SQLSTATES):
            return True
        if _from_driver(cause) and any(text in str(cause).lower() for text in _TRANSIENT_MESSAGES):
            return True
    return False


def _summary(error: BaseException) -> str:
    """The first line of the innermost driver message (no SQL, no parameters)."""
    causes = _causes(error)
    # The database driver's own error says what happened; wrappers (SQLAlchemy, Optuna) only that it did.
    ranked = sorted(causes, key=lambda e: (type(e).__module__.split(".")[0] not in _DBAPI_MODULES,
                                           not isinstance(e, OSError)))
    chosen = ranked[0]
    text = str(chosen).strip().splitlines()[0] if str(chosen).strip() else type(chosen).__name__
    return text[:300]


def retry(operation: Callable[[], _T], what: str, window_s: float, log: Callable[[str], None],
          where: str = "the run database", before_retry: Callable[[], None] | None = None,
          give_up: Callable[[], bool] | None = None) -> _T:
    """``operation()``, retried with backoff while it fails transiently, for at most ``window_s`` seconds.

    ``before_retry`` runs before each retry, inside the retried block (it may touch the database): it
    undoes what a failed attempt may have left behind. A full disk raises :class:`StorageFull` at once;
    a transient error that lasts past the window raises :class:`StorageUnreachable`; other errors pass.
    ``give_up()`` is asked while waiting between tries: when it says yes (the user asked the search to
    stop now), the wait ends with :class:`StorageUnreachable` instead of lasting the whole window.
    """
    started = time.monotonic()
    wait = _FIRST_WAIT_S
    attempt = 0
    while True:
        try:
            if attempt and before_retry is not None:
                before_retry()
            return operation()
        except StorageError:
            raise
        except Exception as error:
            if is_unopenable(error):
                raise StorageCannotOpen(f"cannot open {where} ({what}): {_summary(error)}; committed work is safe") \
                    from error
            if is_storage_full(error):
                raise StorageFull(f"cannot write {where} ({what}): {_summary(error)}; committed work is safe") \
                    from error
            if not is_transient(error):
                raise
            elapsed = time.monotonic() - started
            if elapsed + wait > window_s:
                raise StorageUnreachable(
                    f"{where} has failed for {elapsed:.0f} s ({what}: {_summary(error)}); gave up after "
                    f"{attempt + 1} tries (storage_retry_s = {window_s:g}); committed work is safe") from error
            attempt += 1
            log(f"{where}: {what} failed ({_summary(error)}); retry {attempt} in {wait:.1f} s")
            resume_at = time.monotonic() + wait
            while True:
                # in slices: a stop asked for during the wait is seen within a fraction of a second
                if give_up is not None and give_up():
                    raise StorageUnreachable(
                        f"asked to stop now while {where} was failing ({what}: {_summary(error)}); committed work "
                        f"is safe") from error
                left = resume_at - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, 0.2))
            wait = min(2 * wait, _LONGEST_WAIT_S)


#: Messages and SQLSTATEs of a damaged, truncated or foreign database (a reader cannot do anything about them).
_DAMAGE_MESSAGES = ("no such table", "no such column", "malformed", "not a database", "file is encrypted",
                    "does not exist")
_DAMAGE_SQLSTATES = ("42P01", "42703", "XX001", "XX002")


def is_damaged(error: BaseException) -> bool:
    """Whether ``error`` means the database is damaged, truncated or not a run database (a table is missing)."""
    for cause in _causes(error):
        if _sqlstate(cause).startswith(_DAMAGE_SQLSTATES):
            return True
        if type(cause).__module__.split(".")[0] in _DBAPI_MODULES and any(
                text in str(cause).lower() for text in _DAMAGE_MESSAGES):
            return True
    return False


def one_line_errors(engine: sa.Engine, where: str) -> sa.Engine:
    """Database errors on ``engine`` (a reader's) become one :class:`UserError` line naming ``where``.

    A damaged file (random bytes, truncated, 0 bytes, a dropped table) says so and what to do; any
    other failure (an unreachable server) is named with the driver's own first line.
    """
    @sa.event.listens_for(engine, "handle_error")
    def _one_line(context) -> None:
        error = context.original_exception
        if is_damaged(error):
            raise UserError(f"{where} is damaged or not a cellsearch run database ({_summary(error)}); restore it "
                            f"from a backup") from None
        raise UserError(f"cannot read {where}: {_summary(error)}") from None

    return engine


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RunStorage:
    """The driver's access to its own tables; all writes go through here.

    ``url`` is the URL to connect with (it may carry a password: it is never written or shown;
    :attr:`display_url` is). Every method is one transaction retried as described in the module
    docstring; ``retry_s`` is the retry window and ``log`` receives a line per retry.
    """

    def __init__(self, url: str, create: bool = False, retry_s: float = DEFAULT_RETRY_S,
                 log: Callable[[str], None] | None = None):
        self.url = url
        self.retry_s = retry_s
        self.log = log or _stderr
        #: Asked while a retry waits: True ends the wait (the driver sets it: "stop now" was requested).
        self.give_up: Callable[[], bool] | None = None
        #: Released by :meth:`close`: the run's lock (:mod:`cellsearch.search.lock`), once the run holds it.
        self._held: list[Callable[[], None]] = []
        try:
            self.display_url = redact_url(url)
            self.engine = make_engine(url)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as error:
            # The message names the scheme or the parse failure, never the URL (it may hold a password).
            raise UserError(f"the storage URL cannot be used: {error}") from None
        if create:
            try:
                self.retry(lambda: metadata.create_all(self.engine), "create tables")
            except sa.exc.SQLAlchemyError as error:
                self.engine.dispose()
                raise UserError(f"cannot use the run database {self.display_url}: {_summary(error)}") from None
        else:
            # opened for writing: a run made before an index existed gets it now (once; readers never need it)
            try:
                created = self.retry(lambda: ensure_indexes(self.engine), "create missing indexes")
            except (sa.exc.SQLAlchemyError, StorageError):
                created = []  # not a usable run database (yet), or not writable: whoever uses it reports that
            if created:
                self.log(f"created the indexes {', '.join(created)} on the run database")

    def close(self) -> None:
        self.engine.dispose()
        while self._held:
            self._held.pop()()

    def hold(self, release: Callable[[], None]) -> None:
        """Call ``release`` when this storage is closed (the run's lock is held exactly as long as the storage)."""
        self._held.append(release)

    def retry(self, operation: Callable[[], _T], what: str, before_retry: Callable[[], None] | None = None) -> _T:
        """``operation()`` under this storage's retry policy (see :func:`retry`); the driver's Optuna calls use it."""
        return retry(operation, what, self.retry_s, self.log, where=f"the run database {self.display_url}",
                     before_retry=before_retry, give_up=self.give_up)

    def _write(self, what: str, body: Callable[[sa.Connection, bool], _T]) -> _T:
        """``body(connection, retrying)`` in one transaction, retried.

        ``retrying`` is True from the second attempt on: only then may the body find its own earlier
        commit (acknowledgement lost) and treat it as done; a first attempt that finds the work done
        is a real double count and fails as before.
        """
        attempts = 0

        def attempt() -> _T:
            nonlocal attempts
            attempts += 1
            with self.engine.begin() as connection:
                return body(connection, attempts > 1)

        return self.retry(attempt, what)

    def _read(self, what: str, body: Callable[[sa.Connection], _T]) -> _T:
        def attempt() -> _T:
            with self.engine.connect() as connection:
                return body(connection)

        return self.retry(attempt, what)

    def database_directory(self) -> Path | None:
        """The directory of a SQLite database file (None for server databases and in-memory SQLite)."""
        database = sqlite_path(self.url)
        return None if database is None else database.resolve().parent

    def free_bytes(self) -> int | None:
        """Free space (bytes) on the filesystem of a SQLite database; None for server databases."""
        directory = self.database_directory()
        if directory is None:
            return None
        return shutil.disk_usage(directory).free

    # -- run identity -------------------------------------------------------------------------------------------

    def run_row(self) -> Mapping[str, Any] | None:
        """The ``cs_run`` row, or None when the database holds no run (no tables yet)."""
        try:
            return self._read("read the run", lambda c: c.execute(sa.select(RUN)).mappings().first())
        except sa.exc.SQLAlchemyError as error:
            if any("no such table" in str(e) or _sqlstate(e) == "42P01" for e in _causes(error)):
                return None
            # A wrong password, an unknown host or database: one clear line, not a traceback.
            raise UserError(f"cannot use the run database {self.display_url}: {_summary(error)}") from None

    def create_run(self, run_id: str, config_yaml: str, versions: Mapping[str, str]) -> None:
        def body(connection: sa.Connection, retrying: bool) -> None:
            if retrying and connection.execute(sa.select(RUN.c.run_id).where(RUN.c.run_id == run_id)).first():
                return  # committed by an earlier attempt whose acknowledgement was lost
            connection.execute(RUN.insert().values(run_id=run_id, created_at=time.time(), config_yaml=config_yaml,
                                                   versions_json=json.dumps(dict(versions))))
            connection.execute(STATE.insert().values(key="next_step", value=0))

        self._write("create the run", body)

    def update_config(self, config_yaml: str) -> None:
        self._write("update the config", lambda c, _: c.execute(RUN.update().values(config_yaml=config_yaml)))

    # -- counters -----------------------------------------------------------------------------------------------

    def is_archive(self) -> bool:
        """Whether this database is an archive of a run (see ``ARCHIVE_KEY``)."""
        return self._read("read the driver state", lambda c: c.execute(
            sa.select(STATE.c.value).where(STATE.c.key == ARCHIVE_KEY)).first() is not None)

    def counter(self, key: str) -> int:
        return self._read("read a counter", lambda c: int(
            c.execute(sa.select(STATE.c.value).where(STATE.c.key == key)).scalar_one()))

    # -- reads used to rebuild the driver's state ---------------------------------------------------------------

    def cells(self, statuses: Iterable[str] | None = None) -> list[Mapping[str, Any]]:
        query = sa.select(CELLS).order_by(CELLS.c.step_created, CELLS.c.hash)
        if statuses is not None:
            query = query.where(CELLS.c.status.in_(list(statuses)))
        return self._read("read cells", lambda c: list(c.execute(query).mappings()))

    def cell_description(self, cell_hash: str) -> Mapping[str, Any] | None:
        """One cell's ``spec_json`` and ``parent_hash`` (None when the run holds no such cell): the driver's read
        on a miss of its working set (``cellsearch.search.working_set``)."""
        query = sa.select(CELLS.c.spec_json, CELLS.c.parent_hash).where(CELLS.c.hash == cell_hash)
        return self._read("read a cell", lambda c: c.execute(query).mappings().first())

    def best_scores(self, cell_hash: str | None = None) -> dict[tuple[str, str], float]:
        """(cell hash, task) -> best score over every committed evaluation, except partial ones (settings pruned
        at a rung of successive halving, or trained only to the promotion rung: ``PARTIAL_STATUSES``); only
        ``cell_hash``'s when given (read from the ``ix_cs_evaluations_best`` index)."""
        query = sa.select(EVALUATIONS.c.cell_hash, EVALUATIONS.c.task, sa.func.max(EVALUATIONS.c.score)).where(
            EVALUATIONS.c.status.notin_(PARTIAL_STATUSES)).group_by(EVALUATIONS.c.cell_hash, EVALUATIONS.c.task)
        if cell_hash is not None:
            query = query.where(EVALUATIONS.c.cell_hash == cell_hash)
        return self._read("read best scores", lambda c: {
            (cell, task): float(best) for cell, task, best in c.execute(query)})

    def learning_curves(self, cell_hash: str) -> list[Mapping[str, Any]]:
        """The cell's committed evaluations' task, status, score and curve, in commit order (the driver reads a
        cell's promotion-rung values off them when the cell is used)."""
        e = EVALUATIONS.c
        query = sa.select(e.cell_hash, e.task, e.status, e.score, e.curve_json).where(
            e.cell_hash == cell_hash).order_by(e.id)
        return self._read("read learning curves", lambda c: list(c.execute(query).mappings()))

    def promotions(self) -> dict[int, Mapping[str, Any]]:
        """Step -> its promotion decision (see ``PROMOTIONS``)."""
        return self._read("read promotions", lambda c: {
            row["step"]: row for row in c.execute(sa.select(PROMOTIONS)).mappings()})

    def record_promotion(self, step: int, cell_hash: str, score: float, promoted: bool,
                         trial_number: int | None) -> None:
        """Record a promotion decision; a step's first decision stands (a retried or repeated call changes nothing)."""
        def body(connection: sa.Connection, retrying: bool) -> None:
            if connection.execute(sa.select(PROMOTIONS.c.step).where(PROMOTIONS.c.step == step)).first() is None:
                connection.execute(PROMOTIONS.insert().values(
                    step=step, cell_hash=cell_hash, score=score if math.isfinite(score) else None,
                    promoted=promoted, trial_number=trial_number, at=time.time()))

        self._write(f"record the promotion decision of step {step}", body)

    def population_entries(self) -> dict[str, int]:
        """Cell hash -> step at which it last entered the population (for aging)."""
        query = sa.select(POPULATION.c.cell_hash, sa.func.max(POPULATION.c.step)).where(
            POPULATION.c.action == "enter").group_by(POPULATION.c.cell_hash)
        return self._read("read the population", lambda c: {cell: int(step) for cell, step in c.execute(query)})

    def active_steps(self) -> list[Mapping[str, Any]]:
        query = sa.select(STEPS).where(STEPS.c.status == "active").order_by(STEPS.c.step)
        return self._read("read active steps", lambda c: list(c.execute(query).mappings()))

    def steps_of_kind(self, kind: str) -> list[Mapping[str, Any]]:
        query = sa.select(STEPS).where(STEPS.c.kind == kind).order_by(STEPS.c.step)
        return self._read(f"read {kind} steps", lambda c: list(c.execute(query).mappings()))

    def units_of_step(self, step: int) -> list[Mapping[str, Any]]:
        query = sa.select(UNITS).where(UNITS.c.step == step).order_by(UNITS.c.unit_id)
        return self._read("read units", lambda c: list(c.execute(query).mappings()))

    def untold_units(self) -> list[Mapping[str, Any]]:
        query = sa.select(UNITS).where(UNITS.c.status == "done", UNITS.c.told.is_(False))
        return self._read("read untold units", lambda c: list(c.execute(query).mappings()))

    def evaluations_of_unit(self, unit_id: int) -> list[Mapping[str, Any]]:
        query = sa.select(EVALUATIONS).where(EVALUATIONS.c.unit_id == unit_id)
        return self._read("read evaluations", lambda c: list(c.execute(query).mappings()))

    def counts(self) -> dict[str, int]:
        """Totals for the progress bar: search steps (started, done), units done, evaluations, cells evaluated."""
        def body(connection: sa.Connection) -> dict[str, int]:
            scalar = lambda q: int(connection.execute(q).scalar_one() or 0)  # noqa: E731
            return {
                # seed and confirm steps are not search steps (max_steps counts mutations and re-evaluations)
                "search_steps": scalar(sa.select(sa.func.count()).select_from(STEPS).where(
                    STEPS.c.kind.notin_(("seed", "confirm")))),
                "search_steps_done": scalar(sa.select(sa.func.count()).select_from(STEPS).where(
                    STEPS.c.kind.notin_(("seed", "confirm")), STEPS.c.status == "done")),
                "units_done": scalar(sa.select(sa.func.count()).select_from(UNITS).where(UNITS.c.status == "done")),
                "evaluations": scalar(sa.select(sa.func.count()).select_from(EVALUATIONS)),
                # Cells whose evaluation ended (passed or stopped by a filter), duplicates excluded.
                "cells_evaluated": scalar(sa.select(sa.func.count()).select_from(CELLS).where(
                    CELLS.c.status != "evaluating", sa.or_(CELLS.c.rejected_by.is_(None),
                                                          CELLS.c.rejected_by != "duplicate"))),
            }

        return self._read("read counts", body)

    # -- writes (each one transaction, idempotent under retry) --------------------------------------------------

    def start_step(self, step: int, kind: str, cell_hash: str, parent_hash: str | None,
                   new_cell: Mapping[str, Any] | None, finished_outcome: str | None = None) -> None:
        """Record a new step (and the cell it proposes) and advance ``next_step``, atomically.

        ``finished_outcome`` records a step that ends at once (a duplicate candidate).
        """
        now = time.time()

        def body(connection: sa.Connection, retrying: bool) -> None:
            if retrying and connection.execute(sa.select(STEPS.c.step).where(
                    STEPS.c.step == step, STEPS.c.cell_hash == cell_hash)).first() is not None:
                return  # committed by an earlier attempt whose acknowledgement was lost
            if new_cell is not None:
                connection.execute(CELLS.insert().values(created_at=now, **new_cell))
            connection.execute(STEPS.insert().values(
                step=step, kind=kind, cell_hash=cell_hash, parent_hash=parent_hash, stage=0,
                status="done" if finished_outcome else "active", outcome=finished_outcome, started_at=now,
                finished_at=now if finished_outcome else None))
            connection.execute(STATE.update().where(STATE.c.key == "next_step").values(value=step + 1))

        self._write(f"start step {step}", body)

    def add_units(self, rows: list[Mapping[str, Any]]) -> list[int]:
        """Insert planned units (status pending) in one transaction; returns their ids in order."""
        now = time.time()

        def body(connection: sa.Connection, retrying: bool) -> list[int]:
            ids = []
            for row in rows:
                existing = retrying and connection.execute(sa.select(UNITS.c.unit_id, UNITS.c.settings_json).where(
                    UNITS.c.step == row["step"], UNITS.c.stage == row["stage"], UNITS.c.task == row["task"],
                    UNITS.c.slot == row["slot"])).first()
                if existing and existing.settings_json == row["settings_json"]:
                    ids.append(int(existing.unit_id))  # an earlier attempt committed, its acknowledgement was lost
                    continue
                result = connection.execute(UNITS.insert().values(status="pending", told=False, submissions=0,
                                                                  created_at=now, **row))
                ids.append(int(result.inserted_primary_key[0]))
            return ids

        return self._write("record units", body)

    def commit_unit(self, unit_id: int, step: int, cell_hash: str, task: str,
                    evaluations: list[Mapping[str, Any]]) -> None:
        """A finished unit: its evaluations and its ``done`` mark, in one transaction.

        A unit counts once: committing a unit that is already done raises, unless this is a retry and the
        unit is done with exactly these trials (the earlier attempt committed; its acknowledgement was lost).
        """
        now = time.time()

        def body(connection: sa.Connection, retrying: bool) -> None:
            updated = connection.execute(UNITS.update().where(UNITS.c.unit_id == unit_id,
                                                              UNITS.c.status == "pending").values(
                status="done", finished_at=now))
            if updated.rowcount != 1:
                if not retrying:
                    raise RuntimeError(f"unit {unit_id} is not pending; refusing to count it twice")
                status = connection.execute(sa.select(UNITS.c.status).where(UNITS.c.unit_id == unit_id)).scalar()
                stored = sorted(connection.execute(sa.select(EVALUATIONS.c.trial_number).where(
                    EVALUATIONS.c.unit_id == unit_id)).scalars())
                if status == "done" and stored == sorted(row["trial_number"] for row in evaluations):
                    return
                raise RuntimeError(f"unit {unit_id} is not pending; refusing to count it twice")
            for row in evaluations:
                connection.execute(EVALUATIONS.insert().values(unit_id=unit_id, step=step, cell_hash=cell_hash,
                                                               task=task, finished_at=now, **row))

        self._write(f"commit unit {unit_id}", body)

    def rename_optuna_studies(self, renames: Mapping[str, str]) -> None:
        """Rename Optuna studies (old name -> new name) in one transaction, in Optuna's own ``studies`` table (Optuna
        has no rename; its trials refer to the study's id, which stays)."""
        def body(connection: sa.Connection, retrying: bool) -> None:
            for old, new in renames.items():
                connection.execute(sa.text("UPDATE studies SET study_name = :new WHERE study_name = :old"),
                                   {"old": old, "new": new})

        self._write(f"rename {len(renames)} Optuna studies", body)

    def mark_told(self, unit_id: int) -> None:
        self._write(f"mark unit {unit_id} told", lambda c, _: c.execute(
            UNITS.update().where(UNITS.c.unit_id == unit_id).values(told=True)))

    def note_submission(self, unit_id: int) -> None:
        # A retry after a lost acknowledgement may count one submission twice; the column is only a statistic.
        self._write(f"note a submission of unit {unit_id}", lambda c, _: c.execute(
            UNITS.update().where(UNITS.c.unit_id == unit_id).values(submissions=UNITS.c.submissions + 1)))

    def set_stage(self, step: int, stage: int) -> None:
        self._write(f"advance step {step}", lambda c, _: c.execute(
            STEPS.update().where(STEPS.c.step == step).values(stage=stage)))

    def finish_step(self, step: int, outcome: str, cell_updates: Mapping[str, Mapping[str, Any]],
                    population_changes: list[tuple[str, str, float | None]]) -> None:
        """End a step: its outcome, cell status changes and population changes, in one transaction."""
        now = time.time()

        def body(connection: sa.Connection, retrying: bool) -> None:
            if retrying and connection.execute(sa.select(STEPS.c.status).where(STEPS.c.step == step)).scalar() \
                    == "done":
                return  # an earlier attempt committed, its acknowledgement was lost
            connection.execute(STEPS.update().where(STEPS.c.step == step).values(
                status="done", outcome=outcome, finished_at=now))
            for cell_hash, values in cell_updates.items():
                connection.execute(CELLS.update().where(CELLS.c.hash == cell_hash).values(**values))
            for cell_hash, action, score in population_changes:
                connection.execute(POPULATION.insert().values(step=step, cell_hash=cell_hash, action=action,
                                                              score=score, at=now))

        self._write(f"finish step {step}", body)

    # -- helpers of the driver's hot path (one statement or one transaction each) --------------------------------

    def mark_told_many(self, unit_ids: Iterable[int]) -> None:
        """:meth:`mark_told` for several units in one transaction (the driver marks a round of completions at once;
        a unit left untold by a crash is told again on resume, and telling is idempotent)."""
        ids = sorted(set(unit_ids))
        if ids:
            self._write(f"mark {len(ids)} units told", lambda c, _: c.execute(
                UNITS.update().where(UNITS.c.unit_id.in_(ids)).values(told=True)))

    def optuna_trial_state(self, trial_id: int) -> str | None:
        """The state of an Optuna trial (``RUNNING``, ``COMPLETE``, ``FAIL``, ...): one read of Optuna's ``trials``
        table, instead of building the whole trial (parameters, attributes, intermediate values) to read it."""
        query = sa.text("SELECT state FROM trials WHERE trial_id = :trial_id")
        state = self._read("read the state of a trial", lambda c: c.execute(query, {"trial_id": trial_id}).scalar())
        return None if state is None else str(getattr(state, "name", state))

    def set_optuna_study_attributes(self, study_id: int, user_attrs: Mapping[str, Any],
                                    system_attrs: Mapping[str, Any]) -> None:
        """Set an Optuna study's user and system attributes in one transaction, as Optuna's ``set_user_attr`` and
        ``set_study_system_attr`` store them (one row per key, the value as JSON), instead of one transaction per
        attribute. Idempotent (a key's earlier value is replaced)."""
        def body(connection: sa.Connection, retrying: bool) -> None:
            for table, attrs in (("study_user_attributes", user_attrs), ("study_system_attributes", system_attrs)):
                for key, value in attrs.items():
                    parameters = {"study_id": study_id, "key": key, "value_json": json.dumps(value)}
                    connection.execute(sa.text(f"DELETE FROM {table} WHERE study_id = :study_id AND key = :key"),
                                       parameters)
                    connection.execute(sa.text(f"INSERT INTO {table} (study_id, key, value_json) "
                                               f"VALUES (:study_id, :key, :value_json)"), parameters)

        self._write(f"describe Optuna study {study_id}", body)

    def set_optuna_trial_attributes(self, trial_id: int, user_attrs: Mapping[str, Any]) -> None:
        """Set a running Optuna trial's user attributes in one transaction, as Optuna's ``set_trial_user_attr``
        stores them (one row per key, the value as JSON; a key's earlier value replaced). The caller has checked
        that the trial is still running (Optuna refuses to change a finished one)."""
        def body(connection: sa.Connection, retrying: bool) -> None:
            for key, value in user_attrs.items():
                parameters = {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                connection.execute(sa.text("DELETE FROM trial_user_attributes WHERE trial_id = :trial_id "
                                           "AND key = :key"), parameters)
                connection.execute(sa.text("INSERT INTO trial_user_attributes (trial_id, key, value_json) "
                                           "VALUES (:trial_id, :key, :value_json)"), parameters)

        self._write(f"set the attributes of Optuna trial {trial_id}", body)
