"""Token windows from text files: only real text is measured, and too little of it says what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixprec.core.errors import MixprecError
from mixprec.model.data import WindowConfig, load_windows


def test_binary_and_too_short_data_are_refused(tmp_path: Path) -> None:
    from mixprec.bundled import bundled_model_path

    binary, short = tmp_path / "data.bin", tmp_path / "short.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    short.write_text("def f(): pass\n")
    with pytest.raises(MixprecError, match="not UTF-8 text"):
        load_windows(bundled_model_path(), "calibration", WindowConfig(16, 1), [binary])
    with pytest.raises(MixprecError, match="fewer than one window") as caught:
        load_windows(bundled_model_path(), "calibration", WindowConfig(256, 1), [short])
    assert "at most 0 windows" not in str(caught.value)

