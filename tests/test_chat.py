"""Chat templates in the torch-free runtime: found and rendered like transformers'
apply_chat_template, so the prompt ids are transformers' ids exactly; then the same replies
through Generator.chat and `onnxport generate --chat / --messages`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onnxport.bundle.seal import reseal
from onnxport.errors import BundleError, RuntimeInputError
from onnxport.runtime import Generator
from onnxport.runtime.chat import ChatTemplate, as_conversations
from onnxport.runtime.tokenizer import BundleTokenizer

DEMO = Path(__file__).resolve().parents[1] / "src" / "onnxport" / "demo_model"

#: Qwen2's template, verbatim
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Llama-3.1-style: writes bos itself, a date from strftime_now, and refuses a wrong role order
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

#: Qwen2-VL's template, plus Qwen2.5-Omni's audio branch: list contents become placeholders
QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Zephyr's template: one tag per line, so the output depends on trim_blocks / lstrip_blocks
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
VL_TOKENS = (*CHATML_TOKENS, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
             "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>")

MULTI_TURN = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What does assert do?"},
    {"role": "assistant", "content": "It checks a condition."},
    {"role": "user", "content": "And when it fails? ü 🙂"},
]
CASES = {
    "single user turn": [{"role": "user", "content": "hi"}],
    "system + multi-turn": MULTI_TURN,
    "no system, two turns": MULTI_TURN[1:],
}


def tokenizer_folder(root: Path, template=None, where: str = "config", added=(), bos: str | None = None,
                     **config) -> Path:
    """The demo tokenizer plus `added` special tokens (ids after its 1024), a template written
    where `where` says, and tokenizer_config overrides; `bos` also makes the post-processor
    prepend it, as Llama 3's tokenizer.json does (so a second bos would show)."""
    root.mkdir(parents=True, exist_ok=True)
    tok = json.loads((DEMO / "tokenizer.json").read_text())
    for i, content in enumerate(added, start=len(tok["model"]["vocab"])):
        tok["added_tokens"].append({"id": i, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    if bos is not None:
        bos_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == bos)
        tok["post_processor"] = {"type": "TemplateProcessing",
                                 "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                            {"Sequence": {"id": "A", "type_id": 0}}],
                                 "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                          {"Sequence": {"id": "B", "type_id": 1}}],
                                 "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
        config.setdefault("bos_token", bos)
    (root / "tokenizer.json").write_text(json.dumps(tok))
    cfg = {**json.loads((DEMO / "tokenizer_config.json").read_text()), **config}
    if where == "config":
        cfg["chat_template"] = template
    elif where == "named":
        cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": template}]
    elif where == "jinja":
        (root / "chat_template.jinja").write_text(template)
        cfg["chat_template"] = "{{ 'the .jinja file wins over this' }}"
    elif where == "json":
        (root / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    return root


def hf_ids(folder: Path, messages, **variables) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                        **variables))


def our_ids(folder: Path, messages, **variables) -> list[int]:
    text = ChatTemplate.from_folder(folder).render(messages, add_generation_prompt=True, **variables)
    return BundleTokenizer(folder).encode(text, add_special_tokens=False)


@pytest.mark.parametrize("case", CASES)
def test_chatml_ids_equal_transformers(tmp_path, case):
    folder = tokenizer_folder(tmp_path, CHATML, added=CHATML_TOKENS)
    ids = our_ids(folder, CASES[case])
    assert ids == hf_ids(folder, CASES[case])
    im_start, im_end = 1024, 1025
    assert ids[0] == im_start and ids.count(im_end) == len(CASES[case]) + (case != "system + multi-turn")


def test_llama3_writes_bos_once_like_transformers(tmp_path):
    # add_bos_token and a bos-prepending post-processor: both must be skipped for a rendered chat
    folder = tokenizer_folder(tmp_path, LLAMA3, added=LLAMA3_TOKENS, bos="<|begin_of_text|>", add_bos_token=True)
    bos = 1024
    for messages in CASES.values():
        ids = our_ids(folder, messages)
        assert ids == hf_ids(folder, messages)
        assert ids[0] == bos and ids.count(bos) == 1
    # plain prompts keep the bundle's default: bos once, from the post-processor
    assert BundleTokenizer(folder).encode("hi")[0] == bos
    assert BundleTokenizer(folder).encode("hi") == BundleTokenizer(folder).encode("hi", add_special_tokens=True)


def test_llama3_wrong_role_order_is_one_line_error(tmp_path):
    folder = tokenizer_folder(tmp_path, LLAMA3, added=LLAMA3_TOKENS)
    wrong = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(RuntimeInputError, match="Conversation roles must alternate") as err:
        our_ids(folder, wrong)
    assert "\n" not in str(err.value)
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf_ids(folder, wrong)


def test_qwen2_vl_placeholders_equal_transformers(tmp_path):
    folder = tokenizer_folder(tmp_path, QWEN2_VL, added=VL_TOKENS)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "audio"}, {"type": "image", "image": "cat.png"},
                                     {"type": "text", "text": "And this sound?"}]},
    ]
    ids = our_ids(folder, messages)
    assert ids == hf_ids(folder, messages)
    image_pad = 1024 + VL_TOKENS.index("<|image_pad|>")
    audio = 1024 + VL_TOKENS.index("<|AUDIO|>")
    assert ids.count(image_pad) == 2 and ids.count(audio) == 1
    # template variables pass through like apply_chat_template's kwargs
    assert our_ids(folder, messages, add_vision_id=True) == hf_ids(folder, messages, add_vision_id=True)
    assert "Picture 2: " in ChatTemplate.from_folder(folder).render(messages, add_vision_id=True)


