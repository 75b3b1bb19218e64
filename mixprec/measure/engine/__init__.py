"""The KL engine: prefix-cached, batched forwards of the reference model with groups swapped to variants.
"""
