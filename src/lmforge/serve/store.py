"""The web app's SQLite store: studies, prompts, outputs, annotators, votes, organisers.

One file in WAL mode (readers never block the single writer) with
``synchronous=FULL``, so a vote acknowledged to the browser survives a crash
of the server or the machine. Access tokens are stored only as SHA-256
hashes: a leaked database does not let anyone in.

Votes are idempotent twice over: each carries a client-generated id
(``vote_uid``, unique) and an annotator judges an item at most once
(``UNIQUE(annotator_id, item_id)``). A resubmitted form, a retried request
after a timeout, or a second tab all land on ``INSERT ... ON CONFLICT DO
NOTHING`` and leave exactly one vote. A study's ``votes_per_item`` is checked
in the transaction that stores the vote, so no item ever gets more.

Organisers sign in with a token and get a session: a random id whose hash is
stored with an expiry. Signing out deletes it; revoking a token deletes the
token and its sessions. The file (and its -wal/-shm companions, which SQLite
creates with the database's mode) is readable by its owner only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lmforge.serve.stats import OUTCOMES, Judgment

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS organisers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, token_hash TEXT UNIQUE NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL,
    settings TEXT NOT NULL, status TEXT NOT NULL, error TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS study_models (
    study_id INTEGER NOT NULL REFERENCES studies(id), idx INTEGER NOT NULL,
    label TEXT NOT NULL, checkpoint TEXT NOT NULL, PRIMARY KEY (study_id, idx));
CREATE TABLE IF NOT EXISTS prompts (
    study_id INTEGER NOT NULL REFERENCES studies(id), idx INTEGER NOT NULL,
    text TEXT NOT NULL, PRIMARY KEY (study_id, idx));
CREATE TABLE IF NOT EXISTS outputs (
    study_id INTEGER NOT NULL, prompt_idx INTEGER NOT NULL, model_idx INTEGER NOT NULL,
    text TEXT NOT NULL, PRIMARY KEY (study_id, prompt_idx, model_idx));
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, study_id INTEGER NOT NULL REFERENCES studies(id),
    prompt_idx INTEGER NOT NULL, model_a INTEGER NOT NULL, model_b INTEGER NOT NULL,
    UNIQUE (study_id, prompt_idx, model_a, model_b));
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, study_id INTEGER NOT NULL REFERENCES studies(id),
    name TEXT NOT NULL, token_hash TEXT UNIQUE NOT NULL, created REAL NOT NULL,
    UNIQUE (study_id, name));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY, vote_uid TEXT UNIQUE NOT NULL,
    study_id INTEGER NOT NULL REFERENCES studies(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    left_model INTEGER NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('a', 'b', 'tie', 'both_bad')),
    ratings TEXT NOT NULL DEFAULT '{}', comment TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    UNIQUE (annotator_id, item_id));
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY, organiser_id INTEGER NOT NULL REFERENCES organisers(id),
    created REAL NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS votes_study ON votes (study_id, id);
CREATE INDEX IF NOT EXISTS items_study ON items (study_id);
CREATE INDEX IF NOT EXISTS votes_item ON votes (item_id);
"""

CHOICES = ("left", "right", "tie", "both_bad")


class VoteRefused(Exception):
    """The item already has the study's `votes_per_item` judgments, or the study is not
    open for votes."""


