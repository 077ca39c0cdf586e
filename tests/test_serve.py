"""`llm serve`: the OpenAI API through the official client, continuous batching that keeps every request's text its own,
clients that disconnect, bad requests, a failing request, a full queue and SIGTERM with requests in flight.

The servers run the shipped model on a free loopback port (--port 0; the address is the first line of stdout)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from conftest import ROOT, run_cli

KEY = "test-key"
MODEL = "tinystories"
PROMPTS = [f"Tell me a story about {thing}" for thing in (
    "a cat", "a dog", "a big red ball", "a girl who liked to sing", "a tree", "a boat", "the sun", "the moon",
    "a bird", "a fish", "a happy frog", "a little car", "a kind bear", "a toy", "a flower", "a cake", "a park",
    "a rainy day", "a lost shoe", "a brave mouse", "a funny clown", "a blue kite", "a snowman", "a farm",
    "a shy bunny", "a dragon", "a robot", "a picnic", "the sea", "a garden", "a bike", "a star")]


def start_server(tmp_path, *args, env=None) -> tuple[subprocess.Popen, str, object]:
    """A `llm serve` process, its base URL, and its stderr file (read it with .read_text())."""
    log = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", "--port", "0", *map(str, args)],
                               stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    url = process.stdout.readline().strip()  # printed once the port is bound
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), (url, log.read_text())
    return process, url, log


def stop_server(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


server_process = {}  # url: the process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process, url, log = start_server(tmp_path_factory.mktemp("serve"), env={"LLM_API_KEY": KEY})
    server_process[url] = process
    yield url, log
    assert stop_server(process) == 0, log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def post(url, path, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, headers=headers, timeout=60, **({"json": body} if body is not None else kwargs))


def generate_json(*args) -> list[dict]:
    result = run_cli("generate", *args, "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# --- the API through the openai client -----------------------------------------------------------------------------

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(server[0].removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion_is_llm_generate_text_greedy_and_seeded(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0)
    (expected,) = generate_json(PROMPTS[0], "--max-new-tokens", 30, "--temperature", 0)
    assert greedy.choices[0].text == expected["text"] and greedy.choices[0].finish_reason == "length"
    assert greedy.usage.prompt_tokens == expected["prompt_tokens"] and greedy.usage.completion_tokens == 30
    # the same seed and settings: the same samples as llm generate -n 2
    sampled = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=25, temperature=0.9, n=2, seed=7,
                                        extra_body={"top_k": 40})
    expected = generate_json(PROMPTS[1], "--max-new-tokens", 25, "--temperature", 0.9, "--top-k", 40, "-n", 2,
                             "--seed", 7)
    assert [c.text for c in sampled.choices] == [e["text"] for e in expected]
    assert sampled.choices[0].text != sampled.choices[1].text


def test_stop_strings_and_list_prompts(client):
    result = client.completions.create(model=MODEL, prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=60, temperature=0,
                                       stop=[" named"])
    texts = [c.text for c in result.choices]
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.finish_reason == "stop" for c in result.choices), texts
    assert texts[0] == "Once upon a time, there was a little girl"  # cut before the stop string


def test_chat_and_streaming(client):
    messages = [{"role": "user", "content": "Tell me a story about a cat"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and len(text.split()) >= 5
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 5  # a piece at a time
    assert finish == "length" and usage.completion_tokens == 20
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in stream)
    assert streamed == client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20,
                                                 temperature=0).choices[0].text


def test_chat_prompt_renders_the_models_template():
    from llmcli.infer.serve import _chat_prompt
    from llmcli.text.chat_template import ChatTemplate

    source = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    from llmcli.formats import load_model_tokenizer
    from llmcli.infer.sampler import sampling_settings

    prompt = _chat_prompt(ChatTemplate(source), messages)
    assert prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    cfg, _ = sampling_settings({}, ChatTemplate(source), load_model_tokenizer(None))  # (as every caller's)
    assert "<|end|>" in cfg.stop
    assert _chat_prompt(None, messages) == "Be brief.\nHi"  # no template: plain text


# --- continuous batching -------------------------------------------------------------------------------------------

async def stream_text(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    text, finish, done = "", None, False
    async with http.stream("POST", url + "/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                text, finish = text + choice["text"], choice["finish_reason"] or finish
    assert done
    return text, finish


def test_32_concurrent_streams_each_get_their_own_text(server):
    url, _ = server
    expected = [r["text"] for r in generate_json_stdin(PROMPTS, 24)]

    async def run():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(stream_text(http, url, p, 24) for p in PROMPTS))

    results = asyncio.run(run())
    assert [text for text, _ in results] == expected
    assert len(set(expected)) > 4  # the prompts lead to different texts


def generate_json_stdin(prompts, max_new_tokens) -> list[dict]:
    """llm generate on each prompt alone (--batch-size 1), greedy."""
    result = run_cli("generate", "-", "--max-new-tokens", max_new_tokens, "--temperature", 0, "--batch-size", 1,
                     "--json", input="\n".join(prompts) + "\n")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_client_that_disconnects_frees_its_row(server):
    url, log = server
    health = url.removesuffix("/v1") + "/health"
    other = {}
    thread = threading.Thread(target=lambda: other.update(post(url, "/completions", {
        "model": MODEL, "prompt": PROMPTS[3], "max_tokens": 120, "temperature": 0}).json()))
    thread.start()
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # one piece of text, then hang up
    for _ in range(100):  # its row leaves at the next step
        if httpx.get(health).json()["decoding"] <= (1 if thread.is_alive() else 0):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the disconnected stream still decodes")
    thread.join(timeout=60)
    assert other["choices"][0]["finish_reason"] == "length" and other["usage"]["completion_tokens"] == 120
    for _ in range(50):
        if " 499 " in log.read_text():
            break
        time.sleep(0.05)
    assert " POST /v1/completions 499 " in log.read_text()


# --- bad requests --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, param", [
    ({"model": 3, "prompt": "x"}, 400, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": 3}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "echo": True, "n": 2}, 400, "echo"),
    ({"model": MODEL, "prompt": [[1, 2], [-1]]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "once " * 400}, 400, "prompt"),  # longer than the context
])
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    response = post(server[0], "/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_chat_and_embedding_requests(server):
    url = server[0]
    for body, param in [({"model": MODEL, "messages": []}, "messages"),
                        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
                        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content")]:
        response = post(url, "/chat/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    response = post(url, "/embeddings", {"model": MODEL, "input": [1, 2]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


def test_malformed_json_big_body_unknown_path_and_keys(server):
    url = server[0]
    response = post(url, "/completions", None, content=b'{"model": ')
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = post(url, "/completions", None, content=b'{"model": "' + b"x" * (2 << 20) + b'"}')
    assert response.status_code == 413 and "error" in response.json()
    assert httpx.get(url + "/nothing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    for key in (None, "wrong"):
        response = post(url, "/completions", {"model": MODEL, "prompt": "x"}, key=key)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()


def test_bad_options_and_a_port_in_use(server):
    port = server[0].rsplit(":", 1)[1].split("/")[0]
    for args, message in [(("--max-batch", 0), "--max-batch must be at least 1"),
                          (("--port", port), f"cannot listen on 127.0.0.1:{port}")]:
        result = run_cli("serve", *args)
        assert result.returncode == 1 and result.stderr.startswith(f"llm: error: {message}"), result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


# --- failures, a full queue, SIGTERM ---------------------------------------------------------------------------------

FAILING_TEMPERATURE = 1.25  # the in-process server's sampling raises for requests with this temperature


@pytest.fixture(scope="module")
def local_server():
    """A server in this process (two rows, one place in the queue) whose sampling fails for FAILING_TEMPERATURE:
    (url, its log lines, model, tokenizer)."""
    import uvicorn

    from llmcli.formats import load_model
    from llmcli.infer.engine import Engine
    from llmcli.infer.serve import Server, _bind, create_app

    real_sample = Engine._sample

    def sample(rows, logits):
        if rows[0].job.cfg.temperature == FAILING_TEMPERATURE:
            raise RuntimeError("boom")
        return real_sample(rows, logits)

    model, tokenizer, config = load_model(None)
    logged = []
    server = Server(MODEL, config, tokenizer, Engine(model, tokenizer, 2, 1, logged.append), None, logged.append)
    sock = _bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", access_log=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "_sample", staticmethod(sample))
        thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]})
        thread.start()
        for _ in range(200):
            if uv.started:
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", logged, model, tokenizer
        uv.should_exit = True
        thread.join(timeout=60)


def test_an_exception_fails_its_request_only(local_server):
    url, logged, _, _ = local_server
    good = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}
    bad = {**good, "temperature": FAILING_TEMPERATURE}

    async def run():
        async with httpx.AsyncClient(timeout=60) as http:
            first, failed = await asyncio.gather(http.post(url + "/completions", json=good),
                                                 http.post(url + "/completions", json=bad))  # in one batch
            failed_stream = await http.post(url + "/completions", json={**bad, "stream": True})
            return first, failed, failed_stream, await http.post(url + "/completions", json=good)

    first, failed, failed_stream, again = asyncio.run(run())
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 20
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    assert '"error"' in failed_stream.text and "[DONE]" not in failed_stream.text
    assert sum("RuntimeError: boom" in line for line in logged) == 2  # the traceback, logged


def test_embeddings_are_llm_embeds(client, local_server):
    from llmcli.eval.embed import embed_texts

    _, _, model, tokenizer = local_server
    texts = ["a cat sat on the mat", "the sun was hot"]
    result = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    plain = post(str(client.base_url).rstrip("/"), "/embeddings", {"model": MODEL, "input": texts[0]}).json()
    expected = embed_texts(model, tokenizer, texts, "mean")  # what llm embed prints
    got = np.array([d.embedding for d in result.data])
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
    assert np.abs(np.array(plain["data"][0]["embedding"]) - expected[0]).max() < 1e-5
    assert result.usage.prompt_tokens > 0


def test_a_full_queue_gets_429(local_server):
    url = local_server[0]

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            streams = [asyncio.ensure_future(stream_text(http, url, p, 60)) for p in PROMPTS[:3]]
            for _ in range(200):  # two decoding, one waiting
                if (await http.get(url.removesuffix("/v1") + "/health")).json()["waiting"] == 1:
                    break
                await asyncio.sleep(0.02)
            turned_away = await http.post(url + "/completions", json={"model": MODEL, "prompt": "x"})
            return turned_away, await asyncio.gather(*streams)

    turned_away, finished = asyncio.run(run())
    assert turned_away.status_code == 429 and turned_away.headers["retry-after"] == "1"
    assert turned_away.json()["error"]["type"] == "rate_limit_error"
    assert [finish for _, finish in finished] == ["length"] * 3


def test_sigterm_finishes_the_requests_in_flight(server):
    """(Runs last: it stops the module's server.)"""
    url, log = server
    process = server_process[url]

    async def run():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
            streams = [asyncio.ensure_future(stream_text(http, url, p, 60)) for p in PROMPTS[:3]]
            for _ in range(200):
                if (await http.get(url.removesuffix("/v1") + "/health")).json()["decoding"] == 3:
                    break
                await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*streams)

    finished = asyncio.run(run())
    assert [finish for _, finish in finished] == ["length"] * 3
    assert process.wait(timeout=60) == 0, log.read_text()
    with pytest.raises(httpx.ConnectError):  # no longer listening
        httpx.get(url + "/models")
    assert "stopped" in log.read_text()


