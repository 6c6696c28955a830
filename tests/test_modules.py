"""DilatedAttention and MultiheadDilatedAttention, the modules over the functional path."""

from __future__ import annotations

import pytest
import torch
from conftest import examples, module_reference
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dilattn import DilatedAttention, MultiheadDilatedAttention, alibi_score_mod, dilated_attention
from dilattn.reference import dilated_attention_reference


def test_module_equals_functional_and_reference() -> None:
    q, k, v = (torch.randn(2, 4, 37, 8, dtype=torch.float64) for _ in range(3))
    attn = DilatedAttention([8, 16], [1, 3], is_causal=True)
    out = attn(q, k, v)
    torch.testing.assert_close(out, dilated_attention(q, k, v, [8, 16], [1, 3], is_causal=True))
    torch.testing.assert_close(
        out, dilated_attention_reference(q, k, v, [8, 16], [1, 3], is_causal=True)
    )
    assert "segment_lengths=[8, 16]" in repr(attn)


def test_module_passes_extras_through() -> None:
    q, k, v = (torch.randn(2, 4, 30, 8, dtype=torch.float64) for _ in range(3))
    extras = {
        "key_padding_mask": torch.rand(2, 30) < 0.3,
        "cu_seqlens": torch.tensor([0, 11, 30]),
        "score_mod": alibi_score_mod(4),
        "q_offset": 0,
    }
    out = DilatedAttention([8, 16], [1, 3])(q, k, v, **extras)
    torch.testing.assert_close(out, dilated_attention_reference(q, k, v, [8, 16], [1, 3], **extras))


def test_module_compiles_fullgraph_without_graph_breaks() -> None:
    """On CPU (math; compiled flex is refused there, see test_functional)."""
    attn = DilatedAttention([8, 16], [1, 2], is_causal=True, enable_gqa=True)
    q = torch.randn(1, 4, 29, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 29, 8) for _ in range(2))
    compiled = torch.compile(attn, fullgraph=True, backend="eager")  # dynamo only: fast on CPU
    out = compiled(q, k, v)
    torch.testing.assert_close(out, attn(q, k, v))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def _copy_torch_weights(ours: MultiheadDilatedAttention, mha: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        for proj, weight, bias in zip(
            (ours.q_proj, ours.k_proj, ours.v_proj), weights, biases, strict=True
        ):
            proj.weight.copy_(weight)
            if bias is not None:
                proj.bias.copy_(bias)
        ours.out_proj.load_state_dict(mha.out_proj.state_dict())


@pytest.mark.parametrize(
    ("options", "inputs"),
    [
        ({}, "self"),
        ({}, "padding"),
        ({}, "causal"),
        ({"bias": False}, "padding"),
        ({"kdim": 12, "vdim": 20}, "cross"),
    ],
)
def test_single_dense_branch_is_torch_multihead_attention(options: dict, inputs: str) -> None:
    """The drop-in claim: with ``segment_lengths=[S], dilation_rates=[1]`` it is
    ``nn.MultiheadAttention(batch_first=True)`` with the same weights."""
    E, H, S, S_kv = 32, 4, 19, 23 if inputs == "cross" else 19
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64, **options)
    ours = MultiheadDilatedAttention(E, H, [S_kv], [1], dtype=torch.float64, **options)
    _copy_torch_weights(ours, mha)
    x = torch.randn(3, S, E, dtype=torch.float64)
    key = torch.randn(3, S_kv, options.get("kdim", E), dtype=torch.float64)
    value = torch.randn(3, S_kv, options.get("vdim", E), dtype=torch.float64)
    query, key, value = (x, key, value) if inputs == "cross" else (x, x, x)
    padding = torch.rand(3, S_kv) < 0.3 if inputs == "padding" else None
    if padding is not None:
        padding[:, 0] = False  # torch gives NaN for a row with no key; we give 0
    causal = torch.ones(S, S, dtype=torch.bool).triu(1) if inputs == "causal" else None
    expected, _ = mha(
        query, key, value, key_padding_mask=padding, attn_mask=causal, need_weights=False
    )
    out, weights = ours(query, key, value, key_padding_mask=padding, is_causal=inputs == "causal")
    assert weights is None
    torch.testing.assert_close(out, expected)


