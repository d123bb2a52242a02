"""scripts/gpu-check, as far as a machine without CUDA can run it: its refusal, its wheel folder,
its pytest and example runs (which report every GPU test skipped here, and why), its table."""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import submitit
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check"


def load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    loader.exec_module(module)
    return module


gpu_check = load_script()


def gpu_check_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def submitit_wheel(folder: Path) -> Path:
    """A wheel of the submitit installed here, made from its files: what ``pip download``
    gives, without the network."""
    package = Path(submitit.__file__).parent
    wheel = folder / f"submitit-{submitit.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path in package.rglob("*.py"):
            z.write(path, Path("submitit") / path.relative_to(package))
        z.writestr(f"submitit-{submitit.__version__}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: submitit\nVersion: {submitit.__version__}\n")
    return wheel


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_it_refuses_a_torch_without_cuda_and_says_why():
    done = gpu_check_run()
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"gpu-check: cannot run: torch {torch.__version__} has no CUDA: it is a CPU-only build "
        f"(torch.version.cuda is None)")
    assert f"torch {torch.__version__} (CUDA None" in done.stdout


def test_a_package_comes_from_the_wheel_folder_ahead_of_the_machine(tmp_path):
    wheel = submitit_wheel(tmp_path)
    done = gpu_check_run("--wheels", str(tmp_path))
    assert re.search(rf"^package submitit +found +from wheel {re.escape(wheel.name)}$",
                     done.stdout, re.M), done.stdout
    assert re.search(r"^package torch +found +from .*site-packages$", done.stdout, re.M)
    # The processes that the checks start import it from there too, as the device machine must.
    env = gpu_check.environment(gpu_check.wheel_paths(tmp_path))
    imported = subprocess.run([sys.executable, "-c", "import submitit.slurm.slurm, submitit; "
                               "print(submitit.__file__)"], env=env, capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
    assert imported.stdout.strip() == str(wheel / "submitit" / "__init__.py"), imported.stderr
    assert env["PYTHONPATH"].split(":")[:2] == [str(ROOT), str(wheel)]


@pytest.mark.parametrize("names, said", [
    (None, "--wheels {folder}/absent: no such folder"),
    (["numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl"], "--wheels: numpy-2.0.0-cp311-cp311-"
     "manylinux_2_17_x86_64.whl is not a pure-Python wheel (its tags are cp311-manylinux_2_17_"
     "x86_64, not none-any): Python cannot import compiled code from a zip; install it on the "
     "machine instead"),
    (["submitit-1.5.3-py3-none-any.whl", "submitit-1.5.4-py3-none-any.whl"],
     "--wheels: submitit-1.5.3-py3-none-any.whl and submitit-1.5.4-py3-none-any.whl are two "
     "versions of submitit; keep one"),
    (["submitit.whl"], "--wheels: submitit.whl is not named as a wheel is"),
])
def test_a_wheel_folder_that_cannot_serve_is_refused_in_one_line(tmp_path, names, said):
    folder = tmp_path / "absent"
    if names is not None:
        folder = tmp_path
        for name in names:
            zipfile.ZipFile(tmp_path / name, "w").close()
    done = gpu_check_run("--wheels", str(folder))
    assert done.returncode == 2
    assert done.stderr.strip() == f"gpu-check: cannot run: {said.format(folder=tmp_path)}"


def test_it_checks_every_package_that_ddpw_requires():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    required = [re.split(r"[<>=;! ]", line.strip())[0]
                for line in config["options"]["install_requires"].splitlines() if line.strip()]
    checked = set(gpu_check.REQUIRED.values())
    assert [name for name in required if name not in checked] == ["tomli"]  # Python < 3.11
    assert {"pytest", "scikit-learn"} <= checked


def test_its_parts_fit_in_five_minutes():
    limits = gpu_check.ENVIRONMENT_LIMIT_S + gpu_check.PYTEST_LIMIT_S + gpu_check.EXAMPLE_LIMIT_S
    assert limits <= 5 * 60 - 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_without_cuda_its_test_run_reports_every_gpu_test_skipped_and_why(tmp_path):
    rows = gpu_check.run_tests(gpu_check.environment([]), tmp_path)
    names = [row.check for row in rows]
    assert "test_gpu::test_two_gpus_form_one_nccl_world" in names
    assert "test_gpu::test_one_gpu_trains_in_process_on_cuda_with_the_precision_asked[bf16]" \
        in names
    assert len(names) == len(set(names)) >= 10
    reasons = {row.check: (row.result, row.detail) for row in rows}
    assert reasons.pop("test_gpu::test_two_gpus_form_one_nccl_world") == (
        "skipped", "needs 2 CUDA GPUs (NCCL refuses two ranks on one GPU of one host; "
        "test_two_ranks_on_one_gpu_as_two_hosts stands in)")
    assert reasons.pop("test_gpu::test_a_gpu_checkpoint_evaluates_the_same_on_cpu") == (
        "skipped", "needs a CUDA GPU (run scripts/gpu-check on a GPU machine)")
    # Every other test marked gpu, in any file, is skipped too, saying what it needs.
    assert {result for result, _ in reasons.values()} == {"skipped"}
    assert all(detail.startswith("needs ") for _, detail in reasons.values()), reasons
    assert (tmp_path / "pytest.log").is_file() and (tmp_path / "pytest.xml").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_without_cuda_its_example_run_fails_with_the_reason(tmp_path):
    pytest.importorskip("sklearn", reason="the example's default data need scikit-learn")
    row = gpu_check.run_example(gpu_check.environment([]), tmp_path)
    assert row.result == "failed"
    assert row.detail.startswith("exit status 1: ddpw.errors.ConfigError: "
                                 "PlatformConfig.platform=Platform.GPU needs CUDA GPUs"), row


def test_junit_rows_say_how_each_test_went_and_why(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='needs 2 CUDA GPUs')\n"
        "def test_skipped(): pass\n"
        "@pytest.mark.parametrize('x', [1])\n"
        "def test_param(x): pass\n")
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                    f"--junitxml={tmp_path / 'out.xml'}", str(tmp_path / "test_sample.py")],
                   capture_output=True, timeout=120, cwd=tmp_path)
    rows = {row.check: row for row in gpu_check.junit_rows(tmp_path / "out.xml")}
    assert set(rows) == {"test_sample::test_passes", "test_sample::test_fails",
                         "test_sample::test_skipped", "test_sample::test_param[1]"}
    assert rows["test_sample::test_passes"].result == "passed"
    assert rows["test_sample::test_passes"].detail.endswith(" s")
    assert rows["test_sample::test_fails"].result == "failed"
    assert "one is not two" in rows["test_sample::test_fails"].detail
    assert (rows["test_sample::test_skipped"].result,
            rows["test_sample::test_skipped"].detail) == ("skipped", "needs 2 CUDA GPUs")


