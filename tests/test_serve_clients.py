"""`llm serve` for the clients people use (issue 30), through the official `openai` SDK: any model name, the developer
role, the values that ask for nothing, OpenAI's presence/frequency penalties and logit_bias, ignore_eos."""

import httpx
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
