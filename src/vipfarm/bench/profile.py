"""Where the time goes: a perf(1) profile of one wrk run, split by area of the network path.

`perf record -a` samples every CPU while wrk runs; only samples of the lab's own tasks (the lab's
processes, wrk, ksoftirqd) are kept, so other tenants of the machine do not blur the picture. Each
kernel sample is put in an area by its symbol (conntrack, the BPF prefilter, nftables, bridge,
device and veth, TCP/IP, memory, syscalls and scheduling), each user-space sample under its
program. An area's share times
the run's CPU per request (`vipfarm.bench.cpu`) gives microseconds per request, which compare
across variants: that is the table the summary shows next to a goal that falls short.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vipfarm.bench.cpu import lab_tasks
from vipfarm.bench.framework import Context, Target
from vipfarm.bench.wrk import Mode

KERNEL_DSO = "[kernel.kallsyms]"

# First match wins: conntrack before the generic `nf_` of nftables.
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("conntrack", ("nf_conntrack", "__nf_conntrack", "nf_ct_", "__nf_ct_", "nf_confirm",
                   "ipv4_conntrack", "hash_conntrack", "tcp_in_window", "nf_nat")),
    ("bpf prefilter", ("bpf_prog", "tcx_", "__bpf_prog", "bpf_")),
    ("netfilter/nftables", ("nft_", "__nft_", "nf_tables", "nf_hook", "jhash")),
    ("bridge", ("br_", "__br_", "nbp_")),
    ("device/veth", ("veth_", "__dev_", "dev_", "netif_", "__netif_", "process_backlog",
                     "net_rx_action", "enqueue_to_backlog", "napi_", "__napi", "eth_type_trans",
                     "validate_xmit", "sch_direct", "qdisc", "__qdisc", "packet_rcv")),
    ("tcp/ip", ("tcp", "__tcp", "inet", "__inet", "ip_", "__ip_", "ipv4_", "ip4_", "raw_",
                "sk_", "__sk_", "sock_", "__sock", "lock_sock", "release_sock", "fib_",
                "dst_", "neigh_", "csum", "__skb_checksum", "icmp")),
    ("memory", ("kmem_", "__kmem", "kmalloc", "__kmalloc", "kfree", "__kfree", "skb_", "__skb",
                "alloc_skb", "__alloc_skb", "consume_skb", "page_", "__page", "slab", "___slab",
                "memcpy", "memset", "copy_", "_copy_", "rep_movs", "clear_page", "__put_user",
                "__get_user", "__check_object_size")),
    ("syscalls/scheduling/locks", ("do_syscall", "entry_SYSCALL", "syscall_", "__x64_sys", "__sys_",
                            "x64_sys", "ep_", "do_epoll", "__fget", "fget", "fput", "__fput",
                            "schedule", "__schedule", "finish_task_switch", "_raw_spin",
                            "try_to_wake_up", "ttwu", "pick_next", "dequeue_", "enqueue_",
                            "update_", "irqentry", "rcu", "__rcu", "sysvec", "__sysvec",
                            "read_tsc", "ktime", "hrtimer", "restore_", "native_", "pv_")),
)  # fmt: skip

_LINE = re.compile(
    r"^\s*(?P<comm>.+?)\s+(?P<pid>\d+)\s+[0-9a-f]+\s+(?P<sym>.*?)\s+\((?P<dso>.*)\)\s*$"
)


def area_of(comm: str, sym: str, dso: str) -> str:
    """The area a sample belongs to: a kernel area by symbol, or `<program> (user)`."""
    if sym.startswith("bpf_prog_"):  # JIT-compiled: perf may not name the kernel as its DSO
        return "bpf prefilter"
    if dso != KERNEL_DSO:
        program = "wrk" if comm == "wrk" else comm.split("/")[0].split(":")[0]
        return f"{program} (user)"
    for area, prefixes in AREAS:
        if sym.startswith(prefixes):
            return area
    return "other kernel"


def parse_samples(
    text: str, pids: Iterable[int], comms: Iterable[str] = ("wrk",)
) -> Counter[tuple[str, str]]:
    """(area, symbol) counts of the samples from `pids` or from a task named in `comms`."""
    keep, names = set(pids), set(comms)
    out: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None or (int(m["pid"]) not in keep and m["comm"] not in names):
            continue
        sym = m["sym"] if m["sym"] != "[unknown]" else f"[{Path(m['dso']).name or '?'}]"
        out[(area_of(m["comm"], m["sym"], m["dso"]), sym)] += 1
    return out


def breakdown(samples: Counter[tuple[str, str]], cpu_us: float, top: int = 12) -> dict[str, Any]:
    """Microseconds per request by area, and the top symbols with their share, from samples."""
    total = sum(samples.values())
    if not total:
        return {"samples": 0, "cpu_us": cpu_us, "areas": {}, "top": []}
    areas: Counter[str] = Counter()
    for (area, _), n in samples.items():
        areas[area] += n
    return {
        "samples": total,
        "cpu_us": cpu_us,
        "areas": {a: n / total * cpu_us for a, n in areas.most_common()},
        "top": [[n / total * 100, sym, area] for (area, sym), n in samples.most_common(top)],
    }


def profile_variants(ctx: Context, targets: Mapping[str, Target], mode: Mode) -> dict[str, Any]:
    """One profiled wrk run per variant; {} when perf is not installed."""
    perf = shutil.which("perf")
    if perf is None:
        for _ in targets:
            ctx.advance()  # the steps were counted
        return {}
    out: dict[str, Any] = {"mode": str(mode), "variants": {}}
    for name, target in targets.items():
        ctx.status(f"profiling {name} {mode}")
        with tempfile.TemporaryDirectory(prefix="vipfarm-perf-") as tmp:
            data = Path(tmp) / "perf.data"
            rec = subprocess.Popen(
                [perf, "record", "-a", "-F", "999", "-o", str(data)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                pids = lab_tasks(ctx.namespaces())
                run = ctx.measure(name, target, mode, -1, ctx.settings.duration_s)
            finally:
                rec.send_signal(signal.SIGINT)  # perf writes its file and exits
                try:
                    rec.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    rec.kill()
                    rec.wait()
            script = subprocess.run(
                [perf, "script", "-i", str(data), "-F", "comm,pid,ip,sym,dso"],
                capture_output=True,
                text=True,
                timeout=120,
            )
        samples = parse_samples(script.stdout, pids)
        out["variants"][name] = breakdown(samples, run.cpu_us_per_request or 0.0)
        ctx.advance()
    return out
