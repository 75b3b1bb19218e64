"""evaluate / `mixprec eval`: the statistic set of any checkpoint against a reference, in window batches.

Run: .venv/bin/python -m pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mixprec.checkpoint.evaluate import EvalConfig, compare_models, evaluate, format_table, save_result
from mixprec.cli import main
from mixprec.core.errors import FingerprintMismatchError
from mixprec.core.kl import compare_logits, summarize
from mixprec.formats.recipe import Recipe
from mixprec.model.data import WindowConfig, load_windows
from tests.test_compile import compile_tiny, recipe_model
from tests.tiny_models import save_tiny_model

CONFIG = EvalConfig(seq_len=24, num_windows=6, batch_size=4, n_boot=200)


@pytest.fixture(scope="module")
def setup(tiny_model_dirs: dict[str, Path],
          tmp_path_factory: pytest.TempPathFactory) -> tuple[Recipe, Path, Path, Path]:
    """(recipe, work, compiled folder, reference folder with an evaluation token split)."""
    root = tmp_path_factory.mktemp("evaluate")
    reference = root / "reference"
    shutil.copytree(tiny_model_dirs["qwen2_moe"], reference)
    tokens = torch.randint(3, 160, (2000,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    save_file({"tokens": tokens}, reference / "evaluation.safetensors")
    recipe, work, out = compile_tiny(reference, root)
    return recipe, work, out, reference


def test_statistics_equal_the_recipe_model_on_the_same_windows(setup: tuple) -> None:
    recipe, work, out, reference = setup
    result = evaluate(out, reference, CONFIG)
    windows = load_windows(reference, "evaluation", WindowConfig(CONFIG.seq_len, CONFIG.num_windows)).tokens
    from mixprec.model.loading import load_model

    with torch.no_grad():
        ref = load_model(reference)(windows).logits[:, :-1]
        q = recipe_model(reference, work, recipe)(windows).logits[:, :-1]
    cmp = compare_logits(ref.reshape(-1, 160), q.reshape(-1, 160), windows[:, 1:].reshape(-1))
    expected = summarize(cmp, CONFIG.num_windows, CONFIG.n_boot, CONFIG.seed)
    assert result.candidate_format == "mixprec" and result.data.split == "evaluation"
    assert result.summary.n_tokens == CONFIG.num_windows * (CONFIG.seq_len - 1)
    assert result.summary.kl_mean > 0
    for name in ("kl_mean", "kl_p99", "kl_max", "same_top1", "rms_dp", "ppl_ref", "ppl_q", "ln_ppl_ratio"):
        assert math.isclose(getattr(result.summary, name), getattr(expected, name), rel_tol=1e-5, abs_tol=1e-9), name


def test_reference_against_itself_is_zero(setup: tuple) -> None:
    *_, reference = setup
    s = evaluate(reference, reference, CONFIG).summary
    assert s.kl_mean == 0 and s.kl_max == 0 and s.same_top1 == 1 and s.ln_ppl_ratio == 0 and s.rms_dp == 0


def test_batch_size_does_not_change_the_result(setup: tuple) -> None:
    recipe, work, out, reference = setup
    from mixprec.checkpoint.load import load
    from mixprec.model.loading import load_model

    windows = load_windows(reference, "evaluation", WindowConfig(CONFIG.seq_len, CONFIG.num_windows)).tokens
    ref_model, q_model = load_model(reference), load(out)
    one = compare_models(ref_model, q_model, windows, batch_size=1)
    five = compare_models(ref_model, q_model, windows, batch_size=5)
    assert one.kl.shape == (CONFIG.num_windows * (CONFIG.seq_len - 1),)
    # batched matmuls round differently; KLs here are ~1e-5, so compare at 1e-6 absolute
    torch.testing.assert_close(one.kl, five.kl, rtol=1e-3, atol=1e-6)
    assert torch.equal(one.same_top1, five.same_top1)


def test_plain_folder_candidate(setup: tuple, tmp_path: Path) -> None:
    *_, reference = setup
    other = save_tiny_model("qwen2_moe", tmp_path / "other", seed=1)
    result = evaluate(other, reference, CONFIG)
    assert result.candidate_format == "hf" and result.summary.kl_mean > 0.01


def test_wrong_reference_is_refused(setup: tuple, tiny_model_dirs: dict, tmp_path: Path) -> None:
    _, _, out, _ = setup
    other = save_tiny_model("qwen2_moe", tmp_path / "other", seed=1)
    save_file({"tokens": torch.arange(3, 160, dtype=torch.int32).repeat(3)}, other / "evaluation.safetensors")
    with pytest.raises(FingerprintMismatchError, match="--reference"):
        evaluate(out, other, CONFIG)
    assert evaluate(out, other, CONFIG, allow_other_reference=True).summary.kl_mean > 0


def test_table_and_json(setup: tuple, tmp_path: Path) -> None:
    _, _, out, reference = setup
    result = evaluate(out, reference, CONFIG)
    table = format_table(result)
    for label in ("Mean    KLD", "Median  KLD", "90.0%   KLD", "99.0%   KLD", "99.9%   KLD", "Maximum KLD",
                  "Same top p", "RMS Δp", "PPL(ref)", "PPL(q)", "ln(PPL(q)/PPL(ref))", "p_ref top-1 in"):
        assert label in table, label
    save_result(result, tmp_path / "eval.json")
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["summary"]["kl_mean"] == result.summary.kl_mean and data["data"]["sha256"] == result.data.sha256


def test_cli_eval(setup: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, out, reference = setup
    code = main(["eval", str(out), "--reference", str(reference), "--windows", "4", "--seq-len", "16",
                 "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert code == 0 and "Mean    KLD" in printed and "Same top p" in printed
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["n_tokens"] == 4 * 15


def test_eval_of_the_checkpoint_equals_what_the_search_engine_measured(setup: tuple) -> None:
    """The KL the search's engine measures for the recipe is the KL of the compiled checkpoint."""
    from mixprec.checkpoint.load import load
    from mixprec.measure.engine.core import KLEngine
    from mixprec.model.loading import Checkpoint, load_model
    from mixprec.quant.variants import Variant

    recipe, work, out, reference = setup
    windows = load_windows(reference, "evaluation", WindowConfig(CONFIG.seq_len, CONFIG.num_windows))
    variants = {b: Variant.open(work / "variants" / recipe.quant_config(b).variant_id)
                for b in set(recipe.groups.values()) if b is not None}
    engine = KLEngine(load_model(reference), Checkpoint.open(reference).model_map(recipe.granularity), windows,
                      variants)
    measured = engine.evaluate(recipe.groups)
    evaluated = compare_models(load_model(reference), load(out), windows.tokens, CONFIG.batch_size)
    torch.testing.assert_close(evaluated.kl, measured.kl, rtol=1e-3, atol=1e-6)
    assert torch.equal(evaluated.same_top1, measured.same_top1)


def test_streamed_reference_gives_the_same_result(setup: tuple) -> None:
    """`--streaming on` (reference, and a plain candidate, read one layer at a time) changes no number."""
    _, _, out, reference = setup
    streamed = replace(CONFIG, streaming="on")
    for candidate in (out, reference):  # repr: exact floats, and empty confidence buckets (nan) compare equal
        assert repr(evaluate(candidate, reference, streamed).summary) == \
            repr(evaluate(candidate, reference, replace(CONFIG, streaming="off")).summary)
