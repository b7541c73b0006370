"""One test per transformers shim (onnxport.hf.compat), run on every tested major: CI runs this
file with transformers 5.x, .ci/transformers4 with 4.57, .ci/transformers-next with the newest."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from onnxport.hf import compat


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_cache_kwarg_is_a_parameter_of_the_layer_and_the_model(tiny_llama):
    layer = tiny_llama.model.layers[0]
    for fn in (layer.forward, tiny_llama.forward, layer.self_attn.forward):
        name = compat.cache_kwarg(fn)
        assert name in compat.CACHE_KWARGS
        assert name in inspect.signature(fn).parameters, (fn, name)


def test_layer_cache_kwarg_really_fills_the_cache(tiny_llama):
    """The 5.24 break: a layer called with a name it does not know leaves the cache empty."""
    layer = tiny_llama.model.layers[0]
    seen = {}

    class Capture:
        def update(self, k, v, layer_idx, *a, **kw):
            seen[layer_idx] = k.shape
            return k, v

        def get_seq_length(self, layer_idx=0):
            return 0

    h = torch.randn(1, 3, 32)
    pos = torch.arange(3)[None]
    cos_sin = tiny_llama.model.rotary_emb(h, pos)
    layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin, use_cache=True,
          **{compat.cache_kwarg(layer.forward): Capture()})
    assert seen == {0: torch.Size([1, 2, 3, 8])}


def test_dynamic_cache_round_trip_and_model_output_cache(tiny_llama):
    pairs = [(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)) for _ in range(2)]
    cache = compat.build_dynamic_cache(pairs)
    assert all(torch.equal(a, b) for p, q in zip(compat.cache_pairs(cache), pairs) for a, b in zip(p, q))
    with torch.no_grad():
        out = tiny_llama(input_ids=torch.tensor([[1, 2]]), use_cache=True,
                         **{compat.cache_kwarg(tiny_llama.forward): cache})
    got = compat.cache_pairs(compat.output_cache(out))
    assert [tuple(k.shape) for k, _ in got] == [(1, 2, 7, 8)] * 2
    assert torch.equal(got[0][0][:, :, :5], pairs[0][0])


def test_dtype_kwarg_is_accepted_by_from_pretrained(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path, safe_serialization=True)
    m = AutoModelForCausalLM.from_pretrained(tmp_path, **compat.dtype_kwarg(torch.float16))
    assert m.dtype == torch.float16
    key = next(iter(compat.dtype_kwarg(torch.float16)))
    assert key == ("dtype" if compat.TRANSFORMERS_VERSION.release >= (4, 56) else "torch_dtype")


def test_text_config_of_nested_and_flat_configs():
    flat = AutoConfig.for_model("llama", hidden_size=32)
    assert compat.text_config(flat).hidden_size == 32
    nested = AutoConfig.for_model("llava", text_config={"model_type": "llama", "hidden_size": 48,
                                                          "num_attention_heads": 4})
    assert compat.text_config(nested).hidden_size == 48


def test_require_transformers_names_the_version():
    compat.require_transformers(4, "test")
    with pytest.raises(Exception, match=f"needs transformers >= 99.*installed {transformers.__version__}"):
        compat.require_transformers(99, "test")
