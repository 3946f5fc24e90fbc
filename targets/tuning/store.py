"""The on-disk tuning database: MetaSchedule JSON records, safe to share between processes.

Layout of a database folder (``Tune(db=PATH)``)::

    PATH/<target-key>/database_workload.json       one workload (a TIR PrimFunc) per line
    PATH/<target-key>/database_tuning_record.json  one measured schedule per line: [workload line, record]
    PATH/<target-key>/tasks_done.json              [workload hash, per-task budget] of finished runs
    PATH/<target-key>/rule_baselines.json          [workload hash, mean seconds] of graphopt's rule schedule
    PATH/<target-key>/target.json                  the target these records were measured on
    PATH/<target-key>/versions.json                graphopt, TVM and schedule-rule versions they are valid for
    PATH/<target-key>/.lock                        the flock that serialises writers

Both ``.json`` files are exactly MetaSchedule's ``JSONDatabase`` format, so TVM's own tools read
them. One sub-folder per target (the key is a hash of the target dict) is what makes records
"keyed by workload *and* target": MetaSchedule's query ignores the target a record was measured
on, so records for two targets must never share one database. The key also hashes what makes
a record stale although its workload and target are the same: the graphopt and TVM versions
(a trace replays TVM's schedule primitives; graphopt lowers and legalizes the workloads) and
a hash of the sources of graphopt's CPU schedule rules (a rule baseline, or a task marked
done, was measured against one version of the rules). A change of any of them starts a fresh
sub-folder instead of applying records measured for other code.

Why not hand MetaSchedule a ``JSONDatabase`` directly:

* **two writers**: JSONDatabase numbers workloads by their line in the workload file, counted in
  its own process. Two processes tuning into one folder would both append "workload 7" and
  their records would point at each other's kernels. Here every append happens under an
  exclusive ``fcntl.flock``, after re-reading the lines other processes appended, so a
  record always carries the index of *its* workload's line;
* **crashes**: a process killed in the middle of an append leaves a partial last line that
  JSONDatabase refuses to load. Loading drops such a tail (under the lock), so a crash costs at
  most the record that was being written, never the database.

The tuner works on an in-memory MetaSchedule database filled from these files (``load``) and
persists each measured batch as soon as the runner returns (``append``): Ctrl-C or a crash keeps
every record already measured.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
from contextlib import contextmanager
from typing import Any, Iterator

from graphopt.errors import TuningError

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
TARGET_FILE = "target.json"
VERSIONS_FILE = "versions.json"
LOCK_FILE = ".lock"
DONE_FILE = "tasks_done.json"
BASELINE_FILE = "rule_baselines.json"


# graphopt's CPU schedule rules: their sources are part of what a record was measured against
RULES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cpu", "schedules")


@functools.lru_cache(maxsize=None)
def schedule_rules_version(folder: str = RULES_DIR) -> str:
    """A hash of the schedule rules' Python sources (file names and contents)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            h.update(name.encode() + b"\0")
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def record_versions() -> dict[str, str]:
    """What tuning records are valid for besides their workload and target."""
    import tvm

    from graphopt import __version__

    return {"graphopt": __version__, "tvm": tvm.__version__, "schedule_rules": schedule_rules_version()}


def target_key(target_json: dict[str, Any]) -> str:
    """Folder name for a target: readable kind/cpu plus a hash of the whole target dict and of
    the versions records measured now are valid for (``record_versions``)."""
    keyed = {"target": target_json, "versions": record_versions()}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    tvm_part = target_json.get("tvm", target_json)
    cpu = tvm_part.get("mcpu") or tvm_part.get("arch") or "generic"
    return f"{tvm_part.get('kind', 'target')}-{cpu}-{digest}"


