"""``attn_implementation="dilated"`` in a Hugging Face model: a tiny random Llama generates.

Needs transformers (``pip install 'dilattn[hf]'``). Nothing is downloaded: the model is built
from a config with random weights. The branches live in the config (``dilated_attention``),
so they are saved and loaded with it. Cached generation is exact: the generated tokens are
the greedy choices of one full forward over the result.

    python examples/huggingface_llama.py
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dilattn.integrations import transformers as dilattn_hf


def main(prompt_len: int = 24, new_tokens: int = 8) -> None:
    dilattn_hf.register()  # "dilated", configured by each model's config
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        dilated_attention={"segment_lengths": [8, 16, 32], "dilation_rates": [1, 2, 4]},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="dilated").eval()

    prompt = torch.randint(0, config.vocab_size, (2, prompt_len))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # row 1 is left-padded, as a tokenizer pads for generation
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    print("generated:", out[:, prompt_len:].tolist())

    full_mask = torch.cat([mask, torch.ones(2, new_tokens, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = model(out, attention_mask=full_mask).logits  # (B, S, vocab)
    greedy = logits[:, prompt_len - 1 : -1].argmax(-1)
    assert torch.equal(greedy, out[:, prompt_len:]), "cached decoding differs from full forward"
    print("cached generation equals the greedy choices of one full forward")


if __name__ == "__main__":
    main()
