"""Shared fixtures: tiny saved models of every family, offline mode, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny_models import TINY_CONFIGS, save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model_type -> folder with a saved tiny random model (built once per test session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {model_type: save_tiny_model(model_type, root / model_type) for model_type in TINY_CONFIGS}


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
