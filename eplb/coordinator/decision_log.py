"""The leader's decision log: what it decided about each epoch, written durably *before* the
decision is sent, so that a restarted leader answers every promised worker the same way.

Records (one JSON object a line):

- :class:`EpochStarted` before the PLAN of an epoch goes out: epoch numbers are never reused.
- :class:`EpochDecided` before the COMMIT (with S and both placements ``[L, P]``, so a restarted
  leader can finish the epoch and check the ranks that rejoin mid-copy) or the ABORT.
- :class:`EpochEnded` once a committed epoch ended: ``succeeded`` (its placement is now the
  group's), or ``failed``.

A restarted leader reads the log (:func:`read_log`) and hands the records to
:meth:`eplb.coordinator.leader.LeaderCore.restore`: an epoch started and never decided is aborted
(and that abort logged), a committed epoch that never ended is resumed. The records are plain
values; :class:`DecisionLog` is the only code here that touches the disk.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger("eplb.decisions")

#: Most records kept when the log is compacted at open (only the newest commit keeps placements).
KEEP_RECORDS = 4096


@dataclass(frozen=True)
class EpochStarted:
    epoch: int


@dataclass(frozen=True)
class EpochDecided:
    """COMMIT at ``switch_step`` (``commit`` True), or ABORT for ``reason``. A commit carries
    ``old`` and ``new`` placements as nested lists ``[L][P]``, the world size and the chunking."""

    epoch: int
    commit: bool
    switch_step: int = 0
    reason: str = ""
    old: list[list[int]] | None = None
    new: list[list[int]] | None = None
    world_size: int = 0
    num_experts: int = 0
    layers_per_chunk: int = 1
    bytes_per_chunk: int = 0

    def placements(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(old, new)``, each ``[L, P]`` int64."""
        assert self.old is not None and self.new is not None
        return (torch.tensor(self.old, dtype=torch.int64), torch.tensor(self.new, dtype=torch.int64))


@dataclass(frozen=True)
class EpochEnded:
    """A committed epoch ended: ``succeeded`` True (its placement is adopted) or False (failed)."""

    epoch: int
    succeeded: bool
    reason: str = ""


LogRecord = EpochStarted | EpochDecided | EpochEnded
_KINDS: dict[str, type] = {"started": EpochStarted, "decided": EpochDecided, "ended": EpochEnded}
_NAMES = {cls: name for name, cls in _KINDS.items()}


class DecisionLogError(RuntimeError):
    """The log cannot be read or written; the message says what to do."""


def to_line(record: LogRecord) -> str:
    return json.dumps({"kind": _NAMES[type(record)], **asdict(record)}, separators=(",", ":"))


def from_line(line: str) -> LogRecord:
    raw = json.loads(line)
    cls = _KINDS[raw.pop("kind")]
    return cls(**raw)


def read_log(path: Path) -> list[LogRecord]:
    """Every whole record of the log at ``path`` (none if it does not exist). A torn last line
    (the leader died while writing it) is dropped: its decision was never sent."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DecisionLogError(f"cannot read the decision log {path}: {exc}; check the run "
                               "directory's permissions") from None
    records: list[LogRecord] = []
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(from_line(line))
        except (ValueError, KeyError, TypeError) as exc:
            if number >= len(lines) - 1:  # the last line: torn by a crash, never acted on
                log.warning("decision log %s: dropped a torn last record (%s)", path, exc)
                continue
            raise DecisionLogError(f"decision log {path}, line {number}: not a record ({exc}); "
                                   "move the file away to start without history (promised "
                                   "workers of the epoch in flight will then be aborted)") from None
    return records


def compact(records: list[LogRecord]) -> list[LogRecord]:
    """The records a restarted leader needs: every decision (placements only in the newest
    commit), every epoch start and end, at most :data:`KEEP_RECORDS`."""
    newest_commit = max((r.epoch for r in records if isinstance(r, EpochDecided) and r.commit),
                        default=None)
    out: list[LogRecord] = []
    for r in records:
        if isinstance(r, EpochDecided) and r.commit and r.epoch != newest_commit:
            r = EpochDecided(r.epoch, True, r.switch_step, r.reason)
        out.append(r)
    return out[-KEEP_RECORDS:]


class DecisionLog:
    """Append-only file of :data:`LogRecord`; every append is flushed and fsync'd before it
    returns, so a decision is on disk before it is sent.

    Args:
        path: the file (in the leader's run directory).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records = compact(read_log(self.path))
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                f.writelines(to_line(r) + "\n" for r in self.records)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._file = open(self.path, "a")
        except OSError as exc:
            raise DecisionLogError(f"cannot write the decision log {self.path}: {exc}; the "
                                   "leader's run directory must be writable") from None

    def append(self, record: LogRecord) -> None:
        self._file.write(to_line(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
