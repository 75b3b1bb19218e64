"""Tests of the bundled stdlib MoE model, its data splits and its training entry point.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_bundled_model.py -q
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mixprec.bundled as bundled
from mixprec.bundled import bundled_model_path
from mixprec.bundled.artifacts import read_token_file
from mixprec.bundled.corpus import (
    SPLIT_NAMES,
    CorpusConfig,
    discover_files,
    split_corpus,
    split_of,
    stdlib_root,
)
from mixprec.bundled.loop import heldout_loss
from mixprec.bundled.train import build_parser, config_from_args, main

OUTPUT_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TRAINING.json",
    "splits.json", "calibration.safetensors", "evaluation.safetensors",
)
SNIPPET = 'def f(x):\n\tif x >  1 :  # naïve — ok\n        return [x , x*2]  \n\n\nprint(f"{f(3)!r}")\n'


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="module")
def splits(model_dir: Path) -> dict:
    return json.loads((model_dir / "splits.json").read_text())["splits"]


def test_bundled_folder_has_every_artifact(model_dir: Path) -> None:
    missing = [name for name in OUTPUT_FILES if not (model_dir / name).is_file()]
    assert not missing, f"bundled model folder lacks {missing}"
    total = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    assert total < 30e6, f"bundled folder is {total / 1e6:.1f} MB, over the 30 MB limit"


def test_missing_bundled_model_says_how_to_recreate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundled, "BUNDLED_MODEL_NAME", "no-such-model")
    with pytest.raises(FileNotFoundError, match="python -m mixprec.bundled.train"):
        bundled_model_path()


def test_tokenizer_round_trips_python(model_dir: Path, splits: dict) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(SNIPPET, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == SNIPPET
    assert len(tok) == 4096 and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    held_out = splits["evaluation"]
    assert held_out["num_bytes"] / held_out["num_tokens"] > 3.0, "BPE should compress stdlib code to > 3 bytes/token"


def test_trained_model_beats_random_init(model_dir: Path) -> None:
    tokens, _ = read_token_file(model_dir / "evaluation.safetensors")
    window = tokens[: 16 * 128 + 1]
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager")
    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(trained.config, dtype=torch.float32, experts_implementation="eager")
    assert trained.config.model_type == "qwen2_moe"
    assert trained.config.mlp_only_layers == [] and not trained.config.norm_topk_prob, "llama.cpp's qwen2moe layout"
    trained_loss = heldout_loss(trained, window, seq_len=128)
    random_loss = heldout_loss(random, window, seq_len=128)
    assert random_loss > 7.5, f"random-init loss {random_loss:.2f} should be near ln(4096) = 8.3"
    assert trained_loss < 5.0, f"bundled model held-out loss {trained_loss:.2f} is not below 5.0"


def test_token_files_match_splits_json(model_dir: Path, splits: dict) -> None:
    """Each token file decodes, file by file, back to text with the hash recorded for its split."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    for name in ("calibration", "evaluation"):
        tokens, meta = read_token_file(model_dir / f"{name}.safetensors")
        record = splits[name]
        assert tokens.dtype == torch.int32 and tokens.dim() == 1
        assert meta["split"] == name and meta["text_sha256"] == record["text_sha256"]
        assert tokens.numel() == record["num_tokens"] >= 100_000
        ids = tokens.tolist()
        ends = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
        assert len(ends) == record["num_files"] and ends[-1] == len(ids) - 1
        digest = hashlib.sha256()
        for start, end in zip([-1, *ends[:-1]], ends, strict=True):
            digest.update(tok.decode(ids[start + 1 : end]).encode("utf-8"))
        assert digest.hexdigest() == record["text_sha256"], f"{name} tokens do not decode to the recorded text"


def test_shipped_splits_are_disjoint_and_follow_split_of(splits: dict) -> None:
    files = {name: set(splits[name]["files"]) for name in SPLIT_NAMES}
    for i, a in enumerate(SPLIT_NAMES):
        for b in SPLIT_NAMES[i + 1 :]:
            assert not files[a] & files[b], f"files in both {a} and {b}: {sorted(files[a] & files[b])[:3]}"
    config = CorpusConfig()
    wrong = [(p, n) for n in SPLIT_NAMES for p in files[n] if split_of(p, config) != n]
    assert not wrong, f"split_of disagrees with splits.json for {wrong[:3]}"


def test_split_is_deterministic_and_order_free() -> None:
    config = CorpusConfig()
    files = discover_files(config)
    first, again = split_corpus(files, config), split_corpus(files, config)
    shuffled = split_corpus(list(reversed(files)), config)
    assert [s.sha256() for s in first.splits()] == [s.sha256() for s in again.splits()]
    for a, b in zip(first.splits(), shuffled.splits(), strict=True):
        assert set(a.rel_paths) == set(b.rel_paths), f"{a.name} membership depends on input order"
    assert [f.rel_path for f in files] == sorted(f.rel_path for f in files)
    assert not any(f.rel_path.startswith("test/") or "site-packages" in f.rel_path for f in files)


def _tiny_corpus(root: Path) -> None:
    """About 24 real stdlib files under synthetic names chosen so that every split gets some."""
    config = CorpusConfig(calibration_fraction=0.2, evaluation_fraction=0.2)
    texts = [f.text for f in discover_files(CorpusConfig(root=stdlib_root() / "email"))][:24]
    wanted = ["train", "train", "calibration", "evaluation"]
    candidates = (f"m{j}.py" for j in range(100_000))
    for i, text in enumerate(texts):
        name = next(c for c in candidates if split_of(c, config) == wanted[i % 4])
        (root / name).write_text(text, encoding="utf-8")


def test_training_entry_point_end_to_end(tmp_path: Path) -> None:
    corpus_root, out = tmp_path / "corpus", tmp_path / "model"
    corpus_root.mkdir()
    _tiny_corpus(corpus_root)
    args = build_parser().parse_args([
        "--out", str(out), "--corpus-root", str(corpus_root), "--heldout-fraction", "0.2", "--max-steps", "3",
        "--vocab-size", "512", "--hidden-size", "32", "--num-layers", "2", "--num-experts", "4",
        "--intermediate-size", "64", "--moe-intermediate-size", "32", "--shared-intermediate-size", "64",
        "--seq-len", "32", "--batch-size", "4", "--probe-windows", "4", "--eval-every", "2", "--warmup-steps", "1",
        "--router-aux-loss-coef", "0.05",
    ])
    summary = main(config_from_args(args))
    missing = [name for name in OUTPUT_FILES if not (out / name).is_file()]
    assert not missing, f"training run did not write {missing}"
    assert summary.steps == 3 and not list(tmp_path.glob(".model.*")), "temporary folder left behind"
    record = json.loads((out / "TRAINING.json").read_text())
    assert record["steps"] == 3 and record["config"]["loop"]["max_steps"] == 3
    assert record["config"]["model"]["router_aux_loss_coef"] == 0.05
    assert record["final"]["heldout_tokens"] == json.loads((out / "splits.json").read_text())[
        "splits"]["evaluation"]["num_tokens"]
    assert [p["heldout_loss"] is not None for p in record["curve"]] == [True, True, True]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32 and model.config.num_experts == 4
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok(SNIPPET, add_special_tokens=False)["input_ids"]) == SNIPPET
