"""llama.cpp itself as the reference for GGUF files: its server (the `xllamacpp` wheel, a test extra) on loopback,
asked for the tokens of texts as llama-server tokenizes prompts (the start token as the file says; special-token
text parsed)."""

import importlib.util
import json
import urllib.request

llama_cpp = importlib.util.find_spec("xllamacpp") is not None  # (pip install 'llmcli[test]')


def llama_cpp_tokens(path, texts: list[str]) -> list[list[int]]:
    """The token ids llama.cpp gives each text for the GGUF file at path."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 64
    params.n_parallel = 1
    params.cpuparams.n_threads = 1
    server = xllamacpp.Server(params)
    try:
        out = []
        for text in texts:
            body = json.dumps({"content": text, "add_special": True, "parse_special": True}).encode()
            request = urllib.request.Request(server.listening_address + "/tokenize", data=body,
                                             headers={"Content-Type": "application/json"})
            out.append(json.loads(urllib.request.urlopen(request, timeout=30).read())["tokens"])
        return out
    finally:
        del server