@pytest.mark.parametrize("where", ["jinja", "named"])
def test_template_found_where_transformers_finds_it(tmp_path, where):
    folder = tokenizer_folder(tmp_path, ZEPHYR, where=where, added=("<|user|>", "<|system|>", "<|assistant|>"))
    ids = our_ids(folder, MULTI_TURN)
    assert ids == hf_ids(folder, MULTI_TURN)
    assert ChatTemplate.from_folder(folder).render(MULTI_TURN).endswith("<|endoftext|>\n<|assistant|>\n")


def test_tojson_and_namespace_render_like_transformers(tmp_path):
    # jinja's own tojson would HTML-escape "<" and "'"; transformers' writes JSON as is
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                "{{ messages|tojson }} {{ ns.n }} {{ dict(a=1)|tojson(indent=1) }}")
    folder = tokenizer_folder(tmp_path, template)
    messages = [{"role": "user", "content": "<b>it's ü</b>", "tool_calls": None}]
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
    assert ChatTemplate.from_folder(folder).render(messages, add_generation_prompt=False) == want
    assert '"<b>it\'s ü</b>"' in want and "tool_calls" not in want


def test_template_sources_and_missing_template(tmp_path):
    # a processor's legacy chat_template.json (the tokenizer alone does not read it)
    folder = tokenizer_folder(tmp_path / "json", CHATML, where="json")
    t = ChatTemplate.from_folder(folder)
    assert t.origin.endswith("chat_template.json") and t.render(MULTI_TURN).startswith("<|im_start|>system\nYou")
    assert t.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                "pad_token": "<|endoftext|>"}
    with pytest.raises(BundleError, match="has no chat template") as err:
        ChatTemplate.from_folder(tokenizer_folder(tmp_path / "none", where="nowhere"))
    assert err.value.hint and "chat_template.jinja" in err.value.hint
    cfg = tmp_path / "nodefault" / "tokenizer_config.json"
    tokenizer_folder(cfg.parent, CHATML)
    cfg.write_text(json.dumps({"chat_template": [{"name": "rag", "template": "x"}]}))
    with pytest.raises(BundleError, match="none named 'default'"):
        ChatTemplate.from_folder(cfg.parent)
    broken = tokenizer_folder(tmp_path / "broken", "{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(BundleError, match="does not parse"):
        ChatTemplate.from_folder(broken).render(CASES["single user turn"])


def test_conversation_shapes():
    hi = [{"role": "user", "content": "hi"}]
    assert as_conversations("hi") == [hi]
    assert as_conversations(hi) == [hi]
    assert as_conversations(["hi", hi]) == [hi, hi]
    assert as_conversations("hi", system="s") == [[{"role": "system", "content": "s"}, *hi]]
    with pytest.raises(RuntimeInputError, match="already starts with a system message"):
        as_conversations([[{"role": "system", "content": "a"}, *hi]], system="b")
    with pytest.raises(RuntimeInputError, match="not a {role, content} dict"):
        as_conversations([[{"content": "no role"}]])
    with pytest.raises(RuntimeInputError, match="empty"):
        as_conversations([[]])


# --- a real bundle: Generator.chat and the CLI ---------------------------------------------------


@pytest.fixture(scope="module")
def chat_bundle(exported, tmp_path_factory) -> Path:
    """The tiny llama bundle with Qwen2's template added (the demo tokenizer has no ChatML tokens,
    so its markers are plain text: every id stays inside the 1024-token vocabulary)."""
    bundle = tmp_path_factory.mktemp("chat") / "bundle"
    shutil.copytree(exported("llama"), bundle)
    cfg = json.loads((bundle / "tokenizer_config.json").read_text())
    # add_bos_token: plain prompts get bos; a rendered chat must not (transformers encodes it
    # without special tokens)
    (bundle / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML, "add_bos_token": True}))
    reseal(bundle)  # an edit made on purpose (`onnxport seal`)
    return bundle


