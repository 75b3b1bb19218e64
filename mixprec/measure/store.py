"""The measurement job store: one Optuna study whose trials are the (group, bits) jobs of a table.

Why Optuna and not a home-made queue: its storages already solve sharing between processes and
machines (a journal file with file locks on one host; PostgreSQL/MySQL or a Redis journal across
machines), and popping a WAITING trial to RUNNING is atomic in all of them. So every job is
pre-enqueued as a WAITING trial, a worker claims jobs by flipping them to RUNNING, and stores the
finished row in the trial's user attributes the moment it is measured. Killing a worker loses only
the jobs it held.

Journal storage has no heartbeat (FIELD.md §7.2), so each claim records its owner (host, pid and
the process start time, which guards against pid reuse). A RUNNING trial whose owner is a dead
process on this host is stale: it is marked FAIL and its job enqueued again. `reset_stale` extends
that to owners on other hosts, for when the user knows those workers are gone.

Duplicates are impossible by construction on a journal file (enqueueing happens under a file lock);
on a shared database two first-time workers could enqueue the same job twice, so the canonical
trial of a job is its lowest-numbered non-failed trial and workers discard the others on sight.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mixprec.core.errors import FingerprintMismatchError

__all__ = ["Job", "JobStore", "process_owner", "owner_is_dead"]

log = logging.getLogger(__name__)

STUDY_NAME = "mixprec-measure"
_FINGERPRINT_ATTR = "mixprec_fingerprint"
#: A claim writes state then owner; a RUNNING trial without owner older than this was killed in between.
_OWNERLESS_GRACE = timedelta(seconds=60)


@dataclass(frozen=True)
class Job:
    """One cell of the table: `group` measured at `bits`; `position` orders jobs by their first layer."""

    group: str
    bits: int
    position: int

    @property
    def key(self) -> str:
        return f"{self.group}@{self.bits}"

    def attrs(self) -> dict[str, Any]:
        return {"job": self.key, "group": self.group, "bits": self.bits, "position": self.position}

    @staticmethod
    def from_attrs(attrs: Mapping[str, Any]) -> Job:
        return Job(str(attrs["group"]), int(attrs["bits"]), int(attrs["position"]))


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/pid/stat), None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_owner() -> dict[str, Any]:
    """Who is claiming: host, pid, and process start time (so a reused pid is not mistaken for us)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def owner_is_dead(owner: Mapping[str, Any], other_hosts_dead: bool = False) -> bool:
    """True when the claiming process is known to be gone (other hosts only with `other_hosts_dead`)."""
    if owner.get("host") != socket.gethostname():
        return other_hosts_dead
    start = _start_time(int(owner["pid"]))
    return start is None or start != owner.get("start")


@contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class JobStore:
    """The jobs of one measurement table in an Optuna storage (see the module docstring)."""

    def __init__(self, storage: Any, fingerprint: Mapping[str, Any], lock_path: Path | None = None) -> None:
        import optuna

        self._optuna = optuna
        self.storage = storage
        self.lock_path = lock_path
        self.owner = process_owner()
        self._state = optuna.trial.TrialState
        with _file_lock(lock_path):
            self.study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True)
            self.study_id = storage.get_study_id_from_name(STUDY_NAME)
            self._check_fingerprint(dict(fingerprint))

    def _check_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        recorded = self.study.user_attrs.get(_FINGERPRINT_ATTR)
        if recorded is None:
            self.study.set_user_attr(_FINGERPRINT_ATTR, fingerprint)
            return
        problems = [f"{key}: table has {recorded.get(key)!r}, this run has {fingerprint.get(key)!r}"
                    for key in ("model", "data", "settings") if recorded.get(key) != fingerprint.get(key)]
        old, new = recorded.get("variants", {}), fingerprint.get("variants", {})
        problems += [f"variant {vid}: table has sha256 {old[vid][:12]}…, this run has {new[vid][:12]}…"
                     for vid in sorted(set(old) & set(new)) if old[vid] != new[vid]]
        if problems:
            raise FingerprintMismatchError(
                "the measurement in this storage was made from other inputs and cannot be continued: "
                + "; ".join(problems) + ". Use another --work folder (or --storage), or delete the old measurement "
                "folder to start over")
        if set(new) - set(old):
            self.study.set_user_attr(_FINGERPRINT_ATTR, {**recorded, "variants": {**old, **new}})

    # -- study-level shared values ------------------------------------------------------------------

    def get_attr(self, key: str) -> Any:
        return self.storage.get_study_user_attrs(self.study_id).get(key)

    def set_attr(self, key: str, value: Any) -> None:
        self.storage.set_study_user_attr(self.study_id, key, value)

    # -- jobs ---------------------------------------------------------------------------------------

    def _trials(self, states: Sequence[Any] | None = None) -> list[Any]:
        trials = self.storage.get_all_trials(self.study_id, deepcopy=False,
                                             states=None if states is None else tuple(states))
        return sorted(trials, key=lambda t: t.number)

    def _canonical(self, trials: list[Any]) -> dict[str, int]:
        failed = self._optuna.trial.TrialState.FAIL
        canonical: dict[str, int] = {}
        for trial in trials:
            if trial.state != failed and "job" in trial.user_attrs:
                canonical.setdefault(trial.user_attrs["job"], trial.number)
        return canonical

    def enqueue(self, jobs: Sequence[Job]) -> int:
        """Add a WAITING trial for every job that has no live (waiting, running or complete) trial."""
        with _file_lock(self.lock_path):
            present = self._canonical(self._trials())
            missing = [job for job in jobs if job.key not in present]
            for job in missing:
                self.study.enqueue_trial({}, user_attrs=job.attrs())
        return len(missing)

    def recover_stale(self, reset_stale: bool = False) -> int:
        """Fail RUNNING trials of dead owners and enqueue their jobs again; returns how many."""
        with _file_lock(self.lock_path):
            recovered = sum(self._recover(trial, reset_stale) for trial in self._trials([self._state.RUNNING]))
        if recovered:
            self.enqueue([Job.from_attrs(t.user_attrs) for t in self._trials([self._state.FAIL])
                          if "job" in t.user_attrs])
        return recovered

    def _recover(self, trial: Any, reset_stale: bool) -> bool:
        owner = trial.user_attrs.get("owner")
        if owner is None:
            stale = reset_stale or self._ownerless_is_stale(trial)
        else:
            stale = owner_is_dead(owner, other_hosts_dead=reset_stale)
        if stale and self._fail(trial, "stale"):
            log.warning("job %s was left running by %s; measuring it again", trial.user_attrs.get("job"), owner)
            return True
        return False

    def _ownerless_is_stale(self, trial: Any) -> bool:
        """A claim writes state, then owner. With the folder's lock both happen under it (see `claim`), so an
        ownerless RUNNING trial seen while holding the lock was left by a claimer killed in between. Without a
        lock (a storage shared by hosts) another worker may be between the two writes: wait a grace period."""
        if self.lock_path is not None:
            return True
        started = trial.datetime_start
        age = datetime.now(started.tzinfo) - started if started is not None else _OWNERLESS_GRACE * 2
        return age > _OWNERLESS_GRACE

    def _fail(self, trial: Any, reason: str) -> bool:
        try:
            self.storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            return bool(self.storage.set_trial_state_values(trial._trial_id, self._optuna.trial.TrialState.FAIL))
        except self._optuna.exceptions.UpdateFinishedTrialError:
            return False

    def claim(self, limit: int) -> list[tuple[int, Job]]:
        """Take up to `limit` waiting jobs that start at the same layer; returns (trial id, job) pairs.

        Under the folder's lock (when there is one) so that state and owner are written together as far as
        `recover_stale` can see."""
        with _file_lock(self.lock_path):
            return self._claim(limit)

    def _claim(self, limit: int) -> list[tuple[int, Job]]:
        state = self._state
        trials = self._trials()
        canonical = self._canonical(trials)
        claimed: list[tuple[int, Job]] = []
        for trial in (t for t in trials if t.state == state.WAITING and "job" in t.user_attrs):
            job = Job.from_attrs(trial.user_attrs)
            if canonical[job.key] != trial.number:
                self._fail(trial, "duplicate")
                continue
            if claimed and job.position != claimed[0][1].position:
                break
            try:
                if not self.storage.set_trial_state_values(trial._trial_id, state.RUNNING):
                    continue
            except self._optuna.exceptions.UpdateFinishedTrialError:
                continue
            self.storage.set_trial_user_attr(trial._trial_id, "owner", self.owner)
            claimed.append((trial._trial_id, job))
            if len(claimed) == limit:
                break
        return claimed

    def finish(self, trial_id: int, row: Mapping[str, Any], value: float) -> None:
        """Store a measured row and mark its trial COMPLETE (one write each, so a kill loses at most this job)."""
        self.storage.set_trial_user_attr(trial_id, "row", dict(row))
        self.storage.set_trial_state_values(trial_id, self._optuna.trial.TrialState.COMPLETE, values=[value])

    def abandon(self, trial_ids: Sequence[int], reason: str) -> None:
        """Mark claimed jobs FAIL after an error so the next run measures them again."""
        for trial in self._trials():
            if trial._trial_id in trial_ids:
                self._fail(trial, reason)

    def rows(self) -> dict[str, dict[str, Any]]:
        """Finished rows by job key (the canonical trial of each job)."""
        trials = self._trials([self._optuna.trial.TrialState.COMPLETE])
        found: dict[str, dict[str, Any]] = {}
        for trial in trials:
            if "row" in trial.user_attrs:
                found.setdefault(trial.user_attrs["job"], trial.user_attrs["row"])
        return found

    def counts(self) -> dict[str, int]:
        """Number of trials per state name, e.g. {'COMPLETE': 60, 'RUNNING': 2}."""
        result: dict[str, int] = {}
        for trial in self._trials():
            result[trial.state.name] = result.get(trial.state.name, 0) + 1
        return result
