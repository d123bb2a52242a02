"""The network interface of the pause flags' gloo group (ddpw.network).

The rules are tested as data on made-up interface tables; then for real, in two network
namespaces joined by a veth pair, where the machine's name resolves to the loopback address as
on many clusters: gloo's own choice of interface cannot reach the other namespace, ddpw's does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from conftest import real_parts_required

from ddpw.network import (
    GLOO_IFNAME,
    NCCL_IFNAME,
    arrival_addresses,
    gloo_interface,
    gloo_interface_chosen,
    interface_for_gloo,
    route_address,
)

INTERFACES = {"lo": ["127.0.0.1", "::1"], "eth0": ["192.0.2.2", "fd00::2"],
              "ib0": ["10.9.0.2"], "ib1": ["10.9.1.2"], "docker0": ["172.17.0.1"]}


def test_the_interface_holding_the_route_to_the_rendezvous_is_chosen():
    assert gloo_interface(None, INTERFACES, "10.9.1.2") == "ib1"
    assert gloo_interface(None, INTERFACES, "fd00::2") == "eth0"
    assert gloo_interface(None, INTERFACES, None) is None
    assert gloo_interface(None, INTERFACES, "203.0.113.9") is None  # on no interface: gloo's


def test_nccls_interface_wins_and_its_forms_are_understood():
    assert gloo_interface("ib", INTERFACES, "192.0.2.2") == "ib0"  # a prefix: the first match
    assert gloo_interface("ib", INTERFACES, "10.9.1.2") == "ib1"  # ...or the routed match
    assert gloo_interface("docker,ib", INTERFACES, "10.9.0.2") == "ib0"
    assert gloo_interface("=ib1", INTERFACES, "192.0.2.2") == "ib1"  # exact names
    assert gloo_interface("=ib", INTERFACES, "192.0.2.2") == "eth0"  # no exact match: the route
    assert gloo_interface("^docker,lo", INTERFACES, "10.9.0.2") == "ib0"  # exclusions: the route
    assert gloo_interface("mlx", INTERFACES, "192.0.2.2") == "eth0"  # no match: the route


def test_on_the_rendezvous_machine_reached_over_loopback_the_arrivals_decide():
    assert gloo_interface(None, INTERFACES, "127.0.1.1", ["10.9.0.2"]) == "ib0"
    assert gloo_interface(None, INTERFACES, "127.0.0.1", ["127.0.0.1", "10.9.1.2"]) == "ib1"
    assert gloo_interface(None, INTERFACES, "127.0.0.1", []) == "lo"  # a job on one machine
    assert gloo_interface(None, INTERFACES, "::1") == "lo"


def test_a_gloo_interface_set_by_the_user_is_left_alone():
    env = {GLOO_IFNAME: "eth7", NCCL_IFNAME: "lo", "MASTER_ADDR": "127.0.0.1"}
    assert interface_for_gloo(env) is None
    with gloo_interface_chosen(env) as chosen:
        assert chosen is None and env[GLOO_IFNAME] == "eth7"
    assert env[GLOO_IFNAME] == "eth7"


def test_the_choice_holds_only_while_the_group_is_made():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as rendezvous:  # which no one else reaches
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(rendezvous.getsockname()[1])}
        with gloo_interface_chosen(env) as chosen:
            assert chosen == "lo" and env[GLOO_IFNAME] == "lo"
    assert GLOO_IFNAME not in env
    assert interface_for_gloo({}) is None  # no rendezvous address: gloo's own choice
    assert route_address("no-such-host.invalid") is None


def test_arrivals_are_the_local_ends_of_connections_from_elsewhere_only():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            accepted.close()
        assert arrival_addresses(port) == []  # from this machine's loopback: not an arrival


# --- for real, in network namespaces ----------------------------------------------------------

#: The two ends of the veth pair: (namespace suffix, address). Only inside the test's namespaces.
ENDS = (("a", "10.231.0.1"), ("b", "10.231.0.2"))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def namespaces():
    """Two network namespaces joined by a veth pair, each with its loopback up; yields
    ``{suffix: (namespace, interface, address)}``, and deletes them (and the pair) after."""
    tag = uuid.uuid4().hex[:6]
    made: list[str] = []
    ends = {suffix: (f"ddpw-{tag}-{suffix}", f"dv{tag}{suffix}", address)
            for suffix, address in ENDS}
    try:
        if shutil.which("ip") is None or os.geteuid() != 0:
            raise PermissionError("making network namespaces needs root and iproute2's ip")
        for namespace, _, _ in ends.values():
            _ip("netns", "add", namespace)
            made.append(namespace)
        if_a, if_b = ends["a"][1], ends["b"][1]
        _ip("link", "add", if_a, "type", "veth", "peer", "name", if_b)
        for namespace, interface, address in ends.values():
            _ip("link", "set", interface, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "link", "set", interface, "up")
    except (OSError, subprocess.CalledProcessError) as error:
        for namespace in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        said = getattr(error, "stderr", None) or error
        if real_parts_required():
            pytest.fail(f"network namespaces cannot be made, and CI or DDPW_REQUIRE_REAL=1 "
                        f"requires them: {said}", pytrace=False)
        pytest.skip(f"network namespaces cannot be made here: {said}")
    try:
        yield ends
    finally:
        for namespace in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


def _in_namespace(namespace: str, code: str, env: dict[str, str],
                  *args: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", code,
                             *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def test_in_a_namespace_the_interface_that_reaches_the_rendezvous_is_chosen(namespaces,
                                                                           no_leftover_processes):
    code = textwrap.dedent("""
        import json, os
        from ddpw.network import interface_for_gloo, route_address
        print(json.dumps([route_address(os.environ["MASTER_ADDR"]), interface_for_gloo(),
                          interface_for_gloo({**os.environ, "NCCL_SOCKET_IFNAME": "lo"})]))
    """)
    master = namespaces["a"][2]
    for namespace, interface, address in namespaces.values():
        process = _in_namespace(namespace, code, {"MASTER_ADDR": master})
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert json.loads(out) == [address, interface, "lo"]


#: One rank of a two-process world across the namespaces. The job's backend stands in for NCCL
#: (which no machine here has): a backend other than gloo, bound to the interface the test names,
#: as NCCL is by NCCL_SOCKET_IFNAME. With ``gloo-default`` the flag group is made as gloo
#: chooses by itself; otherwise a Trainer makes it, as at a step boundary.
RANK = textwrap.dedent("""
    import datetime, json, os, sys
    import torch
    import torch.distributed as dist
    from torch.distributed import ProcessGroupGloo

    def stand_in(store, rank, size, timeout):
        options = ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [ProcessGroupGloo.create_device(interface=os.environ["STAND_IN_IF"])]
        return ProcessGroupGloo(store, rank, size, options)

    dist.Backend.register_backend("standin", stand_in, devices=["cpu"])
    rank = int(os.environ["RANK"])
    dist.init_process_group("standin", timeout=datetime.timedelta(seconds=60))
    if sys.argv[1:] == ["gloo-default"]:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=5))
        flag = torch.tensor([float(rank)])
        dist.all_reduce(flag, group=group)
        flagged = bool(flag.item() > 0)
    else:
        from accelerate import Accelerator
        from ddpw import JobConfig, Trainer

        trainer = Trainer(JobConfig())
        trainer.accelerator = Accelerator(cpu=True)
        flagged = trainer._ddpw.vote.any_rank(rank == 1, trainer.world_size)
    print(json.dumps({"flagged": flagged, "left": os.environ.get("GLOO_SOCKET_IFNAME"),
                      "backend": dist.get_backend()}))
    sys.stdout.flush()
    os._exit(0)
