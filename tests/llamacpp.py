"""llama.cpp itself as the reference for GGUF files: its server (the `xllamacpp` wheel, a test extra) on loopback,
asked for the tokens of texts as llama-server tokenizes prompts (the start token as the file says, special-token
text parsed), or for a greedy completion.

Each question runs in a process of its own that leaves with os._exit once it has printed the answers: the wheel's
server can hang in its destructor, and a hung test would stall the whole suite."""

import importlib.util
import json
import os
import subprocess
import sys
import urllib.request

llama_cpp = importlib.util.find_spec("xllamacpp") is not None  # (pip install 'llmcli[test]')


def _ask(path, context: int, requests: list[tuple[str, dict]]) -> list[dict]:
    """llama.cpp's server's replies to (endpoint, body) requests on the GGUF file at path, from a child process."""
    question = json.dumps({"path": str(path), "context": context, "requests": requests})
    done = subprocess.run([sys.executable, __file__], input=question, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _serve(question: dict) -> list[dict]:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = question["path"]
    params.n_ctx = question["context"]
    params.n_parallel = 1
    params.cpuparams.n_threads = 1
    server = xllamacpp.Server(params)
    replies = []
    for endpoint, body in question["requests"]:
        request = urllib.request.Request(server.listening_address + endpoint, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        replies.append(json.loads(urllib.request.urlopen(request, timeout=60).read()))
    return replies


def llama_cpp_tokens(path, texts: list[str]) -> list[list[int]]:
    """The token ids llama.cpp gives each text for the GGUF file at path."""
    requests = [("/tokenize", {"content": t, "add_special": True, "parse_special": True}) for t in texts]
    return [reply["tokens"] for reply in _ask(path, 64, requests)]


def llama_cpp_greedy(path, prompt: str, n: int, context: int = 256) -> dict:
    """llama.cpp's greedy continuation of prompt: {"text", "prompt_tokens"}."""
    body = {"prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False}
    (reply,) = _ask(path, context, [("/completion", body)])
    return {"text": reply["content"], "prompt_tokens": reply["tokens_evaluated"]}


if __name__ == "__main__":
    answers = _serve(json.loads(sys.stdin.read()))
    print(json.dumps(answers), flush=True)
    sys.stderr.flush()
    os._exit(0)  # past the server's destructor (see the module's docstring)