def new_token() -> str:
    """A fresh access token: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(24)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class StudySettings:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    max_tokens: int = 64
    seed: int = 0
    prompt_format: str = "completion"  # or "chat" (the tokenizer's chat template)
    criteria: list[str] = field(default_factory=list)
    votes_per_item: int = 0  # 0 = every annotator judges every item


@dataclass
class Study:
    id: int
    name: str
    created: float
    settings: StudySettings
    status: str  # generating | ready | failed
    error: str
    models: list[dict[str, Any]]  # {idx, label, checkpoint}
    n_prompts: int
    n_outputs: int

    @property
    def n_expected(self) -> int:
        return self.n_prompts * len(self.models)


@dataclass
class Annotator:
    id: int
    study_id: int
    name: str


@dataclass
class Item:
    id: int
    study_id: int
    prompt_idx: int
    model_a: int
    model_b: int
    prompt: str
    output_a: str
    output_b: str


class Store:
    """Thin, typed access to the SQLite file; one connection per thread."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock  # session expiry reads this (tests move it forward)
        _create_private(self.path)
        self._local = threading.local()
        # Writers of this process queue on a lock instead of SQLite's busy handler, which
        # polls with sleeps of up to 100 ms and made tail latency under load seconds long.
        self._write_lock = threading.Lock()
        con = self._con()
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)
        columns = {r["name"] for r in con.execute("PRAGMA table_info(organisers)")}
        if "last_used" not in columns:  # a store made before sessions existed
            con.execute("ALTER TABLE organisers ADD COLUMN last_used REAL")
        for companion in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            if companion.exists():
                os.chmod(companion, 0o600)
        if self.meta("secret") is None:
            with self.write() as c:
                c.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),)
                )
        self.secret = bytes.fromhex(self.meta("secret") or "")

    # ------------------------------------------------------------------ plumbing

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            # isolation_level=None: autocommit; writes open BEGIN IMMEDIATE themselves.
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE takes the write lock up front: no upgrade deadlocks)."""
        con = self._con()
        with self._write_lock:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._con().execute(sql, args).fetchall()

    def meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # ------------------------------------------------------------------ organisers

    def add_organiser(self, name: str = "organiser", token: str | None = None) -> str:
        """Register an organiser token (a new one unless given); returns the token."""
        token = token or new_token()
        with self.write() as con:
            con.execute(
                "INSERT OR IGNORE INTO organisers (name, token_hash, created) VALUES (?, ?, ?)",
                (name, hash_token(token), time.time()),
            )
        return token

    def n_organisers(self) -> int:
        return int(self.query("SELECT COUNT(*) AS n FROM organisers")[0]["n"])

    def organiser_tokens(self) -> list[dict[str, Any]]:
        """Every organiser token: id, name, created, last sign-in, live sessions (never the secret)."""
        rows = self.query(
            "SELECT o.id, o.name, o.created, o.last_used, "
            "(SELECT COUNT(*) FROM sessions s WHERE s.organiser_id = o.id AND s.expires > ?) "
            "AS sessions FROM organisers o ORDER BY o.id",
            (self.clock(),),
        )
        return [dict(r) for r in rows]

    def revoke_organiser(self, organiser_id: int) -> bool:
        """Delete an organiser token and end its sessions; False if there is no such token."""
        with self.write() as con:
            con.execute("DELETE FROM sessions WHERE organiser_id = ?", (organiser_id,))
            cur = con.execute("DELETE FROM organisers WHERE id = ?", (organiser_id,))
            return cur.rowcount == 1

    def is_organiser(self, token: str | None) -> bool:
        if not token:
            return False
        rows = self.query("SELECT 1 FROM organisers WHERE token_hash = ?", (hash_token(token),))
        return bool(rows)

    def start_session(self, token: str, ttl_s: float) -> str | None:
        """Exchange an organiser token for a new session id valid `ttl_s` seconds (None if the
        token is not valid). Only the id's hash is stored."""
        now = self.clock()
        session = new_token()
        with self.write() as con:
            rows = con.execute(
                "SELECT id FROM organisers WHERE token_hash = ?", (hash_token(token),)
            ).fetchall()
            if not rows:
                return None
            con.execute("UPDATE organisers SET last_used = ? WHERE id = ?", (now, rows[0]["id"]))
            con.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            con.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?)",
                (hash_token(session), rows[0]["id"], now, now + ttl_s),
            )
        return session

    def session_valid(self, session: str | None) -> bool:
        """Whether `session` is a live (not ended, not expired, token not revoked) session."""
        if not session:
            return False
        rows = self.query(
            "SELECT 1 FROM sessions WHERE id_hash = ? AND expires > ?",
            (hash_token(session), self.clock()),
        )
        return bool(rows)

    def end_session(self, session: str | None) -> None:
        if session:
            with self.write() as con:
                con.execute("DELETE FROM sessions WHERE id_hash = ?", (hash_token(session),))

    # ------------------------------------------------------------------ studies

    def create_study(
        self,
        name: str,
        prompts: Sequence[str],
        models: Sequence[tuple[str, str]],
        settings: StudySettings,
        outputs: dict[tuple[int, int], str] | None = None,
    ) -> int:
        """A study over `prompts` and `models` ((label, checkpoint) pairs) with one item per
        (prompt, pair of models). With every output given, it is ready at once."""
        if len(models) < 2:
            raise ValueError("a study needs at least two models")
        if not prompts:
            raise ValueError("a study needs at least one prompt")
        outputs = outputs or {}
        complete = len(outputs) == len(prompts) * len(models)
        with self.write() as con:
            cur = con.execute(
                "INSERT INTO studies (name, created, settings, status) VALUES (?, ?, ?, ?)",
                (
                    name,
                    time.time(),
                    json.dumps(settings.__dict__),
                    "ready" if complete else "generating",
                ),
            )
            sid = int(cur.lastrowid or 0)
            con.executemany(
                "INSERT INTO study_models VALUES (?, ?, ?, ?)",
                [(sid, i, label, ckpt) for i, (label, ckpt) in enumerate(models)],
            )
            con.executemany(
                "INSERT INTO prompts VALUES (?, ?, ?)", [(sid, i, p) for i, p in enumerate(prompts)]
            )
            con.executemany(
                "INSERT INTO outputs VALUES (?, ?, ?, ?)",
                [(sid, p, m, text) for (p, m), text in outputs.items()],
            )
            con.executemany(
                "INSERT INTO items (study_id, prompt_idx, model_a, model_b) VALUES (?, ?, ?, ?)",
                [
                    (sid, p, a, b)
                    for p in range(len(prompts))
                    for a in range(len(models))
                    for b in range(a + 1, len(models))
                ],
            )
        return sid

    def study(self, study_id: int) -> Study | None:
        if not _is_rowid(study_id):
            return None
        rows = self.query("SELECT * FROM studies WHERE id = ?", (study_id,))
        if not rows:
            return None
        r = rows[0]
        models = [
            dict(m)
            for m in self.query(
                "SELECT idx, label, checkpoint FROM study_models WHERE study_id = ? ORDER BY idx",
                (study_id,),
            )
        ]
        n_prompts = self.query("SELECT COUNT(*) AS n FROM prompts WHERE study_id = ?", (study_id,))
        n_out = self.query("SELECT COUNT(*) AS n FROM outputs WHERE study_id = ?", (study_id,))
        return Study(
            id=r["id"],
            name=r["name"],
            created=r["created"],
            settings=StudySettings(**json.loads(r["settings"])),
            status=r["status"],
            error=r["error"],
            models=models,
            n_prompts=int(n_prompts[0]["n"]),
            n_outputs=int(n_out[0]["n"]),
        )

    def studies(self) -> list[Study]:
        ids = [r["id"] for r in self.query("SELECT id FROM studies ORDER BY id DESC")]
        return [s for s in (self.study(i) for i in ids) if s is not None]

    def set_status(self, study_id: int, status: str, error: str = "") -> None:
        with self.write() as con:
            con.execute(
                "UPDATE studies SET status = ?, error = ? WHERE id = ?", (status, error, study_id)
            )

    def prompts(self, study_id: int) -> list[str]:
        rows = self.query("SELECT text FROM prompts WHERE study_id = ? ORDER BY idx", (study_id,))
        return [r["text"] for r in rows]

    def done_outputs(self, study_id: int) -> set[tuple[int, int]]:
        rows = self.query(
            "SELECT prompt_idx, model_idx FROM outputs WHERE study_id = ?", (study_id,)
        )
        return {(r["prompt_idx"], r["model_idx"]) for r in rows}

    def put_output(self, study_id: int, prompt_idx: int, model_idx: int, text: str) -> None:
        with self.write() as con:
            con.execute(
                "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?)",
                (study_id, prompt_idx, model_idx, text),
            )

    # ------------------------------------------------------------------ annotators

    def add_annotator(self, study_id: int, name: str) -> str:
        """Invite an annotator to a study; returns their token (shown once, stored hashed)."""
        token = new_token()
        with self.write() as con:
            taken = con.execute(
                "SELECT 1 FROM annotators WHERE study_id = ? AND name = ?", (study_id, name)
            ).fetchall()
            if taken:
                raise ValueError(f"an annotator named {name!r} is already invited to this study")
            con.execute(
                "INSERT INTO annotators (study_id, name, token_hash, created) VALUES (?, ?, ?, ?)",
                (study_id, name, hash_token(token), time.time()),
            )
        return token

    def annotator(self, token: str | None) -> Annotator | None:
        if not token:
            return None
        rows = self.query(
            "SELECT id, study_id, name FROM annotators WHERE token_hash = ?", (hash_token(token),)
        )
        return Annotator(**dict(rows[0])) if rows else None

    def annotators(self, study_id: int) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT a.id, a.name, a.created, COUNT(v.id) AS votes FROM annotators a "
            "LEFT JOIN votes v ON v.annotator_id = a.id WHERE a.study_id = ? "
            "GROUP BY a.id ORDER BY a.id",
            (study_id,),
        )
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------ items and votes

    def _rank(self, annotator_id: int, item_id: int) -> bytes:
        return hmac.new(self.secret, f"{annotator_id}:{item_id}".encode(), "sha256").digest()

    def left_is_a(self, annotator_id: int, item_id: int) -> bool:
        """The left/right order an annotator sees for an item: random, but stable across
        reloads and decided by the server (the client never says which model was where)."""
        return bool(self._rank(annotator_id, item_id)[0] & 1)

    def item(self, item_id: int) -> Item | None:
        if not _is_rowid(item_id):
            return None
        rows = self.query(
            "SELECT i.*, p.text AS prompt, oa.text AS output_a, ob.text AS output_b FROM items i "
            "JOIN prompts p ON p.study_id = i.study_id AND p.idx = i.prompt_idx "
            "JOIN outputs oa ON oa.study_id = i.study_id AND oa.prompt_idx = i.prompt_idx "
            "  AND oa.model_idx = i.model_a "
            "JOIN outputs ob ON ob.study_id = i.study_id AND ob.prompt_idx = i.prompt_idx "
            "  AND ob.model_idx = i.model_b "
            "WHERE i.id = ?",
            (item_id,),
        )
        if not rows:
            return None
        return Item(**{f.name: rows[0][f.name] for f in fields(Item)})

    def next_item(self, annotator: Annotator, votes_per_item: int) -> Item | None:
        """The annotator's next unjudged item, in an order random per annotator.

        With `votes_per_item` > 0, items that already have that many judgments are
        skipped, and the least-judged items come first (so overlap builds up evenly).
        """
        rows = self.query(
            "SELECT i.id, COUNT(v.id) AS n, "
            "SUM(v.annotator_id = ?) AS mine FROM items i "
            "LEFT JOIN votes v ON v.item_id = i.id WHERE i.study_id = ? GROUP BY i.id",
            (annotator.id, annotator.study_id),
        )
        open_items = [
            (r["n"] if votes_per_item else 0, self._rank(annotator.id, r["id"]), r["id"])
            for r in rows
            if not r["mine"] and (votes_per_item <= 0 or r["n"] < votes_per_item)
        ]
        if not open_items:
            return None
        return self.item(min(open_items)[2])

    def progress(self, annotator: Annotator) -> tuple[int, int]:
        done = self.query("SELECT COUNT(*) AS n FROM votes WHERE annotator_id = ?", (annotator.id,))
        total = self.query(
            "SELECT COUNT(*) AS n FROM items WHERE study_id = ?", (annotator.study_id,)
        )
        return int(done[0]["n"]), int(total[0]["n"])

    def record_vote(
        self,
        annotator: Annotator,
        item_id: int,
        vote_uid: str,
        choice: str,
        ratings: dict[str, dict[str, int]] | None = None,
        comment: str = "",
    ) -> bool:
        """Store a judgment once; returns False when it was already stored (a resubmission).
        Raises `VoteRefused` when the item already has the study's `votes_per_item`
        judgments or the study is not ready.

        `choice` is what the annotator clicked (left / right / tie / both_bad); the
        store maps it to the item's canonical outcome with the order it showed.
        `ratings` are keyed by side ("left"/"right") then criterion.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        it = self.item(item_id)
        if it is None or it.study_id != annotator.study_id:
            raise LookupError(f"item {item_id} is not part of this study")
        left_is_a = self.left_is_a(annotator.id, item_id)
        left_model = it.model_a if left_is_a else it.model_b
        outcome = {
            "left": "a" if left_is_a else "b",
            "right": "b" if left_is_a else "a",
        }.get(choice, choice)
        assert outcome in OUTCOMES
        by_model = {}
        for side, crit in (ratings or {}).items():
            model = left_model if side == "left" else (it.model_b if left_is_a else it.model_a)
            by_model[str(model)] = crit
        with self.write() as con:
            refusal = self._vote_refusal(con, annotator, item_id, vote_uid)
            if refusal:
                raise VoteRefused(refusal)
            cur = con.execute(
                "INSERT INTO votes (vote_uid, study_id, item_id, annotator_id, left_model, "
                "outcome, ratings, comment, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (
                    vote_uid,
                    annotator.study_id,
                    item_id,
                    annotator.id,
                    left_model,
                    outcome,
                    json.dumps(by_model),
                    comment,
                    time.time(),
                ),
            )
            return cur.rowcount == 1

    @staticmethod
    def _vote_refusal(
        con: sqlite3.Connection, annotator: Annotator, item_id: int, vote_uid: str
    ) -> str | None:
        """Inside the write transaction: why this vote may not be stored (None: it may).
        A resubmission of a stored vote is never refused (it then stores nothing), so
        retries stay idempotent."""
        stored = con.execute(
            "SELECT 1 FROM votes WHERE vote_uid = ? OR (annotator_id = ? AND item_id = ?)",
            (vote_uid, annotator.id, item_id),
        ).fetchall()
        if stored:
            return None
        study = con.execute(
            "SELECT s.status, s.settings FROM studies s JOIN items i ON i.study_id = s.id "
            "WHERE i.id = ?",
            (item_id,),
        ).fetchone()
        if study["status"] != "ready":
            return f"this study is not open for votes (it is {study['status']})"
        limit = int(json.loads(study["settings"]).get("votes_per_item", 0))
        n = con.execute("SELECT COUNT(*) AS n FROM votes WHERE item_id = ?", (item_id,)).fetchone()
        if 0 < limit <= int(n["n"]):
            return (
                f"item {item_id} already has the {limit} judgments this study asks for; "
                "no more votes are taken on it"
            )
        return None

    def votes(self, study_id: int) -> list[dict[str, Any]]:
        """Every vote of a study, oldest first, with prompt and model labels."""
        rows = self.query(
            "SELECT v.id, v.vote_uid, v.item_id, v.outcome, v.ratings, v.comment, v.created, "
            "v.left_model, a.name AS annotator, i.prompt_idx, i.model_a, i.model_b, "
            "ma.label AS label_a, mb.label AS label_b "
            "FROM votes v JOIN annotators a ON a.id = v.annotator_id "
            "JOIN items i ON i.id = v.item_id "
            "JOIN study_models ma ON ma.study_id = v.study_id AND ma.idx = i.model_a "
            "JOIN study_models mb ON mb.study_id = v.study_id AND mb.idx = i.model_b "
            "WHERE v.study_id = ? ORDER BY v.id",
            (study_id,),
        )
        return [dict(r) for r in rows]

    def judgments(self, study_id: int) -> list[Judgment]:
        return [
            Judgment(
                item=v["item_id"],
                annotator=v["annotator"],
                model_a=v["label_a"],
                model_b=v["label_b"],
                outcome=v["outcome"],
            )
            for v in self.votes(study_id)
        ]


def _is_rowid(value: int) -> bool:
    """Whether SQLite can hold `value` (a 64-bit signed integer): ids come from URLs and forms."""
    return -(2**63) <= value < 2**63


def _create_private(path: Path) -> None:
    """Create `path` empty with mode 0600 unless it exists (SQLite takes an empty file as a new
    database and gives its -wal and -shm files the same mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
