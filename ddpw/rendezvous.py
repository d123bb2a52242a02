"""Where the machines of a job meet when no scheduler tells them: torchrun's rendezvous.

Every machine runs the same command. In a fixed set of machines (static), each gives its own
node rank, and node 0's torchrun agent holds the rendezvous, a ``TCPStore`` at
``master_addr:master_port``, which the other nodes' agents join. An elastic job (``min_nodes``)
uses torchrun's c10d rendezvous at the same address instead: it numbers the machines itself,
and when one is lost the others meet again as a smaller world. Then every process meets the
others in its process group. ddpw invents no rendezvous of its own: :func:`of` fills in
torchrun's options (through ``accelerate launch``) from the
:class:`~ddpw.platform.PlatformConfig` or from the environment, :func:`check` refuses what
cannot work before any process starts, and :func:`explain` turns torch's errors for a
rendezvous that did not form into one sentence.

An elastic job forms a new world whenever a machine is lost or one joins. torch counts only the
first kind as a restart (``TORCHELASTIC_RESTART_COUNT``), and a machine that joins counts from
0, so ddpw numbers the worlds itself in the rendezvous's store (:func:`next_world`). Every world
of an elastic job gets a store of its own for its processes (:func:`agent_env`): torch's shared
store, kept across worlds, leaves a machine that joins waiting for a key that is never written
(torch 2.13: ``DistStoreError`` after 60 s on every machine).

The environment is read only where the config leaves a field at its default, the ``PET_``
name first (torchrun's own, which Kubernetes' training operators set), then the plain one:

==========================  ==========================================
``n_nodes``, ``min_nodes``  ``PET_NNODES``, ``NNODES`` (``N``, or ``MIN:MAX``: elastic)
``node_rank``               ``PET_NODE_RANK``, ``NODE_RANK``
``master_addr``             ``PET_MASTER_ADDR``, ``MASTER_ADDR``
``master_port``             ``PET_MASTER_PORT``, ``MASTER_PORT`` (else torch's 29500)
``max_restarts``            ``PET_MAX_RESTARTS``
==========================  ==========================================
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from . import network
from .errors import ConfigError
from .platform import PlatformConfig

#: torch's own default port for a rendezvous.
DEFAULT_PORT = 29500

#: Where the rendezvous's store keeps ddpw's note of the job's newest world.
WORLD_KEY = "ddpw/world"

#: For each field, the variables that may give it, in the order they are read.
VARIABLES = {"n_nodes": ("PET_NNODES", "NNODES"), "node_rank": ("PET_NODE_RANK", "NODE_RANK"),
             "master_addr": ("PET_MASTER_ADDR", "MASTER_ADDR"),
             "master_port": ("PET_MASTER_PORT", "MASTER_PORT"),
             "max_restarts": ("PET_MAX_RESTARTS",)}


@dataclass(frozen=True)
class Rendezvous:
    """How this machine meets the others of its job.

    :param nodes: the machines of the job.
    :param node_rank: this machine's place among them.
    :param master_addr: node 0's host name or address.
    :param master_port: the port of the rendezvous on node 0.
    :param timeout_s: how long the nodes wait for each other.
    :param read: the variables that gave fields, ``{field: variable}``.
    :param min_nodes: for an elastic job, the fewest machines it goes on with; ``None`` for a
        fixed set.
    :param max_restarts: how many times the processes may start again.
    :param run_id: the elastic rendezvous's id, the same on every machine of the job.
    :param last_call_s: in an elastic job, how long the rendezvous waits for more machines
        once ``min_nodes`` are there.
    """

    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    timeout_s: int
    read: dict[str, str]
    min_nodes: int | None = None
    max_restarts: int = 0
    run_id: str = "ddpw"
    last_call_s: int = 10

    @property
    def elastic(self) -> bool:
        """Whether the machines meet in torchrun's c10d rendezvous, which re-forms the world."""
        return self.min_nodes is not None

    @property
    def endpoint(self) -> str:
        """``host:port`` (an IPv6 address in brackets)."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"{host}:{self.master_port}"

    def launch_args(self) -> tuple[str, ...]:
        """The ``accelerate launch`` options that make this node's agent join it. (For an
        elastic job, ``--num_machines`` is the most; :func:`ddpw.launcher.run_accelerate`
        hands torchrun the range and the rendezvous's settings, which accelerate's options
        cannot say: :func:`torchrun_options`.)"""
        elastic = (("--rdzv_backend", "c10d") if self.elastic
                   else ("--rdzv_conf", f"timeout={self.timeout_s}"))
        return ("--num_machines", str(self.nodes), "--machine_rank", str(self.node_rank),
                "--main_process_ip", self.master_addr,
                "--main_process_port", str(self.master_port),
                "--max_restarts", str(self.max_restarts), *elastic)

    @property
    def nnodes(self) -> str:
        """torchrun's ``--nnodes``: ``N``, or ``MIN:MAX`` for an elastic job."""
        return f"{self.min_nodes}:{self.nodes}" if self.elastic else str(self.nodes)


