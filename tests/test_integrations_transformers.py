"""Hugging Face integration: ``attn_implementation="dilated"`` on a tiny random Llama (built
from a config, no weights downloaded), against SDPA/eager and the dense reference."""

from __future__ import annotations

import importlib
import sys
from copy import deepcopy
from typing import Any

import pytest
import torch
from conftest import ATOL, assert_within_budget, requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    StaticCache,
)
from transformers.masking_utils import (  # noqa: E402
    AttentionMaskInterface,
    and_masks,
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from dilattn.integrations import transformers as dilattn_hf  # noqa: E402
from dilattn.integrations.transformers import DilatedMask  # noqa: E402
from dilattn.reference import dilated_attention_reference  # noqa: E402

VOCAB = 97
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


class ReferenceAttention:
    """An attention function from the test's own knowledge: the dense reference with the
    padding the test set, queries at the last positions; HF's mask is ignored."""

    def __init__(self) -> None:
        self.padding: torch.Tensor | None = None

    def __call__(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: object,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        options = module.config.dilated_attention
        out = dilated_attention_reference(
            query,
            key,
            value,
            options["segment_lengths"],
            options["dilation_rates"],
            is_causal=True,
            scale=scaling,
            enable_gqa=True,
            key_padding_mask=self.padding,
            q_offset=key.shape[2] - query.shape[2],
        )
        return out.transpose(1, 2), None


REFERENCE = ReferenceAttention()
dilattn_hf.register()  # "dilated", configured by each model's config
dilattn_hf.register([4, 8], [1, 2], name="dilated_default", backend="math")
AttentionInterface.register("dilated_reference", REFERENCE)
AttentionMaskInterface.register("dilated_reference", sdpa_mask)


def tiny_llama(
    attn: str,
    segment_lengths: list[int] | None,
    dilation_rates: list[int] | None,
    dtype: torch.dtype = torch.float64,
    **config: Any,
) -> LlamaForCausalLM:
    """A random Llama: 2 layers, hidden 64, 4 heads, 2 key/value heads."""
    options = {"segment_lengths": segment_lengths, "dilation_rates": dilation_rates}
    extra = {} if segment_lengths is None else {"dilated_attention": options}
    cfg = LlamaConfig(**TINY, **extra, **config)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()


def logits_with(
    model: LlamaForCausalLM, attn: str, ids: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    model.set_attn_implementation(attn)
    return model(ids, use_cache=False, **kwargs).logits


def padding_mask(batch: int, length: int, side: str, gen: torch.Generator) -> torch.Tensor:
    """HF's 2-D mask (1 = token): random pad lengths on ``side``; the first row unpadded."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        pad = int(torch.randint(0, length, (1,), generator=gen))
        if side == "left":
            mask[row, :pad] = 0
        elif side == "right":
            mask[row, length - pad :] = 0
    return mask


@pytest.mark.parametrize("other", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_one_dense_branch_is_the_model_with_sdpa_or_eager(other: str, side: str) -> None:
    """With ``segment_lengths=[S], dilation_rates=[1]`` dilated attention is full causal
    attention: the same logits as SDPA/eager with the same weights, on every real token.
    In float32: eager softmaxes in float32, where float64's masked rows turn into NaN."""
    S = 13
    model = tiny_llama("dilated", [S], [1], torch.float32)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, S), generator=gen)
    mask = padding_mask(3, S, side, gen)
    ours = logits_with(model, "dilated", ids, attention_mask=mask)
    theirs = logits_with(model, other, ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real])
    shorter = tiny_llama("dilated", [4], [1], torch.float32)
    shorter = logits_with(shorter, "dilated", ids, attention_mask=mask)
    assert not torch.allclose(shorter[real], theirs[real])  # the branches do change the model


@settings(max_examples=12)
@given(
    branches=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 4)), min_size=1, max_size=3),
    length=st.integers(1, 20),
    batch=st.integers(1, 3),
    side=st.sampled_from(["none", "left", "right"]),
    seed=st.integers(0, 2**16),
)
def test_dilated_model_equals_the_reference(
    branches: list[tuple[int, int]], length: int, batch: int, side: str, seed: int
) -> None:
    """A real dilated configuration (odd lengths, ``w % r != 0``, GQA, padding): the model's
    logits equal those of the same model whose attention is the dense reference."""
    branches = [(w, min(r, w)) for w, r in branches]
    model = tiny_llama("dilated", [w for w, _ in branches], [r for _, r in branches])
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    mask = padding_mask(batch, length, side, gen)
    ours = logits_with(model, "dilated", ids, attention_mask=mask)
    REFERENCE.padding = ~mask.bool()
    truth = logits_with(model, "dilated_reference", ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], truth[real], atol=ATOL[torch.float64], rtol=1e-9)


