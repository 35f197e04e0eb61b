"""The results store: one SQLite file per audit directory holding every generation and score.

Each run (model x KV config x rotation x arithmetic variant x decoding parameters x kvedge version)
has a content-derived key, and each result row is keyed by (run, prompt id, prompt text hash), so a
killed audit resumes where it stopped and a rerun generates nothing new. Every insert is its own
transaction: a kill loses at most the generation in flight.
"""

from __future__ import annotations

import errno
import hashlib
import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import StoreError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_key TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS generations (
    run_key TEXT NOT NULL,
    prompt_id TEXT NOT NULL,
    prompt_sha TEXT NOT NULL,
    response TEXT NOT NULL,
    tokens_json TEXT NOT NULL,
    n_prompt_tokens INTEGER NOT NULL,
    stop_reason TEXT NOT NULL,
    prompt_seconds REAL NOT NULL,
    seconds REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_key, prompt_id, prompt_sha)
);
CREATE TABLE IF NOT EXISTS scores (
    run_key TEXT NOT NULL,
    ref_key TEXT NOT NULL,
    prompt_id TEXT NOT NULL,
    prompt_sha TEXT NOT NULL,
    n_positions INTEGER NOT NULL,
    nll_sum REAL NOT NULL,
    kld_sum REAL NOT NULL,
    top1_agree INTEGER NOT NULL,
    max_abs_logprob_diff REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_key, ref_key, prompt_id, prompt_sha)
);
CREATE TABLE IF NOT EXISTS origins (
    run_key TEXT NOT NULL,
    prompt_id TEXT NOT NULL,
    prompt_sha TEXT NOT NULL,
    server TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    PRIMARY KEY (run_key, prompt_id, prompt_sha)
);
CREATE TABLE IF NOT EXISTS servers (
    url TEXT PRIMARY KEY,
    identity_json TEXT NOT NULL,
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stability (
    ref_key TEXT NOT NULL,
    noise_key TEXT NOT NULL,
    detector TEXT NOT NULL,
    prompt_id TEXT NOT NULL,
    prompt_sha TEXT NOT NULL,
    stable INTEGER NOT NULL,
    PRIMARY KEY (ref_key, noise_key, detector, prompt_id, prompt_sha)
);
"""


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


def run_key(spec: dict[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _is_disk_full(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "disk is full" in msg or "disk i/o error" in msg or getattr(exc, "errno", None) == errno.ENOSPC


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            with self._conn:
                self._conn.executescript(_SCHEMA)
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            found = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open results store {self.path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot create results store {self.path}: {exc.strerror or exc}") from None
        if int(found) != SCHEMA_VERSION:
            raise StoreError(f"results store {self.path} has schema {found}, this kvedge reads {SCHEMA_VERSION}")

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

    # runs -------------------------------------------------------------------------------------
    def register_run(self, spec: dict[str, Any]) -> str:
        key = run_key(spec)
        with self._write() as c:
            c.execute(
                "INSERT OR IGNORE INTO runs(run_key, spec_json, created) VALUES (?, ?, ?)",
                (key, json.dumps(spec, sort_keys=True), time.time()),
            )
        return key

    def runs(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(s) for k, s in self._conn.execute("SELECT run_key, spec_json FROM runs")}

    # generations ------------------------------------------------------------------------------
    def put_generation(self, row: GenerationRow, origin: dict[str, Any] | None = None) -> None:
        """One result, and with `origin` (a server answered it: `origin["server"]` is its URL) where it
        came from, in the same transaction."""
        with self._write() as c:
            c.execute(
                "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.run_key, row.prompt_id, row.prompt_sha, row.response, json.dumps(row.tokens),
                 row.n_prompt_tokens, row.stop_reason, row.prompt_seconds, row.seconds, time.time()),
            )
            if origin is not None:
                c.execute("INSERT OR REPLACE INTO origins VALUES (?, ?, ?, ?, ?)",
                          (row.run_key, row.prompt_id, row.prompt_sha, origin["server"],
                           json.dumps(origin, sort_keys=True)))

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
        cur = self._conn.execute(
            "SELECT run_key, prompt_id, prompt_sha, response, tokens_json, n_prompt_tokens, stop_reason, prompt_seconds, seconds "
            "FROM generations WHERE run_key = ?",
            (run_key_,),
        )
        out = {}
        for r in cur:
            row = GenerationRow(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8])
            out[(row.prompt_id, row.prompt_sha)] = row
        return out

    # scores -----------------------------------------------------------------------------------
    def put_score(self, row: ScoreRow) -> None:
        with self._write() as c:
            c.execute(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.run_key, row.ref_key, row.prompt_id, row.prompt_sha, row.n_positions, row.nll_sum,
                 row.kld_sum, row.top1_agree, row.max_abs_logprob_diff, time.time()),
            )

    def scores(self, run_key_: str, ref_key: str) -> dict[tuple[str, str], ScoreRow]:
        cur = self._conn.execute(
            "SELECT run_key, ref_key, prompt_id, prompt_sha, n_positions, nll_sum, kld_sum, top1_agree, "
            "max_abs_logprob_diff FROM scores WHERE run_key = ? AND ref_key = ?",
            (run_key_, ref_key),
        )
        return {(r[2], r[3]): ScoreRow(*r) for r in cur}

    def audit_rows(self, run_keys: list[str], ref_key: str) -> AuditRows:
        return AuditRows({k: self.generations(k) for k in run_keys}, {k: self.scores(k, ref_key) for k in run_keys})

    # stability ----------------------------------------------------------------------------------
    def put_stability(self, ref_key: str, noise_key: str, detector: str, rows: list[tuple[str, str, bool]]) -> None:
        """Mark each (prompt id, text hash) stable or not: unstable prompts flipped under pure noise."""
        with self._write() as c:
            c.executemany(
                "INSERT OR REPLACE INTO stability VALUES (?, ?, ?, ?, ?, ?)",
                [(ref_key, noise_key, detector, pid, sha, int(stable)) for pid, sha, stable in rows],
            )

    def stability(self, ref_key: str, noise_key: str, detector: str) -> dict[tuple[str, str], bool]:
        cur = self._conn.execute(
            "SELECT prompt_id, prompt_sha, stable FROM stability WHERE ref_key = ? AND noise_key = ? AND detector = ?",
            (ref_key, noise_key, detector),
        )
        return {(r[0], r[1]): bool(r[2]) for r in cur}
