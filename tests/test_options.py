"""Options that are wired from the command line to what they change, each checked by its effect; guard rails that
keep a run from being overwritten; invalid values said in one line. Several options share a launch."""

import json
import shutil

import pytest
import yaml
from conftest import SHAKESPEARE, run_cli
from test_generate_readme import library_text


def _error(result) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("llm: error: ")
    return line


def test_pretrain_options_defaults_and_guard_rails(tmp_path, nano_checkpoint):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    (tmp_path / "corpus").mkdir()
    for name, part in (("a.jsonl", text[:30_000]), ("b.jsonl", text[30_000:50_000])):
        records = [{"body": chunk} for chunk in part.split("\n\n")]  # no 'text' field: --text-field must be used
        (tmp_path / "corpus" / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "notes.txt").write_text(text[50_000:].replace("\n\n", "\n===\n"))
    run = tmp_path / "run"
    result = run_cli("pretrain", "corpus/*.jsonl", "notes.txt", "--preset", "nano", "--text-field", "body",
                     "--doc-separator", "===", "--vocab-size", "400", "--context", "32", "--warmup-steps", "3",
                     "--keep-last", "1", "--max-steps", "4", "--save-interval", "1", "--eval-interval", "2",
                     "--seed", "4", "-o", run, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["model"]["context"], config["model"]["vocab_size"]) == (32, 400)
    train = config["train"]
    assert (train["warmup_steps"], train["keep_last"], train["text_field"], train["doc_separator"]) == \
        (3, 1, "body", "===")
    import sentencepiece

    assert sentencepiece.SentencePieceProcessor(model_file=str(run / "tokenizer.model")).vocab_size() == 400
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs[1] == pytest.approx(train["lr"] / 3) and lrs[3] == pytest.approx(train["lr"])  # 3 warmup steps
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r and r["step"] > 0}
    kept = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
    assert kept == sorted({4, min(val, key=val.get)})  # --keep-last 1, and the best

    # a run is never overwritten: by -o, nor by the default name
    before = (run / "model.safetensors").read_bytes()
    assert "already holds a training run" in _error(run_cli("pretrain", "notes.txt", "-t", run, "-o", run,
                                                            cwd=tmp_path))
    assert (run / "model.safetensors").read_bytes() == before
    outs = []
    for _ in range(2):
        result = run_cli("pretrain", "-", "-t", run, "--preset", "nano", "--context", "32", "--max-steps", "1",
                         input=text, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outs.append(result.stdout.strip().splitlines()[-1])
    assert outs == ["checkpoints/stdin-nano", "checkpoints/stdin-nano-2"]
    assert all((tmp_path / o / "model.safetensors").is_file() for o in outs)

    # invalid values of the settings that take a name
    for option, value in (("--precision", "fp16"), ("--schedule", "step"), ("--strategy", "zero")):
        line = _error(run_cli("pretrain", "notes.txt", "-t", run, "--preset", "nano", option, value, "-o",
                              tmp_path / f"bad{option}", cwd=tmp_path))
        assert value in line and option.lstrip("-") in line, line
        assert not (tmp_path / f"bad{option}" / "checkpoints").exists()

    # $LLM_MODEL names the model of every command that takes one
    env = run_cli("generate", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0", env={"LLM_MODEL": str(run)})
    assert env.returncode == 0, env.stderr
    assert env.stdout == library_text(run, "ROMEO:", max_new_tokens=8, temperature=0) + "\n"


def test_pretrain_that_cannot_start_leaves_no_run_directory(tmp_path, nano_checkpoint):
    # found after tokenizing: a corpus shorter than the context, model settings that do not fit together
    (tmp_path / "short.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:300])
    (tmp_path / "long.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000])
    for corpus, options, message in (("short.txt", [], "the corpus is too small"),
                                     ("long.txt", ["--config", "bad.yaml"], "must be a multiple of n_head")):
        (tmp_path / "bad.yaml").write_text("model:\n  n_head: 3\n")
        line = _error(run_cli("pretrain", corpus, "-t", nano_checkpoint, "--preset", "nano", "--max-steps", "1",
                              *options, "-o", "run", cwd=tmp_path))
        assert message in line, line
        assert not (tmp_path / "run").exists()


def test_tokenize_train_options(tmp_path):
    import sentencepiece

    text = SHAKESPEARE.read_text(encoding="utf-8")
    (tmp_path / "one.txt").write_text(text[:20_000])
    (tmp_path / "two.txt").write_text(text[20_000:40_000])
    result = run_cli("tokenize", "train", "-", tmp_path / "one.txt", tmp_path / "two.txt", "--type", "unigram",
                     "--special", "<sep>", "--special", "<tab>", "--vocab-size", "320", "-o", tmp_path / "tok",
                     input=text[40_000:60_000])
    assert result.returncode == 0, result.stderr
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    # a unigram model scores its pieces by log-probabilities; BPE's scores are minus their merge ranks (integers)
    assert any(sp.GetScore(i) % 1 != 0 for i in range(sp.vocab_size()))
    assert sp.vocab_size() == 320
    encoded = run_cli("tokenize", "encode", "--json", "-t", tmp_path / "tok", input="ROMEO <sep> and <tab> JULIET\n")
    assert encoded.returncode == 0, encoded.stderr
    pieces = json.loads(encoded.stdout)["pieces"]
    assert "<sep>" in pieces and "<tab>" in pieces  # never split


def test_sampling_controls_through_the_cli(nano_checkpoint):
    """A tiny --top-p leaves one token: greedy, whatever the temperature and the seed. --top-k and --top-p at a
    temperature other than 0 and 1 give the library's sample for those settings, which they change."""
    greedy = library_text(nano_checkpoint, "ROMEO:", max_new_tokens=16, temperature=0)
    result = run_cli("generate", "ROMEO:", "-m", nano_checkpoint, "--max-new-tokens", "16", "--temperature", "1.5",
                     "--seed", "3", "--top-p", "0.001")
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy + "\n"
    result = run_cli("generate", "ROMEO:", "-m", nano_checkpoint, "--max-new-tokens", "16", "--temperature", "0.6",
                     "--top-k", "3", "--top-p", "0.9", "--seed", "3")
    assert result.returncode == 0, result.stderr
    settings = dict(max_new_tokens=16, temperature=0.6, seed=3)
    assert result.stdout == library_text(nano_checkpoint, "ROMEO:", top_k=3, top_p=0.9, **settings) + "\n"
    assert result.stdout != library_text(nano_checkpoint, "ROMEO:", **settings) + "\n"


def test_chat_system_sampling_and_quantize(nano_checkpoint, tmp_path):
    from llmcli.formats import load_model
    from llmcli.infer.generate import generate_samples
    from llmcli.infer.sampler import SamplingConfig
    from llmcli.text.chat_template import find_chat_template

    template = ("{% for m in messages %}{% if m.role == 'system' %}[S] {% elif m.role == 'user' %}[U] {% else %}[A] "
                "{% endif %}{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[A] {% endif %}")
    ckpt = tmp_path / "templated"
    shutil.copytree(nano_checkpoint, ckpt)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    config.setdefault("generation", {})["chat_template"] = template
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("chat", "-m", ckpt, "--system", "Be brief.", "--quantize", "int8", "--temperature", "0.7",
                     "--top-k", "20", "--seed", "5", "--max-new-tokens", "12", input="ROMEO:\n")
    assert result.returncode == 0, result.stderr
    model, tok, _ = load_model(ckpt, quantize="int8")
    stops = find_chat_template(ckpt, config, tok).stops()  # the reply ends where the next turn would start
    assert stops == ("[U]",)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=20, seed=5, stop=stops)
    (sample,) = generate_samples(model, tok, ["[S] Be brief.\n[U] ROMEO:\n[A] "], cfg, truncate=True)
    assert result.stdout == sample.text + "\n"
