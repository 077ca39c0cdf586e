"""Conversations: the model's chat template renders the messages as its prompt; a Chat keeps the history within the
context.

The template is the model's own Jinja template (llmcli/text/chat_template.py). A reply ends at the model's end token,
where the template ends an assistant turn, or where the model starts the next user turn by itself. Without a
template, a conversation is plain text: the turns one after another, a line each, and the model continues the last.
"""

import sys
from dataclasses import replace
from typing import Callable

from llmcli.errors import LLMError, Terminated

HELP = """commands (a line that starts with / is never sent to the model):
  /help          this list
  /reset         forget the conversation (the system message stays)
  /system TEXT   set the system message (/system alone removes it)
  /exit          leave (as do exit, quit, /quit and Ctrl-D); Ctrl-C stops a reply"""


def plain_text(messages: list[dict]) -> str:
    """A conversation for a model without a chat template: the messages' contents, a line each."""
    return "\n".join(m["content"] for m in messages)


class Chat:
    """A conversation with a model: each reply is generated from the history, the oldest turns dropped to fit."""

    def __init__(self, model, tokenizer, cfg, template=None, system: str | None = None, log=None, engine=None):
        """template: a ChatTemplate (llmcli/text/chat_template.py), or None for plain text; cfg: sampling settings
        with its stops (sampling_settings(..., chat=template)). engine: the model's Engine, if it has one already."""
        from llmcli.infer.engine import Engine

        self.model, self.tokenizer, self.template, self.log = model, tokenizer, template, log or (lambda m: None)
        self.cfg = replace(cfg, num_samples=1)
        self.engine = engine or Engine(model, tokenizer, max_batch=1, preallocate=False)
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict] = []

    def reset(self):
        self.messages = []

    def set_system(self, text: str):
        """The system message (an empty text removes it). Raises LLMError where the template refuses one."""
        system = [{"role": "system", "content": text}] if text else []
        if system and self.template is not None:
            self.template.prompt(system + [{"role": "user", "content": "hi"}])  # a template may refuse system turns
        self.system = system

    def prompt(self) -> str:
        """The rendered history, without its oldest turns if it would leave the reply too little room."""
        context = self.engine.context
        room = min(self.cfg.max_new_tokens, context // 2)  # tokens kept free for the reply
        dropped = 0
        while True:
            messages = self.system + self.messages
            text = self.template.prompt(messages) if self.template else plain_text(messages)
            if 1 + len(self.tokenizer.encode(text)) <= context - room:  # 1: the end-of-text token before it
                break
            if len(self.messages) <= 1:  # the new message alone is too long: its end is kept (said by generate)
                break
            drop = 2 if self.messages[0]["role"] == "user" and len(self.messages) > 2 else 1
            self.messages, dropped = self.messages[drop:], dropped + drop
        if dropped:
            self.log(f"dropped the {dropped} oldest messages of the conversation to fit the context "
                     f"({context} tokens)")
        return text

    def reply(self, content: str, on_text: Callable[[str], None]) -> str:
        """Add the user's message, stream the model's reply through on_text, add it to the history and return it."""
        from llmcli.infer.generate import generate_samples

        self.messages.append({"role": "user", "content": content})
        shown: list[str] = []

        def show(sample, text):
            shown.append(text)
            on_text(text)

        try:
            (sample,) = generate_samples(self.model, self.tokenizer, [self.prompt()], self.cfg, truncate=True,
                                         log=self.log, on_text=show, engine=self.engine)
            text = sample.text
        except Terminated:
            raise
        except KeyboardInterrupt:  # Ctrl-C stops the reply; what was shown stays in the history
            text = "".join(shown)
            self.log("(reply stopped)")
        self.messages.append({"role": "assistant", "content": text})
        return text


def repl(conversation: Chat, name: str, log: Callable[[str], None], stdin=None, stdout=None, stderr=None):
    """Read messages a line at a time and stream the replies: the loop of `llm chat`.

    A banner on stderr names the model and how to leave; lines starting with / are commands (HELP), as are a bare
    `exit` and `quit`, and none of them reaches the model. Ctrl-C at the prompt gives a fresh line; end of input
    leaves."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty() and stdin is sys.stdin
    if interactive:
        import readline  # noqa: F401 (input() then edits the line and keeps a history, as a shell does)
    log(f"chatting with {name}; /help for commands, /exit or Ctrl-D to leave")
    while True:
        if interactive:
            stderr.write("> ")
            stderr.flush()
        try:
            line = _read_line(stdin, interactive)
        except Terminated:
            raise
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not an exit
            stderr.write("\n")
            continue
        if not line:  # Ctrl-D / end of input
            break
        message = line.rstrip("\r\n")
        if not message.strip():
            continue
        if message.strip() in ("exit", "quit") or message.startswith("/"):
            if not _command(conversation, message.strip(), log):
                break
            continue
        conversation.reply(message, lambda text: (stdout.write(text), stdout.flush()))
        stdout.write("\n")
        stdout.flush()


def _read_line(stdin, interactive: bool) -> str:
    """The next line with its ending; "" at the end of input."""
    if not interactive:
        return stdin.readline()
    try:
        return input() + "\n"
    except EOFError:
        return ""


def _command(conversation: Chat, command: str, log: Callable[[str], None]) -> bool:
    """Carry out a REPL command; False to leave."""
    word, _, argument = command.partition(" ")
    if word in ("/exit", "/quit", "exit", "quit"):
        return False
    if word == "/help":
        log(HELP)
    elif word == "/reset":
        conversation.reset()
        log("conversation cleared")
    elif word == "/system":
        try:
            conversation.set_system(argument.strip())
        except LLMError as e:
            log(f"no system message: {e}")
        else:
            log(f"system message set: {argument.strip()}" if argument.strip() else "system message removed")
    else:
        log(f"unknown command {word}; /help lists the commands")
    return True
