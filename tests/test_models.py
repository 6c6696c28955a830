"""LongNet and LongNetLM: hand-composed stacks over the dense reference, nn.Transformer,
decoding with a KV cache, generation, activation checkpointing."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_budget, examples, module_reference, requires_cuda
from hypothesis import given
from hypothesis import strategies as st
from test_modules import _copy_torch_weights
from torch import Tensor, nn

from dilattn import Block, KVCache, LongNet, LongNetConfig, LongNetLM
from dilattn.nn.models import _sample

TINY = {"d_model": 32, "num_heads": 4, "num_layers": 2, "ffn_dim": 48}


def _fresh(model: nn.Module, std: float = 0.3) -> nn.Module:
    """Random values everywhere: LayerNorm's ones and zero biases would hide mistakes."""
    for p in model.parameters():
        nn.init.normal_(p, std=std)
    return model


def block_reference(
    block: Block,
    x: Tensor,
    *,
    dtype: torch.dtype,
    memory: Tensor | None = None,
    memory_key_padding_mask: Tensor | None = None,
    **extras: object,
) -> Tensor:
    """What ``block`` computes, written out in ``dtype`` with its own parameters, attention by
    the dense reference (``module_reference``)."""

    def linear(layer: nn.Linear, y: Tensor) -> Tensor:
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return F.linear(y, layer.weight.to(dtype), bias)

    def residual(y: Tensor, norm: nn.LayerNorm, f: Callable[[Tensor], Tensor]) -> Tensor:
        layer_norm = lambda z: F.layer_norm(
            z, z.shape[-1:], norm.weight.to(dtype), norm.bias.to(dtype), norm.eps
        )
        return y + f(layer_norm(y)) if block.norm_first else layer_norm(y + f(y))

    def attention(m: nn.Module, key: Tensor | None, **kwargs: object) -> Callable[..., Tensor]:
        assert isinstance(m, nn.Module)
        return lambda y: module_reference(
            m, y, y if key is None else key, y if key is None else key, dtype=dtype, **kwargs
        )

    x = x.to(dtype)
    x = residual(
        x,
        block.attn_norm,
        attention(block.self_attn, None, is_causal=block.self_attn.is_causal, **extras),
    )
    if block.cross_attn is not None:
        assert block.cross_norm is not None and memory is not None
        cross = attention(
            block.cross_attn,
            memory.to(dtype),
            is_causal=False,
            key_padding_mask=memory_key_padding_mask,
        )
        x = residual(x, block.cross_norm, cross)
    ffn = block.ffn

    def feed_forward(y: Tensor) -> Tensor:
        hidden = linear(ffn.up, y)
        if ffn.gate is not None:
            return linear(ffn.down, F.silu(linear(ffn.gate, y)) * hidden)
        activation = {"gelu": F.gelu, "relu": F.relu}[ffn.activation]
        return linear(ffn.down, activation(hidden))

    return residual(x, block.ffn_norm, feed_forward)


def final_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


def lm_reference(
    model: LongNetLM, tokens: Tensor, *, dtype: torch.dtype, **extras: object
) -> Tensor:
    """``model``'s logits, hand-composed: embedding rows, each block, final norm, tied head."""
    weight = model.embedding.weight.to(dtype)
    x = weight[tokens]  # (B, S, E)
    for block in model.blocks:
        x = block_reference(block, x, dtype=dtype, **extras)
    return F.linear(final_norm(model.norm, x), weight)


def longnet_reference(
    model: LongNet, src: Tensor, tgt: Tensor, *, dtype: torch.dtype, src_key_padding_mask=None
) -> Tensor:
    memory = src
    for block in model.encoder:
        memory = block_reference(block, memory, dtype=dtype, key_padding_mask=src_key_padding_mask)
    memory = final_norm(model.encoder_norm, memory)
    x = tgt
    for block in model.decoder:
        x = block_reference(
            block, x, dtype=dtype, memory=memory, memory_key_padding_mask=src_key_padding_mask
        )
    return final_norm(model.decoder_norm, x)