def _invoke(*args):
    from onnxport.cli import app

    return CliRunner().invoke(app, ["generate", *map(str, args)])


def _one_line_failure(res, code: int, text: str):
    assert res.exit_code == code, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], res.output
    assert sum(line.startswith("hint:") for line in res.output.splitlines()) == 1, res.output
    assert "Traceback" not in res.output


def test_generator_chat_generates_from_transformers_ids(chat_bundle):
    gen = Generator(chat_bundle)
    convs = [[{"role": "user", "content": "hi"}], MULTI_TURN]
    ids = [hf_ids(chat_bundle, c) for c in convs]
    assert gen.chat_ids(convs) == ids
    assert ids[0][0] != 0 and gen.tokenizer.encode("hi")[0] == 0  # add_bos_token: plain prompts only
    want = gen.generate_ids(ids, max_new_tokens=4)
    res = gen.chat(convs, max_new_tokens=4)
    assert res.tokens == want.tokens and len(res.tokens[0]) == 4
    assert res.texts == [gen.tokenizer.decode(t) for t in want.tokens]
    assert gen.chat("hi", max_new_tokens=4).tokens == want.tokens[:1]


def test_cli_chat_batch_system_and_messages(chat_bundle, tmp_path):
    gen = Generator(chat_bundle)

    def replies(convs):
        res = gen.generate_ids([hf_ids(chat_bundle, c) for c in convs], max_new_tokens=4)
        return [gen.tokenizer.decode(t) for t in res.tokens]

    hi, more = [{"role": "user", "content": "hi"}], [{"role": "user", "content": "tell me more"}]
    res = _invoke(chat_bundle, "--chat", "-p", "hi", "-p", "tell me more", "-n", 4)
    assert res.exit_code == 0, res.output
    assert res.stdout == "".join(f"{t}\n" for t in replies([hi, more]))

    system = {"role": "system", "content": "You answer in one line."}
    res = _invoke(chat_bundle, "--system", system["content"], "-p", "hi", "-n", 4, "--no-stream")
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{replies([[system, *hi]])[0]}\n"

    # streamed: the reply as it arrives (a trailing incomplete UTF-8 character is held back)
    res = _invoke(chat_bundle, "--chat", "-p", "hi", "-n", 4)
    assert res.exit_code == 0 and "tokens/s" in res.output, res.output
    streamed = res.stdout.removesuffix("\n")
    assert replies([hi])[0].startswith(streamed) and streamed

    f = tmp_path / "chat.json"
    f.write_text(json.dumps(MULTI_TURN))
    res = _invoke(chat_bundle, "--messages", f, "-n", 4, "--no-stream")
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{replies([MULTI_TURN])[0]}\n"


def test_cli_chat_errors_are_one_line(chat_bundle, exported, tmp_path):
    _one_line_failure(_invoke(exported("llama"), "--chat", "-p", "hi"), 2, "has no chat template")

    llama3 = tmp_path / "llama3"
    shutil.copytree(chat_bundle, llama3)
    cfg = json.loads((llama3 / "tokenizer_config.json").read_text())
    (llama3 / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": LLAMA3}))
    reseal(llama3)
    f = tmp_path / "wrong.json"
    f.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]))
    _one_line_failure(_invoke(llama3, "--messages", f), 2, "Conversation roles must alternate")

    _one_line_failure(_invoke(chat_bundle, "--chat"), 2, "nothing to generate from")
    _one_line_failure(_invoke(chat_bundle, "--messages", f, "-p", "hi"), 2, "either -p or --messages")
    f.write_text("[{")
    _one_line_failure(_invoke(chat_bundle, "--messages", f), 2, "not valid JSON")
    _one_line_failure(_invoke(chat_bundle, "--system", "s", "--messages", tmp_path / "missing.json"), 2,
                      "is not a file")


def test_chat_runs_without_torch(chat_bundle):
    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('torch', 'transformers'):\n"
        "        raise ImportError('runtime must not import ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from onnxport.runtime import Generator\n"
        f"r = Generator({str(chat_bundle)!r}).chat('hi', max_new_tokens=2)\n"
        "assert len(r.tokens[0]) == 2, r.tokens\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
