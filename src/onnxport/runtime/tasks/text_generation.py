"""Text generation: a text decoder bundle (no pipeline section) runs prompts or chats through
the Generator (runtime/generator.py)."""

from __future__ import annotations

from pathlib import Path

from onnxport.runtime.generator import Generator
from onnxport.runtime.tasks import TEXT_GENERATION, register_task
from onnxport.runtime.tasks.request import OnText, Reply, Request, refuse, stream_decoder


@register_task(TEXT_GENERATION)
class TextGeneration:
    """Prompts (each printed with its continuation) or conversations (the reply only, rendered
    with the bundle's chat template)."""

    def __init__(self, bundle: str | Path, threads: int | None = None):
        self.folder = Path(bundle)
        self.generator = Generator(bundle, threads)

    def run(self, request: Request, on_text: OnText | None = None) -> Reply:
        refuse(request, TEXT_GENERATION, images=True, audio=True, speak=True, speech_options=True)
        return generate_text(self.generator, request, on_text)


def generate_text(gen: Generator, request: Request, on_text: OnText | None) -> Reply:
    """A request of prompts or conversations on `gen`; row 0 streamed when there is one row."""
    request.needs_prompt()
    sampling = request.sampling.text()
    if request.sampling.speculative:
        sampling["speculative"] = request.sampling.speculative
    if request.sampling.draft is not None:
        # the model and its draft take turns: neither session's threads may busy-wait after a run
        # (measured on SmolLM2: drafting 0.65x plain decoding with spinning pools, 1.0-1.3x without)
        gen = Generator(gen.folder, runtime=gen.runtime, spinning=False)
        sampling["draft"] = Generator(request.sampling.draft, runtime=gen.runtime, spinning=False)
    if request.wants_chat:
        from onnxport.runtime.chat import as_conversations

        conversations = as_conversations(request.messages if request.messages is not None else list(request.prompts),
                                          request.system)
        streaming = on_text is not None and request.stream and len(conversations) == 1
        res = gen.chat(conversations, on_token=stream_decoder(gen.tokenizer, on_text) if streaming else None,
                       **sampling)
        lines = [] if streaming else list(res.texts)
    else:
        prompts = list(request.prompts)
        streaming = on_text is not None and request.stream and len(prompts) == 1
        res = gen.generate(prompts, on_token=stream_decoder(gen.tokenizer, on_text, echo=prompts[0]) if streaming else None,
                           **sampling)
        lines = [] if streaming else [p + t for p, t in zip(prompts, res.texts)]
    summary = f"prefill {res.prefill_ms:.1f} ms, decode {res.decode_tokens_per_s:.1f} tokens/s"
    if res.speculative:
        summary += (f", {res.speculative['tokens_per_forward']:.2f} tokens per forward "
                    f"({res.speculative['accepted']}/{res.speculative['drafted']} drafted tokens accepted"
                    + (f", drafting {res.speculative['draft_ms']:.0f} ms" if request.sampling.draft is not None else "")
                    + ")" + ("; int8-activation graph (accuracy level 4): at near-ties a token may differ from plain "
                             "decoding's" if res.speculative.get("int8_activations") else ""))
    return Reply(lines, summary, streamed=streaming)
