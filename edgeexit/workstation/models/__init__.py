"""Staged early-exit models: the representation, backbones, exit heads, exit placement, the builder registry."""
