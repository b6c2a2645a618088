"""Network isolation for Ray started by Kiln's tests and benchmarks (never by `kiln serve --ray`).

Ray advertises the machine's non-loopback address even when told 127.0.0.1, and on the machines Kiln is built on
traffic to any address but loopback is forbidden. So whatever starts Ray there first enters a network namespace
of its own that has nothing but loopback (`isolate()`, or `unshare -n`), and refuses to go on when an interface
it did not create is present (`require_isolated`). Multi-node tests add their own veth pair (`VethPair`) to a
second namespace, with addresses they assign themselves and no route anywhere else.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000


class NotIsolated(RuntimeError):
    """This process can see a network interface that was not made for the test."""


def interfaces() -> list[str]:
    """The network interfaces of this thread's namespace, from netlink (`ip -o link`; /sys/class/net shows the
    namespace sysfs was mounted in, not this one)."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def addresses() -> list[str]:
    """Every IPv4 address in this namespace (`ip -o -4 addr`)."""
    out = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def require_isolated(allowed: tuple[str, ...] = ()) -> None:
    """Raise NotIsolated unless the only interfaces here are loopback and `allowed` (the test's own veths)."""
    others = [name for name in interfaces() if name != "lo" and name not in allowed]
    if others:
        raise NotIsolated(f"refusing to start Ray: this network namespace has interfaces {others}; run inside one "
                          f"with loopback only (unshare -n, or kiln.cluster.isolation.isolate())")


class Namespace:
    """Moves the calling thread (and every process or thread it starts afterwards) into a new network namespace
    with only loopback up; `leave()` returns it to the namespace it came from. Needs CAP_SYS_ADMIN (root)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        if self._libc.unshare(CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            os.close(self._home)
            raise OSError(error, f"unshare(CLONE_NEWNET): {os.strerror(error)}")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    def leave(self) -> None:
        if self._libc.setns(self._home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
        os.close(self._home)


@dataclass
class VethPair:
    """A veth pair from this namespace (`local`, address `local_ip`) to a new named namespace (`peer`,
    `peer_ip`), both in a /24 of their own: two "machines" that can reach each other and nothing else."""

    netns: str
    local: str = "kiln-h0"
    peer: str = "kiln-w0"
    local_ip: str = "10.77.0.1"
    peer_ip: str = "10.77.0.2"

    def create(self) -> None:
        commands = [
            ["ip", "netns", "add", self.netns],
            ["ip", "link", "add", self.local, "type", "veth", "peer", "name", self.peer, "netns", self.netns],
            ["ip", "addr", "add", f"{self.local_ip}/24", "dev", self.local],
            ["ip", "link", "set", self.local, "up"],
            ["ip", "-n", self.netns, "addr", "add", f"{self.peer_ip}/24", "dev", self.peer],
            ["ip", "-n", self.netns, "link", "set", self.peer, "up"],
            ["ip", "-n", self.netns, "link", "set", "lo", "up"],
        ]
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)

    def in_peer(self, command: list[str]) -> list[str]:
        """`command` run inside the peer namespace."""
        return ["ip", "netns", "exec", self.netns, *command]

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.local], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def session_pids(sid: int) -> list[int]:
    """The live processes of session `sid`: what a process started with `start_new_session` started (Ray's
    raylet, GCS, workers), and what they started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def stop_session(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM `process` (started with `start_new_session`) and wait up to `grace` s; then SIGTERM, and after 3 s
    SIGKILL, each process still left in its session, by pid."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        for pid in session_pids(process.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while session_pids(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