def of(config: PlatformConfig, env: Mapping[str, str]) -> Rendezvous | None:
    """This machine's rendezvous for a job of ``config`` outside SLURM, the environment filling
    in the fields that ``config`` leaves at their defaults; ``None`` for a job on one machine.

    :raises ConfigError: when a field it needs is missing or a variable is not valid, naming the
        field and the variables that could give it.
    """
    read: dict[str, str] = {}
    nodes, fewest = config.n_nodes, config.min_nodes
    if nodes == 1:
        found = _variable(env, "n_nodes", read)
        if found is not None and ":" in found:
            low, _, high = found.partition(":")
            fewest = _number(low, "n_nodes", read, minimum=1, what=found)
            nodes = _number(high, "n_nodes", read, minimum=fewest, what=found)
        elif found is not None:
            nodes = _number(found, "n_nodes", read, minimum=1)
    if nodes == 1:
        return None
    rank = config.node_rank
    if rank is None:
        found = _variable(env, "node_rank", read)
        if found is None and fewest is None:
            raise ConfigError(_missing("node_rank", nodes, f"this machine's place, from 0 to "
                                                           f"{nodes - 1}"))
        # An elastic rendezvous numbers the machines itself.
        rank = _number(found, "node_rank", read, minimum=0) if found is not None else 0
    if rank >= nodes:
        where = f"{read['node_rank']}={rank}" if "node_rank" in read else f"node_rank={rank}"
        raise ConfigError(f"PlatformConfig.node_rank: {where} is outside 0 to {nodes - 1} for "
                          f"n_nodes={nodes}.")
    address = config.master_addr or _variable(env, "master_addr", read)
    if not address:
        raise ConfigError(_missing("master_addr", nodes, "node 0's host name or address, "
                                                         "where the machines meet"))
    port = config.master_port
    if port is None:
        found = _variable(env, "master_port", read)
        port = (_number(found, "master_port", read, minimum=1, maximum=65535)
                if found is not None else DEFAULT_PORT)
    restarts = config.max_restarts
    if restarts == 0:
        found = _variable(env, "max_restarts", read)
        restarts = _number(found, "max_restarts", read, minimum=0) if found is not None else 0
    return Rendezvous(nodes, rank, address.strip(), port, config.rendezvous_timeout_s, read,
                      min_nodes=fewest, max_restarts=restarts, run_id=config.name,
                      last_call_s=config.rendezvous_last_call_s)


