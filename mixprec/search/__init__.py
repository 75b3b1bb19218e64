"""The search stage: exact bit costs, the additive estimate solved exactly, and an Optuna study over composed recipes.
"""
