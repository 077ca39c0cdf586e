"""Chat templates: a model's own Jinja template turns messages into its prompt, as `transformers` renders it.

A chat template is a Jinja template (https://huggingface.co/docs/transformers/chat_templating) over `messages`
([{"role", "content"}, ...]), `add_generation_prompt` (end with the start of the assistant's turn), the tokenizer's
special tokens as text (`bos_token`, `eos_token`), `tools` (None here) and the functions `raise_exception(message)`
and `strftime_now(format)`; the environment is the one `transformers`' `apply_chat_template` builds (trim_blocks,
lstrip_blocks, loop controls, its `tojson` filter), so a template renders here exactly as it does there.

A template comes with a downloaded model and is untrusted input: it is rendered in Jinja's immutable sandbox, where
attributes starting with an underscore (the way to Python's internals), methods that change data and unsafe calls
are refused. Whatever goes wrong in a template (a syntax error, `raise_exception`, a refused attribute) is an
LLMError of one line.

Where a model keeps its template (`find_chat_template`): our checkpoints in config.yaml as `generation.chat_template`;
Hugging Face folders in `chat_template.jinja` or `tokenizer_config.json`, GGUF files in their metadata, which the
tokenizer reads (llmcli/text/tokenizer.py) and carries as `tokenizer.chat_template`.
"""

import json
import re
from itertools import pairwise
from pathlib import Path

from llmcli.errors import LLMError

CONFIG_KEY = "generation.chat_template"
# Placeholder messages of a made-up conversation, rendered to learn where the template puts turn boundaries
_USER, _REPLY, _NEXT = "llmcli-user-message-1", "llmcli-assistant-message-1", "llmcli-user-message-2"