def check(rendezvous: Rendezvous) -> None:
    """Refuse a rendezvous whose address does not resolve here.

    :raises ConfigError: naming the address and where it came from.
    """
    try:
        socket.getaddrinfo(rendezvous.master_addr, rendezvous.master_port,
                           type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        given = rendezvous.read.get("master_addr", "PlatformConfig.master_addr")
        raise ConfigError(f"{given}={rendezvous.master_addr!r} does not resolve on this machine "
                          f"({error}): give node 0's host name or IP address.") from None


def agent_env(rendezvous: Rendezvous) -> dict[str, str]:
    """The variables of this node's torchrun agent and its processes.

    ``GLOO_SOCKET_IFNAME``: gloo (the CPU backend, and ddpw's own group beside NCCL) binds the
    interface through which this machine reaches node 0 (:mod:`ddpw.network`), not the one its
    host name happens to resolve to; unless the variable is set already, or no interface is
    known. In an elastic job, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: each world's rank 0
    holds a new store for its processes, rather than the agents sharing one across worlds,
    which torch 2.13 does not tell a machine that joins later."""
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if rendezvous.elastic else {}
    chosen = network.interface_for_gloo({**os.environ, "MASTER_ADDR": rendezvous.master_addr,
                                         "MASTER_PORT": str(rendezvous.master_port)})
    return {**env, network.GLOO_IFNAME: chosen} if chosen else env


def torchrun_options(rendezvous: Rendezvous) -> dict[str, str]:
    """For an elastic job, what ``accelerate launch`` cannot tell torchrun: the range of
    machines, the rendezvous's id, its waits (``last_call_s``, torch's 30 s by default, which
    every restart waits out as well) and whether this machine's agent hosts the rendezvous's
    store (torch guesses from the host name, which misses an address of another interface, as
    in a network namespace). Nothing for a fixed set of machines."""
    if not rendezvous.elastic:
        return {}
    # Node 0's agent (the one with node_rank 0 on the rendezvous's machine: every machine may
    # run the same command) holds the store; the others, here too, join it.
    hosts = rendezvous.node_rank == 0 and _is_this_machine(rendezvous.master_addr)
    conf = (f"join_timeout={rendezvous.timeout_s},last_call_timeout={rendezvous.last_call_s},"
            f"is_host={int(hosts)}")
    options = {"nnodes": rendezvous.nnodes, "rdzv_id": rendezvous.run_id, "rdzv_conf": conf}
    # The address the other machines reach this one at, for the store of the world's processes
    # that the first agent opens (else its host name, which may resolve elsewhere).
    local = network.route_address(rendezvous.master_addr, rendezvous.master_port)
    if local is not None:
        options["local_addr"] = local
    return options


def next_world(rendezvous: Rendezvous, world_size: int) -> tuple[int, int | None]:
    """Note in the rendezvous's store (which lives as long as the job, on node 0) that a new
    world of ``world_size`` processes has formed; return its number, 1 for the job's first,
    and the size of the one before (``None`` for the first). Only the new world's rank 0 calls
    it, once its world has formed: worlds form one after the other."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(rendezvous.master_addr, rendezvous.master_port, is_master=False,
                          timeout=timedelta(seconds=rendezvous.timeout_s))
    before = json.loads(store.get(WORLD_KEY)) if store.check([WORLD_KEY]) else None
    number = before["number"] + 1 if before else 1
    store.set(WORLD_KEY, json.dumps({"number": number, "size": world_size}))
    return number, before["size"] if before else None


def store_attempt(env: Mapping[str, str] = os.environ) -> str:
    """A name for this attempt's keys in the launch's store (``MASTER_ADDR:MASTER_PORT``) that
    every process of the world gives alike and no earlier world's process gave in that store:
    torchrun's restart count where the agents' store serves every attempt (it counts the
    restarts alike on every machine), ``"0"`` where each world has a store of its own (an
    elastic job's: :func:`agent_env`, whose machines count their restarts apart)."""
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE", "True") == "True"
    return env.get("TORCHELASTIC_RESTART_COUNT", "0") if shared else "0"


def _is_this_machine(address: str) -> bool:
    """Whether ``address`` resolves to an address of one of this machine's interfaces."""
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(address, None)}
        mine = {a for addresses in network.local_interfaces().values() for a in addresses}
    except (OSError, UnicodeError):
        return False
    return bool(resolved & mine)


def explain(error: BaseException, rendezvous: Rendezvous) -> ConfigError | None:
    """The sentence for torch's error when the machines did not all meet (``None`` for any
    other error): how many nodes joined, where, and for how long they waited."""
    text = str(error)
    waited = (f"within PlatformConfig.rendezvous_timeout_s={rendezvous.timeout_s} s at "
              f"{rendezvous.endpoint}")
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        return ConfigError(
            f"only {joined.group(1)} of {joined.group(2)} nodes joined the rendezvous "
            f"{waited} (this is node 0): start the others with the same command, each with "
            f"its own node_rank from 1 to {rendezvous.nodes - 1}, and check that they reach "
            f"this machine at that address.")
    if re.search(r"timed out .*trying to connect to", text):
        return ConfigError(
            f"node {rendezvous.node_rank} could not reach node 0's rendezvous {waited}: start "
            f"node 0 (node_rank 0) with the same command, and check that this machine reaches "
            f"{rendezvous.master_addr} on port {rendezvous.master_port}.")
    if isinstance(error, ConnectionError) and "utilizing it" in text:
        return ConfigError(
            f"PlatformConfig.master_port={rendezvous.master_port} is in use on this machine, "
            f"node 0, which must bind it for the rendezvous: choose a free port, the same on "
            f"every node.")
    return None


def _variable(env: Mapping[str, str], field: str, read: dict[str, str]) -> str | None:
    for name in VARIABLES[field]:
        value = env.get(name, "").strip()
        if value:
            read[field] = name
            return value
    return None


def _number(value: str, field: str, read: dict[str, str], minimum: int,
            maximum: int | None = None, what: str | None = None) -> int:
    """``value`` of a variable as an integer in ``[minimum, maximum]``; ``what`` is the whole
    variable when ``value`` is a part of it (``MIN:MAX``)."""
    if re.fullmatch(r"\d+", value.strip()) and int(value) >= minimum and (
            maximum is None or int(value) <= maximum):
        return int(value)
    bound = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    if what is not None:
        bound = "N or MIN:MAX with 1 <= MIN <= MAX"
    raise ConfigError(f"{read[field]}={what or value!r} in the environment (for "
                      f"PlatformConfig.{field}) is not {bound}.")


def _missing(field: str, nodes: int, what: str) -> str:
    names = " or ".join(VARIABLES[field])
    return (f"PlatformConfig.{field} is not set, and a job on n_nodes={nodes} machines needs "
            f"it: {what} (or set {names}).")
