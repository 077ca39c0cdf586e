"""The README and the docs/ pages: every page's ```bash commands are run by a test, the README's short sections run
as written, every measured number in docs/perf.md says when, where and how, and every link leads somewhere."""

import json
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT
from test_readme import bash_blocks, workdir

# who runs each page's commands
RUN_BY = {
    "README.md": ["tests/test_readme.py", "tests/test_docs.py"],
    "docs/training.md": ["tests/test_readme.py"],
    "docs/generation.md": ["tests/test_generate_readme.py"],
    "docs/finetune.md": ["tests/test_finetune_readme.py"],
    "docs/eval.md": ["tests/test_eval_readme.py"],
    "docs/serve.md": ["tests/test_serve_readme.py"],
    "docs/formats.md": ["tests/test_hf_readme.py", "tests/test_gguf_readme.py", "tests/test_formats_doc.py"],
    "docs/models.md": ["tests/test_docs_models_data.py"],
    "docs/data.md": ["tests/test_docs_models_data.py"],
}
# the README's sections after the walkthrough, run here on a model like the walkthrough's
SECTIONS = ["Generate and chat", "Train", "Fine-tune", "Evaluate, embed, search", "Serve", "Models from elsewhere"]


def _pages() -> list[str]:
    return ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def test_every_pages_commands_are_run_by_a_test():
    for page in _pages():
        if not bash_blocks(page=page):
            continue
        assert page in RUN_BY, f"{page} has commands that no test runs: add it to RUN_BY and run them"
        for test in RUN_BY[page]:
            assert page.removeprefix("docs/") in (ROOT / test).read_text(), (page, test)


def test_readme_is_short_and_numbers_live_in_perf_md():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert 'readme = "README.md"' in (ROOT / "pyproject.toml").read_text()  # PyPI shows the short README
    assert not re.search(r"\d tokens/s|\d ms\b|\dx faster", readme)  # measured numbers are in docs/perf.md
    perf = (ROOT / "docs" / "perf.md").read_text()
    sections = perf.split("\n## ")[1:]
    assert len(sections) >= 10
    for section in sections:  # each with its date, machine and the command that reproduces it
        assert re.search(r"\n\*Measured \d{4}-\d{2}-\d{2} on [^*]+\. Reproduce: [^*]+\*\n", section), section[:80]
    assert "earlier that day" not in perf and "the day before" not in perf  # numbers, not a diary


def test_links_lead_somewhere():
    # docs/api.md comes with the Python API (llmcli/api.py, issue 26), merged on its own branch
    pending = set() if (ROOT / "llmcli" / "api.py").exists() else {ROOT / "docs" / "api.md"}
    for page in _pages():
        text = (ROOT / page).read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            path = (ROOT / page).parent / target
            assert path.exists() or path in pending, f"{page} links to {target}, which does not exist"


def test_readme_sections_run(tmp_path, nano_checkpoint):
    work = workdir(tmp_path)
    shutil.copytree(nano_checkpoint, work / "shakespeare-nano")
    # `llm` as a user has it: a program (so that `kill %1` signals the server itself)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "llm").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llmcli "$@"\n')
    (bin_dir / "llm").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    outputs = {}
    for section in SECTIONS:
        (block,) = bash_blocks(section)
        result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block], cwd=work, capture_output=True,
                                text=True, timeout=600, env=env)
        assert result.returncode == 0, (section, result.stderr)
        outputs[section] = result.stdout.splitlines()
    story, *chat_and_json = outputs["Generate and chat"]
    assert len(story.split()) >= 10 and json.loads(chat_and_json[-1])["prompt"] == "ROMEO:"
    assert outputs["Train"] == ["short-run", "short-run"] and (work / "short-run" / "checkpoints").is_dir()
    assert outputs["Fine-tune"][0] == "tuned" and (work / "tuned" / "model.safetensors").is_file()
    evaluated = outputs["Evaluate, embed, search"]
    assert any("bits/byte" in line for line in evaluated) and evaluated[-2].startswith("1\t")
    assert json.loads(outputs["Serve"][0])["data"][0]["id"] == "tinystories"
    assert outputs["Models from elsewhere"][0] == "shakespeare-nano.gguf" and (work / "shakespeare-nano.gguf").is_file()
