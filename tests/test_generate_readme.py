"""docs/generation.md runs as written, and each command prints what the library gives for its options."""

import json

from test_readme import bash_blocks, run_bash, workdir


def library_text(ckpt, prompt: str, quantize=None, **settings) -> str:
    """The sample the library gives for these settings, without the CLI."""
    from llmcli.formats import load_model
    from llmcli.infer.generate import generate_samples
    from llmcli.infer.sampler import SamplingConfig

    model, tok, _ = load_model(ckpt, numpy_if_small=True, quantize=quantize)
    (sample,) = generate_samples(model, tok, [prompt], SamplingConfig(**settings))
    return sample.text


def test_generation_section_runs(tmp_path):
    work = workdir(tmp_path)
    (block,) = bash_blocks(page="docs/generation.md")
    commands = block.strip().splitlines()
    results = []
    for command in commands:  # one at a time, so each command's output is its own
        result = run_bash(command, cwd=work)
        assert result.returncode == 0, (command, result.stderr)
        results.append(result)
    _, _, controls, stop, int8, int4, jsonl, greedy, chat = (r.stdout for r in results)
    bard = work / "bard"

    assert "--top-k 50 --min-p 0.05 --repetition-penalty 1.2" in commands[2]
    assert controls == library_text(bard, "ROMEO:", max_new_tokens=40, temperature=0.9, top_k=50, min_p=0.05,
                                    repetition_penalty=1.2, seed=1) + "\n"
    # the controls change the sample: the same seed without them gives another text
    assert controls != library_text(bard, "ROMEO:", max_new_tokens=40, temperature=0.9, seed=1) + "\n"

    unstopped = library_text(bard, "ROMEO:", max_new_tokens=60, seed=1, temperature=0.8)
    cut = min(i for i in (unstopped.find("\n\n"), unstopped.find("JULIET"), len(unstopped)) if i >= 0)
    assert stop == unstopped[:cut] + "\n" and "\n\n" not in stop[:-1] and "JULIET" not in stop

    assert "--quantize int8" in commands[4]
    assert int8 == library_text(bard, "ROMEO:", quantize="int8", max_new_tokens=20, seed=1, temperature=0.8) + "\n"
    assert int4 == library_text(bard, "ROMEO:", quantize="int4", max_new_tokens=20, seed=1, temperature=0.8) + "\n"

    records = [json.loads(line) for line in jsonl.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in records] == [("ROMEO:", 0), ("ROMEO:", 1), ("JULIET: O", 0),
                                                             ("JULIET: O", 1)]
    assert all(r["finish_reason"] in ("length", "stop") and r["new_tokens"] <= 20 for r in records)
    assert all(r["new_tokens"] == 20 for r in records if r["finish_reason"] == "length")

    texts = greedy.split("<|endoftext|>\n")  # the two plain prompts, greedy, each closed by the separator
    assert texts[2:] == [""] and texts[:2] == [library_text(bard, p, max_new_tokens=20, temperature=0) + "\n"
                                               for p in ("ROMEO:", "KING:")]
    assert "conversation cleared" in results[-1].stderr
    # after /reset the conversation is the last message alone: its reply is what greedy generation gives it
    assert chat.endswith(library_text(bard, "JULIET:", max_new_tokens=20, temperature=0) + "\n")