def _random_torch_mha(E: int, H: int, **options: object) -> nn.MultiheadAttention:
    """A float64 ``nn.MultiheadAttention(batch_first=True)`` with fresh random weights and
    biases (torch initialises biases to 0, which would hide a bias that is not copied)."""
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64, **options)
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(std=0.3)
    return mha


def _fresh_module(
    mha: nn.MultiheadAttention, S_kv: int, is_causal: bool
) -> MultiheadDilatedAttention:
    """A dense module of ``mha``'s shape with its own (random) weights."""
    return MultiheadDilatedAttention(
        mha.embed_dim,
        mha.num_heads,
        [S_kv],
        [1],
        bias=mha.in_proj_bias is not None,
        kdim=mha.kdim,
        vdim=mha.vdim,
        is_causal=is_causal,
        dtype=torch.float64,
    )


def _load_into_fresh_module(
    mha: nn.MultiheadAttention, S_kv: int, is_causal: bool
) -> MultiheadDilatedAttention:
    ours = _fresh_module(mha, S_kv, is_causal)
    ours.load_state_dict(mha.state_dict())
    return ours


def _load_nested(
    mha: nn.MultiheadAttention, S_kv: int, is_causal: bool
) -> MultiheadDilatedAttention:
    """Through a parent module: the state dict keys carry a prefix (``blocks.0.attn.``)."""
    ours = _fresh_module(mha, S_kv, is_causal)
    theirs = nn.ModuleDict({"blocks": nn.ModuleList([nn.ModuleDict({"attn": mha})])})
    parent = nn.ModuleDict({"blocks": nn.ModuleList([nn.ModuleDict({"attn": ours})])})
    parent.load_state_dict(theirs.state_dict())
    return ours


_LOADERS = {
    "from_torch": lambda mha, S_kv, is_causal: MultiheadDilatedAttention.from_torch(
        mha, [S_kv], [1], is_causal=is_causal
    ),
    "load_state_dict": _load_into_fresh_module,
    "nested_load_state_dict": _load_nested,
}


@pytest.mark.parametrize("loader", list(_LOADERS))
@pytest.mark.parametrize(
    ("options", "inputs"),
    [
        ({}, "self"),
        ({}, "causal"),
        ({"bias": False}, "self"),
        ({"bias": False}, "causal"),
        ({"kdim": 12, "vdim": 20}, "cross"),
    ],
)
def test_torch_weights_reproduce_torch_multihead_attention(
    loader: str, options: dict, inputs: str
) -> None:
    """``from_torch(mha, [S], [1])`` and ``load_state_dict(mha.state_dict())`` give a dense
    module that computes ``mha(x, x, x)`` (causal: with torch's causal ``attn_mask``)."""
    E, H, S = 32, 4, 19
    S_kv = 23 if inputs == "cross" else S
    mha = _random_torch_mha(E, H, **options)
    causal = inputs == "causal"
    ours = _LOADERS[loader](mha, S_kv, causal)
    x = torch.randn(3, S, E, dtype=torch.float64)
    if inputs == "cross":
        key = torch.randn(3, S_kv, options["kdim"], dtype=torch.float64)
        value = torch.randn(3, S_kv, options["vdim"], dtype=torch.float64)
    else:
        key = value = x
    mask = torch.ones(S, S, dtype=torch.bool).triu(1) if causal else None
    expected, _ = mha(x, key, value, attn_mask=mask, is_causal=causal, need_weights=False)
    out, weights = ours(x, key, value)
    assert weights is None and out.dtype == torch.float64
    torch.testing.assert_close(out, expected)
    again = _fresh_module(mha, S_kv, causal)
    again.load_state_dict(ours.state_dict())  # our own state dict still loads
    torch.testing.assert_close(again(x, key, value)[0], expected)


