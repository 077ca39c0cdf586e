"""`llm generate` through the CLI: controls, batching, stop strings, JSON lines, determinism; `llm chat`."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from llmcli.infer.generate import decode
from llmcli.infer.rows import TextStream
from llmcli.infer.sampler import SamplingConfig, apply_min_p, apply_repetition_penalty

PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo, wherefore art thou", "", "KING HENRY: Once more unto the breach"]


def _json_lines(result):
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("field, value", [("min_p", -0.1), ("repetition_penalty", 0.0), ("batch_size", 0)])
def test_bad_new_settings_are_rejected(field, value):
    from llmcli.errors import LLMError

    with pytest.raises(LLMError, match=field.replace("_", "-")):
        SamplingConfig(**{field: value}).check()


def test_min_p_and_repetition_penalty():
    logits = np.array([[0.0, -1.0, -3.0, 2.0]])  # probabilities relative to the best: e^-2, e^-3, e^-5, 1
    kept = np.isfinite(apply_min_p(logits, 0.1)).tolist()  # e^-2 = 0.135 >= 0.1 > e^-3
    assert kept == [[True, False, False, True]]
    seen = np.array([[True, True, False, True]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[0.0, -2.0, -3.0, 1.0]]


def test_text_stream_holds_back_a_stop_string_split_across_tokens(nano_checkpoint):
    from llmcli.text.tokenizer import Tokenizer

    tok = Tokenizer(nano_checkpoint)
    text = "the king is dead, long live the king"
    ids = tok.encode(text)
    assert len(ids) > 6
    stream = TextStream(tok, stop=("long live",))
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        assert len("".join(pieces)) <= len("the king is dead, ")  # no part of the stop string printed
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) + stream.flush() == "the king is dead, "
    # without the stop string, a held-back partial match is printed once it is known not to be one
    stream = TextStream(tok, stop=("dead, short",))
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


@pytest.mark.parametrize("numpy_decoder", [False, True])
def test_the_samples_of_a_prompt_share_one_prefill(nano_checkpoint, numpy_decoder):
    """Rows with the same prompt are prefilled once, then decode as if each had been prefilled alone."""
    from llmcli.formats import load_model
    from llmcli.infer.rows import encode_prompt

    model, tok, _ = load_model(nano_checkpoint, numpy_if_small=numpy_decoder)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    rows = [encode_prompt(tok, p, model.config.context, False) for p in prompts]
    batch_sizes = []
    # every step of either decoder passes here (torch's runs its decode steps through llmcli/model/numpy_steps.py)
    counted = model if numpy_decoder else model.token_embedding
    forward = counted.forward
    counted.forward = lambda idx, *args, **kwargs: (batch_sizes.append(len(idx)), forward(idx, *args, **kwargs))[1]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    together = decode(model, rows, cfg)
    assert batch_sizes[0] == len(set(prompts)) and set(batch_sizes[1:]) == {3}
    for b, row in enumerate(rows):
        assert together[b] == decode(model, [row], cfg)[0], b


def test_decode_steps_leave_numpy_for_torch_once_the_attention_is_long(nano_checkpoint, monkeypatch):
    """NumPy's attention runs on one core: steps whose rows x slots pass MOST_KEYS run on torch, over the same KV
    cache, and the tokens are those of torch alone."""
    from llmcli.formats import load_model
    from llmcli.infer.rows import encode_prompt
    from llmcli import runtime
    from llmcli.model import numpy_steps

    model, tok, _ = load_model(nano_checkpoint)
    rows = [encode_prompt(tok, p, model.config.context, False) for p in PROMPTS[:2]]
    L = max(map(len, rows))
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    monkeypatch.setattr(numpy_steps, "runs_on_numpy", lambda model: False)
    on_torch = decode(model, rows, cfg)
    monkeypatch.undo()
    monkeypatch.setattr(runtime, "MOST_KEYS", 2 * (L + 4))  # 2 rows: 4 steps on NumPy, then torch
    slots = []  # filled after each call of torch's forward
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda idx, pos=0, **kwargs: (slots.append(pos + idx.size(1)), forward(
        idx, pos, **kwargs))[1])
    tokens = decode(model, rows, cfg)
    assert slots == [L] + list(range(L + 5, L + 12))  # the prefill, then the steps past L + 4 slots
    assert tokens == on_torch and all(len(t) == 12 for t in tokens)


def greedy_reference(model, ids: list[int], new_tokens: int) -> list[int]:
    """The plain loop the decoder must equal: the whole sequence through model(tokens) for every new token."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(min(new_tokens, model.config.context - len(ids))):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-new_tokens:]


