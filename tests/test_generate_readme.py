"""The README's generation section runs as written."""

import json

from test_readme import bash_blocks, run_bash, workdir


def test_generation_section_runs(tmp_path):
    work = workdir(tmp_path)
    result = run_bash("\n".join(bash_blocks("Generation: sampling controls, pipelines, batches, chat")), cwd=work)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"prompt"')]
    assert [(r["prompt"], r["sample"]) for r in records] == [("ROMEO:", 0), ("ROMEO:", 1), ("JULIET: O", 0),
                                                             ("JULIET: O", 1)]
    assert all(r["finish_reason"] in ("length", "eos") for r in records)
    assert result.stdout.count("<|endoftext|>\n") == 2  # the two plain prompts
    assert "conversation cleared" in result.stderr
