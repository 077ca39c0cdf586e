import os
import random
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import zygote

from llmcli.runtime import configure

# as `llm` itself does before torch is imported (llmcli.cli.main): OpenMP threads that sleep when they wait. Without
# it, the tests that train in this process spin-wait beside the other pytest worker and the runs they start, and ran
# 2-5x slower on two busy cores; NumPy's BLAS on one thread, as `llm` has it
configure()

ROOT = Path(__file__).resolve().parent.parent
# the corpora committed in the repository (data/README.md): the tests read nothing outside it
DATA = ROOT / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
TINYSTORIES_TRAIN = DATA / "tinystories" / "train.txt"
TINYSTORIES_VALID = DATA / "tinystories" / "valid.txt"
# token shards are cached by content hash; the tests' cache lives in a temporary directory, not the user's home
os.environ.setdefault("LLM_CACHE_DIR", tempfile.mkdtemp(prefix="llm-test-cache-"))


def run_cli(*args, input: str | bytes | None = None, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run `python -m llmcli ARGS` of this checkout as a user would; text output unless input is bytes."""
    text = not isinstance(input, bytes)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    # the same run forked from a process that has already imported torch (tests/zygote.py); a fresh process where
    # the server cannot give it (LLM_TEST_NO_ZYGOTE=1, or an environment that changes what imports read)
    forked = zygote.run(list(map(str, args)), input, cwd, env, timeout=600)
    if forked is not None:
        return forked
    return subprocess.run([sys.executable, "-m", "llmcli", *map(str, args)], input=input, capture_output=True,
                          text=text, cwd=cwd, env=env, timeout=600)


# The longest tests, longest first (each 20-60 s on two cores): pytest-xdist (--dist loadgroup) hands tests out one
# at a time in collection order, so started first they run beside the short ones instead of ending the run alone.
LONGEST_FIRST = [
    "test_readme.py::test_long_run_commands_run",
    "test_readme.py::test_walkthrough_commands_run",
    "test_docs.py::test_readme_sections_run",
    "test_train.py::test_two_processes_follow_the_one_process_run_and_resume[ddp]",
    "test_default_model.py::test_int8_costs_the_bits_per_byte_the_readme_says",
    "test_train.py::test_two_processes_follow_the_one_process_run_and_resume[fsdp]",
    "test_default_model.py::test_default_checkpoint_loads_and_matches_its_card",
    "test_train.py::test_interrupt_and_kill_then_resume_repeats_the_uninterrupted_run",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.rsplit("/", 1)[-1], len(rank)))


def pytest_sessionstart(session):
    """Start this worker's fork server now: its imports overlap the first tests instead of delaying the first run.
    Not in the process that only hands tests to pytest-xdist's workers."""
    if hasattr(session.config, "workerinput") or not getattr(session.config.option, "numprocesses", None):
        zygote.start()


def _shared_dir(tmp_path_factory) -> Path:
    """A folder of this session that all its pytest-xdist workers share (the session's own one without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def _once(path: Path):
    """Yield whether path is still to be made, holding a lock: the first worker to ask makes it, the others wait and
    find it made."""
    import fcntl

    done = Path(f"{path}.done")
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield not done.exists()
        done.touch()


@pytest.fixture(scope="session")
def shakespeare_slice(tmp_path_factory) -> Path:
    path = _shared_dir(tmp_path_factory) / "shakespeare.txt"
    with _once(path) as missing:
        if missing:
            path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def nano_checkpoint(shakespeare_slice, tmp_path_factory) -> Path:
    """A test-size model trained for a few seconds, shared by the tests that need any real checkpoint (trained once
    for all the workers: never change it in place)."""
    from llmcli.train.pretrain import pretrain

    out = _shared_dir(tmp_path_factory) / "nano"
    with _once(out) as missing:
        if missing:
            pretrain([str(shakespeare_slice)], out, preset="nano", overrides={"max_steps": 60, "eval_interval": 30})
    return out


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, so a failure reruns the same way."""
    random.seed(0)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)
