"""CPU time spent by a lab, for CPU cost per request, two ways.

* Machine-wide, from /proc/stat: user + nice + system + irq + softirq (idle and iowait are not
  work; steal is time the hypervisor gave another guest). Complete, but it counts every other
  tenant of the machine too.
* The lab's own: the time on a CPU of every process in the lab's namespaces, of our children
  (wrk) and of the ksoftirqd threads. Softirq work (where packets are switched, filtered and
  delivered; on a veth it runs on the sending CPU, inside the sender's system call) counts as
  time of the task it interrupted, so this includes the network path while leaving other tenants
  out (checked on this kernel: over a loaded run, the CPU time of all processes together equals
  the machine's busy time, softirq included). This is the figure the bench reports; the
  machine-wide one is kept with every run for comparison.
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


def task_cpu_ns(pid: int) -> tuple[int, int] | None:
    """(start time, nanoseconds on a CPU) of a process, all its threads together.

    From the scheduler's own clock (`/proc/<pid>/task/*/schedstat`), not tick samples, which at
    250 Hz would blur a few-second run by several percent.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ns = 0
        for task in os.scandir(f"/proc/{pid}/task"):
            ns += int(Path(task.path, "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[19]), ns


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
    tasks: dict[int, tuple[int, int]]  # pid -> (start time, CPU ns)


def snapshot(pids: Iterable[int]) -> Snapshot:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    tasks = {pid: t for pid in pids if (t := task_cpu_ns(pid)) is not None}
    return Snapshot(read_cpu(), usage.ru_utime + usage.ru_stime, tasks)


def lab_cpu_s(before: Snapshot, after: Snapshot) -> float:
    """CPU seconds the lab's processes and our children used between two snapshots.

    The tick-based accounting of this kernel charges softirq work to the task it interrupted,
    which under a lab's load is mostly the lab's own senders, so this counts the network path too
    while leaving out other tenants of the machine. A process that ended in between is left out.
    """
    ns = 0
    for pid, (start, t0) in before.tasks.items():
        now = after.tasks.get(pid)
        if now is not None and now[0] == start:
            ns += now[1] - t0
    return ns / 1e9 + after.children_s - before.children_s
