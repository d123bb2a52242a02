"""What ddpw needs of torch: setup.cfg's floor, and the warning when torchrun's agent takes the
pause signals over (as data: the old torch that needs it is not installed here)."""

from __future__ import annotations

import configparser
import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch

from ddpw import Platform, PlatformConfig, Wrapper, _compat

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def test_setup_cfg_asks_for_the_torch_that_ddpw_checks_for():
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    floor = re.search(r"^torch>=([\d.]+)$", config["options"]["install_requires"], re.M)
    assert floor, "setup.cfg has no torch>= line"
    assert _compat.torch_version(floor.group(1)) == _compat.TORCH_FLOOR


@pytest.mark.parametrize("version, refused", [
    ("2.3.0", False), ("2.11.0+cu130", False), ("2.13.0+cpu", False), ("3.0.0", False),
    ("2.2.2", True), ("1.13.1+cu117", True),
])
def test_the_torch_floor(version, refused):
    error = _compat.torch_floor_error(version)
    assert (error is not None) == refused
    if refused:
        assert error == f"ddpw needs torch>=2.3; this is torch {version}"


def test_a_torch_version_that_is_none_is_refused_by_name():
    with pytest.raises(ValueError, match="not a torch version: 'nightly'"):
        _compat.torch_version("nightly")


def test_an_agent_without_signals_to_handle_gets_a_one_line_warning():
    old = {"min_nodes", "max_nodes", "nproc_per_node", "run_id"}
    message = _compat.agent_signals_warning("2.8.0+cu128", old)
    assert message is not None and "\n" not in message
    assert message.startswith("torch 2.8.0+cu128's torchrun cannot be told which signals to "
                              "handle (torch 2.9 can)")
    assert "SIGTERM and SIGINT" in message and "SIGUSR1 and SIGUSR2 pause as usual" in message
    assert _compat.agent_signals_warning("2.9.0", old | {"signals_to_handle"}) is None


def test_this_torch_has_signals_to_handle_and_launches_without_the_warning():
    assert "signals_to_handle" in _compat.launch_config_fields()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.warn_if_agent_takes_signals()
    assert _compat.torch_floor_error(torch.__version__) is None


def rank() -> int:
    from ddpw import world

    return world().global_rank


def test_a_launch_with_an_agent_that_takes_the_signals_warns(monkeypatch):
    # An older torch's LaunchConfig, which has no signals_to_handle: what no machine here has.
    from torch.distributed.launcher.api import LaunchConfig

    fields = {f.name for f in dataclasses.fields(LaunchConfig)} - {"signals_to_handle"}
    monkeypatch.setattr(_compat, "launch_config_fields", lambda: fields)
    p_config = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=False)
    with pytest.warns(RuntimeWarning, match=r"torchrun cannot be told which signals to handle"):
        assert Wrapper(p_config).start(rank) == [0, 1]
