"""Who this worker is, so that at start-up it can close the streams of its dead predecessors.

Every `inference.started` record carries `worker` = `{host, pid, instance}`: the host name,
the process id and a random id made when the process started. A stream that ended has an
`inference` (or `inference.aborted`) record naming the started record's seq in
`started_seq`. At start-up each worker scans for started records with no end whose worker is
on this host and is not a live process (`os.kill(pid, 0)` fails, or the pid is alive but is
a different instance: a reused pid, or this very process restarted), and appends
`inference.aborted` for each, one worker at a time (a lock file in FLEXGATE_HOME, so the
workers of a restarted server do not both close the same stream). Started records of
other hosts are never touched: only their own host can tell whether they still run (a host
gone for good leaves them open, visible to `flexgate audit query --kind inference.started`).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerId:
    host: str
    pid: int
    instance: str

    @classmethod
    def current(cls) -> WorkerId:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex)

    def as_payload(self) -> dict[str, object]:
        return {"host": self.host, "pid": self.pid, "instance": self.instance}


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def is_dead_local(worker: object, me: WorkerId, live_instances: frozenset[str]) -> bool:
    """Is the worker named in a started record one of this host's, and gone?

    `live_instances`: instance ids known to be running here (this process's own).
    """
    if not isinstance(worker, dict) or worker.get("host") != me.host:
        return False
    instance = worker.get("instance")
    if instance in live_instances:
        return False
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == me.pid:  # our pid, another instance: the previous run of this process id
        return True
    return not pid_alive(pid)