OUTPUT = ("train (start_at=0, epochs=2): loss 0.5000, accuracy 0.8000, epoch 2\n"
          "resume (start_at=2, epochs=4): loss 0.2000, accuracy 0.9300, epoch 4\n"
          "evaluate (start_at=4, epochs=4): loss 0.1500, accuracy {accuracy}\n")


@pytest.mark.parametrize("status, output, result, detail", [
    (0, OUTPUT.format(accuracy="0.9611"), "passed", "test accuracy 0.9611 >= 0.8"),
    (0, OUTPUT.format(accuracy="0.4000"), "failed", "test accuracy 0.4000 < 0.8"),
    (1, "Traceback\nRuntimeError: CUDA error\n", "failed", "exit status 1: RuntimeError: CUDA "
     "error"),
    (0, "", "failed", "exit status 0: no output"),
    (None, "", "timed out", "killed after 60 s"),
])
def test_the_example_row(status, output, result, detail):
    row = gpu_check.example_row(status, output)
    assert (row.result, row.detail) == (result, detail)
    assert row.failed == (result != "passed")


def test_a_part_past_its_limit_is_killed_with_what_it_started(tmp_path, no_leftover_processes):
    status, output = gpu_check.run_limited(
        ["bash", "-c", "echo started; sleep 60 & sleep 60"], 1, tmp_path / "log")
    assert (status, output) == (None, "started\n")


def test_the_table_lines_up_its_columns():
    rows = [gpu_check.Row("test_gpu::test_a", "passed", "1.0 s"),
            gpu_check.Row("test_gpu::test_two_gpus", "skipped", "needs 2 CUDA GPUs")]
    assert gpu_check.table(rows).splitlines() == [
        "check                    result   why / detail",
        "-----------------------  -------  ------------",
        "test_gpu::test_a         passed   1.0 s",
        "test_gpu::test_two_gpus  skipped  needs 2 CUDA GPUs",
    ]
