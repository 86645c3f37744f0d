"""The "omni" transformers attention backend against transformers' own "eager" attention,
on random-initialised models: a Llama-style decoder with grouped-query heads (causal,
left-padded batch, and greedy generation through the KV cache) and a BERT encoder
(bidirectional, right-padded batch). Each runs on the torch reference and on the Triton
kernel under the interpreter. fp32 logits must agree to 1e-5 relative on the real tokens
(padded positions are undefined in eager and zero here)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from omni_core.integrations.transformers import register  # noqa: E402

BACKENDS = ["reference", "triton"]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def build(make_config, model_class, attn: str, seed: int):
    torch.manual_seed(seed)
    return model_class(make_config()).eval() if attn == "eager" else \
        model_class._from_config(make_config(), attn_implementation=attn).eval()


@pytest.fixture(autouse=True)
def calls(monkeypatch):
    """Counts the backend's calls into the op, so a silent fallback to eager would fail."""
    import omni_core.integrations.transformers as integration

    count = []
    op = integration.varlen_attention

    def counted(*args, **kwargs):
        count.append(1)
        return op(*args, **kwargs)

    monkeypatch.setattr(integration, "varlen_attention", counted)
    yield count
    assert count, "the omni backend never ran"


def pair(make_config, model_class):
    """The same random weights under "eager" and "omni"."""
    register()
    seed = int(torch.randint(0, 2**31, (1,)))
    eager = build(make_config, model_class, "eager", seed)
    omni = build(make_config, model_class, "omni", seed)
    omni.load_state_dict(eager.state_dict())
    assert omni.config._attn_implementation == "omni"
    return eager, omni


def llama_config():
    return transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    attn_implementation="eager")


def bert_config():
    return transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=96, max_position_embeddings=64, attn_implementation="eager")


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_gqa_causal_left_padded(backend, monkeypatch):
    monkeypatch.setenv("OMNI_BACKEND", backend)
    eager, omni = pair(llama_config, transformers.LlamaForCausalLM)
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0  # left padding, as for batched generation
    mask[2, :1] = 0
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask).logits
        got = omni(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(got[real], ref[real]) <= 1e-5
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_greedy_generation_through_the_kv_cache(backend, monkeypatch):
    monkeypatch.setenv("OMNI_BACKEND", backend)
    eager, omni = pair(llama_config, transformers.LlamaForCausalLM)
    ids = torch.randint(0, 97, (2, 6))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(omni.generate(ids, **kwargs), eager.generate(ids, **kwargs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_bidirectional_right_padded(backend, monkeypatch):
    monkeypatch.setenv("OMNI_BACKEND", backend)
    eager, omni = pair(bert_config, transformers.BertForMaskedLM)
    ids = torch.randint(0, 97, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 12:] = 0
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask).logits
        got = omni(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(got[real], ref[real]) <= 1e-5


def test_unsupported_features_are_named(calls):
    calls.append(1)  # nothing runs here
    from omni_core.integrations.transformers import omni_attention_forward

    x = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="sliding_window"):
        omni_attention_forward(module, x, x, x, None, sliding_window=4)
    with pytest.raises(NotImplementedError, match="2-D padding masks"):
        omni_attention_forward(module, x, x, x, torch.ones(1, 1, 3, 3, dtype=torch.bool))
