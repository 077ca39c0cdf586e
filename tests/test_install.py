"""Installed the usual way, not from the source tree: the package carries its model, and `llm generate` works from a
directory with nothing in it."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

from conftest import ROOT


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_a_wheel_built_from_the_sdist_installs_and_generates_from_any_directory(tmp_path):
    # the files a build reads, copied, so that building writes nothing into the checkout
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "llmcli", source / "llmcli", ignore=shutil.ignore_patterns("__pycache__"))
    offline = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLM_MODEL")} | {"PIP_NO_INDEX": "1"}

    # source -> sdist -> wheel: what `pip install .`, `pip install git+...`, pipx and a PyPI sdist all go through
    run(sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
        tmp_path / "dist", cwd=source, env=offline)
    (sdist,) = (tmp_path / "dist").glob("llmcli-*.tar.gz")
    with tarfile.open(sdist) as archive:
        assert any(n.endswith("llmcli/checkpoints/tinystories/model.safetensors") for n in archive.getnames())
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", sdist,
        env=offline)
    (wheel,) = (tmp_path / "dist").glob("llmcli-*.whl")

    # a fresh environment that takes torch and the rest from this one; its own llmcli must win over any installed here
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    python, llm = venv / "bin" / "python", venv / "bin" / "llm"
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", wheel, env=offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    where = run(python, "-c", "import llmcli; print(llmcli.__file__)", cwd=empty, env=offline).stdout.strip()
    assert where.startswith(str(venv)), where

    # the version the package says is the one it was installed as; the code's license travels with it
    version = run(llm, "--version", cwd=empty, env=offline).stdout
    assert version == f"llm {wheel.name.split('-')[1]}\n"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in zipfile.ZipFile(wheel).namelist())

    result = run(llm, "generate", "Tell me a story about a cat", "--max-new-tokens", "30", "--seed", "1", cwd=empty,
                 env=offline)
    assert len(result.stdout.split()) >= 5, result.stdout
    assert not list(empty.iterdir())  # nothing written where it ran
