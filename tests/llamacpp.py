"""llama.cpp itself as the reference for GGUF files: its server (the `xllamacpp` wheel, a test extra) on loopback,
asked for the tokens of texts as llama-server tokenizes prompts (the start token as the file says, special-token
text parsed), or for a greedy completion."""

import importlib.util
import json
import urllib.request
from contextlib import contextmanager

llama_cpp = importlib.util.find_spec("xllamacpp") is not None  # (pip install 'llmcli[test]')


@contextmanager
def llama_server(path, context: int = 64):
    """A function posting a JSON body to an endpoint of llama.cpp's server on the GGUF file at path."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = context
    params.n_parallel = 1
    params.cpuparams.n_threads = 1
    server = xllamacpp.Server(params)

    def post(endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(server.listening_address + endpoint, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=60).read())

    try:
        yield post
    finally:
        del server


def llama_cpp_tokens(path, texts: list[str]) -> list[list[int]]:
    """The token ids llama.cpp gives each text for the GGUF file at path."""
    with llama_server(path) as post:
        return [post("/tokenize", {"content": t, "add_special": True, "parse_special": True})["tokens"]
                for t in texts]


def llama_cpp_greedy(path, prompt: str, n: int, context: int = 256) -> dict:
    """llama.cpp's greedy continuation of prompt: {"text", "prompt_tokens"}."""
    with llama_server(path, context) as post:
        reply = post("/completion", {"prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False})
    return {"text": reply["content"], "prompt_tokens": reply["tokens_evaluated"]}