def test_register_defaults_apply_when_the_config_has_none() -> None:
    model = tiny_llama("dilated_default", None, None)
    ids = torch.randint(0, VOCAB, (2, 11))
    ours = logits_with(model, "dilated_default", ids)
    model.config.dilated_attention = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}
    REFERENCE.padding = None
    torch.testing.assert_close(ours, logits_with(model, "dilated_reference", ids))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True])
def test_decoding_with_a_cache_gives_the_full_forward(cache: str, padded: bool) -> None:
    """Prefill, then one token at a time: each step's logits are the full forward's rows (the
    queries sit at the cache's offset, also in a static cache longer than the text)."""
    S, prompt = 12, 5
    model = tiny_llama("dilated", [4, 8], [1, 3])
    ids = torch.randint(0, VOCAB, (2, S))
    mask = torch.ones(2, S, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # left padding, as in generation
    full = model(ids, attention_mask=mask, use_cache=False).logits
    kv = DynamicCache(config=model.config) if cache == "dynamic" else None
    if kv is None:
        kv = StaticCache(config=model.config, max_cache_len=20)
    steps = [model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=kv).logits]
    for t in range(prompt, S):
        step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=kv)
        steps.append(step.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real])


def generate_greedy(
    model: LlamaForCausalLM, attn: str, cache: str, new_tokens: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate`` on a fixed batch of two 9-token prompts, the second left-padded,
    with a ``"dynamic"`` cache, ``cache_implementation="static"`` or a ``StaticCache`` (longer
    than the text): the tokens and the logits of every step ``(steps, B, vocab)``."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    options: dict[str, Any] = {}
    if cache == "static":
        options["cache_implementation"] = "static"
    elif cache == "StaticCache":
        options["past_key_values"] = StaticCache(config=model.config, max_cache_len=24)
    model.set_attn_implementation(attn)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **options,
    )
    return out.sequences, torch.stack(out.logits)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("branches", "cache"),
    [
        ("dense", "dynamic"),
        ("dense", "static"),
        ("dense", "StaticCache"),
        ("dilated", "static"),
        ("dilated", "StaticCache"),
    ],
)
def test_generate_equals_the_dynamic_cache_and_sdpa_for_one_dense_branch(
    branches: str, cache: str
) -> None:
    """Greedy ``generate`` with the cache: the tokens (and logits) of the dynamic cache;
    with one dense branch also those of SDPA (full attention). 9 + 8 tokens span several
    segments of ``[4, 8]``, so the dilated model differs from full attention."""
    dense = branches == "dense"
    model = tiny_llama("dilated", *(([64], [1]) if dense else ([4, 8], [1, 3])))
    tokens, logits = generate_greedy(model, "dilated", cache)
    want, want_logits = generate_greedy(model, "dilated", "dynamic")
    sdpa, sdpa_logits = generate_greedy(model, "sdpa", "dynamic")
    assert torch.equal(tokens, want)
    torch.testing.assert_close(logits, want_logits)
    if dense:
        assert torch.equal(tokens, sdpa)
        torch.testing.assert_close(logits, sdpa_logits)
    else:
        assert not torch.allclose(logits, sdpa_logits)  # the branches do change the model


class Layer(nn.Module):
    """What the attention function reads from a layer: ``config`` and ``is_causal``."""

    def __init__(self, is_causal: bool, branches: dict[str, list[int]]) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.config = LlamaConfig(**TINY, dilated_attention=branches)


@settings(max_examples=30)
@given(
    q_len=st.integers(1, 10),
    extra_keys=st.integers(0, 8),
    data=st.data(),
    is_causal=st.booleans(),
    form=st.sampled_from(["bool", "-inf", "min"]),
    kv_heads=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_four_d_masks_are_read_exactly(
    q_len: int,
    extra_keys: int,
    data: st.DataObject,
    is_causal: bool,
    form: str,
    kv_heads: int,
    seed: int,
) -> None:
    """A 4-D causal (or full) mask with key padding, queries anywhere in a longer key range
    (a static cache) when causal: the layer computes the reference with that padding and
    offset. Some query sees its own key, which is what fixes the offset."""
    kv_len = q_len + extra_keys
    q_offset = data.draw(st.integers(0, extra_keys)) if is_causal else extra_keys
    gen = torch.Generator().manual_seed(seed)
    B, H, D = 2, 4, 8
    q = torch.randn(B, H, q_len, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, kv_heads, kv_len, D, generator=gen, dtype=torch.float64) for _ in "kv")
    padding = torch.rand(B, kv_len, generator=gen) < 0.3
    padding[0, q_offset + q_len - 1] = False
    visible = DilatedMask(is_causal, q_offset, padding).visible(q_len, kv_len, q.device)
    mask = visible if form == "bool" else torch.zeros(visible.shape, dtype=torch.float64)
    if form != "bool":
        blocked = -torch.inf if form == "-inf" else torch.finfo(torch.float64).min
        mask = mask.masked_fill(~visible, blocked)
    branches = {"segment_lengths": [3, 5], "dilation_rates": [1, 2]}
    attention = AttentionInterface()["dilated"]
    out, weights = attention(Layer(is_causal, branches), q, k, v, mask, scaling=0.3)
    truth = dilated_attention_reference(
        q,
        k,
        v,
        [3, 5],
        [1, 2],
        is_causal=is_causal,
        scale=0.3,
        enable_gqa=True,
        key_padding_mask=padding,
        q_offset=q_offset,
    )
    assert weights is None
    assert out.shape == (B, q_len, H, D)
    torch.testing.assert_close(out, truth.transpose(1, 2))


