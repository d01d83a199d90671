"""The study: a SQLite file (WAL) holding one row per candidate, the search's only memory.

Operation priorities, the population and the next candidates are all derived from these rows,
so a search killed at any moment resumes from the file alone. Evaluator state (a supernet under
weight sharing) is saved after each commit as a versioned file, written atomically, and the row
that finishes the evaluation references it in the same transaction; an orphan file of a crash
before that transaction is ignored (its row is still `running` and runs again).
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnc.compiler.errors import ConfigError

from .space import Architecture

STATUSES = ("pending", "running", "done", "failed", "duplicate")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,          -- creation order; also the candidate's RNG stream
    generation INTEGER NOT NULL,
    arch TEXT NOT NULL,              -- Architecture JSON (canonical formulas)
    genes TEXT NOT NULL,             -- per layer: path JSON (attention) or null (conv)
    arch_key TEXT NOT NULL,          -- canonical-hash key
    fp_key TEXT NOT NULL,            -- float64 fingerprint key ("numerically equivalent")
    parents TEXT NOT NULL,           -- JSON list of candidate ids
    status TEXT NOT NULL,
    score REAL, metrics TEXT, seconds REAL, steps INTEGER,
    seed INTEGER NOT NULL,
    error TEXT,
    illegal INTEGER NOT NULL DEFAULT 0,   -- illegal graphs rejected while making this candidate
    duplicate_of INTEGER,
    state_file TEXT,                 -- evaluator state after this candidate's commit
    finish_order INTEGER,            -- completion order of evaluations (done / failed)
    created REAL NOT NULL, finished REAL
);
CREATE INDEX IF NOT EXISTS by_status ON candidates(status);
"""


@dataclass(frozen=True)
class Row:
    id: int
    generation: int
    arch: Architecture
    genes: list
    arch_key: str
    fp_key: str
    parents: list
    status: str
    score: float | None
    metrics: dict
    seconds: float | None
    steps: int | None
    seed: int
    error: str | None
    illegal: int
    duplicate_of: int | None
    state_file: str | None
    finish_order: int | None


class Study:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.db = connect(self.path, _SCHEMA)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def close(self) -> None:
        self.db.close()

    # --- meta ---------------------------------------------------------------------------------------

    def check_meta(self, settings: dict) -> None:
        """Store the search settings on first use; on resume they must match."""
        check_meta(self.db, self.path, settings, hint="resume with the same settings, or use a new study path")

    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    # --- rows ---------------------------------------------------------------------------------------

    def rows(self, where: str = "", args: tuple = ()) -> list[Row]:
        cur = self.db.execute(f"SELECT id, generation, arch, genes, arch_key, fp_key, parents, status, "
                              f"score, metrics, seconds, steps, seed, error, illegal, duplicate_of, "
                              f"state_file, finish_order FROM candidates {where} ORDER BY id", args)
        return [Row(r[0], r[1], Architecture.from_json(json.loads(r[2])), json.loads(r[3]), r[4], r[5],
                    json.loads(r[6]), r[7], r[8], json.loads(r[9]) if r[9] else {}, r[10], r[11], r[12],
                    r[13], r[14], r[15], r[16], r[17]) for r in cur.fetchall()]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]

    def insert_many(self, items: list[dict]) -> None:
        """Insert one generation's candidates in one transaction (all or none)."""
        with self._tx():
            for it in items:
                self.db.execute(
                    "INSERT INTO candidates (id, generation, arch, genes, arch_key, fp_key, parents, status,"
                    " score, seed, illegal, duplicate_of, created, finished) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (it["id"], it["generation"], json.dumps(it["arch"].to_json()), json.dumps(it["genes"]),
                     it["arch_key"], it["fp_key"], json.dumps(it["parents"]), it["status"],
                     it.get("score"), it["seed"], it["illegal"], it.get("duplicate_of"), time.time(),
                     time.time() if it["status"] == "duplicate" else None))

    def mark_running(self, cid: int) -> None:
        with self._tx():
            self.db.execute("UPDATE candidates SET status='running' WHERE id=?", (cid,))

    def finish(self, cid: int, status: str, score=None, metrics=None, seconds=None, steps=None,
               error=None, state_file=None) -> None:
        with self._tx():
            order = self.db.execute("SELECT COALESCE(MAX(finish_order), 0) + 1 FROM candidates").fetchone()[0]
            self.db.execute("UPDATE candidates SET status=?, score=?, metrics=?, seconds=?, steps=?, error=?,"
                            " state_file=?, finish_order=?, finished=? WHERE id=?",
                            (status, score, json.dumps(metrics or {}), seconds, steps, error, state_file,
                             order, time.time(), cid))
            if status == "done":   # duplicates of it made while it waited get the reused score
                self.db.execute("UPDATE candidates SET score=? WHERE duplicate_of=? AND status='duplicate'",
                                (score, cid))

    def latest_state_file(self) -> str | None:
        r = self.db.execute("SELECT state_file FROM candidates WHERE state_file IS NOT NULL "
                            "ORDER BY finish_order DESC LIMIT 1").fetchone()
        return r[0] if r else None

    def _tx(self):
        return _Tx(self.db)

    # --- evaluator state ----------------------------------------------------------------------------

    def save_state(self, state: dict, version: int) -> str:
        """Write evaluator state atomically as state/v{version}.pt; returns the relative name."""
        import torch
        d = self.folder / "state"
        d.mkdir(exist_ok=True)
        name = f"state/v{version:06d}.pt"
        tmp = self.folder / (name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        return name

    def load_state(self, name: str) -> Any:
        import torch
        return torch.load(self.folder / name, weights_only=False)

    def prune_states(self, keep: str) -> None:
        """Delete state files other than the referenced latest one (after its row committed)."""
        d = self.folder / "state"
        if not d.is_dir():
            return
        for f in d.iterdir():
            if f"state/{f.name}" != keep:
                f.unlink(missing_ok=True)


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """A study database (its folder created): autocommit mode (transactions are explicit, _Tx), WAL,
    synchronous=FULL (a committed row survives a power cut too), `schema` applied. Shared with
    attnc.search.tinybert.study."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


def check_meta(db: sqlite3.Connection, path: Path, settings: dict, hint: str) -> None:
    """Store the search settings in the meta table on first use; on resume the stored ones must
    match (compared as JSON: a tuple equals the list it was stored as). Shared with the tinybert study."""
    old = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if not old:
        with _Tx(db):
            for k, v in settings.items():
                db.execute("INSERT INTO meta VALUES (?, ?)", (k, json.dumps(v)))
        return
    stored = {k: json.loads(v) for k, v in old.items()}
    diff = [k for k in settings if k in stored and stored[k] != json.loads(json.dumps(settings[k]))]
    if diff:
        raise ConfigError(f"study {path} was made with other settings: "
                          + ", ".join(f"{k}={stored[k]!r} (now {settings[k]!r})" for k in diff), hint=hint)


class _Tx:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, et, e, tb):
        self.db.execute("COMMIT" if et is None else "ROLLBACK")
        return False
