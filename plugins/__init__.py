"""Built-in attention plugins of dhat-seg (installed as ``dhat_seg.plugins``).

Each module is a pluggy plugin: it implements ``register_attention_methods`` and
registers one or more :class:`dhat_seg.attention.AttentionSpec`.
"""
