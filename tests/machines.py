"""Two machines on one: network namespaces joined by a veth pair, made and removed by the tests
themselves. (Two launchers on the loopback address, which the tests of a lost peer use, choose
no network interface: only namespaces show that gloo binds the one that reaches node 0.)"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import real_parts_required

#: The addresses of the two namespaces' ends of the veth pair: a private subnet that nothing
#: outside the namespaces uses.
SUBNET = "10.77.0.{}/24"


@dataclass(frozen=True)
class Machine:
    """One of the two machines: its address, and the command prefix that runs inside it."""

    address: str
    prefix: tuple[str, ...] = ()
    #: The interface that reaches the other machine (``None``: loopback).
    interface: str | None = None

    def command(self, *args: str) -> list[str]:
        return [*self.prefix, *args]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def namespaces() -> Iterator[tuple[Machine, Machine]]:
    """Two network namespaces, each with its loopback up and one end of a veth pair at
    10.77.0.1 and 10.77.0.2; removed afterwards. Skips (fails where
    :func:`conftest.real_parts_required`) when they cannot be made."""
    tag = f"ddpw{os.getpid() % 100000}"
    names = (f"{tag}a", f"{tag}b")
    ends = (f"{tag}va", f"{tag}vb")
    steps = [("netns", "add", names[0]), ("netns", "add", names[1]),
             ("link", "add", ends[0], "type", "veth", "peer", "name", ends[1])]
    for i in range(2):
        steps += [("link", "set", ends[i], "netns", names[i]),
                  ("-n", names[i], "addr", "add", SUBNET.format(i + 1), "dev", ends[i]),
                  ("-n", names[i], "link", "set", ends[i], "up"),
                  ("-n", names[i], "link", "set", "lo", "up")]
    try:
        for step in steps:
            done = _ip(*step) if shutil.which("ip") else None
            if done is None or done.returncode:
                why = done.stderr.strip() if done is not None else "no ip command (iproute2)"
                reason = f"cannot make network namespaces (ip {' '.join(step)}): {why}"
                if real_parts_required():
                    pytest.fail(f"{reason}; CI or DDPW_REQUIRE_REAL=1 requires them",
                                pytrace=False)
                pytest.skip(reason)
        yield tuple(Machine(SUBNET.format(i + 1).split("/")[0],
                            ("ip", "netns", "exec", names[i]), ends[i]) for i in range(2))
    finally:
        for name in names:  # the veth pair goes with its namespaces
            _ip("netns", "delete", name)
