"""Token windows for measurement, search and evaluation, with their identity recorded.

Three disjoint data roles exist (FIELD.md §8.4): quantizer calibration, measurement/search
("calibration" split of the bundled model) and the final report ("evaluation" split). Every result
file records the `DataSpec` of the windows it used, and `require_disjoint` refuses to judge a recipe
on the tokens it was tuned on.

The bundled model ships its calibration and evaluation splits as token files
(`calibration.safetensors`, `evaluation.safetensors`, one 1-D int32 tensor `tokens`), so the tokens
are identical on every machine whatever the local Python standard library version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mixprec.core.errors import MixprecError

__all__ = ["WindowConfig", "DataSpec", "TokenWindows", "load_windows", "windows_from_tokens", "windows_between",
           "require_disjoint", "BUNDLED_SPLITS", "max_positions", "check_seq_len", "BETWEEN_SUFFIX"]

#: Marks the source of the windows halfway between another set's (`windows_between`).
BETWEEN_SUFFIX = "#between"

BUNDLED_SPLITS = ("calibration", "evaluation")


@dataclass(frozen=True)
class WindowConfig:
    """How many windows of how many tokens to cut from a token stream."""

    seq_len: int = 256
    num_windows: int = 32

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise MixprecError(f"seq_len={self.seq_len} must be at least 2 (one input and one next token)")
        if self.num_windows < 1:
            raise MixprecError(f"num_windows={self.num_windows} must be at least 1")


@dataclass(frozen=True)
class DataSpec:
    """Identity of a set of windows: where they came from and a hash of the exact token ids."""

    source: str
    split: str
    seq_len: int
    num_windows: int
    num_tokens: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenWindows:
    """`tokens` [num_windows, seq_len] int64 and the spec that identifies them."""

    tokens: torch.Tensor
    spec: DataSpec


def max_positions(model_dir: str | Path) -> int | None:
    """The model's `max_position_embeddings` (top level or `text_config`), None when config.json lacks it.

    A config.json that cannot be read returns None: `Checkpoint.open` reports that file with its own error.
    """
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")
    value = config.get("max_position_embeddings", text.get("max_position_embeddings") if isinstance(text, dict)
                       else None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_seq_len(model_dir: str | Path, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's positions before any work: past them the model is not
    trained and the measurement is meaningless (and slow: attention grows with the square of the length)."""
    limit = max_positions(model_dir)
    if limit is not None and seq_len > limit:
        raise MixprecError(f"{flag} {seq_len} exceeds the model's max_position_embeddings {limit} "
                           f"({Path(model_dir) / 'config.json'}); use {flag} {limit} or less")


def _hash_tokens(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def windows_from_tokens(stream: torch.Tensor, config: WindowConfig, source: str, split: str) -> TokenWindows:
    """Cut `num_windows` non-overlapping windows spread evenly over the stream.

    Spreading them (instead of taking the first N) samples the whole split: held-out loss on the
    first windows of our corpus differed from the whole split's by 0.7 nats (FIELD.md §9.3).
    """
    available = stream.numel() // config.seq_len
    if available == 0:
        raise MixprecError(f"{source}: {stream.numel()} tokens are fewer than one window of {config.seq_len}; "
                           f"give more text, or use --seq-len {max(stream.numel(), 2)} or less")
    if available < config.num_windows:
        raise MixprecError(f"{source}: {stream.numel()} tokens give only {available} windows of {config.seq_len}; "
                           f"ask for at most {available} windows or shorter windows")
    starts = torch.linspace(0, available - 1, config.num_windows).round().long() * config.seq_len
    tokens = torch.stack([stream[s : s + config.seq_len] for s in starts.tolist()]).to(torch.int64)
    spec = DataSpec(source, split, config.seq_len, config.num_windows, tokens.numel(), _hash_tokens(tokens))
    return TokenWindows(tokens, spec)


def windows_between(stream: torch.Tensor, config: WindowConfig, source: str, split: str) -> TokenWindows:
    """The `num_windows - 1` windows halfway between the `num_windows` that `windows_from_tokens` cuts: the
    same text, never the same tokens, so recipes chosen on the first set can be compared on these without
    the first set's noise (which the sensitivity table, and every recipe fitted to it, has learned)."""
    available = stream.numel() // config.seq_len
    if config.num_windows < 2 or available < 2 * config.num_windows:
        raise MixprecError(f"{source}: {available} windows of {config.seq_len} tokens are too few to put "
                           f"{config.num_windows - 1} windows between {config.num_windows} others; give at least "
                           f"{2 * config.num_windows} windows' worth of text or measure on fewer windows")
    step = (available - 1) / (config.num_windows - 1)
    starts = [round(step * (i + 0.5)) * config.seq_len for i in range(config.num_windows - 1)]
    tokens = torch.stack([stream[s : s + config.seq_len] for s in starts]).to(torch.int64)
    spec = DataSpec(source + BETWEEN_SUFFIX, split, config.seq_len, len(starts), tokens.numel(), _hash_tokens(tokens))
    return TokenWindows(tokens, spec)


def _bundled_stream(model_dir: Path, split: str) -> torch.Tensor:
    path = model_dir / f"{split}.safetensors"
    if not path.exists():
        raise MixprecError(f"{path} is missing: the model folder ships no {split!r} token split; pass text files "
                           "with --data instead")
    with safe_open(path, "pt") as handle:
        return handle.get_tensor("tokens")


def _text_stream(paths: list[Path], model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids: list[int] = []
    for path in paths:
        if not path.is_file():
            raise MixprecError(f"data file {path} does not exist or is a folder; give text files")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:  # binary data would be measured as replacement characters
            raise MixprecError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); give "
                               "plain text files") from exc
        ids.extend(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def load_windows(model_dir: str | Path, split: str = "calibration", config: WindowConfig | None = None,
                 text_files: list[Path] | None = None, between: bool = False) -> TokenWindows:
    """Windows from the model folder's shipped split, or from text files tokenized with its tokenizer
    (`between`: the windows halfway between those, `windows_between`)."""
    config = config or WindowConfig()
    model_dir = Path(model_dir)
    check_seq_len(model_dir, config.seq_len)
    cut = windows_between if between else windows_from_tokens
    if text_files:
        source = ",".join(str(p) for p in text_files)
        return cut(_text_stream(text_files, model_dir), config, source, split)
    if split not in BUNDLED_SPLITS:
        raise MixprecError(f"split {split!r} is unknown; use one of {BUNDLED_SPLITS} or pass text files")
    return cut(_bundled_stream(model_dir, split), config, f"{model_dir.name}:{split}", split)


def require_disjoint(tuned_on: DataSpec, judged_on: DataSpec) -> None:
    """Refuse to judge a result on the data it was tuned on (same split name and source, or same tokens)."""
    same_split = tuned_on.source == judged_on.source and tuned_on.split == judged_on.split
    if tuned_on.sha256 == judged_on.sha256 or same_split:
        raise MixprecError(
            f"evaluation data {judged_on.source} ({judged_on.split}) is the data the recipe was tuned on; "
            "evaluate on the held-out 'evaluation' split or on other text files"
        )
