"""The study: a SQLite file (WAL) holding one row per candidate, the search's only memory.

Operation priorities, the population and the next candidates are all derived from these rows,
so a search killed at any moment resumes from the file alone. Besides the candidates it holds the
supernet warm-up (one row per warm-up child, with its steps), the re-scores (top candidates scored
again on a common supernet state) and the checkpoints of the evaluator's state (a supernet under
weight sharing): written atomically as versioned files every few evaluations, at the end of the
warm-up and of each generation, and recorded in the same transaction as the row that finished
last. On resume the state of the latest checkpoint is loaded and what finished after it (warm-up
children, candidates whose write-backs it does not hold) runs again; an orphan file of a crash
before its transaction is ignored.
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
CREATE TABLE IF NOT EXISTS warmup (
    i INTEGER PRIMARY KEY,           -- warm-up child number (its architecture and seed derive from it)
    arch TEXT NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL,
    score REAL, metrics TEXT, seconds REAL, steps INTEGER, error TEXT, finished REAL
);
CREATE TABLE IF NOT EXISTS rescores (
    id INTEGER PRIMARY KEY,
    candidate INTEGER NOT NULL,      -- the candidate scored again
    generation INTEGER NOT NULL,     -- the supernet state it starts from: elite: the one generation G's children
                                     -- start from; final: the one after this many finished evaluations
    kind TEXT NOT NULL,              -- elite (a parent, scored with the next generation) | final (after the search)
    seed INTEGER NOT NULL, status TEXT NOT NULL,
    score REAL, metrics TEXT, seconds REAL, error TEXT, finished REAL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    version INTEGER PRIMARY KEY,
    file TEXT NOT NULL,              -- evaluator state, relative to the study folder
    finish_order INTEGER NOT NULL,   -- candidates finished up to here are in it
    warmup_done INTEGER NOT NULL,    -- warm-up children 0 .. warmup_done - 1 are in it
    open_generation INTEGER NOT NULL,   -- saved inside a generation (its merge not applied yet)
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Checkpoint:
    version: int
    file: str
    finish_order: int
    warmup_done: int
    open_generation: bool


@dataclass(frozen=True)
class Rescore:
    id: int
    candidate: int
    generation: int
    kind: str
    seed: int
    status: str
    score: float | None
    metrics: dict
    seconds: float | None
    error: str | None


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
        self._lock = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    def lock(self) -> None:
        """Take the study for this process (STUDY.lock, an exclusive flock held until close or exit):
        two searches evaluating one study at once would evaluate candidates twice and overwrite each
        other's supernet. ConfigError when another process holds it."""
        import fcntl

        f = open(self.path.with_name(self.path.name + ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise ConfigError(f"the study {self.path} is being searched by another process (pid {holder})",
                              hint="wait for that search to end (or stop it), then resume; or use another study "
                                   "path") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock = f

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()      # closing the file releases the flock
            self._lock = None

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
               error=None, state_file=None, checkpoint: dict | None = None) -> None:
        """Finish candidate `cid`; with `checkpoint` ({"warmup_done", "open_generation"}) the state
        file `state_file` is recorded as a checkpoint holding it, in the same transaction."""
        with self._tx():
            order = self._next_order()
            self.db.execute("UPDATE candidates SET status=?, score=?, metrics=?, seconds=?, steps=?, error=?,"
                            " state_file=?, finish_order=?, finished=? WHERE id=?",
                            (status, score, json.dumps(metrics or {}), seconds, steps, error, state_file,
                             order, time.time(), cid))
            if status == "done":   # duplicates of it made while it waited get the reused score
                self.db.execute("UPDATE candidates SET score=? WHERE duplicate_of=? AND status='duplicate'",
                                (score, cid))
            if checkpoint is not None:
                self._add_checkpoint(state_file, order, **checkpoint)

    def _next_order(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(finish_order), 0) + 1 FROM candidates").fetchone()[0]

    def _add_checkpoint(self, file: str, finish_order: int, warmup_done: int, open_generation: bool) -> None:
        self.db.execute("INSERT INTO checkpoints (file, finish_order, warmup_done, open_generation, created) "
                        "VALUES (?,?,?,?,?)", (file, finish_order, warmup_done, int(open_generation), time.time()))

    def add_checkpoint(self, file: str, warmup_done: int, open_generation: bool) -> None:
        """Record a checkpoint of everything finished so far."""
        with self._tx():
            self._add_checkpoint(file, self._next_order() - 1, warmup_done, open_generation)

    def latest_checkpoint(self) -> Checkpoint | None:
        r = self.db.execute("SELECT version, file, finish_order, warmup_done, open_generation FROM checkpoints "
                            "ORDER BY version DESC LIMIT 1").fetchone()
        if r:
            return Checkpoint(r[0], r[1], r[2], r[3], bool(r[4]))
        # a study written before the checkpoints table: the state file of the latest finished row
        r = self.db.execute("SELECT state_file, finish_order FROM candidates WHERE state_file IS NOT NULL "
                            "ORDER BY finish_order DESC LIMIT 1").fetchone()
        return Checkpoint(0, r[0], r[1], 0, False) if r else None

    def latest_state_file(self) -> str | None:
        ck = self.latest_checkpoint()
        return ck.file if ck else None

    def reset_after(self, ck: Checkpoint | None) -> int:
        """Candidates finished `done` after checkpoint `ck` (their write-backs are not in its state)
        become pending again, and warm-up children after it are forgotten; returns how many rows."""
        order = ck.finish_order if ck else 0
        warm = ck.warmup_done if ck else 0
        with self._tx():
            n = self.db.execute("UPDATE candidates SET status='pending', score=NULL, metrics=NULL, seconds=NULL, "
                                "steps=NULL, error=NULL, state_file=NULL, finish_order=NULL, finished=NULL "
                                "WHERE status='done' AND finish_order > ?", (order,)).rowcount
            n += self.db.execute("DELETE FROM warmup WHERE i >= ?", (warm,)).rowcount
        return n

    # --- warm-up and re-scores ----------------------------------------------------------------------

    def warmup_rows(self) -> list[dict]:
        cur = self.db.execute("SELECT i, arch, seed, status, score, metrics, seconds, steps, error FROM warmup ORDER BY i")
        return [{"i": r[0], "arch": Architecture.from_json(json.loads(r[1])), "seed": r[2], "status": r[3],
                 "score": r[4], "metrics": json.loads(r[5]) if r[5] else {}, "seconds": r[6], "steps": r[7],
                 "error": r[8]} for r in cur.fetchall()]

    def warmup_count(self, statuses: tuple[str, ...] = ("done", "failed")) -> int:
        """How many warm-up children ended with one of `statuses` (counted in SQL)."""
        marks = ",".join("?" * len(statuses))
        return self.db.execute(f"SELECT COUNT(*) FROM warmup WHERE status IN ({marks})", statuses).fetchone()[0]

    def finish_warmup(self, **row) -> None:
        with self._tx():
            self._finish_warmup(**row)

    def _finish_warmup(self, i: int, arch: Architecture, seed: int, status: str, score=None, metrics=None,
                       seconds=None, steps=None, error=None) -> None:
        self.db.execute("INSERT OR REPLACE INTO warmup (i, arch, seed, status, score, metrics, seconds, steps, "
                        "error, finished) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (i, json.dumps(arch.to_json()), seed, status, score, json.dumps(metrics or {}), seconds,
                         steps, error, time.time()))

    def add_rescores(self, items: list[dict]) -> None:
        with self._tx():
            for it in items:
                self.db.execute("INSERT INTO rescores (candidate, generation, kind, seed, status) VALUES (?,?,?,?,?)",
                                (it["candidate"], it["generation"], it["kind"], it["seed"], "pending"))

    def delete_rescores(self, kind: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM rescores WHERE kind=?", (kind,))

    def rescores(self, where: str = "", args: tuple = ()) -> list[Rescore]:
        cur = self.db.execute(f"SELECT id, candidate, generation, kind, seed, status, score, metrics, seconds, "
                              f"error FROM rescores {where} ORDER BY id", args)
        return [Rescore(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]) if r[7] else {}, r[8], r[9])
                for r in cur.fetchall()]

    def finish_rescore(self, rid: int, status: str, score=None, metrics=None, seconds=None, error=None) -> None:
        with self._tx():
            self.db.execute("UPDATE rescores SET status=?, score=?, metrics=?, seconds=?, error=?, finished=? "
                            "WHERE id=?", (status, score, json.dumps(metrics or {}), seconds, error, time.time(), rid))

    def _tx(self):
        return _Tx(self.db)

    # --- evaluator state ----------------------------------------------------------------------------

    def save_state(self, state: dict, version: int | None = None) -> str:
        """Write evaluator state atomically as state/v{version}.pt (default: the next checkpoint's
        number); returns the relative name."""
        import torch
        d = self.folder / "state"
        d.mkdir(exist_ok=True)
        if version is None:
            version = self.db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM checkpoints").fetchone()[0]
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