def test_from_torch_copies_the_settings_and_keeps_added_layers() -> None:
    mha = _random_torch_mha(32, 4, dropout=0.25, kdim=12, bias=False).eval()
    m = MultiheadDilatedAttention.from_torch(
        mha, [8, 16], [1, 2], qk_norm=True, sub_layernorm=True, position="t5", dtype=torch.float64
    )
    assert (m.embed_dim, m.num_heads, m.num_kv_heads, m.kdim, m.vdim) == (32, 4, 4, 12, 32)
    assert m.dropout == 0.25 and not m.training and m.batch_first
    assert m.q_proj.bias is None and m.out_proj.bias is None
    assert all(p.dtype == torch.float64 for p in m.parameters())
    for proj, name in ((m.q_proj, "q"), (m.k_proj, "k"), (m.v_proj, "v")):
        torch.testing.assert_close(proj.weight, getattr(mha, f"{name}_proj_weight"), rtol=0, atol=0)
    torch.testing.assert_close(m.out_proj.weight, mha.out_proj.weight, rtol=0, atol=0)
    assert m.q_norm is not None and torch.equal(m.q_norm.weight, torch.ones_like(m.q_norm.weight))


@pytest.mark.parametrize(
    ("torch_options", "kwargs", "error", "match"),
    [
        ({"add_bias_kv": True}, {}, ValueError, "add_bias_kv=True is not supported"),
        ({"add_zero_attn": True}, {}, ValueError, "add_zero_attn=True is not supported"),
        ({}, {"num_kv_heads": 2}, ValueError, r"num_kv_heads from mha \(4\).*GQA"),
        ({"dropout": 0.1}, {"dropout": 0.2}, ValueError, r"dropout from mha \(0.1\)"),
        ({}, {"dtype": torch.float32}, ValueError, "dtype from mha"),
        ({}, {"kdim": 8}, ValueError, "kdim from mha"),
        ({}, {"batch_first": False}, ValueError, r"\(B, S, E\) inputs \(batch first\) only"),
    ],
)
def test_from_torch_refuses_what_it_cannot_copy(
    torch_options: dict, kwargs: dict, error: type, match: str
) -> None:
    mha = _random_torch_mha(16, 4, **torch_options)
    with pytest.raises(error, match=match):
        MultiheadDilatedAttention.from_torch(mha, [8], [1], **kwargs)


def test_from_torch_needs_a_torch_multihead_attention() -> None:
    ours = MultiheadDilatedAttention(16, 4, [8], [1])
    with pytest.raises(TypeError, match=r"mha must be an nn\.MultiheadAttention"):
        MultiheadDilatedAttention.from_torch(ours, [8], [1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("torch_options", "num_kv_heads", "match"),
    [
        ({"add_bias_kv": True}, 4, "add_bias_kv=True is not supported"),
        ({}, 2, r"needs num_kv_heads == num_heads \(4\), got num_kv_heads=2"),
    ],
)
def test_load_state_dict_refuses_torch_state_it_cannot_hold(
    torch_options: dict, num_kv_heads: int, match: str
) -> None:
    mha = _random_torch_mha(16, 4, **torch_options)
    ours = MultiheadDilatedAttention(16, 4, [8], [1], num_kv_heads=num_kv_heads)
    with pytest.raises(ValueError, match=match):
        ours.load_state_dict(mha.state_dict())


_OPTIONS = st.fixed_dictionaries(
    {
        "num_kv_heads": st.sampled_from([1, 2, 4]),
        "qk_norm": st.booleans(),
        "sub_layernorm": st.booleans(),
        "position": st.sampled_from([None, "rotary", "xpos", "alibi", "t5"]),
        "is_causal": st.booleans(),
        "head_offsets": st.sampled_from(["cyclic", "grouped"]),
        "bias": st.booleans(),
    }
)


@examples(15)
@given(
    options=_OPTIONS,
    S=st.integers(1, 32),
    padding=st.booleans(),
    documents=st.booleans(),
    branches=st.sampled_from([([8, 16], [1, 2]), ([5, 12, 40], [1, 3, 6]), ([6], [2])]),
)
def test_module_equals_functional_with_the_same_weights_and_reference(
    options: dict, S: int, padding: bool, documents: bool, branches: tuple
) -> None:
    m = MultiheadDilatedAttention(32, 4, *branches, dtype=torch.float64, **options)
    for p in m.parameters():  # fresh values: LayerNorm and zero biases would hide mistakes
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, S, 32, dtype=torch.float64, requires_grad=True)
    extras = {}
    if padding:
        extras["key_padding_mask"] = torch.rand(2, S) < 0.3
    if documents:
        extras["document_ids"] = (torch.rand(2, S) < 0.2).cumsum(-1)
    out, _ = m(x, x, x, **extras)
    expected = module_reference(m, x, x, x, is_causal=options["is_causal"], **extras)
    torch.testing.assert_close(out, expected)
    params = [x, *m.parameters()]
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, grad, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, params, grad, allow_unused=True)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("position", [None, "rotary", "xpos", "alibi", "t5"])
def test_decoding_token_by_token_equals_the_full_causal_forward(position: str | None) -> None:
    m = MultiheadDilatedAttention(
        32,
        4,
        [4, 8, 16],
        [1, 2, 4],
        num_kv_heads=2,
        position=position,
        qk_norm=True,
        sub_layernorm=True,
        is_causal=True,
        dtype=torch.float64,
    )
    x = torch.randn(2, 27, 32, dtype=torch.float64)
    padding = torch.rand(2, 27) < 0.2
    documents = (torch.rand(2, 27) < 0.15).cumsum(-1)
    extras = lambda end: {"key_padding_mask": padding[:, :end], "document_ids": documents[:, :end]}
    full, _ = m(x, x, x, **extras(27))
    cache = m.new_kv_cache(2, 32)
    steps = [(0, 6), *((t, t + 1) for t in range(6, 20)), (20, 27)]  # prefill, tokens, a chunk
    with torch.no_grad():
        outs = [m(*(x[:, a:b],) * 3, kv_cache=cache, **extras(b))[0] for a, b in steps]
    assert cache.length == 27
    torch.testing.assert_close(torch.cat(outs, 1), full)