def test_decode_steps_leave_numpy_for_torch_once_the_attention_is_long(monkeypatch):
    """The engine steps on NumPy while rows x slots is at most MOST_KEYS, then on torch over the same KV cache:
    the same text as on either alone."""
    from llmcli.formats import load_model
    from llmcli.infer.engine import Engine, Job
    from llmcli.infer.rows import encode_prompt
    from llmcli.infer.sampler import SamplingConfig
    from llmcli import runtime

    model, tokenizer, _ = load_model(None)
    prompt = encode_prompt(tokenizer, PROMPTS[0], model.config.context, False)
    forward, slots = model.forward, []  # after each decode step on torch
    model.forward = lambda idx, pos=0, **kwargs: (idx.size(1) == 1 and slots.append(pos + 1), forward(
        idx, pos, **kwargs))[1]

    def complete(most_keys: int) -> str:
        monkeypatch.setattr(runtime, "MOST_KEYS", most_keys)
        events, done = [], threading.Event()
        engine = Engine(model, tokenizer, max_batch=2)
        engine.start()
        engine.submit(Job([prompt], SamplingConfig(max_new_tokens=12, temperature=0.0),
                          lambda new: (events.extend(new), any(e[0] == "finish" for e in new) and done.set())))
        assert done.wait(60)
        engine.stop()
        return "".join(e[2] for e in events if e[0] == "text")

    on_numpy = complete(10_000)
    assert slots == []
    L = len(prompt)
    mixed = complete(L + 4)  # one row: 4 steps on NumPy, then torch
    assert slots == list(range(L + 5, L + 12))
    slots.clear()
    assert mixed == on_numpy == complete(0) and len(slots) == 11


def test_a_bfloat16_model_decodes_on_torch_alone():
    """NumPy has no bfloat16: such a model's engine steps on torch (its cache is not viewed as NumPy arrays)."""
    import torch

    from llmcli.formats import load_model
    from llmcli.infer.engine import Engine, Job
    from llmcli.infer.rows import encode_prompt
    from llmcli.infer.sampler import SamplingConfig

    model, tokenizer, _ = load_model(None)
    model = model.to(torch.bfloat16)
    engine = Engine(model, tokenizer, max_batch=2)
    assert engine.backend.kernels is None
    events, done = [], threading.Event()
    engine.start()
    engine.submit(Job([encode_prompt(tokenizer, PROMPTS[0], model.config.context, False)],
                      SamplingConfig(max_new_tokens=8, temperature=0.0),
                      lambda new: (events.extend(new), any(e[0] == "finish" for e in new) and done.set())))
    assert done.wait(60)
    engine.stop()
    assert "".join(e[2] for e in events if e[0] == "text")
