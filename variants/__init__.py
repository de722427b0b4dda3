"""Model definitions: tokenizers, text encoders, backbones, heads, and the registry of the four variants.

Nothing here imports harness/.
"""
