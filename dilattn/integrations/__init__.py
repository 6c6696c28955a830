"""Integrations with other libraries, each an optional extra imported on its own:

* :mod:`dilattn.integrations.transformers`: ``attn_implementation="dilated"`` for Hugging
  Face models (``pip install 'dilattn[hf]'``).
"""