def _call(mask: object, *, is_causal: bool = True, q_len: int = 6, **kwargs: Any) -> None:
    q = torch.randn(1, 4, q_len, 8)
    k = v = torch.randn(1, 2, 6, 8)
    layer = Layer(is_causal, {"segment_lengths": [4], "dilation_rates": [1]})
    AttentionInterface()["dilated"](layer, q, k, v, mask, **kwargs)


CAUSAL = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]


@pytest.mark.parametrize(
    ("mask", "kwargs", "error", "match"),
    [
        (torch.ones(1, 1, 6, 6, dtype=torch.bool), {}, ValueError, "not causal"),  # full
        (CAUSAL.roll(1, dims=-1), {}, ValueError, "not causal"),  # shifted diagonal
        (CAUSAL.expand(1, 4, 6, 6), {}, ValueError, "one mask for all heads"),
        (torch.zeros(1, 1, 6, 6).masked_fill(~CAUSAL, -1.0), {}, ValueError, "values other"),
        (CAUSAL.long(), {}, TypeError, "bool or floating"),
        (CAUSAL[..., :5], {}, ValueError, "shape"),
        (CAUSAL, {"is_causal": False}, ValueError, "not causal or full"),
        ([[1]], {}, TypeError, "DilatedMask, a 4-D tensor or None"),
        (None, {"sliding_window": 4}, ValueError, "sliding_window=4"),
        (None, {"softcap": 30.0}, ValueError, "soft-capping"),
        (None, {"s_aux": torch.zeros(4)}, ValueError, "sinks"),
        (None, {"position_bias": torch.zeros(1)}, ValueError, "position bias"),
        (None, {"cu_seq_lens_q": torch.tensor([0, 6])}, ValueError, "packed"),
        (None, {"output_attentions": True}, ValueError, "eager"),
        (None, {"q_len": 7}, ValueError, "S_q <= S_kv"),
    ],
)
def test_what_cannot_be_expressed_is_refused(
    mask: object, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _call(mask, **kwargs)


@pytest.mark.parametrize(
    ("mask_function", "kv_offset", "expected"),
    [
        (causal_mask_function, 0, True),
        (and_masks(causal_mask_function, lambda b, h, q, kv: q >= 0), 0, True),
        (sliding_window_causal_mask_function(20), 0, True),  # wider than the sequence
        (sliding_window_causal_mask_function(3), 0, "not causal"),
        (causal_mask_function, 2, "kv_offset=2"),
    ],
    ids=["causal", "overlay", "wide-window", "window", "kv-offset"],
)
def test_mask_builder(mask_function: Any, kv_offset: int, expected: bool | str) -> None:
    """Plain causal masks become a DilatedMask directly; other patterns only if they equal
    causal or full attention with key padding."""
    tokens = torch.ones(2, 9, dtype=torch.bool)  # HF's 2-D mask: True = token
    tokens[1, :3] = False
    builder = AttentionMaskInterface()["dilated"]
    args = {"batch_size": 2, "q_length": 4, "kv_length": 9, "q_offset": 5, "kv_offset": kv_offset}
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            builder(**args, mask_function=mask_function, attention_mask=tokens)
        return
    mask = builder(**args, mask_function=mask_function, attention_mask=tokens)
    assert mask.is_causal and mask.q_offset == 5
    assert torch.equal(mask.key_padding_mask, ~tokens)


def test_mask_builder_returns_a_prebuilt_mask_for_the_same_queries() -> None:
    """``generate`` with a static cache builds the DilatedMask before the forward and passes it
    in: transformers hands it back to the builder (it is not 2-D), which returns it as it is,
    if the cache's query offset (a tensor for a static cache) is the mask's."""
    prebuilt = DilatedMask(True, 5, torch.zeros(2, 9, dtype=torch.bool))
    assert prebuilt.ndim == 4
    builder = AttentionMaskInterface()["dilated"]
    args = {"batch_size": 2, "q_length": 4, "kv_length": 9, "attention_mask": prebuilt}
    assert builder(**args, q_offset=torch.tensor(5)) is prebuilt
    with pytest.raises(ValueError, match="q_offset=5, but the cache puts the queries at 3"):
        builder(**args, q_offset=3)


def test_packed_sequences_are_refused() -> None:
    model = tiny_llama("dilated", [4], [1])
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None]
    with pytest.raises(ValueError, match="packed sequences"):
        model(torch.randint(0, VOCAB, (1, 11)), position_ids=positions, use_cache=False)