def test_fully_padded_rows_give_no_nan_in_outputs_or_gradients() -> None:
    m = MultiheadDilatedAttention(16, 2, [8], [1], position="t5", dtype=torch.float64)
    x = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1] = True
    out, _ = m(x, x, x, key_padding_mask=padding)
    torch.testing.assert_close(out[1], m.out_proj.bias.expand(8, -1))  # attention gave 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_multihead_compiles_fullgraph_without_graph_breaks() -> None:
    m = MultiheadDilatedAttention(
        32, 4, [8, 16], [1, 2], num_kv_heads=2, position="t5", qk_norm=True, sub_layernorm=True
    )
    x = torch.randn(2, 29, 32, requires_grad=True)
    extras = {"key_padding_mask": torch.rand(2, 29) < 0.2, "cu_seqlens": torch.tensor([0, 13, 29])}
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    out, _ = compiled(x, x, x, **extras)
    torch.testing.assert_close(out, m(x, x, x, **extras)[0])
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert m.relative_bias is not None and torch.isfinite(m.relative_bias.bias.grad).all()


def test_dropout_only_in_training_and_only_where_it_is_defined() -> None:
    m = MultiheadDilatedAttention(16, 2, [8], [1], dropout=0.5, backend="math")
    x = torch.randn(1, 8, 16)
    assert not torch.equal(m(x, x, x)[0], m(x, x, x)[0])  # training: random
    m.eval()
    assert torch.equal(m(x, x, x)[0], m(x, x, x)[0])
    flex = MultiheadDilatedAttention(16, 2, [8], [1], dropout=0.5, backend="flex")
    with torch.no_grad(), pytest.raises(ValueError, match="no attention dropout"):
        flex(x, x, x)
    flex.eval()
    with torch.no_grad():
        flex(x, x, x)


def test_magneto_initialisation() -> None:
    m = MultiheadDilatedAttention(256, 4, [8], [1], gamma_init=3.0, sub_layernorm=True)
    std = lambda layer: layer.weight.std().item()
    assert 2.5 < std(m.v_proj) / std(m.q_proj) < 3.5 and 2.5 < std(m.out_proj) / std(m.k_proj) < 3.5
    assert all((layer.bias == 0).all() for layer in (m.q_proj, m.k_proj, m.v_proj, m.out_proj))
    assert isinstance(m.norm, nn.LayerNorm) and "num_heads=4" in repr(m)


