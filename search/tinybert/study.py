"""The AutoTinyBERT search study: one SQLite file (WAL), the evolution's only memory.

Two tables besides `meta`:
- `candidates`: one row per distinct architecture (its "L-dm-df-h-dqkv" string is the primary key):
  first generation, how it was made (origin, parents), its predicted latency, status, score, metrics
  and timestamps. An architecture met again in a later generation is looked up here, not re-scored.
- `population`: the members of every generation (generation, slot) -> architecture, so that the
  per-generation curves and the next generation's parents come from the file alone.

A generation is written whole (population rows + new `pending` candidates) in one transaction before
any of it is scored, and each score is committed on its own, so a search killed at any moment resumes
with exactly the candidates an uninterrupted run would have made.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from attnc.compiler.errors import ConfigError
from attnc.search.study import _Tx, check_meta, connect   # shared with the OP-NAS study

STATUSES = ("pending", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    arch TEXT PRIMARY KEY,            -- "L-dm-df-h-dqkv"
    seq INTEGER NOT NULL UNIQUE,      -- creation order (scoring order)
    generation INTEGER NOT NULL,      -- first generation holding it
    origin TEXT NOT NULL,             -- "random" | "mutation" | "exploration" | "fast"
    parents TEXT NOT NULL,            -- JSON list of architecture strings
    latency_ms REAL NOT NULL,         -- the latency function's value when it was made
    status TEXT NOT NULL,
    score REAL,
    metrics TEXT,
    error TEXT,
    finish_order INTEGER,
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS population (
    generation INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    arch TEXT NOT NULL REFERENCES candidates(arch),
    origin TEXT NOT NULL,
    parents TEXT NOT NULL,
    PRIMARY KEY (generation, slot)
);
CREATE INDEX IF NOT EXISTS by_status ON candidates(status);
"""


@dataclass(frozen=True)
class Row:
    arch: str
    seq: int
    generation: int
    origin: str
    parents: list
    latency_ms: float
    status: str
    score: float | None
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    finish_order: int | None = None
    created: float | None = None
    finished: float | None = None

    def to_json(self) -> dict:
        return {"arch": self.arch, "generation": self.generation, "origin": self.origin,
                "parents": list(self.parents), "latency_ms": self.latency_ms, "status": self.status,
                "score": self.score, "metrics": dict(self.metrics), "error": self.error}


@dataclass(frozen=True)
class Member:
    generation: int
    slot: int
    arch: str
    origin: str
    parents: list


class Study:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.db = connect(self.path, _SCHEMA)      # the OP-NAS study's settings: WAL, synchronous=FULL

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # --- meta ---------------------------------------------------------------------------------------

    def check_meta(self, settings: dict) -> None:
        """Store the search settings on first use; on resume the stored ones must match."""
        check_meta(self.db, self.path, settings, hint="resume with the same settings, or use a new study folder")

    def set_meta(self, key: str, value) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    # --- reading ------------------------------------------------------------------------------------

    _COLS = ("arch, seq, generation, origin, parents, latency_ms, status, score, metrics, error, "
             "finish_order, created, finished")

    def rows(self, where: str = "", args: tuple = ()) -> list[Row]:
        cur = self.db.execute(f"SELECT {self._COLS} FROM candidates {where} ORDER BY seq", args)
        return [Row(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7],
                    json.loads(r[8]) if r[8] else {}, r[9], r[10], r[11], r[12]) for r in cur.fetchall()]

    def get(self, arch: str) -> Row | None:
        got = self.rows("WHERE arch = ?", (arch,))
        return got[0] if got else None

    def members(self, generation: int | None = None) -> list[Member]:
        where, args = ("WHERE generation = ?", (generation,)) if generation is not None else ("", ())
        cur = self.db.execute(f"SELECT generation, slot, arch, origin, parents FROM population {where} "
                              "ORDER BY generation, slot", args)
        return [Member(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in cur.fetchall()]

    def last_generation(self) -> int:
        """The newest generation written (-1 for a new study)."""
        r = self.db.execute("SELECT MAX(generation) FROM population").fetchone()[0]
        return -1 if r is None else int(r)

    # --- writing ------------------------------------------------------------------------------------

    def add_generation(self, generation: int, members: list[dict], new: list[dict]) -> None:
        """One generation in one transaction: its members, and a pending row for each new architecture.

        members: {"arch", "origin", "parents"} per slot; new: {"arch", "origin", "parents", "latency_ms"}."""
        with self._tx():
            if self.db.execute("SELECT 1 FROM population WHERE generation = ?", (generation,)).fetchone():
                raise RuntimeError(f"generation {generation} is already in {self.path}")
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM candidates").fetchone()[0]
            now = time.time()
            for it in new:
                seq += 1
                self.db.execute("INSERT INTO candidates (arch, seq, generation, origin, parents, latency_ms,"
                                " status, created) VALUES (?,?,?,?,?,?,'pending',?)",
                                (it["arch"], seq, generation, it["origin"], json.dumps(it["parents"]),
                                 float(it["latency_ms"]), now))
            for slot, m in enumerate(members):
                self.db.execute("INSERT INTO population VALUES (?,?,?,?,?)",
                                (generation, slot, m["arch"], m["origin"], json.dumps(m["parents"])))

    def finish(self, arch: str, status: str, score: float | None = None, metrics: dict | None = None,
               error: str | None = None) -> None:
        if status not in STATUSES[1:]:
            raise ValueError(f"finish status must be done or failed, got {status!r}")
        with self._tx():
            order = self.db.execute("SELECT COALESCE(MAX(finish_order), 0) + 1 FROM candidates").fetchone()[0]
            self.db.execute("UPDATE candidates SET status=?, score=?, metrics=?, error=?, finish_order=?,"
                            " finished=? WHERE arch=?",
                            (status, score, json.dumps(metrics or {}), error, order, time.time(), arch))

    def _tx(self):
        return _Tx(self.db)


def study_file(path: str | os.PathLike) -> Path:
    """A study folder or file -> the study.db path (ConfigError when there is none)."""
    p = Path(path)
    if p.is_dir():
        p = p / "study.db"
    if not p.is_file():
        raise ConfigError(f"no study at {p}", hint="pass the search's --out folder or its study.db")
    return p
