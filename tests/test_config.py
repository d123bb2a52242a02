"""Validation of PlatformConfig, ArtefactsConfig and JobConfig, and checkpoint.split/join."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset, RandomSampler, SequentialSampler, TensorDataset

from ddpw.artefacts import ArtefactsConfig
from ddpw.checkpoint import join, split
from ddpw.errors import ConfigError
from ddpw.job import JobConfig, JobMode
from ddpw.jobfolder import DEFAULT_ROOT
from ddpw.platform import Platform, PlatformConfig


def names(owner, field, value):
    """A regex for the ``owner.field=value`` part that every ConfigError message starts with."""
    return re.escape(f"{owner}.{field}={value!r}")


# ------------------------------------------------------------------------------------------------
# Platform.parse
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("platform", list(Platform))
def test_parse_returns_platform_members_unchanged(platform):
    assert Platform.parse(platform) is platform


@pytest.mark.parametrize("text, expected", [
    ("cpu", Platform.CPU), ("CPU", Platform.CPU), ("Gpu", Platform.GPU),
    ("slurm", Platform.SLURM), ("SlUrM", Platform.SLURM), ("mps", Platform.MPS),
])
def test_parse_accepts_names_in_any_case(text, expected):
    assert Platform.parse(text) is expected


def test_platform_config_parses_platform_names():
    assert PlatformConfig(platform="cpu").platform is Platform.CPU


@pytest.mark.parametrize("value", ["tpu", "", " cpu", "Platform.CPU", None, 2.5])
def test_parse_rejects_anything_else_listing_valid_names(value):
    with pytest.raises(ConfigError, match=names("PlatformConfig", "platform", value)) as info:
        Platform.parse(value)
    for member in Platform:
        assert f"Platform.{member.name}" in str(info.value)


def test_platform_config_rejects_unknown_platform():
    with pytest.raises(ConfigError, match=names("PlatformConfig", "platform", "tpu")):
        PlatformConfig(platform="tpu")


# ------------------------------------------------------------------------------------------------
# PlatformConfig: field checks
# ------------------------------------------------------------------------------------------------

INT_FIELDS = ["n_nodes", "n_gpus", "n_procs", "cpus_per_task", "timeout_min", "seed",
              "master_port"]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, 2.0, "2", -1])
def test_platform_int_fields_reject_bools_floats_strings_negatives(field, value):
    with pytest.raises(ConfigError, match=names("PlatformConfig", field, value)):
        PlatformConfig(platform=Platform.CPU, **{field: value})


@pytest.mark.parametrize("field", ["n_nodes", "n_procs", "cpus_per_task", "timeout_min",
                                   "master_port"])
def test_platform_positive_fields_reject_zero(field):
    with pytest.raises(ConfigError, match=names("PlatformConfig", field, 0)):
        PlatformConfig(platform=Platform.CPU, **{field: 0})


@pytest.mark.parametrize("field", ["n_gpus", "seed"])
def test_platform_fields_accept_zero(field):
    assert getattr(PlatformConfig(platform=Platform.CPU, **{field: 0}), field) == 0


@pytest.mark.parametrize("port", [0, 65536, 100000])
def test_master_port_out_of_range(port):
    with pytest.raises(ConfigError, match=names("PlatformConfig", "master_port", port)) as info:
        PlatformConfig(platform=Platform.CPU, master_port=port)
    assert "65535" in str(info.value)


@pytest.mark.parametrize("port", [None, 1, 29500, 65535])
def test_master_port_in_range(port):
    assert PlatformConfig(platform=Platform.CPU, master_port=port).master_port == port


@pytest.mark.parametrize("value", ["fp32", "fp8", "", None, "FP16x"])
def test_mixed_precision_choices(value):
    pattern = names("PlatformConfig", "mixed_precision", value)
    with pytest.raises(ConfigError, match=pattern) as info:
        PlatformConfig(platform=Platform.CPU, mixed_precision=value)
    for choice in ("'no'", "'fp16'", "'bf16'"):
        assert choice in str(info.value)


@pytest.mark.parametrize("field, value", [
    ("name", 5), ("name", None), ("partition", 3), ("master_addr", 5), ("master_addr", " "),
    ("verbose", 1), ("verbose", "yes"),
])
def test_platform_typed_fields(field, value):
    with pytest.raises(ConfigError, match=names("PlatformConfig", field, value)):
        PlatformConfig(platform=Platform.CPU, **{field: value})


@pytest.mark.parametrize("value", [0, -4, True, "4", [4]])
def test_mem_gb_rejects_non_positive_and_non_numbers(value):
    with pytest.raises(ConfigError, match=names("PlatformConfig", "mem_gb", value)):
        PlatformConfig(platform=Platform.CPU, mem_gb=value)


@pytest.mark.parametrize("value", [None, 4, 0.5])
def test_mem_gb_accepts_positive_numbers(value):
    assert PlatformConfig(platform=Platform.CPU, mem_gb=value).mem_gb == value


def test_mem_gb_rejects_nan():
    with pytest.raises(ConfigError, match=r"PlatformConfig\.mem_gb=nan"):
        PlatformConfig(platform=Platform.CPU, mem_gb=float("nan"))


# ------------------------------------------------------------------------------------------------
# PlatformConfig: shape checks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("platform, extra", [
    (Platform.CPU, {}), (Platform.MPS, {}), (Platform.SLURM, {"n_gpus": 0}),
])
def test_fp16_needs_cuda(platform, extra):
    with pytest.raises(ConfigError, match=names("PlatformConfig", "mixed_precision", "fp16")) as i:
        PlatformConfig(platform=platform, mixed_precision="fp16", **extra)
    assert "CUDA" in str(i.value)


@pytest.mark.parametrize("platform, extra", [
    (Platform.GPU, {}), (Platform.SLURM, {"n_gpus": 2}),
])
def test_fp16_accepted_with_cuda(platform, extra):
    assert PlatformConfig(platform=platform, mixed_precision="fp16", **extra).mixed_precision == \
        "fp16"


@pytest.mark.parametrize("platform", [Platform.CPU, Platform.MPS])
def test_bf16_accepted_without_cuda(platform):
    assert PlatformConfig(platform=platform, mixed_precision="bf16").mixed_precision == "bf16"


def test_several_machines_are_refused_on_mps_alone():
    with pytest.raises(ConfigError, match=names("PlatformConfig", "n_nodes", 2)) as info:
        PlatformConfig(platform=Platform.MPS, n_nodes=2)
    assert "Platform.CPU, Platform.GPU or Platform.SLURM" in str(info.value)
    for platform in (Platform.CPU, Platform.GPU):
        assert PlatformConfig(platform=platform, n_nodes=2, node_rank=1).node_rank == 1


@pytest.mark.parametrize("n_nodes, node_rank", [(2, 2), (2, -1), (1, 1), (3, True), (2, "1")])
def test_node_rank_outside_the_nodes_is_refused(n_nodes, node_rank):
    with pytest.raises(ConfigError, match=names("PlatformConfig", "node_rank", node_rank)) as info:
        PlatformConfig(platform=Platform.CPU, n_nodes=n_nodes, node_rank=node_rank)
    assert f"from 0 to {n_nodes - 1} (n_nodes={n_nodes})" in str(info.value)


def test_node_rank_is_slurms_own():
    with pytest.raises(ConfigError, match=names("PlatformConfig", "node_rank", 0)):
        PlatformConfig(platform=Platform.SLURM, n_nodes=2, node_rank=0)


def test_several_nodes_on_slurm():
    assert PlatformConfig(platform=Platform.SLURM, n_nodes=3).n_nodes == 3


def test_gpu_platform_needs_a_gpu():
    with pytest.raises(ConfigError, match=names("PlatformConfig", "n_gpus", 0)) as info:
        PlatformConfig(platform=Platform.GPU, n_gpus=0)
    assert "Platform.CPU" in str(info.value)


@pytest.mark.parametrize("field, value", [("n_gpus", 0), ("n_gpus", 2), ("n_procs", 2)])
def test_mps_is_one_gpu_one_process(field, value):
    with pytest.raises(ConfigError, match=names("PlatformConfig", field, value)) as info:
        PlatformConfig(platform=Platform.MPS, **{field: value})
    assert "Platform.MPS" in str(info.value)


@pytest.mark.parametrize("n_procs", [None, 1])
def test_mps_accepts_one_process(n_procs):
    assert PlatformConfig(platform=Platform.MPS, n_procs=n_procs).world_size == 1


@pytest.mark.parametrize("platform, n_gpus, n_procs", [
    (Platform.GPU, 1, 2), (Platform.GPU, 4, 2), (Platform.SLURM, 2, 3),
    (Platform.SLURM, 1, 2),  # an explicit n_gpus still wins over n_procs
])
def test_gpu_jobs_run_one_process_per_gpu(platform, n_gpus, n_procs):
    with pytest.raises(ConfigError, match=names("PlatformConfig", "n_procs", n_procs)) as info:
        PlatformConfig(platform=platform, n_gpus=n_gpus, n_procs=n_procs)
    assert f"n_gpus={n_gpus}" in str(info.value)


@pytest.mark.parametrize(("kwargs", "n_gpus"), [
    ({}, 1),
    ({"platform": Platform.GPU}, 1),
    ({"platform": Platform.MPS}, 1),
    ({"platform": Platform.CPU, "n_procs": 2}, 1),
    ({"platform": Platform.SLURM}, 1),
    # n_procs on SLURM, and nothing about GPUs: CPU processes.
    ({"platform": Platform.SLURM, "n_procs": 2}, 0),
    ({"platform": "slurm", "n_nodes": 2, "n_procs": 1}, 0),
    ({"platform": Platform.SLURM, "n_procs": 2, "n_gpus": 0}, 0),
    ({"platform": Platform.SLURM, "n_procs": 2, "n_gpus": 2}, 2),
    ({"platform": Platform.SLURM, "n_gpus": 4}, 4),
])
def test_n_gpus_when_not_given(kwargs, n_gpus):
    config = PlatformConfig(**kwargs)
    assert config.n_gpus == n_gpus
    assert config.uses_gpus is (n_gpus > 0 and config.platform in (Platform.GPU, Platform.SLURM))
    # The config holds the number chosen: a copy, or a repr, says it.
    assert dataclasses.replace(config) == config
    assert f"n_gpus={n_gpus}," in repr(config)


def test_slurm_cpu_processes_without_n_gpus():
    config = PlatformConfig(platform=Platform.SLURM, n_nodes=2, n_procs=1, partition="debug")
    assert (config.procs_per_node, config.world_size, config.uses_gpus) == (1, 2, False)
    assert "SLURM, 2 node(s) x 1 process(s) = world of 2" in config.summary()


@pytest.mark.parametrize("platform", [Platform.GPU, Platform.SLURM])
def test_n_procs_equal_to_n_gpus_is_accepted(platform):
    assert PlatformConfig(platform=platform, n_gpus=4, n_procs=4).procs_per_node == 4


@pytest.mark.parametrize("kwargs, procs_per_node, world_size, uses_gpus", [
    ({"platform": Platform.CPU}, 1, 1, False),
    ({"platform": Platform.CPU, "n_procs": 3}, 3, 3, False),
    ({"platform": Platform.CPU, "n_gpus": 8}, 1, 1, False),
    ({"platform": Platform.GPU}, 1, 1, True),
    ({"platform": Platform.GPU, "n_gpus": 4}, 4, 4, True),
    ({"platform": Platform.SLURM, "n_nodes": 2, "n_gpus": 4}, 4, 8, True),
    ({"platform": Platform.SLURM, "n_nodes": 2, "n_gpus": 0, "n_procs": 3}, 3, 6, False),
    ({"platform": Platform.SLURM, "n_gpus": 0}, 1, 1, False),
    ({"platform": Platform.MPS}, 1, 1, False),
])
def test_procs_per_node_and_world_size(kwargs, procs_per_node, world_size, uses_gpus):
    config = PlatformConfig(**kwargs)
    assert config.procs_per_node == procs_per_node
    assert config.world_size == world_size
    assert config.uses_gpus is uses_gpus


@pytest.mark.parametrize("kwargs, world_size", [
    ({"platform": Platform.CPU, "n_procs": 3}, 3),
    ({"platform": Platform.SLURM, "n_nodes": 2, "n_gpus": 4}, 8),
    ({"platform": Platform.MPS}, 1),
])
def test_summary_mentions_world_size(kwargs, world_size):
    summary = PlatformConfig(name="myjob", **kwargs).summary()
    assert "myjob" in summary
    assert re.search(rf"world\D*\b{world_size}\b", summary), summary


# ------------------------------------------------------------------------------------------------
# ArtefactsConfig
# ------------------------------------------------------------------------------------------------

def tiny_set(n=10):
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1))


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(6))


@pytest.mark.parametrize("field", ["train_set", "validation_set", "test_set"])
@pytest.mark.parametrize("value, type_name", [(5, "int"), (object(), "object"),
                                             (torch.nn.Linear(1, 1), "Linear")])
def test_datasets_must_be_datasets(field, value, type_name):
    with pytest.raises(ConfigError, match=names("ArtefactsConfig", field, type_name)) as info:
        ArtefactsConfig(**{field: value})
    assert "dataset" in str(info.value)


@pytest.mark.parametrize("value", [tiny_set(), Stream(), [1, 2, 3], None])
def test_datasets_accept_map_style_iterable_and_none(value):
    assert ArtefactsConfig(train_set=value).train_set is value


@pytest.mark.parametrize("value", [0, -1, True, 2.0])
def test_batch_size(value):
    with pytest.raises(ConfigError, match=names("ArtefactsConfig", "batch_size", value)):
        ArtefactsConfig(batch_size=value)


@pytest.mark.parametrize("value, type_name", [("resnet", "str"),
                                             (lambda: torch.nn.Linear(1, 1), "function"),
                                             ({"w": torch.zeros(1)}, "dict")])
def test_model_must_be_a_module(value, type_name):
    with pytest.raises(ConfigError, match=names("ArtefactsConfig", "model", type_name)) as info:
        ArtefactsConfig(model=value)
    assert "torch.nn.Module" in str(info.value)


@pytest.mark.parametrize("field", ["optimiser_loader", "scheduler_loader", "collate_fn"])
@pytest.mark.parametrize("value", ["adam", 3, [print]])
def test_loaders_must_be_callable(field, value):
    with pytest.raises(ConfigError, match=names("ArtefactsConfig", field, value)) as info:
        ArtefactsConfig(**{field: value})
    assert "callable" in str(info.value)


@pytest.mark.parametrize("field, value, message", [
    ("optimiser_loader", lambda m: torch.optim.Adam(m.parameters()),
     r"optimiser_loader=Adam\(\.\.\.\), the optimiser itself, is not valid: a function that "
     r"takes the model and returns its optimiser, such as "
     r"lambda model: torch\.optim\.Adam\(model\.parameters\(\)\)\.$"),
    ("optimiser_loader", lambda m: torch.optim.Adam,
     r"optimiser_loader=Adam, the optimiser's class, is not valid: a function that takes the "
     r"model"),
    ("scheduler_loader", lambda m: torch.optim.lr_scheduler.StepLR(
        torch.optim.SGD(m.parameters()), 3),
     r"scheduler_loader=StepLR\(\.\.\.\), the scheduler itself, is not valid: a function that "
     r"takes the optimiser and returns its scheduler, such as lambda optimiser: "),
    ("collate_fn", lambda m: [m, m], r"collate_fn=<list> is not valid: a callable or None\.$"),
])
def test_what_a_loader_makes_is_refused_in_its_place_in_one_line(field, value, message):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ConfigError, match=r"^ArtefactsConfig\." + message) as info:
        ArtefactsConfig(model=model, **{field: value(model)})
    assert "\n" not in str(info.value)


def test_loaders_accept_callables():
    config = ArtefactsConfig(model=torch.nn.Linear(1, 1),
                             optimiser_loader=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                             scheduler_loader=torch.optim.lr_scheduler.ConstantLR, collate_fn=list)
    assert isinstance(config.optimiser_loader(config.model), torch.optim.SGD)


@pytest.mark.parametrize("field, value", [
    ("num_workers", -1), ("num_workers", 1.0), ("model_has_batch_norm", 1), ("pin_memory", None),
    ("drop_last", "no"), ("shuffle", 0), ("dataloader_kwargs", None),
    ("dataloader_kwargs", [("timeout", 1)]),
])
def test_other_artefacts_fields(field, value):
    with pytest.raises(ConfigError, match=names("ArtefactsConfig", field, value)):
        ArtefactsConfig(**{field: value})


@pytest.mark.parametrize("kwargs, clashes", [
    ({"batch_size": 8}, ["batch_size"]),
    ({"shuffle": False, "timeout": 3}, ["shuffle"]),
    ({"collate_fn": list, "num_workers": 2}, ["collate_fn", "num_workers"]),
    ({"pin_memory": True, "drop_last": True}, ["drop_last", "pin_memory"]),
    ({"sampler": None}, ["sampler"]),
    ({"batch_sampler": None}, ["batch_sampler"]),
])
def test_dataloader_kwargs_clash(kwargs, clashes):
    with pytest.raises(ConfigError,
                       match=names("ArtefactsConfig", "dataloader_kwargs", clashes)) as info:
        ArtefactsConfig(dataloader_kwargs=kwargs)
    assert "sampler" in str(info.value)


def test_make_loader_shuffles_only_train():
    data = tiny_set()
    config = ArtefactsConfig(train_set=data, batch_size=3)
    assert isinstance(config.make_loader(data, train=True).sampler, RandomSampler)
    assert isinstance(config.make_loader(data, train=False).sampler, SequentialSampler)


def test_make_loader_does_not_shuffle_when_asked_not_to():
    data = tiny_set()
    config = ArtefactsConfig(train_set=data, shuffle=False)
    assert isinstance(config.make_loader(data, train=True).sampler, SequentialSampler)


def test_make_loader_drops_last_only_for_train():
    data = tiny_set(10)
    config = ArtefactsConfig(train_set=data, batch_size=3, drop_last=True)
    train = config.make_loader(data, train=True)
    evaluate = config.make_loader(data, train=False)
    assert (train.drop_last, len(train)) == (True, 3)
    assert (evaluate.drop_last, len(evaluate)) == (False, 4)
    assert evaluate.batch_size == 3


def test_make_loader_iterable_dataset_not_shuffled():
    loader = ArtefactsConfig(batch_size=2).make_loader(Stream(), train=True)
    assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3], [4, 5]]


def test_make_loader_passes_fields_and_kwargs():
    data = tiny_set()
    config = ArtefactsConfig(collate_fn=list, dataloader_kwargs={"timeout": 7.0})
    loader = config.make_loader(data, train=False)
    assert loader.collate_fn is list
    assert loader.timeout == 7.0


# ------------------------------------------------------------------------------------------------
# JobConfig
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["TRAIN", 0, None, Platform.CPU])
def test_job_type_must_be_a_job_mode(value):
    with pytest.raises(ConfigError, match=names("JobConfig", "job_type", value)) as info:
        JobConfig(job_type=value)
    for mode in JobMode:
        assert f"JobMode.{mode.name}" in str(info.value)


@pytest.mark.parametrize("start_at", [0, -1])
def test_resume_needs_a_checkpoint(start_at):
    with pytest.raises(ConfigError, match=names("JobConfig", "start_at", start_at)) as info:
        JobConfig(job_type=JobMode.RESUME, start_at=start_at)
    assert "JobMode.TRAIN" in str(info.value)


@pytest.mark.parametrize("job_type", [JobMode.TRAIN, JobMode.RESUME])
def test_epochs_below_start_at(job_type):
    with pytest.raises(ConfigError, match=names("JobConfig", "epochs", 5)) as info:
        JobConfig(job_type=job_type, start_at=10, epochs=5)
    assert "start_at=10" in str(info.value)


@pytest.mark.parametrize("job_type", list(JobMode))
def test_epochs_equal_to_start_at_is_accepted(job_type):
    assert JobConfig(job_type=job_type, start_at=4, epochs=4).epochs == 4


def test_evaluate_ignores_epochs():
    assert JobConfig(job_type=JobMode.EVALUATE, start_at=10, epochs=5).start_at == 10


@pytest.mark.parametrize("field, value", [
    ("start_at", True), ("start_at", 1.5), ("epochs", -1), ("epochs", 3.0),
    ("save_every", -1), ("save_every", False), ("gradient_accumulation_steps", 0),
    ("gradient_accumulation_steps", -2), ("gradient_accumulation_steps", True),
    ("checkpoint_path", None), ("console_logs_path", 3), ("training_logs_path", b"logs"),
    ("checkpoint_name_prefix", None), ("checkpoint_name_prefix", "a/b"),
    ("checkpoint_name_prefix", "/ckpt"), ("checkpoint_name_prefix", ""),
])
def test_job_fields(field, value):
    with pytest.raises(ConfigError, match=names("JobConfig", field, value)):
        JobConfig(**{field: value})


def test_console_logs_go_where_ddpw_launch_puts_them():
    assert JobConfig().console_logs_path == DEFAULT_ROOT == "./logs/console_logs"


def test_save_every_zero_never_saves():
    job = JobConfig(epochs=5, save_every=0)
    assert [job.saves_after(e) for e in range(1, 6)] == [False] * 5


@pytest.mark.parametrize("save_every, epochs, saved", [
    (2, 5, [2, 4, 5]),
    (1, 3, [1, 2, 3]),
    (5, 10, [5, 10]),
    (10, 4, [4]),
])
def test_saves_after(save_every, epochs, saved):
    job = JobConfig(epochs=epochs, save_every=save_every)
    assert [e for e in range(1, epochs + 1) if job.saves_after(e)] == saved


@pytest.mark.parametrize("start_at, restores", [
    (-1, False), (0, False), (3, True), ("latest", True), ("ckpt_3_batch5", True),
])
def test_restores(start_at, restores):
    assert JobConfig(start_at=start_at, epochs=10).restores is restores


@pytest.mark.parametrize("start_at", ["last", "ckpt_x", "other_3", "ckpt_3_batch", "3"])
def test_start_at_strings_must_be_latest_best_or_a_checkpoint_name(start_at):
    with pytest.raises(ConfigError, match=re.escape(f"JobConfig.start_at={start_at!r}") +
                       r".*'latest', 'best' or a checkpoint name such as 'ckpt_3'"):
        JobConfig(start_at=start_at)


def test_resume_accepts_latest_and_names():
    assert JobConfig(job_type=JobMode.RESUME, start_at="latest").restores
    assert JobConfig(job_type=JobMode.RESUME, start_at="ckpt_2_batch7").restores


@pytest.mark.parametrize("signals", [("SIGNOPE",), ("INT",), (15,)])
def test_pause_signals_must_name_signals(signals):
    with pytest.raises(ConfigError, match=r"JobConfig\.pause_signals="):
        JobConfig(pause_signals=signals)


def test_keep_last_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"JobConfig\.keep_last=-1"):
        JobConfig(keep_last=-1)


def test_evaluate_restores_checkpoint():
    assert JobConfig(job_type=JobMode.EVALUATE, start_at=2).restores is True
    assert JobConfig(job_type=JobMode.EVALUATE).restores is False


# ------------------------------------------------------------------------------------------------
# checkpoint.split / join
# ------------------------------------------------------------------------------------------------

def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_split_join_round_trip():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)},
                  1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "name": None}],
        "rng": ("MT19937", np.arange(5, dtype=np.uint32), 0, 0.25),
        "ints": torch.arange(4, dtype=torch.int64),
        "flag": True,
        "nested": [(1, (2.5, None)), {"x": -1.5}],
    }
    tensors = {}
    structure = split(state, tensors)
    assert len(tensors) == 5
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    restored = join(json.loads(json.dumps(structure)), tensors)
    assert_same(restored, state)


def test_split_stores_detached_tensors():
    weight = torch.randn(3, 2, requires_grad=True)
    tensors = {}
    split({"w": weight.t()}, tensors)
    (stored,) = tensors.values()
    assert not stored.requires_grad
    assert torch.equal(stored, weight.detach().t())


@pytest.mark.parametrize("obj, path", [
    ({"a": [1, lambda: 0]}, ".a.1"),
    ({"opt": {3: object()}}, ".opt.3"),
    ((1, {"s": {1, 2}}), ".1.s"),
])
def test_split_rejects_unsupported_objects_naming_the_path(obj, path):
    with pytest.raises(TypeError, match=re.escape(f"'{path}'")):
        split(obj, {})


def test_split_keeps_tensors_whose_paths_look_alike():
    state = {"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}}
    tensors = {}
    restored = join(json.loads(json.dumps(split(state, tensors))), tensors)
    assert_same(restored, state)


@pytest.mark.parametrize("value", ["data/train.csv", b"bytes"])
def test_a_path_is_not_a_dataset(value):
    with pytest.raises(ConfigError, match=r"ArtefactsConfig\.train_set=.*map-style dataset"):
        ArtefactsConfig(train_set=value)


@pytest.mark.parametrize(("fields", "message"), [
    ({"timeout_min": 1}, r"PlatformConfig\.timeout_min=1 is not valid: more than "
                         r"signal_delay_s=90 seconds"),
    ({"timeout_min": 10, "signal_delay_s": 600}, r"PlatformConfig\.timeout_min=10 is not valid"),
    ({"requeue_signal": "SIGTERM"}, r"requeue_signal='SIGTERM' is not valid: one of 'SIGUSR1', "
                                    r"'SIGUSR2'"),
    ({"requeue_limit": -1}, r"requeue_limit=-1 is not valid: an integer >= 0"),
    ({"signal_delay_s": 0}, r"signal_delay_s=0 is not valid"),
    ({"exclusive": "yes"}, r"exclusive='yes' is not valid: True or False"),
    ({"account": 7}, r"account=7 is not valid: a string or None"),
    ({"slurm_parameters": {"time": 5}}, r"'time' comes from timeout_min"),
    ({"slurm_parameters": {"job-name": "x"}}, r"'job-name' comes from name"),
    ({"slurm_parameters": {"mail_type": None}}, r"slurm_parameters=.* with str, int, float or "
                                                r"True values"),
    ({"slurm_parameters": ["mail_type=END"]}, r"a dict of sbatch options"),
])
def test_slurm_fields_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        PlatformConfig(platform=Platform.SLURM, n_gpus=0, **fields)


def test_a_short_timeout_is_fine_off_slurm():
    assert PlatformConfig(platform=Platform.CPU, timeout_min=1).timeout_min == 1


def test_a_gpu_mistake_names_the_platform_it_defaulted_to():
    with pytest.raises(ConfigError) as left_out:
        PlatformConfig(n_procs=2)
    assert str(left_out.value) == (
        "PlatformConfig.n_procs=2 is not valid: Platform.GPU (the platform when none is given) "
        "runs one process per GPU, and n_gpus=1 sets their number. For 2 CPU processes: "
        "PlatformConfig(platform=Platform.CPU, n_procs=2).")
    with pytest.raises(ConfigError) as given:
        PlatformConfig(platform=Platform.GPU, n_gpus=0)
    assert "at least 1 on Platform.GPU;" in str(given.value)  # chosen: no word of a default
    # The default itself is kept, and held by the config.
    assert PlatformConfig().platform is Platform.GPU
    assert dataclasses.replace(PlatformConfig(n_gpus=2)).platform is Platform.GPU
