"""Reading a local Hugging Face checkpoint: config, safetensors headers, tokenizer files.

Nothing here imports torch: the checks (missing files, pickle-only weights, truncated
safetensors, shapes) run before any model is built, so bad input fails fast and cheaply.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from onnxport.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    # chat templates stored beside the tokenizer config (transformers >= 4.43 / 5.x)
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    #: where the tensor's bytes sit in its file (absolute offset, length)
    offset: int = 0
    nbytes: int = 0


@dataclass
class Checkpoint:
    """A validated local checkpoint folder."""

    path: Path
    config: dict
    weight_files: list[Path]
    pickle_weights: bool
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    #: (thread, result) of hash_in_background()
    _hashing: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def sha256(self) -> str:
        """Hash of config.json and every weight file (streamed), identifying the source. After
        `hash_in_background()`, waits for that thread's result."""
        if self._hashing is not None:
            thread, result = self._hashing
            thread.join()
            if "error" in result:
                raise result["error"]
            return result["sha256"]
        return self._hash_files()

    def _hash_files(self) -> str:
        h = hashlib.sha256()
        for f in [self.path / "config.json", *sorted(self.weight_files)]:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()

    def hash_in_background(self) -> None:
        """Start `sha256()` on a thread (hashlib and file reads release the GIL), so reading
        the weights once more overlaps loading and tracing instead of adding to them (1 s per
        2 GB here). A daemon thread: a failed export does not wait for it."""
        import threading

        if self._hashing is not None:
            return
        result: dict = {}

        def run() -> None:
            try:
                result["sha256"] = self._hash_files()
            except Exception as e:  # noqa: BLE001 - raised where sha256() is asked for
                result["error"] = e

        thread = threading.Thread(target=run, name="checkpoint-sha256", daemon=True)
        self._hashing = (thread, result)
        thread.start()


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check the file really holds every tensor it declares."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds file size {size}")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{file.name} is not a valid safetensors file ({e})",
            "re-download or re-save the checkpoint with `save_pretrained(safe_serialization=True)`",
        ) from None
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            dtype, shape = meta["dtype"], tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{file.name}: malformed header entry for tensor {name!r}",
                "re-save the checkpoint with safetensors",
            ) from None
        if end > data_len:
            raise CheckpointError(
                f"{file.name} is truncated: tensor {name!r} ends at byte {end} "
                f"but the file holds only {data_len} data bytes",
                "the download or copy was interrupted; fetch the file again",
            )
        out[name] = TensorInfo(name, _SAFETENSORS_DTYPES.get(dtype, dtype), shape, file.name, 8 + n + int(start),
                               int(end) - int(start))
    return out


def _index_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index.name} is not valid JSON ({e})", "fetch the checkpoint again") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index.name} has no weight_map", "fetch the checkpoint again")
    return weight_map


def _shards_from_index(folder: Path, index: Path, st_files: list[Path]) -> list[Path]:
    """The shard files a sharded checkpoint's index names: all present, and no other
    *.safetensors beside them (a stale shard would mix weights of two versions)."""
    named = sorted(set(_index_map(index).values()))
    missing = [n for n in named if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{index.name} names {missing[0]}, which is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                              "the download is incomplete; fetch the missing shards")
    stray = [f.name for f in st_files if f.name not in named]
    if stray:
        raise CheckpointError(f"{stray[0]} is not listed in {index.name}",
                              "remove stale weight files from the checkpoint folder, or fix the index")
    return [folder / n for n in named]


def _check_index(index: Path, where: dict[str, str]) -> None:
    for name, file in _index_map(index).items():
        if where.get(name) != file:
            got = f"it is in {where[name]}" if name in where else "no shard holds it"
            raise CheckpointError(f"{index.name} puts {name!r} in {file}, but {got}",
                                  "the shards and their index disagree; fetch the checkpoint again")


#: sizes a model cannot have fewer than one of
POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "head_dim", "max_position_embeddings", "d_model", "n_embd", "n_layer", "n_head")
#: name endings of sizes and counts, none of which can be negative
_SIZE_SUFFIXES = ("_size", "_dim", "_heads", "_layers", "_embeddings", "_experts", "_positions")


def check_config_sizes(config: dict, where: str = "config.json") -> None:
    """One line for a size no model can have (`hidden_size: -64`, `vocab_size: 0`), before
    transformers or torch fail on it deep inside (config.json and its nested sub-configs)."""
    for key, value in config.items():
        if isinstance(value, dict):
            check_config_sizes(value, f"{where}:{key}")
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if (key in POSITIVE and value < 1) or (key.endswith(_SIZE_SUFFIXES) and value < 0):
            raise CheckpointError(f"{where} sets {key} to {value}; a model needs {'at least 1' if key in POSITIVE else 'a size >= 0'}",
                                  "fix config.json (it does not describe a model that can be built)")


def open_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Validate a checkpoint folder and read its config and tensor headers (no weights)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"model folder {str(p)!r} does not exist",
            "pass a local Hugging Face checkpoint folder (config.json + *.safetensors)",
        )
    if not p.is_dir():
        raise CheckpointError(
            f"{str(p)!r} is a file, not a checkpoint folder",
            "pass the folder that holds config.json and the *.safetensors files",
        )
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{str(p)!r} has no config.json",
            "a Hugging Face checkpoint folder needs config.json (save it with save_pretrained)",
        )
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config.json is not valid JSON ({e})", "fix or re-save config.json") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(
            "config.json has no model_type", "re-save the config with transformers' save_pretrained"
        )
    check_config_sizes(config)
    st_files = sorted(p.glob("*.safetensors"))
    pk_files = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    index = p / "model.safetensors.index.json"
    if index.is_file():
        st_files = _shards_from_index(p, index, st_files)
    if st_files:
        ckpt = Checkpoint(p, config, st_files, pickle_weights=False)
        where: dict[str, str] = {}
        for f in st_files:
            header = read_safetensors_header(f)
            for name in header:
                if name in where:  # never let one file silently replace another's tensor
                    raise CheckpointError(f"tensor {name!r} is in both {where[name]} and {f.name}",
                                          "remove the stale or duplicate weight file")
                where[name] = f.name
            ckpt.tensors.update(header)
        if index.is_file():
            _check_index(index, where)
        return ckpt
    if pk_files:
        if not allow_pickle:
            raise CheckpointError(
                f"{str(p)!r} has only pickle weights ({pk_files[0].name}); pickle can run arbitrary code",
                "convert them to safetensors, or pass --allow-pickle if you trust the source",
            )
        return Checkpoint(p, config, pk_files, pickle_weights=True)
    raise CheckpointError(
        f"{str(p)!r} has no weight files (*.safetensors)",
        "save the model with save_pretrained(safe_serialization=True)",
    )
