"""Log-probabilities in the OpenAI API's shapes (https://platform.openai.com/docs/api-reference): a chat choice's
`logprobs.content` list, a completion choice's `logprobs` {tokens, token_logprobs, top_logprobs, text_offset}.

A scored token is (token id, log-probability or None, [(token id, log-probability)] most likely alternatives or None),
the log-probabilities those of the model's own distribution: log_softmax of its logits, before any sampling setting.
"""

import numpy as np

from llmcli.infer.sampler import log_softmax

MOST_ALTERNATIVES = 20  # top_logprobs / logprobs above it: a 400, as OpenAI


def prompt_scores(logits: np.ndarray, ids: list[int], top: int) -> list[tuple]:
    """The scored tokens of a prompt (echo) from the logits (T, vocab) at its positions: each token's
    log-probability given the ones before it; the first has none (None, None)."""
    logprobs = log_softmax(logits)
    scores = [(ids[0], None, None)]
    for i in range(1, len(ids)):
        row = logprobs[i - 1]
        best = np.argsort(-row, kind="stable")[:top]
        scores.append((ids[i], float(row[ids[i]]), [(int(t), float(row[t])) for t in best]))
    return scores


def piece(tokenizer, token: int) -> str:
    """A token's text (an id past the tokenizer's vocabulary, in a padded output layer: <id>)."""
    return tokenizer.decode([token]) if token < tokenizer.vocab_size else f"<{token}>"


def chat_logprobs(tokenizer, scores: list[tuple]) -> dict:
    """A chat choice's (or chunk's) `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal"}."""
    def entry(token, logprob):
        text = piece(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(*alt) for alt in top or ()]}
                        for token, logprob, top in scores], "refusal": None}


def completion_logprobs(tokenizer, scores: list[tuple], offset: int = 0) -> dict:
    """A completion choice's (or chunk's) `logprobs`; offset: where the first token's text starts in the choice's."""
    tokens, offsets = [], []
    for token, _, _ in scores:
        tokens.append(piece(tokenizer, token))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [logprob for _, logprob, _ in scores],
            "top_logprobs": [None if top is None else {piece(tokenizer, t): lp for t, lp in top}
                             for _, _, top in scores],
            "text_offset": offsets}
