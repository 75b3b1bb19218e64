"""Foundation shared by every stage: errors, atomic file I/O, progress bars, byte-bounded caches, KL statistics
and the one place an Optuna storage is opened. Imports nothing else from mixprec.
"""