def _x(S: int = 8, E: int = 16) -> torch.Tensor:
    return torch.randn(1, S, E)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"need_weights": True}, ValueError, "need_weights=True is not supported"),
        ({"attn_mask": torch.zeros(8, 8)}, ValueError, "attn_mask is not supported"),
        ({"key_padding_mask": torch.zeros(1, 8)}, TypeError, "must be a bool tensor"),
        ({"query": torch.randn(8, 16)}, ValueError, r"query must have shape \(B, S, 16\)"),
        ({"key": _x(E=12)}, ValueError, r"key must have shape \(B, S, 16\)"),
        ({"value": _x(S=7)}, ValueError, "must share the batch size"),
    ],
)
def test_bad_forward_inputs_raise(kwargs: dict, error: type, match: str) -> None:
    m = MultiheadDilatedAttention(16, 2, [8], [1])
    inputs = {"query": _x(), "key": _x(), "value": _x()}
    inputs.update({name: kwargs.pop(name) for name in list(kwargs) if name in inputs})
    with pytest.raises(error, match=match):
        m(**inputs, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embed_dim": 15}, "divisible by num_heads"),
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"num_heads": 0}, "num_heads must be a positive"),
        ({"dropout": 1.5}, r"dropout must be in \[0.0, 1.0\]"),
        ({"gamma_init": 0.0}, r"gamma_init must be in \(0.0, inf\]"),
        ({"position": "learned"}, "position must be None"),
        ({"embed_dim": 6, "num_heads": 2, "position": "rotary"}, "even head dim"),
        ({"dilation_rates": [9]}, "at most its segment length"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs: dict, match: str) -> None:
    args = {"embed_dim": 16, "num_heads": 4, "segment_lengths": [8], "dilation_rates": [1]}
    with pytest.raises(ValueError, match=match):
        MultiheadDilatedAttention(**{**args, **kwargs})


def test_batch_first_true_is_accepted() -> None:
    m = MultiheadDilatedAttention(16, 4, [8], [1], batch_first=True)
    assert m.batch_first is True
    x = torch.randn(2, 8, 16)
    assert m(x, x, x)[0].shape == (2, 8, 16)


@pytest.mark.parametrize(
    ("batch_first", "error", "match"),
    [
        (False, ValueError, r"batch_first=False .*takes \(B, S, E\) inputs \(batch first\) only"),
        (1, TypeError, "batch_first must be a bool, got 1"),
        ("yes", TypeError, "batch_first must be a bool, got 'yes'"),
        (None, TypeError, "batch_first must be a bool, got None"),
    ],
)
def test_batch_first_other_than_true_raises(batch_first: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MultiheadDilatedAttention(16, 4, [8], [1], batch_first=batch_first)  # type: ignore[arg-type]


def test_kv_cache_errors() -> None:
    m = MultiheadDilatedAttention(16, 2, [8], [1], is_causal=True)
    cache = m.new_kv_cache(1, 8)
    with torch.no_grad():
        m(_x(S=6), _x(S=6), _x(S=6), kv_cache=cache)
        with pytest.raises(ValueError, match="KVCache is full"):
            m(_x(S=3), _x(S=3), _x(S=3), kv_cache=cache)
        with pytest.raises(ValueError, match="must be the new tokens of the query"):
            m(_x(S=1), _x(S=2), _x(S=2), kv_cache=cache)
        with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(1, 7\)"):
            m(_x(S=1), _x(S=1), _x(S=1), kv_cache=cache, key_padding_mask=torch.zeros(1, 1).bool())
    assert "length=6" in repr(cache)  # the failed steps stored nothing
    cache.truncate()
    assert cache.length == 0
    with pytest.raises(ValueError, match=r"length must be an integer in \[0, 0\]"):
        cache.truncate(3)


def test_xpos_refuses_positions_past_its_range() -> None:
    m = MultiheadDilatedAttention(16, 2, [8], [1], position="xpos", xpos_scale_base=4.0)
    with pytest.raises(ValueError, match=r"xPos in torch.float32 supports positions up to 141"):
        m(_x(S=200), _x(S=200), _x(S=200))
