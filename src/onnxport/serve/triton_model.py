"""Triton Python-backend model serving an onnxport decoder bundle with onnxport's torch-free
runtime. `onnxport triton` copies this file into a model repository as `<model>/1/model.py`; it
runs inside Triton's Python-backend stub, where `triton_python_backend_utils` exists.

Two models use it, told apart by their config:
- `<name>` (dynamic batching): TEXT_INPUT [1] string, optional MAX_TOKENS [1] int32 ->
  TEXT_OUTPUT [1] string, TOKEN_IDS [-1] int64. The requests Triton batches into one `execute`
  run as one left-padded batch through the generation loop (each request's KV cache lives in
  that loop: nothing is shared between requests); each reply is cut to its own MAX_TOKENS.
- `<name>_stream` (decoupled): the same inputs, one response per new piece of text, the last
  flagged final (gRPC streaming, or HTTP's /generate_stream).
Greedy decoding, as `onnxport generate` without --sample.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend


class TritonPythonModel:
    def initialize(self, args):
        from onnxport.runtime import Generator
        from onnxport.runtime.tokenizer import StreamDecoder
        from onnxport.serve.triton import model_params

        bundle, params = model_params(args)
        config = params["_config"]
        threads = int(params.get("threads") or 0) or None
        self.generator = Generator(bundle, threads=threads)
        self.tokenizer = self.generator.tokenizer
        self.max_tokens = int(params.get("max_tokens") or 32)
        self.stream_decoder = StreamDecoder
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def _inputs(self, request) -> tuple[list[list[int]], int]:
        text = pb_utils.get_input_tensor_by_name(request, "TEXT_INPUT").as_numpy().reshape(-1)
        prompts = [self.tokenizer.encode(t.decode("utf-8") if isinstance(t, bytes) else str(t)) for t in text]
        limit = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
        n = int(limit.as_numpy().reshape(-1)[0]) if limit is not None else self.max_tokens
        if not prompts or any(not p for p in prompts):
            raise ValueError("TEXT_INPUT is empty: send at least one token of text")
        if n < 1:
            raise ValueError(f"MAX_TOKENS must be >= 1, got {n}")
        return prompts, n

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        return self._batched(requests)

    def _batched(self, requests):
        """Every valid request's prompts in one batch of the generation loop."""
        parsed, errors = [], {}
        for i, request in enumerate(requests):
            try:
                parsed.append((i, *self._inputs(request)))
            except Exception as e:  # noqa: BLE001 - reported to that request's client
                errors[i] = str(e)
        replies = {}
        if parsed:
            prompts = [p for _, ps, _ in parsed for p in ps]
            longest = max(n for _, _, n in parsed)
            try:
                tokens = self.generator.generate_ids(prompts, max_new_tokens=longest).tokens
            except Exception as e:  # noqa: BLE001
                tokens, errors = None, {**errors, **{i: str(e) for i, _, _ in parsed}}
            k = 0
            for i, ps, n in parsed:
                if tokens is not None:
                    rows = [t[:n] for t in tokens[k:k + len(ps)]]
                    replies[i] = rows
                k += len(ps)
        out = []
        for i in range(len(requests)):
            if i in errors:
                out.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(errors[i])))
                continue
            rows = replies[i]
            texts = np.array([self.tokenizer.decode(r).encode("utf-8") for r in rows], dtype=np.object_)
            width = max(len(r) for r in rows)
            ids = np.full((len(rows), width), -1, dtype=np.int64)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = row
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("TEXT_OUTPUT", texts.reshape(len(rows), 1)),
                pb_utils.Tensor("TOKEN_IDS", ids)]))
        return out

    def _stream(self, request):
        sender = request.get_response_sender()
        try:
            prompts, n = self._inputs(request)
            if len(prompts) != 1:
                raise ValueError("the streaming model takes one prompt per request")
            decoder = self.stream_decoder(self.tokenizer)

            def on_token(_row, token):
                piece = decoder.push(token)
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("TEXT_OUTPUT", np.array([piece.encode("utf-8")], dtype=np.object_)),
                    pb_utils.Tensor("TOKEN_IDS", np.array([token], dtype=np.int64))]))

            self.generator.generate_ids(prompts, max_new_tokens=n, on_token=on_token)
        except Exception as e:  # noqa: BLE001 - reported to the client
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
