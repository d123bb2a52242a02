"""Which network interface gloo uses for a job whose own backend is another (NCCL).

A Trainer's pause flags travel through a gloo group of their own when the job's backend is not
gloo. Gloo binds the interface named by ``GLOO_SOCKET_IFNAME``; without it, the address that
the machine's hostname resolves to, or the loopback interface when that address is not one of
the machine's. On a cluster whose hostnames resolve to ``127.0.1.1``, or to an interface that
the other nodes cannot reach, the ranks then wait for each other at the first step boundary
until the group's timeout. NCCL may be told its interface with ``NCCL_SOCKET_IFNAME``; gloo is
told nothing. So ddpw chooses gloo's interface (:func:`interface_for_gloo`), on every rank alike:

1. ``GLOO_SOCKET_IFNAME`` set by the user: left as it is;
2. else, ``NCCL_SOCKET_IFNAME`` (a list of name prefixes, or of exact names after ``=``): the
   interface that it matches; among several, the one of rule 3, else the first;
3. else (or when it excludes names with ``^``, or matches none): the interface through which
   this machine reaches the rendezvous address (``MASTER_ADDR``): the one holding the address
   the kernel sends from to reach it. On the rendezvous's own machine that is the loopback
   interface when its name resolves to a loopback address (``127.0.1.1``, as Debian's
   ``/etc/hosts`` has it); there, the interface at which the other machines' connections to
   the rendezvous port arrived, if any (a job on one machine keeps the loopback).

Gloo reads ``GLOO_SOCKET_IFNAME`` when a group is made, so the choice holds only while ddpw makes
its group (:func:`gloo_interface_chosen`); the process's environment is left as it was.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from datetime import timedelta
from typing import Any

import psutil

#: Gloo's own variable, which names the interfaces it binds.
GLOO_IFNAME = "GLOO_SOCKET_IFNAME"
#: NCCL's, which names the interfaces NCCL may use.
NCCL_IFNAME = "NCCL_SOCKET_IFNAME"
#: The rendezvous port when ``MASTER_PORT`` is not set (torch's default). Any port does: a UDP
#: socket's ``connect`` sends nothing, it only asks the kernel for a route.
DEFAULT_PORT = 29500


def gloo_interface(nccl_ifname: str | None, interfaces: Mapping[str, Sequence[str]],
                   route: str | None, arrivals: Sequence[str] = ()) -> str | None:
    """The interface gloo should bind, or ``None`` to leave gloo's own choice.

    :param nccl_ifname: the value of ``NCCL_SOCKET_IFNAME``, if set.
    :param interfaces: the machine's interfaces that are up, in the kernel's order, with their
        IP addresses (:func:`local_interfaces`).
    :param route: this machine's address that the kernel sends from to reach the rendezvous
        address (:func:`route_address`), if known.
    :param arrivals: this machine's addresses at which other machines' connections to the
        rendezvous port arrived (:func:`arrival_addresses`), used when ``route`` is a loopback
        address.
    """
    reached = route
    if route is not None and _is_loopback(route):
        reached = next((a for a in arrivals if not _is_loopback(a)), route)
    routed = next((name for name, addresses in interfaces.items() if reached in addresses), None)
    if nccl_ifname and not nccl_ifname.startswith("^"):
        exact = nccl_ifname.startswith("=")
        wanted = [part.strip() for part in nccl_ifname.removeprefix("=").split(",")]
        matches = [name for part in wanted if part for name in interfaces
                   if (name == part if exact else name.startswith(part))]
        if matches and routed not in matches:
            return matches[0]
    return routed


def route_address(host: str, port: int = DEFAULT_PORT) -> str | None:
    """This machine's address that the kernel would send from to reach ``host``, or ``None``
    when ``host`` does not resolve or cannot be reached."""
    try:
        candidates = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return None
    for family, kind, protocol, _, address in candidates:
        try:  # a family this machine lacks (IPv6 off) is no route
            with socket.socket(family, kind, protocol) as probe:
                probe.connect(address)
                return _bare(probe.getsockname()[0])
        except OSError:
            continue
    return None


def bindable_port(preferred: int) -> int:
    """``preferred`` when a TCP server on this machine can bind it now, else a free port that
    the kernel chooses."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As torch's store binds: a port that only lingers in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", preferred))
        except OSError:
            probe.bind(("", 0))
        return probe.getsockname()[1]


