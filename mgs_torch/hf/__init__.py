"""Hugging Face ``transformers`` integration (extra ``.[hf]``).

The core (``mgs_torch.mgs_kernel`` …) takes a tokenizer's dict and a ``ModelOutput`` as they come and
never imports transformers; this package adds what needs it.
"""