_OPTIONS = st.fixed_dictionaries(
    {
        "activation": st.sampled_from(["gelu", "relu", "swiglu"]),
        "norm_first": st.booleans(),
        "position": st.sampled_from([None, "rotary", "xpos", "alibi", "t5"]),
        "num_kv_heads": st.sampled_from([None, 1, 2]),
        "qk_norm": st.booleans(),
        "sub_layernorm": st.booleans(),
        "bias": st.booleans(),
        "head_offsets": st.sampled_from(["cyclic", "grouped"]),
    }
)
_BRANCHES = st.sampled_from([((4, 8, 16), (1, 2, 4)), ((5, 12), (1, 3)), ((6,), (2,))])


def _assert_grads_close(out: Tensor, expected: Tensor, params: list[Tensor]) -> None:
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, grad, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, params, grad, allow_unused=True)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e)


@examples(12)
@given(options=_OPTIONS, branches=_BRANCHES, S=st.integers(1, 30), extras=st.booleans())
def test_lm_equals_a_hand_composed_stack_of_the_same_layers(
    options: dict, branches: tuple, S: int, extras: bool
) -> None:
    config = LongNetConfig(
        **TINY, segment_lengths=branches[0], dilation_rates=branches[1], **options
    )
    model = _fresh(LongNetLM(37, config, dtype=torch.float64))
    tokens = torch.randint(0, 37, (2, S))
    kwargs = {}
    if extras:
        kwargs = {
            "key_padding_mask": torch.rand(2, S) < 0.2,
            "document_ids": (torch.rand(2, S) < 0.2).cumsum(-1),
        }
    logits = model(tokens, **kwargs)
    expected = lm_reference(model, tokens, dtype=torch.float64, **kwargs)
    assert logits.shape == (2, S, 37)
    torch.testing.assert_close(logits, expected)
    _assert_grads_close(logits, expected, list(model.parameters()))


@examples(6)
@given(options=_OPTIONS, branches=_BRANCHES, S=st.integers(1, 25), T=st.integers(1, 25))
def test_longnet_equals_a_hand_composed_stack_of_the_same_layers(
    options: dict, branches: tuple, S: int, T: int
) -> None:
    config = LongNetConfig(
        **TINY, segment_lengths=branches[0], dilation_rates=branches[1], **options
    )
    model = _fresh(LongNet(config, dtype=torch.float64))
    src = torch.randn(2, S, 32, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    padding = torch.rand(2, S) < 0.2
    out = model(src, tgt, src_key_padding_mask=padding)
    expected = longnet_reference(model, src, tgt, dtype=torch.float64, src_key_padding_mask=padding)
    torch.testing.assert_close(out, expected)
    _assert_grads_close(out, expected, [src, tgt, *model.parameters()])


def _copy_into_torch_layer(ours: Block, layer: nn.Module) -> None:
    """Our block's weights into an ``nn.TransformerEncoderLayer`` / ``DecoderLayer``."""
    pairs = [(ours.attn_norm, layer.norm1), (ours.ffn.up, layer.linear1)]
    pairs += [(ours.ffn.down, layer.linear2)]
    if ours.cross_attn is not None:
        pairs += [(ours.cross_norm, layer.norm2), (ours.ffn_norm, layer.norm3)]
        _copy_torch_weights(ours.cross_attn, layer.multihead_attn)
    else:
        pairs += [(ours.ffn_norm, layer.norm2)]
    _copy_torch_weights(ours.self_attn, layer.self_attn)
    for mine, theirs in pairs:
        mine.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_longnet_with_one_dense_branch_is_torch_transformer(
    norm_first: bool, activation: str
) -> None:
    """With ``segment_lengths=[S], dilation_rates=[1]`` and no positions, LongNet is
    ``nn.Transformer`` (causal ``tgt_mask``) with the same weights."""
    S, T = 17, 13
    theirs = nn.Transformer(
        32, 4, 2, 2, 48, dropout=0.0, activation=activation, batch_first=True,
        norm_first=norm_first, dtype=torch.float64,
    )  # fmt: skip
    config = LongNetConfig(
        **TINY, segment_lengths=(S,), dilation_rates=(1,), activation=activation,  # type: ignore[arg-type]
        norm_first=norm_first, position=None,
    )  # fmt: skip
    ours = LongNet(config, dtype=torch.float64)
    stacks = ((ours.encoder, theirs.encoder), (ours.decoder, theirs.decoder))
    for mine, torch_stack in stacks:
        for block, layer in zip(mine, torch_stack.layers, strict=True):
            _copy_into_torch_layer(block, layer)
    ours.encoder_norm.load_state_dict(theirs.encoder.norm.state_dict())
    ours.decoder_norm.load_state_dict(theirs.decoder.norm.state_dict())
    src, tgt = (
        torch.randn(3, S, 32, dtype=torch.float64),
        torch.randn(3, T, 32, dtype=torch.float64),
    )
    src_pad, tgt_pad = torch.rand(3, S) < 0.3, torch.rand(3, T) < 0.3
    src_pad[:, 0] = tgt_pad[:, 0] = False  # torch gives NaN for a row with no key; we give 0
    expected = theirs(
        src,
        tgt,
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64),
        src_key_padding_mask=src_pad,
        tgt_key_padding_mask=tgt_pad,
        memory_key_padding_mask=src_pad,
        tgt_is_causal=True,
    )
    out = ours(src, tgt, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad)
    torch.testing.assert_close(out, expected)


