"""Fuzz the Gemma 3 chat template: render_chat, Tokenizer.apply_chat_template and encode_chat on arbitrary
message lists, with the official Jinja template as a second oracle.

Byte 0: bit 0 add_generation_prompt; bit 1 set: the rest is JSON (the messages, as a request body
would carry them: "\\ud800" escapes give lone surrogates); clear: the messages are built from the rest
with atheris.FuzzedDataProvider: list / tuple / dict / str / None containers, roles valid and invalid
(system, user, assistant, model, tool, "", 1, None, a list, ...) or missing, alternating or not,
content as str / a list of parts (text, image, text without 'text', unknown types, bare strings,
nested dicts) / None / numbers / dicts / missing, extra keys; bit 2 set: the roles alternate
user/assistant (optionally after a system message) so most inputs reach the renderer.

Oracle: render_chat returns a str or raises ChatTemplateError (one line); apply_chat_template and
encode_chat agree with it (the same error, or "<bos>" + the text, and [bos] + encode(text)); where
render_chat accepts the messages, the Jinja template (rendered as transformers does: sandboxed,
trim_blocks, lstrip_blocks) renders exactly the same text; encode_chat of a text with a lone
surrogate raises TokenizerError (the tokenizer's documented behaviour).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Finding, Target, instrumented, main  # noqa: E402

with instrumented():
    from gemmalab._paths import default_model_path
    from gemmalab.tokenizer import CHAT_TEMPLATE, ChatTemplateError, Tokenizer, TokenizerError, render_chat

import atheris  # noqa: E402  (FuzzedDataProvider; replay mode needs atheris too)

TOK: Tokenizer | None = None
JINJA = None
ROLES = ["user", "assistant", "system", "model", "tool", "developer", "", "User", 1, None, ["user"],
         {"role": "user"}, "assistant ", "function"]
STRINGS = ["", " ", "Hello!", "  padded  \n", "<start_of_turn>user\nhi<end_of_turn>", "<bos>", "\n\n",
           "東京 😀", "\u2581x", "\ufeff", "\u3000trim\u3000", "a\x00b", "\ud800", "{{ raise_exception('x') }}",
           "{% if %}", "<start_of_image>"]


def setup(scratch: Path) -> None:
    global TOK, JINJA
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):  # what transformers registers
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings
    env.globals["raise_exception"] = raise_exception
    JINJA = env.from_string(CHAT_TEMPLATE)
    TOK = Tokenizer.from_gguf(default_model_path())


def _text(fdp) -> str:
    k = fdp.ConsumeIntInRange(0, 3)
    if k == 0:
        return STRINGS[fdp.ConsumeIntInRange(0, len(STRINGS) - 1)]
    if k == 1:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 24))  # may hold lone surrogates
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))


def _value(fdp, depth: int):
    """Something that is not well-formed content: numbers, None, dicts, nested lists."""
    k = fdp.ConsumeIntInRange(0, 6)
    if k == 0:
        return None
    if k == 1:
        return fdp.ConsumeInt(2)
    if k == 2:
        return fdp.ConsumeFloat()
    if k == 3:
        return fdp.ConsumeBool()
    if k == 4 and depth < 3:
        return {_text(fdp): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 2))}
    if k == 5 and depth < 3:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 2))]
    return _text(fdp)


def _part(fdp):
    k = fdp.ConsumeIntInRange(0, 9)
    if k <= 3:
        return {"type": "text", "text": _text(fdp)}
    if k == 4:
        return {"type": "image"}
    if k == 5:
        return {"type": "image", "url": _text(fdp), "image": None}
    if k == 6:
        return {"type": "text", "text": _value(fdp, 1)} if fdp.ConsumeBool() else {"type": "text"}
    if k == 7:
        return {"type": fdp.PickValueInList(["audio", "image_url", "", None, 1, "TEXT"]), "text": _text(fdp)}
    if k == 8:
        return _text(fdp)
    return _value(fdp, 1)


def _content(fdp):
    k = fdp.ConsumeIntInRange(0, 7)
    if k <= 2:
        return _text(fdp)
    if k <= 4:
        parts = [_part(fdp) for _ in range(fdp.ConsumeIntInRange(0, 4))]
        return tuple(parts) if k == 4 and fdp.ConsumeBool() else parts
    if k == 5:
        return {"type": "text", "text": _text(fdp)}
    return _value(fdp, 0)


def _message(fdp, role):
    m = {}
    if role is not _MISSING:
        m["role"] = role
    if fdp.ConsumeIntInRange(0, 15):
        m["content"] = _content(fdp)
    if not fdp.ConsumeIntInRange(0, 7):
        m["name"] = _text(fdp)
    return m


_MISSING = object()


def build(fdp, alternate: bool):
    n = fdp.ConsumeIntInRange(0, 6)
    msgs = []
    if alternate and fdp.ConsumeBool():
        msgs.append({"role": "system", "content": _content(fdp) if fdp.ConsumeBool() else _text(fdp)})
    for k in range(n):
        if alternate:
            role = "user" if k % 2 == 0 else fdp.PickValueInList(["assistant", "model"])
        else:
            role = _MISSING if not fdp.ConsumeIntInRange(0, 15) else fdp.PickValueInList(ROLES)
        msgs.append(_message(fdp, role) if not fdp.ConsumeIntInRange(0, 31) or not alternate
                    else {"role": role, "content": _text(fdp) if fdp.ConsumeBool() else
                          [_part(fdp) for _ in range(fdp.ConsumeIntInRange(1, 3))]})
    if not alternate:
        k = fdp.ConsumeIntInRange(0, 15)
        if k == 0:
            return tuple(msgs)
        if k == 1:
            return {"messages": msgs}
        if k == 2:
            return _text(fdp)
        if k == 3:
            return None
        if k == 4 and msgs:
            msgs[fdp.ConsumeIntInRange(0, len(msgs) - 1)] = _value(fdp, 0)
    return msgs


def check(messages, agp: bool) -> None:
    tok = TOK
    try:
        text = render_chat(messages, agp)
    except ChatTemplateError:
        for f in (tok.apply_chat_template, tok.encode_chat):
            try:
                f(messages, agp)
            except ChatTemplateError:
                continue
            raise Finding(f"render_chat refused the messages but {f.__name__} did not")
        raise
    if not isinstance(text, str):
        raise Finding(f"render_chat returned {type(text).__name__}")
    if tok.apply_chat_template(messages, agp) != "<bos>" + text:
        raise Finding("apply_chat_template is not '<bos>' + render_chat")
    try:
        want = JINJA.render(messages=messages, bos_token="<bos>", add_generation_prompt=agp)
    except Exception as e:  # noqa: BLE001 - any Jinja failure on accepted messages is a divergence
        raise Finding(f"render_chat accepted messages the Jinja template fails on: {type(e).__name__}: "
                      f"{e}; messages {messages!r:.300}") from e
    if want != "<bos>" + text:
        raise Finding(f"render_chat differs from the Jinja template: {text!r:.300} vs {want!r:.300}")
    ids = tok.encode_chat(messages, agp)  # TokenizerError for a lone surrogate in the text
    if ids != [tok.bos_id] + tok.encode(text, add_bos=False) or ids.count(tok.bos_id) < 1:
        raise Finding("encode_chat is not [bos] + encode(render_chat(...), add_bos=False)")
    if tok.decode(ids) != ("<bos>" + text).replace("\u2581", " "):
        raise Finding("decode(encode_chat(messages)) is not the rendered prompt")


def one(data: bytes, scratch: Path) -> None:
    if not data:
        return
    sel, body = data[0], data[1:]
    agp = bool(sel & 1)
    if sel & 2:
        try:
            messages = json.loads(body.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            return  # not JSON: nothing to render (the request parser's business)
    else:
        messages = build(atheris.FuzzedDataProvider(body), alternate=bool(sel & 4))
    check(messages, agp)


CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "My name is Gemma!"},
     {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are a terse assistant.  "}, {"role": "user", "content": "  Hello!\n"},
     {"role": "assistant", "content": "\n Hi. \n"}],
    [{"role": "system", "content": [{"type": "text", "text": "Describe images."}, {"type": "text", "text": "x"}]},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  What is this?  "},
                                  {"type": "image", "url": "ignored"}, {"type": "text", "text": "And this?"}]}],
    [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": {"type": "text", "text": "x"}}],
    [{"role": "user", "content": 3}],
    [{"content": "no role"}],
    [{"role": "system", "content": "only a system message"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
    [{"role": "user", "content": "\ud800 lone"}],
]


def seeds(d: Path):
    for k, conv in enumerate(CONVERSATIONS):
        yield bytes([2 | (k & 1)]) + json.dumps(conv).encode()
    yield b"\x02[]"
    yield b"\x02{}"
    yield b"\x02\"text\""
    for k in range(8):
        yield bytes([k & 1 | (4 if k & 2 else 0)]) + bytes((k * 37 + j * 11) % 256 for j in range(200))


if __name__ == "__main__":
    main(Target("chat", one, (ChatTemplateError, TokenizerError), seeds, setup=setup, timeout_s=20,
                notes="render_chat / apply_chat_template / encode_chat on message lists from JSON or "
                      "FuzzedDataProvider; where render_chat accepts, the official Jinja template must "
                      "render the same text; lone surrogates in contents -> TokenizerError at encode_chat."))
