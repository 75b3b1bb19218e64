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



@pytest.mark.parametrize("windows", [2, 7, 32])
def test_windows_between_are_other_tokens_of_the_same_text(windows: int) -> None:
    """`between` windows sit halfway between the measurement's: same split, no window shared, none overlapping."""
    import torch

    from mixprec.model.data import BETWEEN_SUFFIX, windows_between, windows_from_tokens

    stream = torch.arange(100_000, dtype=torch.int64)  # token i is i: a window's tokens tell where it starts
    config = WindowConfig(seq_len=64, num_windows=windows)
    measured = windows_from_tokens(stream, config, "text", "calibration")
    between = windows_between(stream, config, "text", "calibration")
    assert between.tokens.shape == (windows - 1, 64) and between.spec.source == "text" + BETWEEN_SUFFIX
    used = {int(t) for t in measured.tokens.flatten()}
    assert not used & {int(t) for t in between.tokens.flatten()}, "a token in both sets"
    first = between.tokens[:, 0].tolist()
    assert all(a < b for a, b in zip(first, first[1:], strict=False)) and first[0] > measured.tokens[0, 0]
    assert measured.spec.sha256 != between.spec.sha256
    with pytest.raises(MixprecError, match="too few"):
        windows_between(stream[: 64 * (2 * windows - 1)], config, "text", "calibration")
