"""Chat templates without transformers: the bundle's Jinja template, found and rendered the way
transformers' `apply_chat_template` does, so the prompt's token ids match it exactly.

Where the template comes from (what `AutoTokenizer.from_pretrained(folder)` reads, then the
processor's legacy file): `chat_template.jinja` beside the tokenizer wins over the
`chat_template` of tokenizer_config.json (a string, or a list of {name, template}: "default");
`chat_template.json` ({"chat_template": ...}, which AutoProcessor reads and the tokenizer does
not) is the last resort.

How it renders (transformers 5.24, utils/chat_template_utils.py): a jinja2
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, loop controls, the
`{% generation %}` tag, a `tojson` that does not HTML-escape, `raise_exception`, `strftime_now`,
transformers' guarded `dict` and `namespace`; variables `messages`, `tools` / `documents` (None),
`add_generation_prompt` and the named special tokens (bos_token, eos_token, ...) as strings.
The rendered text is tokenized without special tokens: templates write bos themselves.
Not supported: tools, documents, continue_final_message, assistant-token masks, and
`additional_chat_templates/` (only the default template is read).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from onnxport.bundle import bundle_file
from onnxport.errors import BundleError, OnnxportError, RuntimeInputError

#: one transformers-style message: {"role": ..., "content": str | [{"type": "text", "text": ...}, ...]}
Message = dict[str, Any]
#: what `as_conversations` accepts: a user turn, a conversation, or a batch of either
Chats = str | list[Message] | list[str | list[Message]]

#: transformers' SPECIAL_TOKENS_ATTRIBUTES (v5): the tokens a template sees as variables
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")
#: transformers fills `reasoning_content` and `thinking` from whichever of these a message has
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
#: transformers refuses older jinja2: they have known sandbox escapes, and templates are untrusted
_MIN_JINJA = (3, 1, 6)


@dataclass(frozen=True)
class ChatTemplate:
    """A bundle's chat template.

    >>> t = ChatTemplate.from_folder("out/")                                  # doctest: +SKIP
    >>> t.render([{"role": "user", "content": "hi"}])                        # doctest: +SKIP
    """

    #: the Jinja source
    source: str
    #: where it was read from, for error messages (e.g. "out/tokenizer_config.json")
    origin: str
    #: bos_token, eos_token, ... as strings, passed to the template as variables
    special_tokens: dict[str, str]

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate:
        folder = Path(folder)
        found = find_chat_template(folder)
        if found is None:
            raise BundleError(
                f"{folder} has no chat template (no chat_template.jinja, and tokenizer_config.json has no "
                "chat_template)",
                "copy the checkpoint's chat_template.jinja or tokenizer_config.json into the bundle; "
                "base models have no template: prompt them with plain text")
        source, origin = found
        return cls(source, origin, special_tokens(folder))

    def render(self, messages: list[Message], add_generation_prompt: bool = True, **variables: Any) -> str:
        """One conversation as the model's prompt text. `variables` reach the template as they do
        through apply_chat_template's kwargs (e.g. enable_thinking=False, add_vision_id=True)."""
        template = _compile(self.source, self.origin)  # first: it says when jinja2 is missing
        import jinja2

        messages = as_conversations([messages])[0]  # one-line errors for malformed messages
        chat = [_with_reasoning_aliases(m) for m in _plain(_drop_none(messages))]
        env = {**self.special_tokens, **_plain(variables)}
        try:
            return template.render(messages=chat, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **env)
        except jinja2.TemplateError as e:  # raise_exception, undefined names, sandbox refusals
            raise RuntimeInputError(f"the chat template rejected the messages: {_one_line(e)}",
                                    "check the roles and their order against what this model's template "
                                    "accepts (e.g. user and assistant alternating, system first)") from None
        except Exception as e:  # noqa: BLE001 - template code is untrusted; any failure is about the input
            raise RuntimeInputError(f"the chat template failed on these messages: {type(e).__name__}: {_one_line(e)}",
                                    "check that each message's content is a string or a list of "
                                    "{type, text} parts as the template expects") from None


def find_chat_template(folder: Path) -> tuple[str, str] | None:
    """(template source, file it came from), or None when the folder has none."""
    jinja_file = bundle_file(folder, "chat_template.jinja")
    if jinja_file is not None and jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    for name in ("tokenizer_config.json", "chat_template.json"):
        f = bundle_file(folder, name)
        value = _read_json(f).get("chat_template")
        if value is not None:
            return _default_template(value, f), str(f)
    return None