def _decode(
    model: LongNetLM, tokens: Tensor, prefill: int, chunk: int = 1
) -> tuple[Tensor, list[KVCache]]:
    """Logits ``(B, S, V)`` of a prefill of ``prefill`` tokens, then ``chunk`` tokens a step."""
    caches = model.new_kv_caches(tokens.shape[0], tokens.shape[1])
    steps = [
        (0, prefill),
        *((t, min(t + chunk, tokens.shape[1])) for t in range(prefill, tokens.shape[1], chunk)),
    ]
    with torch.no_grad():
        logits = [model(tokens[:, a:b], kv_caches=caches) for a, b in steps]
    return torch.cat(logits, 1), caches


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "options",
    [
        {"position": "rotary"},
        {"position": "alibi", "num_kv_heads": 2, "activation": "swiglu", "norm_first": False},
        {"position": "t5", "qk_norm": True, "sub_layernorm": True, "num_kv_heads": 1},
        {"position": "xpos", "head_offsets": "grouped", "activation": "relu"},
    ],
    ids=lambda options: options["position"],
)
def test_incremental_decoding_equals_the_full_forward(options: dict, dtype: torch.dtype) -> None:
    """A prompt of 11 tokens (longer than the segments 4 and 8), then one token at a time to
    45, crossing the segment boundaries 16 and 32: the logits of every position equal one
    full forward, to the dtype's tolerance."""
    config = LongNetConfig(**TINY, segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), **options)
    model = _fresh(LongNetLM(37, config, dtype=dtype), std=0.2).eval()
    tokens = torch.randint(0, 37, (2, 45))
    with torch.no_grad():
        full = model(tokens)
    logits, caches = _decode(model, tokens, prefill=11)
    torch.testing.assert_close(logits, full)
    assert all(cache.length == 45 for cache in caches)
    chunked, _ = _decode(model, tokens, prefill=3, chunk=7)  # prefill shorter than a segment
    torch.testing.assert_close(chunked, full)


