"""Tensors on a device travel to the workers, and back, on the CPU (ddpw.shipping).

No machine here has a GPU. torch records each storage's device when it pickles it (its
``location_tag``) and restores the storage there when it unpickles it, through the same table of
devices; the fixture ``on_cuda`` adds to that table storages that count as on ``cuda:1``, so they
pickle as real CUDA ones do, and unpickling them fails as on a machine without that GPU (a SLURM
login node). The GPU-marked tests at the end check the real thing where a GPU is lent.
"""

from __future__ import annotations

import dataclasses
import functools
import linecache
import pickle
import traceback
from collections.abc import Callable

import cloudpickle
import pytest
import torch
from jobs import Blobs, BlobTrainer, artefacts, job
from torch import nn

from ddpw import Platform, PlatformConfig, Wrapper, world
from ddpw.jobfolder import Payload
from ddpw.plan import MachineFacts, resolve_plan
from ddpw.shipping import dumps, on_a_device, ship

NOTE = "tensor storage(s)"
CPU1 = PlatformConfig(platform=Platform.CPU, verbose=True)
CPU2 = PlatformConfig(platform=Platform.CPU, n_procs=2, verbose=True)


def _cuda_tag(tagged: set[int], storage) -> str | None:
    return "cuda:1" if storage.data_ptr() in tagged else None


def storages_on_cuda() -> Callable[..., None]:
    """In this process, have torch's pickling record the storages of the tensors given to the
    function returned as on ``cuda:1``; restoring them is left to torch's own CUDA entry."""
    tagged: set[int] = set()
    # Ahead of torch's own CPU entry (priority 10).
    torch.serialization.register_package(1, functools.partial(_cuda_tag, tagged),
                                         lambda storage, location: None)

    def mark(*tensors: torch.Tensor) -> None:
        tagged.update(t.untyped_storage().data_ptr() for t in tensors)

    return mark


@pytest.fixture
def on_cuda(monkeypatch):
    """``mark(*tensors)``: from now on until the test ends, their storages are on ``cuda:1``."""
    monkeypatch.setattr(torch.serialization, "_package_registry",
                        list(torch.serialization._package_registry))
    return storages_on_cuda()


