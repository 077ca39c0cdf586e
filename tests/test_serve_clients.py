"""`llm serve` for the clients people use (issue 30), through the official `openai` SDK: any model name, the developer
role, the values that ask for nothing, OpenAI's presence/frequency penalties and logit_bias, ignore_eos."""

import httpx
import numpy as np
import openai
import pytest
from test_serve import PROMPTS, generate_json, start_server, stop_server

MODEL = "tinystories"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process, url, log = start_server(tmp_path_factory.mktemp("serve"))
    yield url
    assert stop_server(process) == 0, log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():
    from llmcli.formats import load_model

    return load_model(None, numpy_if_small=True)[1]


def test_any_model_name_the_developer_role_and_do_nothing_values(client, server):
    system = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    expected = client.chat.completions.create(model=MODEL, messages=system, max_tokens=12, temperature=0)
    developer = [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model="gpt-3.5-turbo", messages=developer, max_tokens=12, temperature=0,
                                           response_format={"type": "text"}, tools=[], tool_choice="none",
                                           logit_bias={})
    assert reply.model == MODEL and reply.choices[0].message.content == expected.choices[0].message.content
    # no model at all (lm-evaluation-harness's gguf model sends none)
    response = httpx.post(server + "/completions", json={"prompt": PROMPTS[0], "max_tokens": 3}, timeout=60)
    assert response.status_code == 200 and response.json()["model"] == MODEL


def test_logit_bias_and_ignore_eos(client, tokenizer):
    token = tokenizer.encode(" cat")[-1]
    forced = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0.8, seed=1,
                                       logit_bias={str(token): 100})
    assert forced.choices[0].text == tokenizer.decode([token] * 4)
    # the end token forced: the reply ends at once; with ignore_eos it is never sampled (llama.cpp's meaning)
    eos = {str(tokenizer.stop_tokens[0]): 100}
    ended = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logit_bias=eos)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 0
    going = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logit_bias=eos,
                                      extra_body={"ignore_eos": True})
    assert going.choices[0].finish_reason == "length" and going.usage.completion_tokens == 8


def test_presence_and_frequency_penalties_match_llm_generate(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=40, temperature=0)
    penalised = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=40, temperature=0,
                                          presence_penalty=0.5, frequency_penalty=1.5)
    assert penalised.choices[0].text != plain.choices[0].text
    (expected,) = generate_json(PROMPTS[2], "--max-new-tokens", 40, "--temperature", 0, "--presence-penalty", 0.5,
                                "--frequency-penalty", 1.5)
    assert penalised.choices[0].text == expected["text"]
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=MODEL, prompt="x", presence_penalty=2.5)


# --- log-probabilities ---------------------------------------------------------------------------------------------

def model_logprobs(ids: list[int]) -> np.ndarray:
    """log_softmax of the model's logits (T, vocab) at every position of ids, by a plain forward pass."""
    import torch

    from llmcli.formats import load_model

    net = load_model(None)[0]
    with torch.no_grad():
        return torch.log_softmax(net(torch.tensor([ids])).double(), dim=-1)[0].numpy()


def test_chat_and_completion_logprobs_are_the_models(client, tokenizer):
    ids = [tokenizer.start_of_text] + tokenizer.encode(PROMPTS[0])
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    for _ in range(6):  # greedy decoding by plain forward passes
        ids.append(int(model_logprobs(ids)[-1].argmax()))
    expected = model_logprobs(ids)[-7:-1]
    generated = ids[-6:]
    assert np.allclose(logprobs.token_logprobs, [row[t] for row, t in zip(expected, generated)], atol=1e-4)
    for top, row, token in zip(logprobs.top_logprobs, expected, generated):  # greedy: the most likely comes first
        assert len(top) == 3 and max(top, key=top.get) == tokenizer.decode([token])
        assert np.isclose(max(top.values()), row.max(), atol=1e-4)
    assert "".join(logprobs.tokens) == reply.choices[0].text and logprobs.text_offset[0] == 0
    # chat, streamed and not: the same tokens and log-probabilities
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
    streamed = [c for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                              temperature=0, logprobs=True, top_logprobs=2,
                                                              stream=True)
                if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=messages, logprobs=True, top_logprobs=21)


def test_echo_of_token_ids_with_max_tokens_0_is_lm_eval_loglikelihood(client, tokenizer):
    """lm-evaluation-harness's log-likelihood request: prompt = context + continuation as token ids, echo, logprobs=1,
    max_tokens=0; the prompt's own tokens come back with their log-probabilities, the first one's null."""
    contexts = [tokenizer.encode("Once upon a time, there was a little"), tokenizer.encode("The cat sat on the")]
    reply = client.completions.create(model=MODEL, prompt=[c + tokenizer.encode(" girl") for c in contexts],
                                      echo=True, logprobs=1, max_tokens=0, temperature=0)
    for choice, context in zip(reply.choices, contexts):
        ids = context + tokenizer.encode(" girl")
        assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
        logprobs = choice.logprobs
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        expected = model_logprobs(ids)
        assert np.allclose(logprobs.token_logprobs[1:], [expected[i - 1, ids[i]] for i in range(1, len(ids))],
                           atol=1e-4)
        assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    # echo with generation, streamed: the prompt first, then the new tokens
    text = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], echo=True, max_tokens=5, temperature=0, stream=True))
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], echo=True, max_tokens=5, temperature=0)
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    # (the prompt as the model read it: in the checkpoint's prompt template)
    assert text == whole.choices[0].text and text.startswith(PROMPTS[0]) and text.endswith(plain.choices[0].text)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt="x", echo=True, n=2)


def test_generate_logit_bias_on_the_command_line(tokenizer):
    from conftest import run_cli

    token = tokenizer.encode(" w")[-1]
    (forced,) = generate_json("Once upon", "--max-new-tokens", 3, "--logit-bias", f"{token}=100")
    assert forced["text"] == tokenizer.decode([token] * 3)
    for bad in ("abc", "999999=1", f"{token}=101"):
        result = run_cli("generate", "Once", "--logit-bias", bad, "--max-new-tokens", 2)
        assert result.returncode != 0 and result.stderr.count("\n") == 1 and "logit-bias" in result.stderr, bad