def test_batched_greedy_equals_each_prompt_alone(nano_checkpoint):
    """Left padding with an attention mask: every row of a batch gives what its prompt gives alone, and what a
    plain model(tokens) loop gives."""
    from llmcli.formats import load_model
    from llmcli.infer.rows import encode_prompt

    model, tok, _ = load_model(nano_checkpoint)
    rows = [encode_prompt(tok, p, model.config.context, False) for p in PROMPTS]
    assert len({len(r) for r in rows}) > 2  # really padded
    numpy_model = load_model(nano_checkpoint, numpy_if_small=True)[0]
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0)
    reference = [greedy_reference(model, row, 20) for row in rows]
    for engine in (model, numpy_model):
        batched = decode(engine, rows, cfg)
        for b, row in enumerate(rows):
            assert batched[b] == decode(engine, [row], cfg)[0] == reference[b], (b, type(engine))
    # and the logits themselves agree, not just their argmax
    pad = torch.tensor([max(map(len, rows)) - len(r) for r in rows])
    padded = torch.tensor([[0] * int(p) + r for p, r in zip(pad, rows)])
    with torch.no_grad():
        batch_logits = model(padded, pad=pad)
        for b, row in enumerate(rows):
            torch.testing.assert_close(batch_logits[b, int(pad[b]):], model(torch.tensor([row]))[0],
                                       rtol=1e-4, atol=1e-4)


def test_cli_batched_outputs_equal_single_runs_and_seed_is_batch_independent(nano_checkpoint, tmp_path):
    m = ("-m", nano_checkpoint, "--max-new-tokens", "12", "--json")
    jsonl = "".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS))
    sampling = ("--temperature", "1.0", "--seed", "5")
    batch = _json_lines(run_cli("generate", "-", "--input-format", "jsonl", *m, *sampling, input=jsonl))
    assert [r["prompt"] for r in batch] == PROMPTS and [r["index"] for r in batch] == [0, 1, 2, 3]
    one_by_one = _json_lines(run_cli("generate", "-", "--input-format", "jsonl", *m, *sampling, "--batch-size", "1",
                                     input=jsonl))
    assert [r["text"] for r in batch] == [r["text"] for r in one_by_one]
    alone = _json_lines(run_cli("generate", PROMPTS[1], *m, "--temperature", "1.0", "--seed", "5"))
    assert alone[0]["text"] == batch[1]["text"]
    # several samples: sample 0 of -n 3 is the sample of -n 1, and the samples differ
    three = _json_lines(run_cli("generate", PROMPTS[1], *m, "--temperature", "1.0", "--seed", "5", "-n", "3"))
    assert three[0]["text"] == alone[0]["text"] and len({r["text"] for r in three}) > 1
    r = batch[0]
    assert r["finish_reason"] in ("length", "stop") and r["prompt_tokens"] > 1 and 0 < r["new_tokens"] <= 12
    assert r["load_s"] > 0 and r["time_to_first_token_s"] > 0 and r["tokens_per_s"] > 0