def test_decoding_with_padding_and_documents_equals_the_full_forward() -> None:
    config = LongNetConfig(**TINY, segment_lengths=(4, 8), dilation_rates=(1, 2))
    model = _fresh(LongNetLM(37, config, dtype=torch.float64)).eval()
    tokens = torch.randint(0, 37, (2, 20))
    padding, documents = torch.rand(2, 20) < 0.2, (torch.rand(2, 20) < 0.2).cumsum(-1)
    extras = lambda end: {"key_padding_mask": padding[:, :end], "document_ids": documents[:, :end]}
    caches = model.new_kv_caches(2, 20)
    with torch.no_grad():
        full = model(tokens, **extras(20))
        steps = [model(tokens[:, :9], kv_caches=caches, **extras(9))]
        steps += [
            model(tokens[:, t : t + 1], kv_caches=caches, **extras(t + 1)) for t in range(9, 20)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_decoding_under_bf16_autocast_caches_bf16_and_matches_the_full_forward() -> None:
    model = _fresh(
        LongNetLM(37, LongNetConfig(**TINY, segment_lengths=(4, 8), dilation_rates=(1, 2))), 0.2
    ).eval()
    tokens = torch.randint(0, 37, (2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        full = model(tokens)
        logits, caches = _decode(model, tokens, prefill=7)
        assert model.generate(tokens[:, :5], 4).shape == (2, 9)
    assert all(cache.key.dtype == torch.bfloat16 for cache in caches)
    assert model.new_kv_caches(1, 4)[0].key.dtype == torch.float32  # outside autocast
    torch.testing.assert_close(logits.float(), full.float(), atol=0.05, rtol=0.05)


def _tiny_lm(**options: object) -> LongNetLM:
    config = LongNetConfig(**TINY, segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), **options)  # type: ignore[arg-type]
    return _fresh(LongNetLM(37, config), std=0.2).eval()


def test_generate_fills_one_cache_of_the_context_length_allocated_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cache holds ``prompt + new - 1`` positions per layer (``2 * B * H_kv * capacity *
    D`` elements: linear in the context), allocated before the first step and never again."""
    model = _tiny_lm(num_kv_heads=2)
    made: list[list[KVCache]] = []
    new_kv_caches = model.new_kv_caches
    monkeypatch.setattr(
        model, "new_kv_caches", lambda *a: made.append(new_kv_caches(*a)) or made[-1]
    )
    prompt = torch.randint(0, 37, (3, 10))
    out = model.generate(prompt, 25, temperature=0)
    assert out.shape == (3, 35) and torch.equal(out[:, :10], prompt)
    (caches,) = made
    assert len(caches) == 2
    for cache in caches:
        assert cache.length == cache.capacity == 34
        assert cache.key.numel() == cache.value.numel() == 3 * 2 * 34 * 8
    storage = [cache.key.untyped_storage().nbytes() for cache in caches]
    assert storage == [3 * 2 * 34 * 8 * 4] * 2


def test_greedy_generation_equals_argmax_of_full_forwards() -> None:
    model = _tiny_lm(position="alibi")
    tokens = torch.randint(0, 37, (2, 13))
    out = model.generate(tokens, 20, temperature=0)
    with torch.no_grad():
        for _ in range(20):
            tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], 1)
    torch.testing.assert_close(out, tokens)
    torch.testing.assert_close(model.generate(out[:, :13], 20, temperature=1.0, top_k=1), tokens)


def test_sampling_is_deterministic_under_a_seed_and_stays_in_the_top_k() -> None:
    model = _tiny_lm()
    prompt = torch.randint(0, 37, (4, 9))
    sample = lambda seed, **kw: model.generate(
        prompt, 12, generator=torch.Generator().manual_seed(seed), **kw
    )
    torch.testing.assert_close(sample(1, temperature=0.9), sample(1, temperature=0.9))
    assert not torch.equal(sample(1, temperature=0.9), sample(2, temperature=0.9))
    torch.manual_seed(5)
    first = model.generate(prompt, 12)
    torch.manual_seed(5)
    torch.testing.assert_close(model.generate(prompt, 12), first)
    out = sample(3, temperature=2.0, top_k=3)
    with torch.no_grad():
        logits = model(out[:, :-1])[:, 8:]  # the logits each new token was drawn from
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == out[:, 9:, None]).any(-1).all()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_follows_the_tempered_softmax(temperature: float) -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).expand(40000, -1)
    drawn = _sample(logits, temperature, None, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn.view(-1), minlength=4) / drawn.numel()
    torch.testing.assert_close(
        frequencies, (logits[0] / temperature).softmax(-1), atol=0.01, rtol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be a positive integer"),
        ({"temperature": -0.5}, ValueError, r"temperature must be in \[0.0, inf\]"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number"),
        ({"top_k": 0}, ValueError, "top_k must be a positive integer"),
        ({"top_k": 38}, ValueError, r"top_k must be at most vocab_size \(37\), got 38"),
        ({"prompt": torch.randn(1, 4)}, TypeError, "prompt must be an int64 or int32 tensor"),
        (
            {"prompt": torch.zeros(4, dtype=torch.long)},
            ValueError,
            r"prompt must have shape \(B, S\)",
        ),
    ],
)
def test_bad_generate_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    args = {"prompt": torch.zeros(1, 4, dtype=torch.long), "max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=match):
        _tiny_lm().generate(**args)


@pytest.mark.parametrize("kind", ["lm", "longnet"])
def test_activation_checkpointing_gives_the_same_gradients(kind: str) -> None:
    """Also with dropout: checkpointing replays the random state of the forward."""
    config = LongNetConfig(**TINY, segment_lengths=(4, 8), dilation_rates=(1, 2), dropout=0.2)
    if kind == "lm":
        plain: nn.Module = LongNetLM(37, config, dtype=torch.float64)
        inputs: tuple[Tensor, ...] = (torch.randint(0, 37, (2, 19)),)
    else:
        plain = LongNet(config, dtype=torch.float64)
        inputs = (
            torch.randn(2, 19, 32, dtype=torch.float64),
            torch.randn(2, 11, 32, dtype=torch.float64),
        )
    checkpointed = copy.deepcopy(plain)
    checkpointed.config = dataclasses.replace(config, activation_checkpointing=True)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(0)
        out = model(*inputs)
        results.append((out, torch.autograd.grad(out.square().sum(), list(model.parameters()))))
    (out, grads), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out)
    for g, g_ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(g_ckpt, g)


def test_checkpointing_really_recomputes_in_backward() -> None:
    config = LongNetConfig(
        **TINY, segment_lengths=(8,), dilation_rates=(1,), activation_checkpointing=True
    )
    model = LongNetLM(37, config)
    calls = []
    model.blocks[0].ffn.register_forward_pre_hook(lambda *_: calls.append(1))
    model(torch.randint(0, 37, (1, 8))).sum().backward()
    assert len(calls) == 2  # forward, then recomputed in backward
    with torch.no_grad():
        model(torch.randint(0, 37, (1, 8)))
    assert len(calls) == 3


def test_lm_compiles_fullgraph_forward_and_backward() -> None:
    config = LongNetConfig(
        **TINY, segment_lengths=(8,), dilation_rates=(2,), num_kv_heads=2, activation="swiglu"
    )  # one branch: tracing time grows with branches x layers
    model = LongNetLM(37, config)
    tokens = torch.randint(0, 37, (2, 21))
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo only: fast on CPU
    out = compiled(tokens)
    torch.testing.assert_close(out, model(tokens))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_base_config_is_the_papers() -> None:
    config = LongNetConfig()
    assert (config.d_model, config.num_heads, config.num_layers, config.ffn_dim) == (
        768,
        12,
        12,
        3072,
    )
    assert config.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert config.dilation_rates == (1, 2, 4, 6, 12)
    model = LongNet(device="meta")
    assert len(model.encoder) == len(model.decoder) == 12
    assert LongNetConfig(segment_lengths=[8], dilation_rates=[1]).segment_lengths == (8,)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "tanh"}, "activation must be 'gelu', 'relu' or 'swiglu'"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"ffn_dim": 1.5}, "ffn_dim must be a positive integer"),
        ({"num_kv_heads": 0}, "num_kv_heads must be a positive integer"),
        ({"dropout": 2.0}, r"dropout must be in \[0.0, 1.0\]"),
        ({"segment_lengths": (8, 16)}, "must have the same length"),
        ({"dilation_rates": (16,)}, "at most its segment length"),
        ({"segment_lengths": None}, "segment_lengths must be a sequence of positive integers"),
        ({"dilation_rates": 1}, "dilation_rates must be a sequence of positive integers, got 1"),
        ({"d_model": 2**70}, rf"d_model must be at most 2\*\*62, got {2**70}"),
        ({"segment_lengths": (2**63,)}, r"segment_lengths must be at most 2\*\*62"),
    ],
)
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LongNetConfig(**{"segment_lengths": (8,), "dilation_rates": (1,), **kwargs})


def test_bad_model_inputs_raise() -> None:
    model = _tiny_lm()
    with pytest.raises(
        TypeError, match=r"tokens must be an int64 or int32 tensor, got torch\.float32"
    ):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"kv_caches must hold one KVCache per block \(2\), got 1"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_caches=model.new_kv_caches(1, 8)[:1])
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        LongNetLM(0)
    with pytest.raises(ValueError, match=r"vocab_size must be at most 2\*\*62"):
        LongNetLM(2**70, device="meta")
    block = LongNet(LongNetConfig(**TINY, segment_lengths=(8,), dilation_rates=(1,))).decoder[0]
    x = torch.randn(1, 4, 32)
    with pytest.raises(
        ValueError, match=r"memory must be given exactly when .*cross_attention=True"
    ):
        block(x)
    with pytest.raises(ValueError, match=r"cross_attention=False\), got \(1, 4, 32\)"):
        model.blocks[0](x, memory=x)


@pytest.mark.parametrize(
    ("ids", "bad"),
    [([[0, 37, 5]], r"\[0, 37\]"), ([[3, -1]], r"\[-1, 3\]"), ([[40], [-2]], r"\[-2, 40\]")],
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_token_ids_outside_the_vocabulary_raise(ids: list, bad: str, dtype: torch.dtype) -> None:
    model = _tiny_lm()
    tokens = torch.tensor(ids, dtype=dtype)
    expected = rf"^tokens must hold token ids in \[0, 37\) \(vocab_size\), got ids in {bad}$"
    with pytest.raises(ValueError, match=expected):
        model(tokens)
    with pytest.raises(ValueError, match=expected.replace("tokens", "prompt")):
        model.generate(tokens, 2)
    assert model(tokens.clamp(0, 36)).shape == (*tokens.shape, 37)  # the edges are fine


# GPU (run with `pytest -m gpu` on the device machine).


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "options",
    [
        {"position": "rotary", "num_kv_heads": 2, "activation": "swiglu"},
        {"position": "alibi", "norm_first": False, "qk_norm": True},
    ],
    ids=str,
)
def test_compiled_lm_forward_and_backward_in_bf16(options: dict) -> None:
    """The whole LM compiled on CUDA (flex backend) in bf16, forward and backward, against the
    same model hand-composed in float64 around the reference; budget: 2x / 4x the error of
    the hand-composed model in bf16."""
    torch.manual_seed(0)
    config = LongNetConfig(
        d_model=256, num_heads=4, num_layers=2, ffn_dim=512,
        segment_lengths=(128, 256, 512), dilation_rates=(1, 2, 4), **options,
    )  # fmt: skip
    model = LongNetLM(256, config, device="cuda", dtype=torch.bfloat16)
    for p in model.parameters():
        nn.init.normal_(p, std=256**-0.5)
    tokens = torch.randint(0, 256, (2, 1000), device="cuda")
    model64 = copy.deepcopy(model).double()  # the same values, float64 gradients
    out = torch.compile(model, fullgraph=True)(tokens)
    truth = lm_reference(model64, tokens, dtype=torch.float64)
    baseline = lm_reference(model, tokens, dtype=torch.bfloat16)
    assert_within_budget(out, baseline, truth)
    grad = torch.randn_like(out)
    params = list(model.parameters())
    grads = torch.autograd.grad(out, params, grad)
    truths = torch.autograd.grad(truth, list(model64.parameters()), grad.double())
    baselines = torch.autograd.grad(baseline, params, grad)
    for g, b, t in zip(grads, baselines, truths, strict=True):
        assert_within_budget(g, b, t, factor=4.0)


@pytest.mark.gpu
@requires_cuda
def test_generation_on_cuda_equals_the_full_forward() -> None:
    torch.manual_seed(0)
    config = LongNetConfig(
        d_model=256, num_heads=4, num_layers=2, ffn_dim=512, num_kv_heads=2,
        segment_lengths=(64, 128, 256), dilation_rates=(1, 2, 4),
    )  # fmt: skip
    model = LongNetLM(256, config, device="cuda").eval()
    tokens = torch.randint(0, 256, (2, 600), device="cuda")
    with torch.no_grad():
        full = model(tokens)
    logits, _ = _decode(model, tokens, prefill=300)  # prompt longer than every segment
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    greedy = model.generate(tokens[:, :300], 301, temperature=0)  # the full forward's length
    with torch.no_grad():
        step_logits = model(greedy[:, :-1])[:, 299:]
    torch.testing.assert_close(greedy[:, 300:], step_logits.argmax(-1))


@pytest.mark.gpu
@requires_cuda
def test_decoding_step_memory_does_not_grow_with_the_context() -> None:
    """One decoding step reads one segment per branch: its working memory (beyond the cache)
    is the same at position 1,000 and at position 16,000."""
    config = LongNetConfig(
        d_model=256, num_heads=4, num_layers=2, ffn_dim=512,
        segment_lengths=(64, 128, 256), dilation_rates=(1, 2, 4),
    )  # fmt: skip
    model = LongNetLM(256, config, device="cuda").eval()
    peaks = []
    for context in (1000, 16000):
        caches = model.new_kv_caches(1, context + 1)
        with torch.no_grad():
            model(torch.randint(0, 256, (1, context), device="cuda"), kv_caches=caches)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model(torch.randint(0, 256, (1, 1), device="cuda"), kv_caches=caches)
            peaks.append(torch.cuda.max_memory_allocated() - before)
    assert peaks[1] < 1.5 * peaks[0] + 2**20, peaks