class ChatTemplate:
    """A Jinja chat template compiled in the sandbox, with the special tokens of the model it belongs to.

    bos_token, eos_token: the tokenizer's start and end tokens as text, passed to the template. start_added: the text
    of the token that generation (and fine-tuning) put before every prompt themselves; a rendering that starts with
    it loses it in `prompt` and `segments`, so a template's `{{ bos_token }}` does not give the model two.
    origin: where the template came from, for error messages.
    """

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", start_added: str = "",
                 origin: str = "the chat template"):
        if not isinstance(source, str):
            raise LLMError(f"{origin} must be a Jinja template string, not a {type(source).__name__}")
        self.source, self.bos_token, self.eos_token, self.start_added = source, bos_token, eos_token, start_added
        self.origin = origin
        self._compiled = _compile(source, origin)

    @classmethod
    def for_tokenizer(cls, source: str, tokenizer, origin: str = "the chat template") -> "ChatTemplate":
        """The template with the tokenizer's special tokens (llmcli/text/tokenizer.py): bos_token its beginning token
        (else its start token: ours, <|endoftext|>), eos_token its first end token."""
        start = tokenizer.token(tokenizer.start_of_text)
        bos = tokenizer.token(tokenizer.bos_id) if tokenizer.bos_id is not None else start
        eos = tokenizer.token((tokenizer.eos_ids or tokenizer.stop_tokens or (None,))[0])
        return cls(source, bos, eos, start, origin)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text: what `tokenizer.apply_chat_template(messages, tokenize=False,
        add_generation_prompt=...)` gives. Raises LLMError (one line) for anything that fails in the template."""
        import jinja2

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                         documents=None, bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.SecurityError as e:
            raise LLMError(f"{self.origin} was refused: it tries to reach Python internals ({_one_line(e)})") from None
        except jinja2.TemplateError as e:  # raise_exception(...) and Jinja's own errors
            raise LLMError(f"{self.origin} failed: {_one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 (a template is code: its TypeError, ZeroDivisionError, ... is one line)
            raise LLMError(f"{self.origin} failed: {type(e).__name__}: {_one_line(e)}") from None

    def prompt(self, messages: list[dict]) -> str:
        """The text generation continues: the conversation and the start of the assistant's reply, with the start
        token the template writes (encoded whole, as transformers' apply_chat_template does: what follows a special
        token may be tokenized apart from what starts a text)."""
        return self.render(messages, add_generation_prompt=True)

    def conversation(self, messages: list[dict]) -> str:
        """The whole conversation as a training text (without the start token, which fine-tuning adds itself)."""
        return self._unstarted(self.render(messages))

    def stops(self) -> tuple[str, ...]:
        """Strings that end a reply: the end of an assistant turn (`<|im_end|>`, `<|eot_id|>`, `</s>` ...) and the
        start of the next user turn, for templates that end a turn without an end token. Found by rendering a made-up
        conversation; a template that cannot render it gives none."""
        turn = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _REPLY}]
        try:
            one = self.render(turn)
            two = self.render(turn + [{"role": "user", "content": _NEXT}])
        except LLMError:
            return ()
        stops = []
        if _REPLY in one:
            stops.append(one[one.index(_REPLY) + len(_REPLY):].strip())
        if two.startswith(one) and _NEXT in two[len(one):]:
            stops.append(two[len(one):two.index(_NEXT, len(one))].strip())
        return tuple(dict.fromkeys(s for s in stops if s))

    def stop_tokens(self, tokenizer) -> tuple[int, ...]:
        """The stops that are one special token each (`<|im_end|>`, `<|eot_id|>`): generation ends at these ids too.
        A special token is never printed, so no stop string can see it; a model's files may not name its end of turn
        among its end tokens."""
        ids = (tokenizer.encode(s) for s in self.stops())
        return tuple(i[0] for i in ids if len(i) == 1 and i[0] in tokenizer.special_ids)

    def missing_tokens(self, tokenizer) -> list[str]:
        """The markers of the form <|name|> that the template writes around a made-up conversation (with a system
        message where the template takes one) but that are not one token of the tokenizer's vocabulary."""
        turns = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _REPLY}]
        text = ""
        for messages in ([{"role": "system", "content": _NEXT}] + turns, turns):
            try:
                text = self.render(messages, add_generation_prompt=True)
                break
            except LLMError:
                continue
        markers = dict.fromkeys(re.findall(r"<\|[^<>|\s]{1,64}\|>", text))
        return [m for m in markers if len(tokenizer.encode(m)) != 1]

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into pieces, in order, each with whether it is an assistant's turn.

        An assistant turn is what the template adds from the prompt that asks for it (the conversation before it and
        add_generation_prompt) to the conversation that includes it: its text and whatever ends it (`<|im_end|>`,
        the end token). This needs the template's prefix property: each shorter conversation renders as the start of
        the longer ones; a template that breaks it (one that drops earlier turns' reasoning, say) raises LLMError.
        """
        full = self.render(messages)
        cuts = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = self.render(messages[:i], add_generation_prompt=True), self.render(messages[:i + 1])
            if not (end.startswith(start) and full.startswith(end)) or (cuts and len(start) < cuts[-1]):
                raise LLMError(f"{self.origin} renders the conversation up to message {i + 1} differently from the "
                               "start of the whole conversation, so the assistant's turns cannot be found in it (use "
                               "--train-on-prompt to train on every token)")
            cuts += [len(start), len(end)]
        bounds = [0, *cuts, len(full)]
        pieces = [(full[a:b], k % 2 == 1) for k, (a, b) in enumerate(pairwise(bounds))]
        pieces[0] = (self._unstarted(pieces[0][0]), False)
        return [(text, trained) for text, trained in pieces if text]

    def _unstarted(self, text: str) -> str:
        return text[len(self.start_added):] if self.start_added and text.startswith(self.start_added) else text


def find_chat_template(path: str | Path, config: dict, tokenizer) -> ChatTemplate | None:
    """The chat template of the model at path (config: its config dict, tokenizer: its tokenizer), or None.

    config.yaml's generation.chat_template first (our checkpoints, fine-tuned ones and adapters), else the one the
    tokenizer read with the model's files (`tokenizer.chat_template`: a folder's chat_template.jinja or
    tokenizer_config.json, a GGUF file's metadata). Raises LLMError for a template in a form we cannot use.
    """
    path = Path(path)
    source, origin = (config.get("generation") or {}).get("chat_template"), f"{path / 'config.yaml'}: {CONFIG_KEY}"
    if isinstance(source, dict):
        raise LLMError(f"{origin} is a mapping of format strings (an older form); write it as a Jinja template, "
                       "as llm finetune does now")
    if source is None and getattr(tokenizer, "chat_template", None):
        source, origin = tokenizer.chat_template, f"the chat template of {path}"
        template = ChatTemplate.for_tokenizer(source, tokenizer, origin)
        missing = template.missing_tokens(tokenizer)
        if missing:  # (our config.yaml's templates may write markers as text: llm finetune's <|user|>)
            raise LLMError(f"{origin} writes {missing[0]}, which is not a token of the model's vocabulary (it would be "
                           "read as pieces of text): the template was made for another model")
        return template
    return None if source is None else ChatTemplate.for_tokenizer(source, tokenizer, origin)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _compile(source: str, origin: str):
    """The template compiled in the environment `transformers` renders chat templates in (its
    `_compile_jinja_template`), sandboxed the same way."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            # Jinja returns an undefined value that only fails when used further; refuse at once instead
            raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                                                  "object is unsafe")

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks; here it
        renders its body (we find assistant turns by rendering, see ChatTemplate.segments)."""
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """namespace(...) that refuses attribute names with an underscore, as transformers' does."""

        def __init__(*args, **kwargs):
            self, attributes = args[0], dict(*args[1:], **kwargs)
            for name in attributes:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: JSON as json.dumps writes it (Jinja's own escapes HTML characters)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LLMError(f"{origin} is not a valid Jinja template: line {e.lineno}: {_one_line(e)}") from None