def special_tokens(folder: Path) -> dict[str, str]:
    """The named special tokens as transformers' `special_tokens_map` has them: from
    tokenizer_config.json, overridden by a legacy special_tokens_map.json when the config has no
    added_tokens_decoder (transformers reads that file only then)."""
    cfg = _read_json(bundle_file(folder, "tokenizer_config.json"))
    values = {k: cfg.get(k) for k in SPECIAL_TOKEN_NAMES}
    if "added_tokens_decoder" not in cfg:
        legacy = _read_json(bundle_file(folder, "special_tokens_map.json"))
        values.update({k: legacy[k] for k in SPECIAL_TOKEN_NAMES if k in legacy})
    out = {}
    for k, v in values.items():
        v = v.get("content") if isinstance(v, dict) else v  # an AddedToken written as a dict
        if isinstance(v, str):
            out[k] = v
    return out


def as_conversations(chats: Chats, system: str | None = None) -> list[list[Message]]:
    """A batch of conversations from a user turn (str), one conversation (a list of message
    dicts), or a list mixing both; `system` becomes each conversation's first message."""
    if isinstance(chats, str):
        chats = [chats]
    if not isinstance(chats, (list, tuple)) or not chats:
        raise RuntimeInputError("nothing to chat about: pass a user turn, a list of messages or a list of those",
                                'e.g. [{"role": "user", "content": "hi"}]')
    if all(isinstance(m, dict) for m in chats):
        chats = [chats]
    batch = []
    for c, chat in enumerate(chats, 1):
        if isinstance(chat, str):
            chat = [{"role": "user", "content": chat}]
        if not isinstance(chat, (list, tuple)) or not chat:
            raise RuntimeInputError(f"conversation {c} is empty or not a list of messages",
                                    'give each conversation as [{"role": "user", "content": "..."}, ...]')
        for m, msg in enumerate(chat, 1):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise RuntimeInputError(f"message {m} of conversation {c} is not a {{role, content}} dict: "
                                        f"{str(msg)[:80]}", 'write messages as {"role": "user", "content": "..."}')
        chat = list(chat)
        if system is not None:
            if chat[0]["role"] == "system":
                raise RuntimeInputError(f"conversation {c} already starts with a system message",
                                        "give the system message once: in the conversation or as `system`")
            chat = [{"role": "system", "content": system}, *chat]
        batch.append(chat)
    return batch


def _default_template(value: Any, where: Path) -> str:
    """tokenizer_config.json's chat_template: a string, or named templates (a list of
    {name, template}, or a dict) of which transformers uses "default" when no tools are given."""
    if isinstance(value, str):
        return value
    named = {}
    if isinstance(value, dict):
        named = value
    elif isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if not named:
        raise BundleError(f"the chat_template in {where} is neither a string nor a list of {{name, template}}",
                          f"copy the checkpoint's {where.name} again")
    if isinstance(named.get("default"), str):
        return named["default"]
    raise BundleError(f"{where} has chat templates {sorted(map(str, named))} but none named 'default'",
                      "name the template for plain chats 'default', or save it as chat_template.jinja")


@functools.lru_cache(maxsize=8)
def _compile(source: str, origin: str):
    """The template compiled in transformers' environment (cached: a Generator renders each call)."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise OnnxportError("chat templates need jinja2, which is not installed",
                            "pip install 'jinja2>=3.1.6'") from None
    have = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if have < _MIN_JINJA:
        raise OnnxportError(f"chat templates need jinja2 >= 3.1.6 (older releases have sandbox escapes), "
                            f"found {jinja2.__version__}", "pip install -U 'jinja2>=3.1.6'")

    class GenerationTag(Extension):
        # transformers' AssistantTracker: `{% generation %}` marks assistant text for training
        # masks; a template that uses it must still compile, and rendering keeps just the body
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:
        # transformers' guarded `dict`: the builtin type would expose its attributes to the template
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # transformers refuses underscore names on namespaces (a route to CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt text
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise BundleError(f"the chat template in {origin} does not parse (line {e.lineno}): {_one_line(e)}",
                          "fix the template, or copy the checkpoint's chat_template.jinja / "
                          "tokenizer_config.json again") from None


def _drop_none(messages: list[Message]) -> list[Message]:
    # transformers drops None values (OpenAI-style content=None, tool_calls=None): templates test
    # for a key's presence and would otherwise print "None"
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _with_reasoning_aliases(message: Message) -> Message:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """A copy made of JSON types only, as transformers gives templates: any other object (an
    image, an array) becomes an inert "<TypeName>" the sandbox cannot call methods on."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # subclasses (enums, numpy scalars) lose their extra methods; str(StrEnum) would give its name
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _read_json(p: Path | None) -> dict:
    if p is None or not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{p} is not valid JSON ({e})", f"copy the checkpoint's {p.name} again") from None
    return data if isinstance(data, dict) else {}


def _one_line(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e)
    lines = str(text).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__
