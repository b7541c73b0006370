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


def test_pad_position_is_what_generate_feeds(tiny_llama):
    """Left-padded slots get position 1 in 4.x's generate and 0 in 5.x's: the runtime feeds the
    value the exporting transformers used (it matters when padded states leak: git)."""
    seen = []
    hook = tiny_llama.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        tiny_llama.generate(input_ids=torch.tensor([[0, 0, 5, 6]]), attention_mask=torch.tensor([[0, 0, 1, 1]]),
                            max_new_tokens=1, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert seen[0][0, 2:].tolist() == [0, 1]
    assert seen[0][0, 0].item() == compat.generate_pad_position()


def test_recurrent_states_round_trip_through_a_step_cache():
    """5.x linear-attention layers: probe_cache reads their conv / recurrent states, and a
    step cache built from flat tensors gives the model's own next step."""
    if compat.TRANSFORMERS_VERSION.major < 5:
        pytest.skip("4.x keeps recurrent state in model-specific cache classes (refused)")
    from onnxport.testing.tiny import tiny_causal_lm

    model = tiny_causal_lm("lfm3")
    kv = compat.probe_cache(model)
    assert kv.has_states and [bool(x.states) for x in kv.layers] == [True, False]
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        out = model(input_ids=ids[:, :2], attention_mask=torch.ones(1, 2, dtype=torch.long), use_cache=True)
        cache = compat.output_cache(out)
        flat = [t.clone() for t in compat.state_cache_tensors(cache, kv)]  # the step updates in place
        ref = model(input_ids=ids[:, 2:], attention_mask=torch.ones(1, 3, dtype=torch.long), use_cache=True,
                    **{compat.cache_kwarg(model.forward): cache}).logits
        tensors = {}
        it = iter(flat)
        for i, layer in enumerate(kv.layers):
            if layer.has_kv:
                tensors[(i, "key")], tensors[(i, "value")] = next(it), next(it)
            for st in layer.states:
                tensors[(i, st.suffix)] = next(it)
        rebuilt = compat.build_state_cache(kv, tensors)
        got = model(input_ids=ids[:, 2:], attention_mask=torch.ones(1, 3, dtype=torch.long), use_cache=True,
                    **{compat.cache_kwarg(model.forward): rebuilt}).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
