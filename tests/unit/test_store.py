import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from kvedge.audit import store as store_mod
from kvedge.errors import StoreError
from kvedge.audit.store import MIGRATIONS, GenerationRow, ScoreRow, Store, audit_lock, run_key


def _gen(key, pid, text="hello"):
    return GenerationRow(key, pid, "sha", text, [1, 2, 3], 10, "eog", 0.1, 0.2)


def test_round_trip_and_keys(tmp_path):
    spec = {"type_k": "q4_0", "type_v": "q4_0", "rotation": True}
    with Store(tmp_path / "s.sqlite") as s:
        k = s.register_run(spec)
        assert k == run_key(dict(reversed(list(spec.items()))))  # order-independent
        assert k != run_key({**spec, "rotation": False})
        s.put_generation(_gen(k, "p1"))
        s.put_score(ScoreRow(k, k, "p1", "sha", 3, 1.5, 0.01, 3, 0.2))
    with Store(tmp_path / "s.sqlite") as s:  # reopened: everything persisted
        g = s.generations(k)[("p1", "sha")]
        assert g.tokens == [1, 2, 3] and g.response == "hello"
        assert s.scores(k, k)[("p1", "sha")].nll_sum == 1.5
        assert s.runs()[k]["type_k"] == "q4_0"


def test_disk_full_is_a_clear_store_error(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as s:
        k = s.register_run({"a": 1})
        # a few pages of room: some rows commit, then the file cannot grow
        s._conn.execute("PRAGMA max_page_count = %d" % (s._conn.execute("PRAGMA page_count").fetchone()[0] + 12))
        with pytest.raises(StoreError, match="disk full"):
            for i in range(200):
                s.put_generation(_gen(k, f"p{i}", "x" * 5000))
    with Store(path) as s:  # what was committed before the failure is intact
        kept = s.generations(k)
        assert kept and all(g.response == "x" * 5000 for g in kept.values())


def test_corrupt_store_is_reported(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        Store(path)


def test_stability_marks(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        s.put_stability("r", "n", "keyword-v1", [("a", "x", True), ("b", "y", False)])
        assert s.stability("r", "n", "keyword-v1") == {("a", "x"): True, ("b", "y"): False}
        assert s.stability("r", "n", "other") == {}


# -- migrations ---------------------------------------------------------------------------------------
OLD_STORE = Path(__file__).resolve().parents[1] / "data" / "store-schema1.sqlite"


def _dump(path):
    with sqlite3.connect(path) as c:
        return {t: sorted(c.execute(f"SELECT {cols} FROM {t}").fetchall()) for t, cols in (
            ("runs", "run_key, spec_json"),
            ("generations", "run_key, prompt_id, prompt_sha, response, tokens_json, n_prompt_tokens, stop_reason"),
            ("scores", "run_key, ref_key, prompt_id, prompt_sha, n_positions, nll_sum, kld_sum, top1_agree"),
            ("stability", "ref_key, noise_key, detector, prompt_id, prompt_sha, stable"))}


def test_a_store_from_an_older_kvedge_is_upgraded(tmp_path):
    """A real schema-1 store (written by kvedge at eb17473, tests/data/README.md) opens, is migrated in
    place, and reads back every row unchanged, by column name."""
    path = tmp_path / "kvedge.sqlite"
    shutil.copy(OLD_STORE, path)
    before = _dump(path)
    assert len(before["generations"]) == 9 and len(before["stability"]) == 3
    with Store(path) as s:
        assert s.applied_migrations() == [m.__name__ for m in MIGRATIONS]
        key = next(k for k, spec in s.runs().items() if spec["label"] == "f16")
        gens = s.generations(key)
        assert {pid for pid, _ in gens} == {"old-prompts:h1", "old-prompts:h2", "old-prompts:b1"}
        g = gens[next(k for k in gens if k[0] == "old-prompts:h1")]
        assert g.response.startswith("I'm sorry") and g.rendered_sha256 is None and len(g.tokens) == 8
        assert len(s.scores(key, key)) == 1
        s.put_generation(GenerationRow(key, "new", "sha", "hi", [1], 3, "eog", 0.1, 0.2, "r" * 64))
        assert s.generations(key)[("new", "sha")].rendered_sha256 == "r" * 64
    after = _dump(path)
    after["generations"] = [r for r in after["generations"] if r[1] != "new"]
    assert after == before
    with sqlite3.connect(path) as c:  # kvedge at eb17473 compares this to 1 and refuses anything else
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(len(MIGRATIONS))
    with Store(path) as s:  # reopening applies nothing twice
        assert s.applied_migrations() == [m.__name__ for m in MIGRATIONS]


def test_rows_are_read_by_column_name(tmp_path):
    """A generations table whose columns lie in another order (as a rebuilt table might) reads right."""
    path = tmp_path / "s.sqlite"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        c.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        c.execute("""CREATE TABLE generations (created REAL NOT NULL, seconds REAL NOT NULL,
            prompt_seconds REAL NOT NULL, stop_reason TEXT NOT NULL, n_prompt_tokens INTEGER NOT NULL,
            tokens_json TEXT NOT NULL, response TEXT NOT NULL, prompt_sha TEXT NOT NULL, prompt_id TEXT NOT NULL,
            run_key TEXT NOT NULL, PRIMARY KEY (run_key, prompt_id, prompt_sha))""")
    with Store(path) as s:
        s.put_generation(_gen("k", "p1", "reversed"))
        assert s.generations("k")[("p1", "sha")] == _gen("k", "p1", "reversed")


def test_a_failing_migration_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    with Store(path):
        pass

    def m999_broken(db):
        db.execute("ALTER TABLE generations ADD COLUMN half_done TEXT")
        raise sqlite3.OperationalError("no such table: half_done_index")

    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS + [m999_broken])
    with pytest.raises(StoreError, match="cannot open"):
        Store(path)
    with sqlite3.connect(path) as c:
        cols = [r[1] for r in c.execute("PRAGMA table_info(generations)")]
        names = [r[0] for r in c.execute("SELECT name FROM _migrations")]
    assert "half_done" not in cols and "m999_broken" not in names


def test_a_store_from_a_newer_kvedge_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as s:
        s._conn.execute("INSERT INTO _migrations VALUES ('m500_future', 0)")
        s._conn.commit()
    with pytest.raises(StoreError, match="newer kvedge"):
        Store(path)


def test_one_audit_at_a_time(tmp_path):
    """The lock is the OS's (flock): a second holder, here another process, is refused with the first's pid,
    and the lock is free again once the first lets go."""
    store_path = tmp_path / "kvedge.sqlite"
    probe = ("import sys; from kvedge.audit.store import audit_lock; from kvedge.errors import StoreError\n"
             "try:\n    with audit_lock(sys.argv[1]): print('got it')\n"
             "except StoreError as e: print(e)")
    with audit_lock(store_path):
        other = subprocess.run([sys.executable, "-c", probe, str(store_path)], capture_output=True, text=True)
        assert f"another kvedge audit (pid {os.getpid()}) is writing" in other.stdout, other
    again = subprocess.run([sys.executable, "-c", probe, str(store_path)], capture_output=True, text=True)
    assert again.stdout.strip() == "got it"