def test_cli_stop_string_split_across_tokens_is_never_printed(nano_checkpoint):
    from llmcli.text.tokenizer import Tokenizer

    tok = Tokenizer(nano_checkpoint)
    args = ("generate", "KING:", "-m", nano_checkpoint, "--max-new-tokens", "40", "--seed", "2", "--temperature",
            "1.0")
    full = run_cli(*args)
    assert full.returncode == 0, full.stderr
    text = full.stdout[:-1]
    ids = tok.encode(text)
    # a stop string that straddles the boundary between two tokens in the middle of the text
    for k in range(len(ids) // 2, len(ids)):
        cut = len(tok.decode(ids[:k]))
        stop = text[cut - 2:cut + 2]
        if len(stop) == 4 and stop.strip() and text.find(stop) == cut - 2:
            break
    else:
        pytest.fail("no token boundary with a clean stop string in this sample: the sample is too short")
    stopped = run_cli(*args, "--stop", "zzzq", "--stop", stop)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == text[:cut - 2] + "\n"
    record = _json_lines(run_cli(*args, "--stop", stop, "--json"))[0]
    assert record["finish_reason"] == "stop" and record["text"] == text[:cut - 2]


def test_cli_plain_output_of_several_samples_and_length_at_the_context(nano_checkpoint):
    several = run_cli("generate", "-", "-m", nano_checkpoint, "--max-new-tokens", "5", "-n", "2",
                      input="To be\nKING:\n")
    assert several.returncode == 0, several.stderr
    assert several.stdout.count("<|endoftext|>\n") == 4
    # --max-new-tokens past the context: stops at the context, finish reason length (nano context: 64)
    long_prompt = "the " * 50
    r = _json_lines(run_cli("generate", long_prompt, "-m", nano_checkpoint, "--max-new-tokens", "1000",
                            "--temperature", "0", "--json", "--repetition-penalty", "1.3", "--min-p", "0.05"))[0]
    assert r["finish_reason"] == "length" and r["prompt_tokens"] + r["new_tokens"] == 64


@pytest.mark.parametrize("args, message", [(("--min-p", "1.5"), "--min-p"), (("--stop", ""), "--stop")])
def test_cli_bad_settings_say_one_line(nano_checkpoint, args, message):
    result = run_cli("generate", "hi", "-m", nano_checkpoint, *args)
    assert result.returncode == 1 and result.stderr.startswith("llm: error:") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_jsonl_input_errors(nano_checkpoint):
    for bad, message in (("[1]", "line 2 is a JSON list, not an object"),
                         ('{"text": "b"}', "line 2 has no text field 'prompt'"),
                         ('{"prompt": 5}', "line 2: 'prompt' must be a string, not int")):
        result = run_cli("generate", "-", "--input-format", "jsonl", "-m", nano_checkpoint,
                         input='{"prompt": "a"}\n' + bad + "\n")
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_chat_repl_through_stdin(nano_checkpoint, tmp_path):
    # a long conversation (trimmed to the context, said so), /reset, a last message, /exit: the rest is not read
    session = "".join(f"the king and the queen {i}\n" for i in range(6)) + "/reset\nJULIET:\n/exit\nnever read\n"
    args = ("-m", nano_checkpoint, "--max-new-tokens", "8", "--temperature", "0")
    result = run_cli("chat", *args, input=session)
    assert result.returncode == 0, result.stderr
    assert "no chat template" in result.stderr and "conversation cleared" in result.stderr
    assert "dropped the" in result.stderr and "oldest messages" in result.stderr
    # greedy, and after /reset the history is empty: the last reply is what `generate` gives for the prompt alone
    alone = run_cli("generate", "JULIET:", *args)
    assert alone.returncode == 0 and len(alone.stdout) > 1, alone.stderr  # (a greedy reply may be whitespace)
    assert result.stdout.endswith(alone.stdout) and len(result.stdout) > len(alone.stdout)
    # Ctrl-D (end of input) with no /exit leaves quietly
    eof = run_cli("chat", *args, input="ROMEO:")
    assert eof.returncode == 0 and eof.stdout.endswith("\n") and len(eof.stdout) > 1, eof.stderr


def test_chat_commands_never_reach_the_model(nano_checkpoint):
    args = ("-m", nano_checkpoint, "--max-new-tokens", "8", "--temperature", "0")
    only_commands = run_cli("chat", *args, input="/help\n/frobnicate\n/system be brief\n/reset\nexit\nROMEO:\n")
    assert only_commands.returncode == 0, only_commands.stderr
    assert only_commands.stdout == ""  # no reply: nothing was sent, and `exit` left before ROMEO:
    err = only_commands.stderr
    assert f"chatting with {nano_checkpoint}" in err and "/exit or Ctrl-D to leave" in err  # the banner
    assert "/system TEXT" in err and "unknown command /frobnicate" in err and "conversation cleared" in err
    # a command between messages is not part of the conversation: the reply is the one to the message alone
    alone = run_cli("generate", "ROMEO:", *args)
    for leave in ("/exit", "quit", "/quit"):
        chat = run_cli("chat", *args, input=f"/help\nROMEO:\n/system x\n{leave}\nJULIET:\n")
        assert chat.returncode == 0 and chat.stdout == alone.stdout, chat.stderr


def test_chat_at_a_terminal(nano_checkpoint):
    """stdin a terminal, as a person has it: the prompt on stderr, lines read through readline, `exit` leaves."""
    import os
    import pty
    import subprocess
    import sys

    from conftest import ROOT

    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "chat", "-m", str(nano_checkpoint), "--max-new-tokens",
                             "5", "--temperature", "0"], stdin=terminal, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(terminal)
    os.write(controller, b"ROMEO:\n/help\nexit\n")
    out, err = proc.communicate(timeout=120)
    os.close(controller)
    assert proc.returncode == 0, err
    assert "chatting with" in err and err.count("> ") >= 3 and "/system TEXT" in err
    alone = run_cli("generate", "ROMEO:", "-m", nano_checkpoint, "--max-new-tokens", "5", "--temperature", "0")
    assert out == alone.stdout  # the reply alone on stdout: not the prompt, not the commands


