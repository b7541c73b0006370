"""Text generation with ONNX Runtime, driven by the bundle's manifest (no model code, no torch).

Semantics follow transformers' `generate` so that greedy tokens match it exactly:
left padding, position_ids = cumsum(attention_mask) - 1 (padded slots get 1), finished rows
emit the pad token until every row is done, stop on any EOS id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from onnxport.bundle import GQA_ATTENTION, RIGHT_PADDING, read_manifest
from onnxport.errors import BundleError, RuntimeInputError
from onnxport.runtime.sampling import Sampler
from onnxport.runtime.session import GraphSession, current_runtime
from onnxport.runtime.split import SplitDecoder
from onnxport.runtime.tokenizer import BundleTokenizer, special_ids
from onnxport.spec import left_pad, padded_positions, right_pad

#: called with (row, token_id) for every new token of every unfinished row
TokenCallback = Callable[[int, int], None]
#: called with (step, the decoder's outputs by name) after every call of the decoder graph
OutputsCallback = Callable[[int, dict], None]


@dataclass
class GenerationResult:
    #: new tokens per row, cut after the first EOS (EOS included)
    tokens: list[list[int]]
    #: new tokens per row as the model emitted them, padded like transformers' output
    padded: np.ndarray
    texts: list[str] = field(default_factory=list)
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    #: tokens produced by decode steps (all rows), i.e. excluding each row's first token
    decode_tokens: int = 0
    #: speculative decoding: forwards, drafted and accepted tokens, tokens per forward
    speculative: dict | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1000) if self.decode_ms else 0.0


class Generator:
    """Generate from an onnxport bundle.

    >>> gen = Generator("out/")                                  # doctest: +SKIP
    >>> gen.generate(["def f(x):"], max_new_tokens=16).texts     # doctest: +SKIP
    """

    def __init__(self, bundle: str | Path, threads: int | None = None, runtime: str | None = None,
                 spinning: bool = True):
        """`runtime`: "onnxruntime" (default) or "openvino" (its CPU plugin at f32; None: the
        process's choice, ONNXPORT_RUNTIME). `spinning=False`: ONNX Runtime's worker threads
        sleep after a run instead of busy-waiting (for generators that take turns, as a model
        and its draft model do: a spinning pool starves the other one of cores)."""
        self.folder = Path(bundle)
        self.runtime = current_runtime(runtime)
        self.manifest = read_manifest(self.folder)
        self.split: SplitDecoder | None = None
        kv = self.manifest.kv_cache
        if kv is None:
            raise BundleError(f"{bundle} has no text decoder (its parts: "
                              f"{', '.join(p.name for p in self.manifest.parts) or 'none'})",
                              "run its graphs with onnxport.runtime.EncoderRunner")
        if self.manifest.is_split:
            self.split = SplitDecoder(self.folder, self.manifest, threads, self.runtime)
        else:
            precision = self.manifest.graph("decoder").precision or {}
            if precision.get("compute") == "bfloat16":
                raise BundleError("this decoder computes in bf16, and ONNX Runtime's CPU provider has no bf16 kernels",
                                  "run it with the CUDA or TensorRT provider, or export --dtype bf16 without "
                                  "--bf16-compute (bf16 weights, fp32 compute) for CPUs")
            self.session = GraphSession(self.folder, self.manifest.graph("decoder"), threads, spinning=spinning,
                                        runtime=self.runtime)
        self.past_names = kv.past_names
        self.present_names = kv.present_names
        self.kv_layout = kv.layout
        #: one token per call (recurrent states): prompts run token by token, one row at a time
        self.step_only = bool(kv.step_only)
        if self.split is None:
            #: each past input's dims (MLA keys and values differ; heads can differ per layer)
            self.past_dims = {n: self.session.inputs[n].dims for n in self.past_names}
            self.takes_positions = "position_ids" in self.session.inputs
            #: multimodal rotary ids [3, batch, seq]: text positions repeat on every axis
            self.position_axes = (len(self.session.inputs["position_ids"].dims) == 3 and
                                  self.session.inputs["position_ids"].dims[0]) if self.takes_positions else 0
            #: a decoder fed inputs_embeds reads token ids through its embedding graph
            self.embed_session = None
            if "inputs_embeds" in self.session.inputs:
                emb = next((g for g in self.manifest.graphs if g.role == "embedding" and g.part == "decoder"), None)
                if emb is None:
                    raise BundleError("the decoder takes inputs_embeds but the bundle has no embedding graph",
                                      "re-export the model with onnxport export")
                self.embed_session = GraphSession(self.folder, emb, threads, runtime=self.runtime)
        #: OpenVINO 2026.4's GroupQueryAttention fails at batch > 1 (a Reshape of its own
        #: conversion): such a batch runs one prompt after another
        self.rows_alone = (self.runtime == "openvino" and self.split is None
                           and self.manifest.graph("decoder").attention == GQA_ATTENTION)
        #: GroupQueryAttention graphs run with one fixed-size cache buffer per tensor, bound as
        #: both past and present (written in place: no per-step copy of the cache)
        self.shared_buffer = (self.split is None and not self.step_only and bool(self.past_names)
                              and self.runtime == "onnxruntime"  # an ORT io_binding
                              and self.manifest.graph("decoder").attention == GQA_ATTENTION)
        #: the graph takes positions and cache slots from the mask's row sums (rotary inside
        #: GroupQueryAttention): batches are padded on the right, each row's first token read
        #: at its own last prompt slot
        self.right_padded = self.split is None and self.manifest.graph("decoder").padding == RIGHT_PADDING
        #: the graph can compute a prompt's logits at its last position only (optional input
        #: `logits_to_keep`, optimize/logits_to_keep.py): the lm_head then runs once per row
        self.keeps_logits = self.split is None and "logits_to_keep" in self.session.optional
        self.kv_dtype = np.dtype(kv.dtype)
        self.vocab_size = int(self.manifest.model.vocab_size)
        self.forced: dict = {}
        self.eos_ids, pad = special_ids(self.folder, self.forced)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        #: what padded / finished slots feed the graph: the pad id, unless the config names one
        #: outside the vocabulary (its value is masked out anyway; an embedding Gather is not)
        self.pad_feed = self.pad_id if 0 <= self.pad_id < self.vocab_size else 0
        #: position_ids of left-padded slots, as transformers' generate at export time
        mp = self.manifest.model.pad_position
        self.pad_position = 1 if mp is None else int(mp)
        self._tokenizer: BundleTokenizer | None = None

    @property
    def tokenizer(self) -> BundleTokenizer:
        if self._tokenizer is None:
            self._tokenizer = BundleTokenizer(self.folder)
        return self._tokenizer

    def _empty_past(self, name: str, batch: int) -> np.ndarray:
        shape = [d if isinstance(d, int) else (batch if d == "batch_size" else 0) for d in self.past_dims[name]]
        return np.zeros(shape, dtype=self.kv_dtype)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits [len(ids), vocab] of one sequence from an empty cache (scoring:
        perplexity, quality gates). Monolithic bundles that take a whole prompt per call."""
        if self.split is not None or self.step_only:
            raise RuntimeInputError("scoring needs a monolithic decoder that reads a whole sequence per call",
                                    "export with the monolithic layout")
        return self.session.run(self.prefill_feeds(ids))["logits"][0].astype(np.float32)

    def prefill_feeds(self, ids: list[int]) -> dict[str, np.ndarray]:
        """The decoder graph's inputs for one sequence from an empty cache."""
        x = np.asarray([ids], dtype=np.int64)
        return self._feeds(x, np.ones_like(x), np.arange(len(ids), dtype=np.int64)[None],
                           {n: self._empty_past(n, 1) for n in self.past_names})

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """Token embeddings [batch, seq, hidden] from the bundle's embedding graph."""
        return self.embed_session.run({"input_ids": input_ids}, check=False)["inputs_embeds"]

    def _feeds(self, input_ids, mask, positions, past, inputs_embeds=None) -> dict[str, np.ndarray]:
        """One call's inputs: token ids (or their embeddings), the mask, the positions (2-D,
        or [3, batch, seq] given or repeated for multimodal rotary), the cache."""
        feeds = {"attention_mask": mask, **past}
        if self.embed_session is not None:
            feeds["inputs_embeds"] = inputs_embeds if inputs_embeds is not None else self.embed(input_ids)
        else:
            feeds["input_ids"] = input_ids
        if self.takes_positions:
            if self.position_axes and positions.ndim == 2:
                positions = np.broadcast_to(positions, (self.position_axes, *positions.shape))
            feeds["position_ids"] = np.ascontiguousarray(positions)
        return feeds

    def generate(
        self,
        prompts: list[str] | str,
        max_new_tokens: int = 32,
        on_token: TokenCallback | None = None,
        **sampling,
    ) -> GenerationResult:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.tokenizer.encode(p) for p in prompts]
        res = self.generate_ids(ids, max_new_tokens=max_new_tokens, on_token=on_token, **sampling)
        res.texts = [self.tokenizer.decode(t) for t in res.tokens]
        return res

    def chat(
        self,
        conversations: str | list,
        max_new_tokens: int = 32,
        system: str | None = None,
        on_token: TokenCallback | None = None,
        **sampling,
    ) -> GenerationResult:
        """The assistant's reply to each conversation: a user turn (str), a list of
        transformers-style messages, or a list of those (a batch); see `chat_ids`."""
        ids = self.chat_ids(conversations, system)
        res = self.generate_ids(ids, max_new_tokens=max_new_tokens, on_token=on_token, **sampling)
        res.texts = [self.tokenizer.decode(t) for t in res.tokens]
        return res

    def chat_ids(self, conversations: str | list, system: str | None = None) -> list[list[int]]:
        """Prompt ids of each conversation, rendered with the bundle's chat template: those of
        transformers' apply_chat_template(add_generation_prompt=True, tokenize=True)."""
        # imported here: only chats need jinja2
        from onnxport.runtime.chat import ChatTemplate, as_conversations

        template = ChatTemplate.from_folder(self.folder)
        texts = [template.render(c, add_generation_prompt=True) for c in as_conversations(conversations, system)]
        # the template writes bos itself
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = -1,
        on_token: TokenCallback | None = None,
        prefill: dict | None = None,
        on_outputs: OutputsCallback | None = None,
        speculative: int = 0,
        draft: "Generator | None" = None,
    ) -> GenerationResult:
        """Generate from token-id prompts (left-padded into one batch).

        `eos_token_id=-1` (default) uses the bundle's generation_config; None disables EOS.
        `prefill` (multimodal pipelines): {"inputs_embeds": [batch, longest, hidden] with the
        features in place, "position_ids": [3, batch, longest], "position_delta": [batch]
        added to every later position}, for the left-padded prompt batch. `on_outputs(step,
        outputs)` sees each call's outputs (a pipeline reading `last_hidden_state`); monolithic
        decoders that read a whole prompt per call. Graphs with the optional `logits_to_keep`
        input compute the prompt call's logits at the last position only (every row's last
        token: left padding, or right padding with prompts of one length). `speculative=K`:
        greedy decoding that verifies up to K drafted tokens per forward (the same tokens), drafted
        from the text itself or, given a `draft` Generator (same tokenizer), by that model."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RuntimeInputError("every prompt needs at least one token", "pass a non-empty prompt")
        if max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}", "ask for one token or more (-n 1)")
        flat = [t for p in prompts for t in p]
        if min(flat) < 0 or max(flat) >= self.vocab_size:
            raise RuntimeInputError(
                f"token id {max(flat) if max(flat) >= self.vocab_size else min(flat)} is outside the "
                f"vocabulary [0, {self.vocab_size})",
                "use the bundle's tokenizer to make the prompt",
            )
        limit = self.manifest.model.max_positions
        longest = max(len(p) for p in prompts)
        if limit and longest >= limit:
            raise RuntimeInputError(
                f"the prompt has {longest} tokens; the model has {limit} positions (max_position_embeddings) "
                "and needs one more for a new token",
                f"shorten the prompt to at most {limit - 1} tokens")
        if limit and longest + max_new_tokens > limit:
            raise RuntimeInputError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"{limit} positions (max_position_embeddings)",
                f"ask for at most {limit - longest} new tokens, or shorten the prompt")
        eos = self.eos_ids if eos_token_id == -1 else ([] if eos_token_id is None else
                                                        ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)))
        sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
        if on_outputs is not None and (self.split is not None or self.step_only):
            raise RuntimeInputError("on_outputs needs a monolithic decoder that reads a whole prompt per call",
                                    "export with the monolithic layout")
        if speculative or draft is not None:
            return self._generate_speculative(prompts, max_new_tokens, eos, on_token, speculative or 4,
                                              do_sample or prefill is not None or on_outputs is not None, draft)
        if self.rows_alone and len(prompts) > 1:
            if prefill is not None or on_outputs is not None:
                raise RuntimeInputError("OpenVINO runs this GroupQueryAttention graph one prompt at a time; a "
                                        "pipeline's batched prefill needs ONNX Runtime", "use --runtime onnxruntime")
            rows = [self.generate_ids([p], max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id,
                                      (lambda _row, tok, r=r: on_token(r, tok)) if on_token else None)
                    for r, p in enumerate(prompts)]
            return _stack(rows, self.pad_id)
        if self.split is not None:
            return self._generate_split(prompts, max_new_tokens, sampler, eos, on_token, do_sample)
        if self.step_only:
            if prefill and prefill.get("position_ids") is not None:
                raise RuntimeInputError("prefill position ids need a decoder that reads a whole prompt per call; this "
                                        "one takes one token per call", "pass only inputs_embeds in the prefill")
            return self._generate_steps(prompts, max_new_tokens, sampler, eos, on_token,
                                        (prefill or {}).get("inputs_embeds"))
        batch, longest = len(prompts), max(len(p) for p in prompts)
        input_ids, mask = (right_pad if self.right_padded else left_pad)(prompts, self.pad_feed)
        positions = padded_positions(mask, self.pad_position)
        prefill = dict(prefill or {})
        #: each row's shift from left to right padding (a pipeline's prefill arrives left-padded)
        shift = np.asarray([longest - len(p) for p in prompts]) if self.right_padded else None
        if shift is not None and shift.any():
            for key, axis in (("inputs_embeds", 1), ("position_ids", -1)):
                if prefill.get(key) is not None:
                    prefill[key] = _shift_rows(prefill[key], -shift, axis)
        embeds = prefill.get("inputs_embeds")
        if prefill.get("position_ids") is not None:
            positions = prefill["position_ids"]
        delta = np.asarray(prefill.get("position_delta", 0), dtype=np.int64).reshape(-1, 1)
        if self.shared_buffer:
            run = self._shared_buffer_runner(batch, longest + max_new_tokens)
            past = {}
        else:
            run = None
            past = {n: self._empty_past(n, batch) for n in self.past_names}

        # the prompt call's logits at the last slot only, where that is every row's last token
        keep_last = self.keeps_logits and (not self.right_padded or len({len(p) for p in prompts}) == 1)
        unfinished = np.ones(batch, dtype=bool)
        new_tokens = np.full((batch, max_new_tokens), self.pad_id, dtype=np.int64)
        eos_arr = np.asarray(eos, dtype=np.int64)
        prefill_ms = decode_ms = 0.0
        steps = 0
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            feeds = self._feeds(input_ids, mask, positions, past, embeds if step == 0 else None)
            if step == 0 and keep_last:
                feeds["logits_to_keep"] = np.array(1, dtype=np.int64)
            outs = run(feeds) if run is not None else self.session.run(feeds, check=step == 0)
            if step == 0 and shift is not None and shift.any():
                # callers see the prompt's outputs laid out as left-padded, as without this graph
                outs = {k: _shift_rows(v, shift, 1) if k in ("logits", "last_hidden_state") else v
                        for k, v in outs.items()}
            if on_outputs is not None:
                on_outputs(step, outs)
            next_tok = sampler(outs["logits"][:, -1, :])
            if step == max_new_tokens - 1 and self.forced.get("eos") is not None:
                # transformers' ForcedEOSTokenLogitsProcessor: the last allowed token is EOS
                next_tok = np.full_like(next_tok, self.forced["eos"])
            dt = (time.perf_counter() - t0) * 1000
            if step == 0:
                prefill_ms = dt
            else:
                decode_ms += dt
                steps += 1
            next_tok = np.where(unfinished, next_tok, self.pad_id)
            new_tokens[:, step] = next_tok
            if on_token is not None:
                for r in np.nonzero(unfinished)[0]:
                    on_token(int(r), int(next_tok[r]))
            if eos_arr.size:
                unfinished &= ~np.isin(next_tok, eos_arr)
            if not unfinished.any():
                new_tokens = new_tokens[:, : step + 1]
                break
            if run is None:
                past = {p: outs[q] for p, q in zip(self.past_names, self.present_names)}
            new_ids = np.where(unfinished, next_tok, self.pad_feed)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            if self.past_names:
                input_ids = new_ids
                positions = (mask.sum(axis=-1, keepdims=True) - 1 + delta).astype(np.int64)
            else:  # no cache: the graph reads the whole sequence again
                input_ids = np.concatenate([input_ids, new_ids], axis=1)
                positions = padded_positions(mask, self.pad_position)
        tokens = [_cut_at_eos(row, eos) for row in new_tokens.tolist()]
        return GenerationResult(tokens, new_tokens, prefill_ms=prefill_ms, decode_ms=decode_ms,
                                decode_tokens=steps * batch)

    def _shared_buffer_runner(self, batch: int, capacity: int):
        """run(feeds) -> {"logits": ...} for a GroupQueryAttention graph: every past input and
        its present output are bound to one zeroed [batch, heads, capacity, head_dim] OrtValue,
        which GQA fills in place at the slots the attention mask's length says (the graph takes
        seqlens and total length from the mask, never from the buffer's size)."""
        import onnxruntime as ort

        sess = self.session.session
        io = sess.io_binding()
        io.bind_output("logits")  # first: get_outputs()[0]; rebinding a name keeps its slot
        self._buffers = []  # alive as long as the binding
        for p, q in zip(self.past_names, self.present_names):
            shape = [batch if d == "batch_size" else (capacity if isinstance(d, str) else d) for d in self.past_dims[p]]
            buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.kv_dtype))
            self._buffers.append(buf)
            io.bind_ortvalue_input(p, buf)
            io.bind_ortvalue_output(q, buf)

        past = set(self.past_names)
        logits_dtype = np.dtype(next(o.dtype for o in self.session.entry.outputs if o.name == "logits"))
        # one-token steps write their logits into a preallocated array (no allocation, no
        # wrapping of every output per step); the prompt's logits are allocated by ORT
        step_logits = np.empty((batch, 1, self.vocab_size), dtype=logits_dtype)
        step_value = ort.OrtValue.ortvalue_from_numpy(step_logits)
        self._buffers.append(step_value)

        # inputs backed by an initializer (logits_to_keep) bind only as OrtValues, kept alive here
        optional, held = set(self.session.optional), {}

        def run(feeds: dict) -> dict:
            for name, value in feeds.items():
                if name in optional:
                    held[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                    io.bind_ortvalue_input(name, held[name])
                elif name not in past:
                    io.bind_cpu_input(name, np.ascontiguousarray(value))
            tokens = feeds["input_ids"] if "input_ids" in feeds else feeds["inputs_embeds"]
            if tokens.shape[1] == 1:
                io.bind_ortvalue_output("logits", step_value)
                sess.run_with_iobinding(io)
                return {"logits": step_logits}
            io.bind_output("logits")
            sess.run_with_iobinding(io)
            return {"logits": io.get_outputs()[0].numpy()}

        return run

    def _generate_steps(self, prompts, max_new_tokens, sampler, eos, on_token, embeds=None) -> GenerationResult:
        """One-token-per-call graphs (recurrent states): each row alone, its prompt fed token by
        token (the state after a prompt does not depend on how it was chunked; a padded batch
        would push pad tokens through the recurrence). `embeds`: a pipeline's left-padded
        prompt embeddings [batch, longest, hidden], fed instead of the prompt tokens' own."""
        padded = np.full((len(prompts), max_new_tokens), self.pad_id, dtype=np.int64)
        prefill_ms = decode_ms = 0.0
        steps = 0
        for r, prompt in enumerate(prompts):
            past = {n: self._empty_past(n, 1) for n in self.past_names}
            row_embeds = None if embeds is None else embeds[r, embeds.shape[1] - len(prompt):]
            t0 = time.perf_counter()
            n_new = 0
            fed = list(prompt)
            pos = 0
            while True:
                tok_in = fed[pos]
                given = row_embeds[None, pos:pos + 1] if row_embeds is not None and pos < len(prompt) else None
                feeds = self._feeds(np.array([[tok_in]], dtype=np.int64), np.ones((1, pos + 1), dtype=np.int64),
                                    np.array([[pos]], dtype=np.int64), past, given)
                outs = self.session.run(feeds, check=pos == 0)
                past = {p: outs[q] for p, q in zip(self.past_names, self.present_names)}
                pos += 1
                if pos < len(prompt):
                    continue
                tok = int(sampler(outs["logits"][:, -1, :])[0])
                if n_new == max_new_tokens - 1 and self.forced.get("eos") is not None:
                    tok = int(self.forced["eos"])
                dt = (time.perf_counter() - t0) * 1000
                t0 = time.perf_counter()
                if n_new == 0:
                    prefill_ms += dt
                else:
                    decode_ms += dt
                    steps += 1
                padded[r, n_new] = tok
                n_new += 1
                if on_token is not None:
                    on_token(r, tok)
                if tok in eos or n_new == max_new_tokens:
                    break
                fed.append(tok)
        longest = max(len(_cut_at_eos(row, eos)) for row in padded.tolist())
        padded = padded[:, :longest]
        tokens = [_cut_at_eos(row, eos) for row in padded.tolist()]
        return GenerationResult(tokens, padded, prefill_ms=prefill_ms, decode_ms=decode_ms, decode_tokens=steps)

    def _generate_speculative(self, prompts, max_new_tokens, eos, on_token, k: int, unsupported: bool, draft=None):
        """Drafts of up to `k` tokens (prompt lookup, or the `draft` model's) verified in one
        forward (runtime/speculative.py): greedy only, one prompt at a time; the tokens are plain
        greedy decoding's."""
        from onnxport.runtime.speculative import DraftModel, prompt_lookup, same_tokenizer

        if unsupported:
            raise RuntimeInputError("speculative decoding is greedy and text-only here",
                                    "drop --sample (or --speculative)")
        if k < 1:
            raise RuntimeInputError(f"--speculative must be >= 1 drafted tokens, got {k}", "pass e.g. --speculative 8")
        if draft is not None:
            same_tokenizer(self, draft)
        rows, total = [], {"forwards": 0, "drafted": 0, "accepted": 0, "prefill_ms": 0.0, "decode_ms": 0.0,
                           "decode_tokens": 0, "draft_ms": 0.0}
        for r, prompt in enumerate(prompts):
            cb = (lambda _row, tok, r=r: on_token(r, tok)) if on_token else None
            drafter = DraftModel(draft, k) if draft is not None else None
            toks, stats = prompt_lookup(self, prompt, max_new_tokens, eos, k, on_token=cb, drafter=drafter)
            rows.append(toks)
            for key in total:
                total[key] += stats[key]
        padded = _pad_rows(rows, self.pad_id)
        total["tokens_per_forward"] = round(total["decode_tokens"] / total["forwards"], 3) if total["forwards"] else 0.0
        # MatMulNBits accuracy_level 4 rounds activations to int8: a 1e-7 difference between the
        # one-token and several-token kernels upstream can flip a rounding (measured: up to ~1
        # logit on SmolLM2 int4), so at a near-tie the verified token may differ from plain decoding's
        q = self.manifest.graph("decoder").quantization if self.split is None else None
        total["int8_activations"] = bool(q and q.get("accuracy_level") == 4)
        return GenerationResult([_cut_at_eos(t, eos) for t in rows], padded, prefill_ms=total["prefill_ms"],
                                decode_ms=total["decode_ms"], decode_tokens=total["decode_tokens"], speculative=total)

    def _generate_split(self, prompts, max_new_tokens, sampler, eos, on_token, do_sample) -> GenerationResult:
        """Split bundles run one sequence at a time; results are laid out like the batched path
        (rows padded with the pad token after EOS)."""
        if do_sample and self.split.head == "argmax":
            raise RuntimeInputError("this bundle's lm_head returns argmax tokens; it cannot sample",
                                    "re-export with --head logits or --head topk:K to sample")
        rows = []
        prefill_ms = decode_ms = 0.0
        steps = 0
        for r, prompt in enumerate(prompts):
            cb = (lambda _row, tok, r=r: on_token(r, tok)) if on_token else None
            toks, pre, dec = self.split.generate_one(prompt, max_new_tokens, sampler, eos, cb)
            rows.append(toks)
            prefill_ms += pre
            decode_ms += dec
            steps += len(toks) - 1
        padded = _pad_rows(rows, self.pad_id)
        longest = max(len(_cut_at_eos(row, eos)) for row in padded.tolist())
        padded = padded[:, :longest]
        tokens = [_cut_at_eos(row, eos) for row in padded.tolist()]
        return GenerationResult(tokens, padded, prefill_ms=prefill_ms, decode_ms=decode_ms, decode_tokens=steps)


def _pad_rows(rows: list[list[int]], pad_id: int) -> np.ndarray:
    """Token rows of one sequence each, laid out as one batch (padded with the pad token)."""
    padded = np.full((len(rows), max(map(len, rows))), pad_id, dtype=np.int64)
    for r, toks in enumerate(rows):
        padded[r, :len(toks)] = toks
    return padded


def _stack(rows: list[GenerationResult], pad_id: int) -> GenerationResult:
    """One-prompt results laid out as one batch (rows padded with the pad token)."""
    padded = _pad_rows([r.padded[0].tolist() for r in rows], pad_id)
    return GenerationResult([r.tokens[0] for r in rows], padded, prefill_ms=sum(r.prefill_ms for r in rows),
                            decode_ms=sum(r.decode_ms for r in rows), decode_tokens=sum(r.decode_tokens for r in rows))


def _shift_rows(a: np.ndarray, shift: np.ndarray, axis: int) -> np.ndarray:
    """Each row r (batch axis: the first, or the second of [3, batch, seq] position ids) of
    `a` rolled by shift[r] along `axis`: left <-> right padding."""
    a = np.asarray(a)
    batch_axis = 1 if a.ndim == 3 and axis == -1 else 0
    out = np.empty_like(a)
    for r, s in enumerate(shift):
        idx = [slice(None)] * a.ndim
        idx[batch_axis] = r
        out[tuple(idx)] = np.roll(a[tuple(idx)], int(s), axis=axis if axis < 0 else axis - 1)
    return out


def _cut_at_eos(row: list[int], eos: list[int]) -> list[int]:
    cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return row[:cut]