class TuningStore:
    """The records of one target in a database folder (see the module docstring)."""

    def __init__(self, db: str | os.PathLike[str], target_json: dict[str, Any]):
        self.root = os.path.abspath(os.fspath(db))
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise TuningError(f"tuning database {self.root} is a file; it must be a directory "
                              "(of MetaSchedule JSON records, one sub-folder per target)")
        self.path = os.path.join(self.root, target_key(target_json))
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise TuningError(f"cannot create tuning database {self.path}: {e.strerror or e}") from e
        for name, content in ((TARGET_FILE, target_json), (VERSIONS_FILE, record_versions())):
            if not os.path.exists(os.path.join(self.path, name)):
                with open(os.path.join(self.path, name), "w") as f:
                    json.dump(content, f, indent=2, sort_keys=True)
        self.workload_file = os.path.join(self.path, WORKLOAD_FILE)
        self.record_file = os.path.join(self.path, RECORD_FILE)
        # workload line index -> (shash, json text) of every workload line read so far
        self._lines: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ locking
    @contextmanager
    def locked(self) -> Iterator[None]:
        with open(os.path.join(self.path, LOCK_FILE), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading
    def _read_lines(self, path: str) -> list[Any]:
        """Parsed JSON lines of ``path``; a torn last line (a writer killed mid-append) is cut off."""
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            data = f.read()
        parsed, good_bytes = [], 0
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            if not raw.strip():
                good_bytes += len(raw) + 1
                continue
            try:
                parsed.append(json.loads(raw))
            except ValueError:
                if any(rest.strip() for rest in lines[i + 1:]):
                    raise TuningError(f"tuning database {path} is corrupt at line {i + 1} "
                                      "(not a MetaSchedule JSON record)") from None
                # the last line was being written when its process died: drop it
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            good_bytes += len(raw) + 1
        return parsed

    def load(self, database: Any, workloads: set[int] | None = None, best_only: bool = False) -> int:
        """Commit stored workloads and records into ``database`` (a MetaSchedule Database);
        returns the number of records loaded.

        ``workloads`` (structural hashes) limits that to the workloads a compile has, and
        ``best_only`` to the fastest record of each: what a compile that tunes nothing
        applies. Parsing a record's trace is the slow part (~7 ms each): a second compile of
        mobilenet_v2 from a 532-record database spent 4.3 s loading them all."""
        from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

        with self.locked():
            workload_lines = self._read_lines(self.workload_file)
            records = self._read_lines(self.record_file)
        self._lines = [(str(line[0]), json.dumps(line[1])) for line in workload_lines]
        for index, _body in records:
            if not 0 <= index < len(workload_lines):
                raise TuningError(f"tuning database {self.record_file}: a record names workload line "
                                  f"{index}, the workload file has {len(workload_lines)}")
        wanted = [workloads is None or int(line[0]) in workloads for line in workload_lines]
        records = [r for r in records if wanted[r[0]]]
        if best_only:
            best: dict[int, Any] = {}
            for r in records:
                if r[0] not in best or _mean_seconds(r[1]) < _mean_seconds(best[r[0]][1]):
                    best[r[0]] = r
            records = list(best.values())
        in_memory: dict[int, Any] = {}
        for i, line in enumerate(workload_lines):
            if not wanted[i]:
                continue
            try:
                in_memory[i] = database.commit_workload(Workload.from_json(line).mod)
            except Exception as e:  # TVM raises its own error types for malformed JSON
                raise TuningError(f"tuning database {self.workload_file}: unreadable workload ({e})") from e
        for index, body in records:
            database.commit_tuning_record(TuningRecord.from_json(body, in_memory[index]))
        return len(records)

    # ------------------------------------------------------------------ writing
    def _sync_workload_lines(self) -> None:
        """Read workload lines other processes appended since we last looked (lock held)."""
        for line in self._read_lines(self.workload_file)[len(self._lines):]:
            self._lines.append((str(line[0]), json.dumps(line[1])))

    def _workload_line(self, workload: Any) -> int:
        """Line index of ``workload`` in the workload file, appending it if new (lock held)."""
        import tvm_ffi

        from tvm.s_tir.meta_schedule.database import Workload

        self._sync_workload_lines()
        shash, body = workload.as_json()
        text = json.dumps(body)
        found = None
        for i, (line_hash, line_text) in enumerate(self._lines):
            if str(line_hash) != str(shash):
                continue
            if line_text == text or tvm_ffi.structural_equal(
                    Workload.from_json([line_hash, json.loads(line_text)]).mod, workload.mod):
                found = i
                break
        if found is None:
            _append_line(self.workload_file, json.dumps([shash, body]))
            self._lines.append((str(shash), text))
            found = len(self._lines) - 1
        return found

    def append(self, records: list[Any]) -> None:
        """Persist measured ``records`` (MetaSchedule TuningRecords) now, under the lock."""
        if not records:
            return
        with self.locked():
            seen: list[tuple[Any, int]] = []  # a batch is usually one workload: look it up once
            lines = []
            for r in records:
                index = next((i for w, i in seen if w.same_as(r.workload)), None)
                if index is None:
                    index = self._workload_line(r.workload)
                    seen.append((r.workload, index))
                lines.append(json.dumps([index, _record_json(r)]))
            _append_line(self.record_file, "\n".join(lines))


    def done_tasks(self) -> dict[int, int]:
        """Workload hash -> the largest per-task budget a run that finished normally tuned it with."""
        with self.locked():
            lines = self._read_lines(os.path.join(self.path, DONE_FILE))
        done: dict[int, int] = {}
        for shash, share in lines:
            done[int(shash)] = max(done.get(int(shash), 0), int(share))
        return done

    def rule_baselines(self) -> dict[int, float]:
        """Workload hash -> mean measured seconds of graphopt's rule schedule for it."""
        with self.locked():
            lines = self._read_lines(os.path.join(self.path, BASELINE_FILE))
        return {int(shash): float(secs) for shash, secs in lines}

    def add_rule_baselines(self, secs_by_hash: dict[int, float]) -> None:
        if secs_by_hash:
            with self.locked():
                _append_line(os.path.join(self.path, BASELINE_FILE),
                             "\n".join(json.dumps([h, s]) for h, s in secs_by_hash.items()))

    def mark_done(self, shashes: list[int], share: int) -> None:
        if shashes:
            with self.locked():
                _append_line(os.path.join(self.path, DONE_FILE), "\n".join(json.dumps([h, share]) for h in shashes))


def mean_seconds(run_secs) -> float:
    """Mean of a record's measured run times (a failed measurement has none: infinite)."""
    if not run_secs:
        return float("inf")
    return sum(float(t) for t in run_secs) / len(run_secs)


def _mean_seconds(record_body: Any) -> float:
    """Mean measured run time of a stored record."""
    return mean_seconds(record_body[1] if len(record_body) > 1 else None)


def _record_json(record: Any) -> Any:
    """``record.as_json()`` that also handles schedules using ``transform_layout``.

    MetaSchedule's Python ``as_json`` only unpacks containers and scalars, so a trace holding
    an IndexMap (our rules re-layout conv outputs and packed weights) raised TypeError and the
    tuning run died. TVM's C++ JSONDatabase writes such objects as their ``save_json`` text,
    which the trace reader loads back: write them the same way.
    """
    from tvm.s_tir.meta_schedule import _ffi_api

    return _plain_json(_ffi_api.TuningRecordAsJSON(record))


def _plain_json(obj: Any) -> Any:
    import tvm
    import tvm_ffi

    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
        return obj.value
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, (tvm_ffi.Array, list, tuple)):
        return [_plain_json(x) for x in obj]
    if isinstance(obj, (tvm_ffi.Map, dict)):
        return {_plain_json(k): _plain_json(v) for k, v in obj.items()}
    return tvm.ir.save_json(obj)


def _append_line(path: str, text: str) -> None:
    """Append ``text`` + newline with one write (lock held). A torn last line left by a writer
    that was killed mid-append is cut off first, so it can never end up between good lines."""
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(0)
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
        f.write(text.encode() + b"\n")
        f.flush()
