"""`make gpu-check` refuses a machine it cannot serve before it installs anything: no NVIDIA GPU, a driver older than
the CUDA build of torch needs, a Python older than vLLM's floor. Checked here with stand-ins for nvidia-smi and the
interpreter on PATH; the venv folder must not appear."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVIDIA_SMI = """#!/bin/sh
case "$*" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
  *driver_version*) echo "{driver}"; echo "{driver}" ;;
  *) exit 1 ;;
esac
"""
PYTHON_3_10 = """#!/bin/sh
[ "$1" = "--version" ] && echo "Python 3.10.12" && exit 0
exit 1
"""


def make(tmp_path, target, driver=None, python=sys.executable):
    """`make TARGET` with PATH holding only a stand-in nvidia-smi (reporting ``driver``; None: no GPU) and the tools
    make needs."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for tool in ("sh", "head"):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    if driver is not None:
        (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI.format(driver=driver))
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=str(bin_dir))
    venv = tmp_path / "venv-gpu"
    command = [shutil.which("make"), "-s", "-C", ROOT, target, f"PYTHON={python}", f"GPU_VENV={venv}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert not venv.exists(), "make gpu-check created the venv before its checks passed"
    return result


@pytest.fixture
def old_python(tmp_path):
    path = tmp_path / "python3.10"
    path.write_text(PYTHON_3_10)
    path.chmod(0o755)
    return str(path)


def test_refuses_a_machine_without_an_nvidia_gpu(tmp_path):
    result = make(tmp_path, "gpu-check")
    assert result.returncode != 0 and "needs an NVIDIA GPU and its driver, and nvidia-smi found none" in result.stderr


@pytest.mark.parametrize("driver", ["570.124.06", "N/A"])
def test_refuses_a_driver_older_than_torchs_cuda_needs(tmp_path, driver):
    result = make(tmp_path, "gpu-check", driver=driver)
    assert result.returncode != 0
    assert f"needs an NVIDIA driver >= 580, and this machine's driver is '{driver}'" in result.stderr


def test_refuses_a_python_older_than_3_11_and_names_the_setting(tmp_path, old_python):
    result = make(tmp_path, "gpu-check", driver="580.65.06", python=old_python)
    assert result.returncode != 0
    assert f"needs Python >= 3.11 (vLLM 0.32's floor), and PYTHON={old_python} is Python 3.10.12" in result.stderr
    assert "make gpu-check PYTHON=python3.11" in result.stderr
    result = make(tmp_path, "gpu-check", driver="580.65.06", python="python3.99")
    assert result.returncode != 0 and "PYTHON=python3.99 is not found" in result.stderr


def test_a_machine_that_can_serve_passes_the_checks(tmp_path):
    result = make(tmp_path, "gpu-prerequisites", driver="580.65.06")
    assert result.returncode == 0, result.stderr
