"""Tokenizer for the runtime: the `tokenizers` library on the bundle's tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

from onnxport.bundle import bundle_file
from onnxport.errors import BundleError


class BundleTokenizer:
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        f = bundle_file(folder, "tokenizer.json")
        if f is None or not f.is_file():
            raise BundleError(
                f"{folder} has no tokenizer.json",
                "copy the checkpoint's fast tokenizer (tokenizer.json) into the bundle, or pass token ids",
            )
        try:
            self._tok = Tokenizer.from_file(str(f))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise BundleError(f"{f.name} cannot be read: {str(e).splitlines()[0][:160]}",
                              "copy the checkpoint's tokenizer.json into the bundle again") from None
        cfg = _read_json(bundle_file(folder, "tokenizer_config.json"))
        self.add_special_tokens = True
        bos = cfg.get("bos_token")
        self.bos_token = bos.get("content") if isinstance(bos, dict) else bos
        self.add_bos_token = bool(cfg.get("add_bos_token", False))

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `text`. `add_special_tokens=False` encodes the text alone, as transformers
        does for a rendered chat template (which writes bos itself); None: the bundle's default."""
        if add_special_tokens is False:
            return self._tok.encode(text, add_special_tokens=False).ids
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        ids = self._tok.encode(text, add_special_tokens=special).ids
        if self.add_bos_token and self.bos_token is not None:
            bos = self._tok.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (an added token's content included), None if absent."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class StreamDecoder:
    """Incremental detokenisation: `push(token)` returns the text that token adds, holding back
    while the text ends in an incomplete UTF-8 sequence (byte-level BPE splits characters)."""

    def __init__(self, tokenizer: BundleTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.startswith(self.text) or text.endswith("\ufffd"):
            return ""
        new, self.text = text[len(self.text):], text
        return new


def _read_json(p: Path | None) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8")) if p is not None and p.is_file() else {}
        return data if isinstance(data, dict) else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def special_ids(folder: Path, forced: dict | None = None) -> tuple[list[int], int | None]:
    """(eos ids, pad id) from generation_config.json, then config.json; `forced` (a dict) gets
    the forced first / last token ids (`forced_bos_token_id`, `forced_eos_token_id`: BART-like
    models, which transformers' generate enforces) under "bos" / "eos"."""
    forced = {} if forced is None else forced
    gen, cfg = _read_json(bundle_file(folder, "generation_config.json")), _read_json(bundle_file(folder, "config.json"))
    text = cfg.get("text_config", cfg)

    def pick(key):
        for src in (gen, cfg, text):
            if src.get(key) is not None:
                return src[key]
        return None

    eos = pick("eos_token_id")
    forced["bos"], forced["eos"] = pick("forced_bos_token_id"), pick("forced_eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = pick("pad_token_id")
    return eos_ids, pad
