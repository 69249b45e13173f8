"""Run a function inside a network namespace, from a short-lived thread.

setns(2) moves only the calling thread, so the thread is created for the call and ends with it;
the rest of the process stays where it was. Sockets created by the function belong to the
namespace, and `/proc/thread-self/ns/net` names it: this is how the lab finds and talks to a
node daemon's control socket (`vipfarm.node.control`, keyed by that namespace) without starting
a Python interpreter in the namespace for every question.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(ns: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"call in network namespace {ns} did not finish in {timeout:g} s")
    if error:
        raise error[0]
    return result[0]
