"""The task contract: what a user asks of a bundle (`Request`) and what comes back (`Reply`).

The CLI maps its flags to a Request and prints the Reply; which task runs is decided by the
bundle's manifest (`open_task`), never by the caller. Each task checks that the request fits it
(a speech-to-text task takes audio and no prompt; a text-to-speech task one text) and says what
to change in one line when it does not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnxport.errors import InputError


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; `max_new_tokens` None: the task's default (text: 32; speech-to-text:
    the model's own length rule)."""

    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    #: prompt-lookup speculative decoding with up to this many drafted tokens (0: off; text
    #: generation, greedy)
    speculative: int = 0
    #: a draft bundle (same tokenizer) whose greedy tokens are the drafts (text generation)
    draft: str | None = None

    def text(self, default: int = 32) -> dict:
        """The generator's keyword arguments, with the text default filled in."""
        return dict(max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else default,
                    do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    seed=self.seed)


@dataclass(frozen=True)
class Request:
    """One call of a bundle. `prompts`: plain prompts (one row each); `messages`: one
    conversation (a list of {role, content}) or a list of them; `chat`: render each prompt as
    the user turn of its own conversation with the bundle's template; `images` / `audio`:
    files given with every prompt (or, for speech-to-text, the audio to transcribe); `speak`:
    also speak the reply into this WAV file (`overwrite` an existing one); `text`: the text to
    speak (text-to-speech)."""

    prompts: tuple[str, ...] = ()
    messages: list | None = None
    chat: bool = False
    system: str | None = None
    images: tuple[Path, ...] = ()
    audio: tuple[Path, ...] = ()
    text: str | None = None
    speak: Path | None = None
    overwrite: bool = False
    speaker: str | None = None
    max_frames: int | None = None
    language: str | None = None
    task: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    #: print row 0 as it is generated (one prompt)
    stream: bool = True

    @property
    def wants_chat(self) -> bool:
        return self.chat or self.system is not None or self.messages is not None

    def conversations(self) -> list:
        """The prompts as conversations (chat), or the messages' conversations."""
        if self.messages is not None:
            return self.messages if self.messages and isinstance(self.messages[0], list) else [self.messages]
        return list(self.prompts)

    def needs_prompt(self) -> None:
        if self.messages is not None and self.prompts:
            raise InputError("give either -p or --messages, not both", "put the user turn last in the --messages file")
        if self.messages is None and not self.prompts:
            raise InputError("nothing to generate from",
                             "give a prompt with -p TEXT, or a conversation with --messages FILE.json")



@dataclass
class Reply:
    """What a task produced: `lines` are printed one per line on stdout (after what was
    streamed through `on_text`), `summary` is the statistics line for stderr, `files` lists
    what was written."""

    lines: list[str] = field(default_factory=list)
    summary: str = ""
    #: row 0 went out through `on_text` (its line is still open)
    streamed: bool = False
    files: list[Path] = field(default_factory=list)


#: called with each piece of row 0's text as it is generated (streaming)
OnText = Callable[[str], None]


def read_messages(path: Path) -> list:
    """--messages: a JSON list of messages (one conversation) or a list of conversations."""
    if not path.is_file():
        raise InputError(f"--messages {path} is not a file", "write the conversation as a JSON list of messages")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--messages {path} is not valid JSON: {e}",
                         'write e.g. [{"role": "user", "content": "hi"}]') from None
    if not isinstance(data, list) or not data:
        raise InputError(f"--messages {path} must hold a non-empty JSON list of messages",
                         'write e.g. [{"role": "user", "content": "hi"}]')
    return data


def stream_decoder(tokenizer, on_text: OnText | None, echo: str | None = None):
    """on_token(row, token) for a generator that sends row 0's new text to `on_text`; `echo`
    (the prompt) goes first, with the first token: only once every check has passed."""
    if on_text is None:
        return None
    from onnxport.runtime.tokenizer import StreamDecoder

    stream = StreamDecoder(tokenizer)
    pending = [echo] if echo else []

    def on_token(row: int, tok: int) -> None:
        if row == 0:
            while pending:
                on_text(pending.pop())
            on_text(stream.push(tok))

    return on_token


def refuse(request: Request, kind: str, *, images: bool = False, audio: bool = False, speak: bool = False,
           speech_options: bool = False, prompts: bool = False, text: bool = False) -> None:
    """One line when the request carries what a `kind` task does not take."""
    given = [("--speculative", kind != "text-generation" and bool(request.sampling.speculative)),
             ("--draft", kind != "text-generation" and request.sampling.draft is not None),
             ("text to speak (onnxport speak)", text and request.text is not None),
             ("--image", images and request.images), ("--audio", audio and request.audio),
             ("--speak", speak and request.speak is not None),
             ("--language / --task", speech_options and (request.language is not None or request.task is not None)),
             ("prompt (-p / --messages)", prompts and (request.prompts or request.messages is not None))]
    for what, there in given:
        if there:
            raise InputError(f"a {kind} bundle takes no {what}", HINTS.get(what, "drop it"))


HINTS = {
    "--speculative": "speculative decoding is for text-generation bundles; drop it",
    "--draft": "speculative decoding is for text-generation bundles; drop it",
    "text to speak (onnxport speak)": "speak with a text-to-speech (ChatTTS) or any-to-any (Qwen2.5-Omni) bundle",
    "--image": "export a checkpoint with a vision part (e.g. Qwen2.5-VL, MiniCPM-V) to send images",
    "--audio": "a speech-to-text (Whisper) or any-to-text (Qwen2.5-Omni) bundle takes audio",
    "--speak": "drop --speak; a Qwen2.5-Omni checkpoint exported with its talker and token2wav speaks",
    "--language / --task": "they go with --audio on a speech-to-text bundle",
}


def check_speech_output(request: Request) -> None:
    """The text to speak is not empty and the WAV file may be written."""
    if request.text is not None and not request.text.strip():
        raise InputError("the text to speak is empty", 'pass some words, e.g. --text "Hello there."')
    if request.speak is not None and request.speak.exists() and not request.overwrite:
        raise InputError(f"{request.speak} already exists", "pass --force to replace it, or choose another -o")
    if request.speak is not None and not request.speak.parent.is_dir():
        raise InputError(f"cannot write {request.speak}: the folder {request.speak.parent} does not exist",
                         "create it, or choose another -o")
    if request.speak is not None and request.speak.is_dir():
        raise InputError(f"{request.speak} is a folder", "give a file name, e.g. -o speech.wav")