def test_sliding_window_model_is_refused() -> None:
    config = MistralConfig(**TINY, sliding_window=4, head_dim=16)
    config.dilated_attention = {"segment_lengths": [4], "dilation_rates": [1]}
    model = MistralForCausalLM._from_config(config, attn_implementation="dilated")
    with pytest.raises(ValueError, match="sliding"):
        model(torch.randint(0, VOCAB, (1, 9)), use_cache=False)


def test_attention_dropout_is_applied_in_training_with_the_math_backend() -> None:
    model = tiny_llama("dilated_default", None, None, attention_dropout=0.5).train()
    ids = torch.randint(0, VOCAB, (1, 9))
    first, second = (model(ids, use_cache=False).logits for _ in range(2))
    assert not torch.allclose(first, second)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((), {"name": "sdpa"}, "new implementation name"),
        ((), {"name": ""}, "new implementation name"),
        (([4],), {}, "together"),
        (([4, 8], [1]), {}, "same length"),
        (([4], [1]), {"head_offsets": "mine"}, "head_offsets"),
        (([4], [1]), {"backend": "cuda"}, "backend"),
    ],
)
def test_register_validates(args: tuple, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dilattn_hf.register(*args, **kwargs)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (None, "no dilated attention configuration"),
        ({"segment_lengths": [4]}, "must be a dict with"),
        ({"segment_lengths": [4], "dilation_rates": [1], "window": 3}, "must be a dict with"),
        ({"segment_lengths": [4], "dilation_rates": [5]}, "at most its segment length"),
        ({"segment_lengths": 4, "dilation_rates": [1]}, "segment_lengths must be a sequence"),
    ],
)
def test_model_config_is_validated(options: dict | None, match: str) -> None:
    layer = Layer(True, {})
    layer.config.dilated_attention = options
    q = k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=match):
        AttentionInterface()["dilated"](layer, q, k, v, None)


def test_without_transformers_the_import_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "dilattn.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'dilattn\[hf\]'"):
        importlib.import_module("dilattn.integrations.transformers")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_bf16_model_forward_and_backward(compiled: bool) -> None:
    """On CUDA (``backend="auto"``), bf16, S = 300 over several segments, right padding:
    logits and the embedding's gradient within the error budget of the same model with the
    reference attention in bf16, against float64."""
    model = tiny_llama("dilated", [64, 128], [1, 2], torch.float32)
    ids = torch.randint(0, VOCAB, (2, 300), device="cuda")
    mask = torch.ones(2, 300, dtype=torch.long, device="cuda")
    mask[1, 250:] = 0
    REFERENCE.padding = ~mask.bool()
    out, grad = _logits_and_grad(model, "dilated", torch.bfloat16, ids, mask, compiled)
    base, base_grad = _logits_and_grad(model, "dilated_reference", torch.bfloat16, ids, mask)
    truth, truth_grad = _logits_and_grad(model, "dilated_reference", torch.float64, ids, mask)
    real = mask.bool()
    assert_within_budget(out[real], base[real], truth[real])
    assert_within_budget(grad, base_grad, truth_grad, factor=4.0)


def _logits_and_grad(
    model: LlamaForCausalLM,
    attn: str,
    dtype: torch.dtype,
    ids: torch.Tensor,
    mask: torch.Tensor,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the embedding's gradient of a copy of ``model`` on CUDA in ``dtype``."""
    copy = deepcopy(model).to("cuda", dtype).train()
    copy.set_attn_implementation(attn)
    run = torch.compile(copy) if compiled else copy
    logits = run(ids, attention_mask=mask, use_cache=False).logits
    logits.float().square().mean().backward()
    grad = copy.model.embed_tokens.weight.grad
    assert grad is not None
    return logits.detach(), grad


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cuda_decoding_gives_the_full_forward(cache: str) -> None:
    """Decoding on CUDA (one query per step through flex) gives the full forward's rows."""
    S, prompt = 200, 150
    model = tiny_llama("dilated", [32, 64, 128], [1, 2, 4], torch.float32).cuda()
    ids = torch.randint(0, VOCAB, (2, S), device="cuda")
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        kv = DynamicCache(config=model.config) if cache == "dynamic" else None
        if kv is None:
            kv = StaticCache(config=model.config, max_cache_len=256)
        steps = [model(ids[:, :prompt], past_key_values=kv).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=kv).logits for t in range(prompt, S)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
