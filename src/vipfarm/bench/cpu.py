"""CPU time spent by a lab, for CPU cost per request, two ways.

* Machine-wide, from /proc/stat: user + nice + system + irq + softirq (idle and iowait are not
  work; steal is time the hypervisor gave another guest). Complete, but it counts every other
  tenant of the machine too.
* The lab's own: user + system time of every process in the lab's namespaces, of our children
  (wrk) and of the ksoftirqd threads. The kernel's tick accounting charges softirq work (where
  packets are switched, filtered and delivered; on a veth it runs on the sending CPU, inside the
  sender's system call) to the task it interrupted, so this includes the network path while
  leaving other tenants out (checked on this kernel: over a loaded run, the CPU time of all
  processes together equals the machine's busy time, softirq included). This is the figure the
  bench reports; the machine-wide one is kept with every run for comparison.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTimes:
    busy: int  # clock ticks, all CPUs together

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.busy - other.busy)

    @property
    def busy_s(self) -> float:
        return self.busy * TICK_S


def parse_proc_stat(text: str) -> CpuTimes:
    """Busy time from the aggregate `cpu` line: user nice system idle iowait irq softirq steal...

    Guest time is already part of user time.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
            return CpuTimes(user + nice + system + irq + softirq)
    raise ValueError("no aggregate `cpu` line in /proc/stat")


def read_cpu() -> CpuTimes:
    return parse_proc_stat(Path("/proc/stat").read_text())


# ---- the lab's own CPU time


def _task_ticks(pid: int) -> tuple[int, int] | None:
    """(start time, user + system ticks) of a process, all its threads together."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[19]), int(fields[11]) + int(fields[12])


def lab_tasks(namespaces: Iterable[str]) -> list[int]:
    """Every process living in one of the named network namespaces, and the ksoftirqd threads.

    ksoftirqd is where the kernel finishes packet processing it had to defer; under a load that
    is this lab's.
    """
    inodes = set()
    for ns in namespaces:
        try:
            inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
        except OSError:
            continue
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino in inodes or Path(
                f"/proc/{entry.name}/comm"
            ).read_text().startswith("ksoftirqd/"):
                out.append(int(entry.name))
        except OSError:
            continue
    return out


@dataclass(frozen=True)
class Snapshot:
    machine: CpuTimes
    children_s: float  # our reaped children: wrk runs as one
    tasks: dict[int, tuple[int, int]]


def snapshot(pids: Iterable[int]) -> Snapshot:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    tasks = {pid: t for pid in pids if (t := _task_ticks(pid)) is not None}
    return Snapshot(read_cpu(), usage.ru_utime + usage.ru_stime, tasks)


def lab_cpu_s(before: Snapshot, after: Snapshot) -> float:
    """CPU seconds the lab's processes and our children used between two snapshots.

    The tick-based accounting of this kernel charges softirq work to the task it interrupted,
    which under a lab's load is mostly the lab's own senders, so this counts the network path too
    while leaving out other tenants of the machine. A process that ended in between is left out.
    """
    ticks = 0
    for pid, (start, t0) in before.tasks.items():
        now = after.tasks.get(pid)
        if now is not None and now[0] == start:
            ticks += now[1] - t0
    return ticks * TICK_S + after.children_s - before.children_s