def test_the_default_model_chats_in_stories():
    # the shipped model's chat template is how it was trained: a request line, then the story
    request = "Tell me a story about a dog."
    args = ("--temperature", "0", "--max-new-tokens", "40")
    chat = run_cli("chat", *args, input=f"{request}\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert "this model has no chat template" not in chat.stderr and "(the default model)" in chat.stderr
    story = run_cli("generate", request, *args)
    assert chat.stdout == story.stdout and len(story.stdout.split()) > 10
    assert run_cli("generate", request, "--chat", *args).stdout == story.stdout


def test_chat_uses_the_checkpoint_chat_template(nano_checkpoint, tmp_path):
    import shutil

    import yaml

    from llmcli.infer.chat import plain_text
    from llmcli.text.chat_template import ChatTemplate

    template = ("{% for m in messages %}{{ '[' + m.role[0]|upper + '] ' + m.content + '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}[A] {% endif %}")
    messages = [{"role": "system", "content": "be {brief}"}, {"role": "user", "content": "hi"}]
    assert ChatTemplate(template).prompt(messages) == "[S] be {brief}\n[U] hi\n[A] "
    assert ChatTemplate(template).stops() == ("[U]",)  # no end token: a reply ends where the next user turn starts
    assert plain_text(messages) == "be {brief}\nhi"
    ckpt = tmp_path / "templated"
    shutil.copytree(nano_checkpoint, ckpt)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    config.setdefault("generation", {})["chat_template"] = template
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    args = ("-m", ckpt, "--max-new-tokens", "8", "--temperature", "0")
    chat = run_cli("chat", *args, input="ROMEO:\n")
    assert chat.returncode == 0 and "no chat template" not in chat.stderr, chat.stderr
    # the same as `generate --chat`, which renders the same prompt "[U] ROMEO:\n[A] " and stops at "[U]"
    assert run_cli("generate", "ROMEO:", "--chat", *args).stdout == chat.stdout


def test_ctrl_c_stops_a_reply_and_not_the_chat(nano_checkpoint):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    from llmcli.formats import load_model
    from llmcli.infer.chat import Chat

    model, tok, _ = load_model(nano_checkpoint)
    chat = Chat(model, tok, SamplingConfig(max_new_tokens=20, temperature=0.0))
    shown = []

    def interrupt_after_two(text):  # Ctrl-C arrives while the reply streams
        shown.append(text)
        if len(shown) == 2:
            raise KeyboardInterrupt

    partial = chat.reply("ROMEO:", interrupt_after_two)
    assert partial == "".join(shown) and chat.messages[-1] == {"role": "assistant", "content": partial}
    assert chat.reply("JULIET:", lambda text: None)  # the conversation goes on

    # Ctrl-C at the prompt of a real `llm chat`: a fresh line, not an exit
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "chat", "-m", str(nano_checkpoint), "--max-new-tokens",
                             "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "no chat template" in proc.stderr.readline()  # loaded, about to read stdin
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    time.sleep(1)  # a Ctrl-C discards the line being read, as at a terminal: let it land first
    out, err = proc.communicate("ROMEO:\n/reset\n", timeout=120)
    assert proc.returncode == 0, err
    assert "conversation cleared" in err and out.endswith("\n")  # it read on after the Ctrl-C


def test_cli_ignore_eos_decodes_to_max_new_tokens(nano_checkpoint, tmp_path):
    """A model that always predicts end-of-text stops at once; --ignore-eos makes it go on to --max-new-tokens."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llmcli.text.tokenizer import Tokenizer

    eager = tmp_path / "eager-to-stop"
    shutil.copytree(nano_checkpoint, eager)
    eos = Tokenizer(eager / "tokenizer.model").stop_tokens[0]
    state = load_file(eager / "model.safetensors")
    width = state["norm_f.weight"].numel()
    direction = torch.zeros(width)
    direction[0] = 1.0
    if "lm_head.weight" in state:  # an untied head and RMSNorm (the default block)
        state["token_embedding.weight"][:, 0] = 1000.0  # the residual stream's first channel, positive, dominates...
        state["norm_f.weight"] = direction  # ...and is all the final hidden state keeps...
        state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
        state["lm_head.weight"][eos] = 100 * direction  # ...whose largest logit is end-of-text
    else:
        state["norm_f.weight"] = torch.zeros(width)  # the final hidden state is the bias whatever the input...
        state["norm_f.bias"] = direction
        state["token_embedding.weight"][eos] = 100 * direction  # ...whose largest logit (tied head) is end-of-text
    save_file(state, eager / "model.safetensors")
    args = ("generate", "ROMEO:", "-m", eager, "--temperature", "0", "--max-new-tokens", "7", "--json")
    stopped = _json_lines(run_cli(*args))[0]
    assert stopped["finish_reason"] == "stop" and stopped["new_tokens"] == 0
    ran_on = _json_lines(run_cli(*args, "--ignore-eos"))[0]
    assert ran_on["finish_reason"] == "length" and ran_on["new_tokens"] == 7


def test_a_prompt_that_arrives_joins_the_running_batch(nano_checkpoint):
    """`llm generate -` on a pipe: a line that arrives while others decode joins their batch at the next step (the
    engine's continuous batching), and its text is what it would be alone."""
    from llmcli.formats import load_model
    from llmcli.infer.generate import generate_samples

    model, tok, _ = load_model(nano_checkpoint, numpy_if_small=True)
    rows_a_step = []
    forward = model.forward
    model.forward = lambda idx, *args: (rows_a_step.append(idx.shape), forward(idx, *args))[1]

    def lines():
        yield "ROMEO:"
        yield "JULIET: O Romeo"  # read once ready() says it is there: after the third decode step

    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    samples = list(generate_samples(model, tok, lines(), cfg, ready=lambda: len(rows_a_step) > 3))
    steps = [rows for rows, width in rows_a_step if width == 1]
    assert steps[:3] == [1, 1, 1] and 2 in steps  # alone, then together
    assert rows_a_step.index((1, len(samples[1].ids))) == 4  # the new prompt prefilled between two steps
    for sample in samples:
        (alone,) = generate_samples(model, tok, [sample.prompt], cfg)
        assert sample.text == alone.text and sample.new_tokens == 12
