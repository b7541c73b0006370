"""The request contract of tasks that take prompts with images and audio clips (image-text-to-text,
MiniCPM-V, Qwen2.5-Omni's any-to-text): every prompt gets all the images and clips, in
placeholder order; without any, the bundle's decoder generates from the text alone."""

from __future__ import annotations

from onnxport.runtime.tasks.request import OnText, Reply, Request, refuse, stream_decoder
from onnxport.runtime.tasks.text_generation import generate_text


class PromptsWithMedia:
    """`run` for a task whose `generate(prompts, images=, [audio=,] chat=, system=, on_token=,
    ...)` takes a batch of prompts with their images (and clips, when `takes_audio`)."""

    takes_audio = False

    def run(self, request: Request, on_text: OnText | None = None) -> Reply:
        refuse(request, self.kind, audio=not self.takes_audio, speak=True, speech_options=True, text=True)
        if not request.images and not request.audio:
            return generate_text(self.generator, request, on_text)
        request.needs_prompt()
        from onnxport.runtime.image_processor import load_image

        images = [load_image(p) for p in request.images]
        chat = request.wants_chat
        if request.messages is not None:
            conversations = [request.messages]
        elif chat:
            conversations = [[{"role": "user", "content": [*({"type": "image"} for _ in images),
                                                           *({"type": "audio"} for _ in request.audio),
                                                           {"type": "text", "text": p}]}] for p in request.prompts]
        else:
            conversations = list(request.prompts)
        media = {"audio": [list(request.audio) for _ in conversations]} if request.audio else {}
        streaming = on_text is not None and request.stream and len(conversations) == 1
        res = self.generate(conversations, images=[images for _ in conversations], chat=chat, system=request.system,
                            on_token=stream_decoder(self.generator.tokenizer, on_text) if streaming else None,
                            **media, **request.sampling.text())
        return Reply([] if streaming else list(res.texts),
                     f"prefill {res.prefill_ms:.1f} ms, decode {res.decode_tokens_per_s:.1f} tokens/s", streamed=streaming)
