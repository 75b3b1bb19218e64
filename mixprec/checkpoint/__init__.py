"""Compiled checkpoints: bit packing, the mixprec format, compile, verify, load and evaluate.
"""