def arrival_addresses(port: int) -> list[str]:
    """This machine's addresses at which TCP connections from other machines to ``port``
    arrived (and are still open), most used first; none where connections cannot be listed."""
    try:
        connections = psutil.net_connections("inet")
    except (psutil.Error, OSError):
        return []
    counts: dict[str, int] = {}
    for c in connections:
        if (c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port and c.raddr
                and not _is_loopback(_bare(c.raddr.ip))):
            address = _bare(c.laddr.ip)
            counts[address] = counts.get(address, 0) + 1
    return sorted(counts, key=counts.__getitem__, reverse=True)


def local_interfaces() -> dict[str, list[str]]:
    """This machine's interfaces that are up, with their IPv4 and IPv6 addresses."""
    stats = psutil.net_if_stats()
    return {name: [_bare(a.address) for a in addresses
                   if a.family in (socket.AF_INET, socket.AF_INET6)]
            for name, addresses in psutil.net_if_addrs().items()
            if name in stats and stats[name].isup}


def interface_for_gloo(env: Mapping[str, str] = os.environ) -> str | None:
    """The interface that ddpw has gloo bind, as the rules above say, or ``None`` when
    ``GLOO_SOCKET_IFNAME`` is set already or nothing is known (no ``MASTER_ADDR``)."""
    if env.get(GLOO_IFNAME):
        return None
    master = env.get("MASTER_ADDR")
    try:
        port = int(env.get("MASTER_PORT") or DEFAULT_PORT)
    except ValueError:
        port = DEFAULT_PORT
    route = route_address(master, port) if master else None
    arrivals = arrival_addresses(port) if route is not None and _is_loopback(route) else []
    try:
        interfaces = local_interfaces()
    except (OSError, psutil.Error):  # then gloo makes its own choice, as without ddpw
        return None
    return gloo_interface(env.get(NCCL_IFNAME), interfaces, route, arrivals)


@contextlib.contextmanager
def gloo_interface_chosen(env: MutableMapping[str, str] = os.environ) -> Iterator[str | None]:
    """While the block runs (make the gloo group in it), ``GLOO_SOCKET_IFNAME`` names the
    interface of :func:`interface_for_gloo`; yields it (``None``: the environment is untouched).
    """
    chosen = interface_for_gloo(env)
    if chosen is None:
        yield None
        return
    env[GLOO_IFNAME] = chosen
    try:
        yield chosen
    finally:
        env.pop(GLOO_IFNAME, None)


#: How long the checkpoints' collectives wait (:func:`gloo_group`).
UNLIMITED = timedelta(days=365)


def gloo_group(unlimited: bool = False) -> Any:
    """A new gloo process group of every rank, on the interface of :func:`gloo_interface_chosen`
    when the job's own backend is another; every rank must make it at the same point.

    :param unlimited: its collectives wait as long as a rank's writes take (a year: a checkpoint
        write is never a hang, however long), not the default of the process groups (torch's
        30 minutes, or longer: :func:`ddpw.hang.lengthen_collectives`): for the checkpoints'
        collectives. A peer that dies still ends the wait at once (its connection closes).
    """
    import torch.distributed as dist  # only here: this module is imported without torch

    timeout = UNLIMITED if unlimited else None
    if dist.get_backend() == "gloo":
        return dist.new_group(backend="gloo", timeout=timeout)
    with gloo_interface_chosen():
        return dist.new_group(backend="gloo", timeout=timeout)


def _bare(address: str) -> str:
    """An IP address as :func:`local_interfaces` lists it: without its IPv6 scope
    (``fe80::1%eth0``), and an IPv4 address mapped into IPv6 (``::ffff:10.0.0.1``) as IPv4."""
    address = address.partition("%")[0]
    with contextlib.suppress(ValueError):
        parsed = ipaddress.ip_address(address)
        mapped = getattr(parsed, "ipv4_mapped", None)
        return str(mapped or parsed)
    return address


def _is_loopback(address: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(address).is_loopback
    return False
