"""The results store: one SQLite file per audit directory holding every generation and score.

Each run (model x KV config x rotation x arithmetic variant x decoding parameters x kvedge version)
has a content-derived key, and each result row is keyed by (run, prompt id, prompt text hash), so a
killed audit resumes where it stopped and a rerun generates nothing new. Every insert is its own
transaction: a kill loses at most the generation in flight.

The schema grows by named migrations, the way simonw/llm keeps its log database: `MIGRATIONS` is the
ordered list of functions, `_migrations` the table of those applied, and opening a store applies the
missing ones, each in one transaction with its record. A store written before migrations existed
(`meta.schema_version` 1) is recognised and upgraded in place. Rows are read and written by column name.
One audit at a time writes a directory: `audit_lock` holds a lock file beside the store.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import StoreError

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    # kvedge's first store (schema_version 1); IF NOT EXISTS makes it a no-op on such a store
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS runs (run_key TEXT PRIMARY KEY, spec_json TEXT NOT NULL, "
               "created REAL NOT NULL)")
    db.execute("""CREATE TABLE IF NOT EXISTS generations (
        run_key TEXT NOT NULL, prompt_id TEXT NOT NULL, prompt_sha TEXT NOT NULL, response TEXT NOT NULL,
        tokens_json TEXT NOT NULL, n_prompt_tokens INTEGER NOT NULL, stop_reason TEXT NOT NULL,
        prompt_seconds REAL NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (run_key, prompt_id, prompt_sha))""")
    db.execute("""CREATE TABLE IF NOT EXISTS scores (
        run_key TEXT NOT NULL, ref_key TEXT NOT NULL, prompt_id TEXT NOT NULL, prompt_sha TEXT NOT NULL,
        n_positions INTEGER NOT NULL, nll_sum REAL NOT NULL, kld_sum REAL NOT NULL,
        top1_agree INTEGER NOT NULL, max_abs_logprob_diff REAL NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (run_key, ref_key, prompt_id, prompt_sha))""")


@migration
def m002_stability(db: sqlite3.Connection) -> None:
    # added within schema_version 1, so a version-1 store may or may not have it
    db.execute("""CREATE TABLE IF NOT EXISTS stability (
        ref_key TEXT NOT NULL, noise_key TEXT NOT NULL, detector TEXT NOT NULL, prompt_id TEXT NOT NULL,
        prompt_sha TEXT NOT NULL, stable INTEGER NOT NULL,
        PRIMARY KEY (ref_key, noise_key, detector, prompt_id, prompt_sha))""")


@migration
def m003_rendered_prompt(db: sqlite3.Connection) -> None:
    # what the model saw: the sha256 of the rendered chat prompt (NULL in rows from before)
    db.execute("ALTER TABLE generations ADD COLUMN rendered_sha256 TEXT")


@migration
def m004_servers(db: sqlite3.Connection) -> None:
    # server audits: which server gave each answer, and what each server was when first seen
    db.execute("""CREATE TABLE IF NOT EXISTS origins (
        run_key TEXT NOT NULL, prompt_id TEXT NOT NULL, prompt_sha TEXT NOT NULL, server TEXT NOT NULL,
        detail_json TEXT NOT NULL, PRIMARY KEY (run_key, prompt_id, prompt_sha))""")
    db.execute("CREATE TABLE IF NOT EXISTS servers (url TEXT PRIMARY KEY, identity_json TEXT NOT NULL, "
               "first_seen REAL NOT NULL)")


@migration
def m005_first_token_margin(db: sqlite3.Connection) -> None:
    # the first-token refusal margin at the answer's first position (kvedge.detectors.openings), read from
    # the logits that chose the answer's first token; NULL in rows from before and where none could be read
    db.execute("ALTER TABLE generations ADD COLUMN margin REAL")


@migration
def m006_applied_rotation(db: sqlite3.Connection) -> None:
    # the rotation llama.cpp says it applied per cache side when it made a run's context
    # (kvedge.llama.applied); a run is recorded the first time this kvedge opens it
    db.execute("CREATE TABLE IF NOT EXISTS applied (run_key TEXT PRIMARY KEY, rotation_json TEXT NOT NULL, "
               "recorded REAL NOT NULL)")


@dataclass(frozen=True)
class GenerationRow:
    run_key: str
    prompt_id: str
    prompt_sha: str
    response: str
    tokens: list[int]
    n_prompt_tokens: int
    stop_reason: str
    prompt_seconds: float
    seconds: float  # decode time
    rendered_sha256: str | None = None  # the chat prompt the model saw; None in rows from older stores
    margin: float | None = None  # the first-token refusal margin; None in older rows or where it cannot be read


@dataclass(frozen=True)
class ScoreRow:
    """Teacher-forced scoring of a reference continuation: sums over its positions."""

    run_key: str
    ref_key: str
    prompt_id: str
    prompt_sha: str
    n_positions: int
    nll_sum: float
    kld_sum: float
    top1_agree: int
    max_abs_logprob_diff: float


@dataclass(frozen=True)
class AuditRows:
    """What an audit's report is computed from: each run's generations, and each run's scores against
    the reference run (the reference's against itself included), by (prompt id, text hash)."""

    generations: dict[str, dict[tuple[str, str], GenerationRow]]
    scores: dict[str, dict[tuple[str, str], ScoreRow]]
    applied: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # run key -> rotation applied


def run_key(spec: dict[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _is_disk_full(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "disk is full" in msg or "disk i/o error" in msg or getattr(exc, "errno", None) == errno.ENOSPC


def _insert(c: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    c.execute(f"INSERT OR REPLACE INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})", row)


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=30)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            if _is_disk_full(exc):
                raise StoreError(f"disk full while opening {self.path}: free space and rerun to resume") from None
            raise StoreError(f"cannot open results store {self.path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot create results store {self.path}: {exc.strerror or exc}") from None

    def _migrate(self) -> None:
        c = self._conn
        with c:
            c.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
        applied = {r["name"] for r in c.execute("SELECT name FROM _migrations")}
        known = [m.__name__ for m in MIGRATIONS]
        if applied - set(known):
            raise StoreError(f"results store {self.path} was written by a newer kvedge (migrations "
                             f"{', '.join(sorted(applied - set(known)))}): upgrade kvedge or use another --out")
        for fn in MIGRATIONS:
            if fn.__name__ in applied:
                continue
            c.execute("BEGIN IMMEDIATE")  # the migration and its record commit together, or neither
            try:
                if c.execute("SELECT 1 FROM _migrations WHERE name = ?", (fn.__name__,)).fetchone():
                    c.execute("COMMIT")  # another process applied it while this one waited
                    continue
                fn(c)
                c.execute("INSERT INTO _migrations (name, applied) VALUES (?, ?)", (fn.__name__, time.time()))
                # an older kvedge reads meta.schema_version and refuses any but its own
                c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                          (str(len(known)),))
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:  # SQLite may have rolled back already (a full disk does)
                    c.execute("ROLLBACK")
                raise

    def applied_migrations(self) -> list[str]:
        return [r["name"] for r in self._conn.execute("SELECT name FROM _migrations ORDER BY rowid")]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._conn:
                yield self._conn
        except sqlite3.OperationalError as exc:
            if _is_disk_full(exc):
                raise StoreError(f"disk full while writing {self.path}: free space and rerun to resume") from None
            raise StoreError(f"cannot write results store {self.path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot write results store {self.path}: {exc.strerror or exc}") from None

    # meta -------------------------------------------------------------------------------------
    def setting(self, key: str, default: str) -> str:
        """The value stored under `key`, storing `default` first if there is none: a choice made once
        per audit directory (the render time of dated chat templates) and kept across resumes."""
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, default))
        return self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()["value"]

    # runs -------------------------------------------------------------------------------------
    def register_run(self, spec: dict[str, Any]) -> str:
        key = run_key(spec)
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO runs (run_key, spec_json, created) VALUES (?, ?, ?)",
                      (key, json.dumps(spec, sort_keys=True), time.time()))
        return key

    def runs(self) -> dict[str, dict[str, Any]]:
        return {r["run_key"]: json.loads(r["spec_json"]) for r in self._conn.execute("SELECT run_key, spec_json FROM runs")}

    # generations ------------------------------------------------------------------------------
    def put_generation(self, row: GenerationRow, origin: dict[str, Any] | None = None) -> None:
        """One result, and with `origin` (a server answered it: `origin["server"]` is its URL) where it
        came from, in the same transaction."""
        values = dataclasses.asdict(row)
        values["tokens_json"] = json.dumps(values.pop("tokens"))
        with self._write() as c:
            _insert(c, "generations", {**values, "created": time.time()})
            if origin is not None:
                _insert(c, "origins", {"run_key": row.run_key, "prompt_id": row.prompt_id, "prompt_sha": row.prompt_sha,
                                       "server": origin["server"], "detail_json": json.dumps(origin, sort_keys=True)})

    def origins(self, run_key_: str) -> dict[tuple[str, str], dict[str, Any]]:
        cur = self._conn.execute(
            "SELECT prompt_id, prompt_sha, detail_json FROM origins WHERE run_key = ?", (run_key_,))
        return {(r[0], r[1]): json.loads(r[2]) for r in cur}

    # servers ------------------------------------------------------------------------------------
    def server_identity(self, url: str) -> dict[str, Any] | None:
        """What a server was (kvedge.server.probe's identity) when this store first recorded it."""
        row = self._conn.execute("SELECT identity_json FROM servers WHERE url = ?", (url,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_server(self, url: str, identity: dict[str, Any]) -> None:
        """Record a server's identity the first time it is seen; a later identity never replaces it."""
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO servers VALUES (?, ?, ?)",
                      (url, json.dumps(identity, sort_keys=True), time.time()))

    def generations(self, run_key_: str) -> dict[tuple[str, str], GenerationRow]:
        names = [f.name for f in dataclasses.fields(GenerationRow) if f.name != "tokens"]
        out = {}
        for r in self._conn.execute(f"SELECT {', '.join(names)}, tokens_json FROM generations WHERE run_key = ?",
                                    (run_key_,)):
            row = GenerationRow(tokens=json.loads(r["tokens_json"]), **{k: r[k] for k in names})
            out[(row.prompt_id, row.prompt_sha)] = row
        return out

    # scores -----------------------------------------------------------------------------------
    def put_score(self, row: ScoreRow) -> None:
        with self._write() as c:
            _insert(c, "scores", {**dataclasses.asdict(row), "created": time.time()})

    def scores(self, run_key_: str, ref_key: str) -> dict[tuple[str, str], ScoreRow]:
        names = [f.name for f in dataclasses.fields(ScoreRow)]
        cur = self._conn.execute(f"SELECT {', '.join(names)} FROM scores WHERE run_key = ? AND ref_key = ?",
                                 (run_key_, ref_key))
        return {(r["prompt_id"], r["prompt_sha"]): ScoreRow(**{k: r[k] for k in names}) for r in cur}

    def audit_rows(self, run_keys: list[str], ref_key: str) -> AuditRows:
        applied = {k: a for k in run_keys if (a := self.applied(k)) is not None}
        return AuditRows({k: self.generations(k) for k in run_keys}, {k: self.scores(k, ref_key) for k in run_keys},
                         applied)

    # what llama.cpp applied -------------------------------------------------------------------
    def put_applied(self, run_key_: str, rotation: dict[str, Any]) -> None:
        """The rotation llama.cpp applied for a run (the latest context made for it says)."""
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO applied VALUES (?, ?, ?)",
                      (run_key_, json.dumps(rotation, sort_keys=True), time.time()))

    def applied(self, run_key_: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT rotation_json FROM applied WHERE run_key = ?", (run_key_,)).fetchone()
        return json.loads(row[0]) if row else None

    # stability ----------------------------------------------------------------------------------
    def put_stability(self, ref_key: str, noise_key: str, detector: str, rows: list[tuple[str, str, bool]]) -> None:
        """Mark each (prompt id, text hash) stable or not: unstable prompts flipped under pure noise."""
        with self._write() as c:
            for pid, sha, stable in rows:
                _insert(c, "stability", {"ref_key": ref_key, "noise_key": noise_key, "detector": detector,
                                         "prompt_id": pid, "prompt_sha": sha, "stable": int(stable)})

    def stability(self, ref_key: str, noise_key: str, detector: str) -> dict[tuple[str, str], bool]:
        cur = self._conn.execute(
            "SELECT prompt_id, prompt_sha, stable FROM stability WHERE ref_key = ? AND noise_key = ? AND detector = ?",
            (ref_key, noise_key, detector),
        )
        return {(r["prompt_id"], r["prompt_sha"]): bool(r["stable"]) for r in cur}


def _try_lock(fd: int) -> bool:
    """An exclusive lock on the open file, without waiting: False if another process holds it. The OS
    drops it when the holder exits, however it exits (a SIGKILL included)."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@contextmanager
def audit_lock(store_path: str | Path) -> Iterator[None]:
    """Hold the audit directory of `store_path` for one audit. A second audit on the same directory is
    refused at once with the first one's pid, before it hashes or runs anything: two writers would each
    regenerate what the other had not yet stored."""
    store_path = Path(store_path)
    lock_path = store_path.with_name(store_path.name + ".lock")
    try:
        store_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot write to the audit directory {store_path.parent}: {exc.strerror or exc}") from None
    try:
        if not _try_lock(fd):
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            raise StoreError(f"another kvedge audit (pid {holder}) is writing {store_path.parent}: wait for it to "
                             "finish, or give this one another --out")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError:
            pass  # the pid is a courtesy for the message above; the lock is what counts
        yield
    finally:
        os.close(fd)