""")


def _two_ranks(namespaces, port: int, *args: str) -> list[tuple[int | None, str, str]]:
    """Run :data:`RANK` in both namespaces: rank 0 in ``a``, which hosts the rendezvous and
    reaches it over loopback; rank 1 in ``b``. When one rank fails, the other is ended."""
    processes = []
    for rank, (namespace, interface, _) in enumerate(namespaces.values()):
        master = "127.0.0.1" if rank == 0 else namespaces["a"][2]
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": master, "MASTER_PORT": str(port), "STAND_IN_IF": interface}
        processes.append(_in_namespace(namespace, RANK, env, *args))
    deadline = time.monotonic() + 120  # a bound for a busy machine, not a speed
    try:
        while time.monotonic() < deadline:
            statuses = [p.poll() for p in processes]
            if all(s == 0 for s in statuses) or any(s not in (None, 0) for s in statuses):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    outputs = [p.communicate(timeout=30) for p in processes]
    return [(p.returncode, *output) for p, output in zip(processes, outputs, strict=True)]


def test_the_flag_group_reaches_across_machines_whose_names_resolve_to_loopback(
        namespaces, no_leftover_processes):
    # The machine's name resolves to the loopback address in both namespaces (as /etc/hosts
    # has it here): gloo by itself binds the loopback, which the other namespace cannot reach.
    import socket

    assert socket.gethostbyname(socket.gethostname()).startswith("127."), \
        "this test needs the machine's name to resolve to a loopback address"
    alone = _two_ranks(namespaces, 29501, "gloo-default")
    assert any(status != 0 for status, _, _ in alone), alone
    chosen = _two_ranks(namespaces, 29502)
    for status, out, err in chosen:
        assert status == 0, err
        assert json.loads(out) == {"flagged": True, "left": None, "backend": "standin"}
