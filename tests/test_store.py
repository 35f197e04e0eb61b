import sqlite3

import pytest

from kvedge.errors import StoreError
from kvedge.store import GenerationRow, ScoreRow, Store, run_key


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