class Tied(nn.Module):
    """An embedding and an output layer that share their weight, with a BatchNorm's buffers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(3)


def describe(model: Tied, data: torch.Tensor, view: torch.Tensor, frozen: torch.Tensor) -> dict:
    """What a job sees of what it was given (run as the job's function)."""
    tensors = [*model.parameters(), *model.buffers(), data, view, frozen]
    data[1] = 100.0  # does the view see it?
    return {"devices": {t.device.type for t in tensors},
            "tied": model.embed.weight is model.out.weight,
            "parameter": type(model.embed.weight) is nn.Parameter,
            "requires_grad": (model.embed.weight.requires_grad, frozen.requires_grad),
            "view_shares": view[0].item() == 100.0,
            "weight": model.embed.weight.detach().clone(),
            "running_var": model.norm.running_var.clone()}


def test_a_job_holding_cuda_tensors_reaches_the_job_on_the_cpu_and_says_so_once(on_cuda,
                                                                                capfd):
    model, data = Tied(), torch.arange(6.0)
    view, frozen = data[1:], torch.ones(2, requires_grad=True)
    model.norm.running_var.fill_(3.0)
    on_cuda(model.embed.weight, model.norm.running_var, data, frozen)
    # Today: RuntimeError "Attempting to deserialize object on a CUDA device" as the job loads.
    [seen] = Wrapper(CPU1).start(describe, model, data, view=view, frozen=frozen)
    assert seen["devices"] == {"cpu"}
    assert seen["tied"] and seen["parameter"] and seen["requires_grad"] == (True, True)
    assert seen["view_shares"]
    assert torch.equal(seen["weight"], model.embed.weight.detach())
    assert torch.equal(seen["running_var"], model.norm.running_var)
    said = [line for line in capfd.readouterr().err.splitlines() if NOTE in line]
    assert said == ["[ddpw] the job holds 4 tensor storage(s) (0.0 MiB) on cuda:1: they travel "
                    "to the worker processes as CPU copies, so that none of them lands on cuda:1 "
                    "in every process; Accelerate puts a Trainer's model on each rank's own "
                    "device (a function moves its tensors to ddpw.world().device itself)."]
    assert data[1].item() == 1.0  # the caller's own tensors are untouched


def rank_tensors(x: torch.Tensor) -> dict:
    """Returns tensors that count as on ``cuda:1`` in this worker."""
    rank = world().global_rank
    result = {"x_device": x.device.type, "twice": x * 2, "rank": torch.tensor([rank])}
    storages_on_cuda()(result["twice"], result["rank"])
    return result


def test_results_holding_cuda_tensors_come_back_on_the_cpu(on_cuda, capfd,
                                                          no_leftover_processes):
    x = torch.arange(3.0)
    on_cuda(x)
    # Today: the job does not load in the workers; and the results would not load here.
    results = Wrapper(CPU2).start(rank_tensors, x)
    assert [r["x_device"] for r in results] == ["cpu", "cpu"]
    for rank, result in enumerate(results):
        assert result["twice"].device.type == "cpu" and torch.equal(result["twice"], x * 2)
        assert torch.equal(result["rank"], torch.tensor([rank]))
    said = [line for line in capfd.readouterr().err.splitlines() if NOTE in line]
    assert len(said) == 1 and "1 tensor storage(s)" in said[0]


def test_a_trainer_whose_model_is_on_cuda_trains_on_the_cpu_platform(on_cuda, tmp_path):
    a_config = artefacts(n_train=40, n_test=20)
    on_cuda(*a_config.model.parameters(), a_config.train_set.x)
    result = Wrapper(PlatformConfig(platform=Platform.CPU, verbose=False), a_config).start(
        BlobTrainer(job(tmp_path, epochs=1, save_every=0)))
    assert result["loss"] == result["loss"]


def test_cpu_tensors_pass_through_as_torch_pickles_them_without_a_copy():
    model, data = Tied(), Blobs(50)
    objects = {"model": model, "data": data, "meta": torch.empty(3, device="meta")}
    pickled, moved = dumps(objects)
    assert moved.storages == 0 and moved.nbytes == 0
    assert pickled == cloudpickle.dumps(objects)  # byte for byte what plain cloudpickle writes
    assert on_a_device(model.embed.weight.untyped_storage()) is None
    assert on_a_device(torch.empty(3, device="meta").untyped_storage()) is None
    back = pickle.loads(pickled)
    assert back["meta"].device.type == "meta" and back["model"].out.weight is back[
        "model"].embed.weight


def test_views_of_one_device_storage_share_one_copy(on_cuda):
    base = torch.arange(8.0)
    on_cuda(base)
    pickled, moved = dumps([base, base[2:], base[:4].view(2, 2), torch.ones(0)])
    assert moved.storages == 1 and moved.nbytes == 32
    copy, tail, square, _ = pickle.loads(pickled)
    copy[3] = -1.0
    assert tail[1].item() == -1.0 and square[1, 1].item() == -1.0


class Wide(Tied):
    """:class:`Tied` with 4 MiB of weights, a non-persistent buffer, a plain tensor attribute
    and a view of a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(1024, 1024)
        self.register_buffer("table", torch.arange(4.0), persistent=False)
        self.plain = torch.full((2,), 7.0)
        self.head = self.wide.bias[:4]


def test_the_weights_that_a_resume_restores_travel_without_their_data(tmp_path):
    model = Wide()
    plan = resolve_plan(CPU1, MachineFacts.probe())
    payload = Payload(target=BlobTrainer(job(tmp_path)), p_config=CPU1,
                      a_config=artefacts(model=model), plan=plan)
    fresh = ship(payload)
    resumed = ship(dataclasses.replace(payload, resume_from="ckpt_2"))
    assert len(fresh) > 4 * 2**20 > 100 * len(resumed)
    back = pickle.loads(resumed).a_config.model
    # What no checkpoint holds travels whole; ties and views hold, so the restore fills all.
    assert torch.equal(back.table, model.table) and torch.equal(back.plain, model.plain)
    assert back.out.weight is back.embed.weight and type(back.wide.weight) is nn.Parameter
    back.load_state_dict(model.state_dict())
    assert torch.equal(back.head, model.head)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                  model.state_dict().values(), strict=True))
    # A Trainer that starts from the model as it is gets its weights.
    assert pickle.loads(fresh).a_config.model.wide.weight.equal(model.wide.weight)


# --- on a GPU -----------------------------------------------------------------------------------

def cuda_report(model: nn.Module) -> dict:
    initialised = torch.cuda.is_initialized()  # before this function touches CUDA itself
    return {"cuda_initialised": initialised,
            "devices": {p.device.type for p in model.parameters()},
            "ones": torch.ones(2, device=f"cuda:{torch.cuda.current_device()}")}


@pytest.mark.gpu
def test_a_cuda_model_reaches_cpu_workers_without_cuda_and_cuda_results_come_back_on_the_cpu():
    model = Tied().cuda()
    results = Wrapper(CPU2).start(cuda_report, model)
    for result in results:
        assert result["cuda_initialised"] is False
        assert result["devices"] == {"cpu"}
        assert result["ones"].device.type == "cpu" and torch.equal(result["ones"], torch.ones(2))


def gpu_report(model: nn.Module) -> dict:
    w = world()
    memory = torch.cuda.memory_allocated(0)  # rank 1 computes on cuda:1
    return {"rank": w.global_rank, "device": str(w.device), "memory_on_0": memory,
            "devices": {p.device.type for p in model.parameters()}}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs")
def test_a_cuda_model_does_not_land_on_gpu_0_in_every_rank():
    model = Tied().cuda(0)
    results = Wrapper(PlatformConfig(platform=Platform.GPU, n_gpus=2, verbose=False)).start(
        gpu_report, model)
    assert [r["device"] for r in results] == ["cuda:0", "cuda:1"]
    assert results[1]["memory_on_0"] == 0
    assert all(r["devices"] == {"cpu"} for r in results)



def test_code_sent_by_value_keeps_its_file_name_and_lines_where_the_file_is_gone(tmp_path):
    cell = tmp_path / "cell.py"
    cell.write_text('\ndef unhappy():\n    raise ValueError("unhappy")\n')
    space: dict = {}  # no module: cloudpickle sends these functions by value
    exec(compile(cell.read_text(), str(cell), "exec"), space)
    exec(compile("def nameless():\n    raise KeyError(3)\n", "<string>", "exec"), space)
    sent = dumps((space["unhappy"], space["nameless"]))[0]
    cell.unlink()  # as a Jupyter cell's file is, or on a machine that does not share it
    linecache.checkcache(str(cell))  # and this process forgets it
    said = []
    for function in pickle.loads(sent):
        with pytest.raises(Exception) as caught:
            function()
        said.append("".join(traceback.format_tb(caught.value.__traceback__)))
    assert f'  File "{cell}", line 3, in unhappy\n    raise ValueError("unhappy")\n' in said[0]
    assert said[1].endswith('  File "<string>", line 2, in nameless\n')  # no file: no text
