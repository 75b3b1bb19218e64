"""The model- and flag-dependent defaults of measure and search (`mixprec.cli.auto`): `--granularity auto` (a
width per routed expert and projection, split from the fine table, for MoE models; `fine` wherever the recipe
must keep one width per layer's experts) and GPTQ at group sizes 64/32/128 as options unless one setting is asked
(RTN where one layer's Hessians do not fit in memory).

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_cli_auto.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mixprec.bundled.bpe import TokenizerConfig, train_tokenizer
from mixprec.cli import build_parser, measure_cmd, search_cmd
from mixprec.cli.auto import DEFAULT_OPTIONS, RTN_OPTIONS, default_options
from mixprec.formats.recipe import Budget, Recipe
from mixprec.model.loading import Checkpoint
from mixprec.quant.hessians import layer_hessian_bytes
from tests.test_search import _tiny_model, mixprec
from tests.tiny_models import _COMMON, TINY_CONFIGS


def _resolved(command: str, *flags: str) -> tuple[str, str]:
    args = build_parser().parse_args([command, *flags])
    config = (search_cmd.config_from_args(args) if command == "search" else measure_cmd.config_from_args(args))
    measure = config.measure_config() if command == "search" else config  # type: ignore[union-attr]
    assert measure.granularity == args.granularity and measure.mode == args.mode
    return args.granularity, args.mode


@pytest.mark.parametrize("command", ["measure", "search"])
def test_auto_picks_per_expert_split_for_moe_models(command: str, tiny_model_dirs: dict[str, Path]) -> None:
    budget = ["--budget", "3"] if command == "search" else []
    for family in ("qwen2_moe", "mixtral", "deepseek_v3"):
        assert _resolved(command, str(tiny_model_dirs[family]), *budget) == ("expert-fine", "split"), family
    assert _resolved(command, str(tiny_model_dirs["llama"]), *budget) == ("fine", "drop"), "a dense model"


def test_auto_keeps_one_width_per_layer_where_the_target_needs_it(tiny_model_dirs: dict[str, Path]) -> None:
    moe = [str(tiny_model_dirs["qwen2_moe"]), "--budget", "3"]
    assert _resolved("search", *moe, "--export-exl3", "x.yaml") == ("fine", "drop")
    assert _resolved("search", *moe, "--method", "gguf") == ("fine", "drop")
    assert _resolved("search", *moe, "--mode", "drop") == ("fine", "drop")
    assert _resolved("search", *moe, "--mode", "raise") == ("fine", "raise")
    assert _resolved("search", *moe, "--options", "rtn-g32", "rtn-g128") == ("expert-fine", "split")
    assert _resolved("search", *moe, "--granularity", "fine") == ("fine", "drop"), "explicit wins"
    assert _resolved("search", *moe, "--granularity", "expert", "--mode", "split") == ("expert", "split")


@pytest.fixture(scope="module")
def tokenized_moe(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2-MoE with a real BPE tokenizer of its vocabulary: a folder GPTQ can calibrate on text."""
    folder = tmp_path_factory.mktemp("tokenized") / "qwen2_moe"
    shutil.copytree(tiny_model_dirs["qwen2_moe"], folder)
    _add_tokenizer(folder)
    return folder


def _add_tokenizer(folder: Path) -> None:
    """A real byte-level BPE (vocabulary 320) and the tiny Qwen2-MoE rebuilt with that vocabulary in `folder`."""
    train_tokenizer([Path(pytest.__file__).read_text(encoding="utf-8")],
                    TokenizerConfig(vocab_size=320)).save_pretrained(folder)
    config = AutoConfig.for_model("qwen2_moe", **(_COMMON | {"vocab_size": 320}), **TINY_CONFIGS["qwen2_moe"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def _options(command: str, *flags: str) -> list[str]:
    args = build_parser().parse_args([command, *flags])
    (search_cmd.config_from_args if command == "search" else measure_cmd.config_from_args)(args)
    return list(args.options)


@pytest.mark.parametrize("command", ["measure", "search"])
def test_default_options_are_gptq_group_sizes_unless_one_setting_is_asked(command: str, tokenized_moe: Path) -> None:
    model = [str(tokenized_moe), *(["--budget", "3"] if command == "search" else [])]
    assert _options(command, *model) == list(DEFAULT_OPTIONS)
    assert _options(command, *model, "--options") == [], "no family: one group size"
    assert _options(command, *model, "--group-size", "128") == []
    assert _options(command, *model, "--method", "gptq") == []
    assert _options(command, *model, "--mode", "raise") == []
    assert _options(command, *model, "--options", "rtn-g32") == ["rtn-g32"]
    if command == "measure":
        assert _options(command, *model, "--storage", "journal.log") == [], "one table per shared storage"
        configs = measure_cmd.configs_from_args(build_parser().parse_args([command, *model]))
        assert [c.quant.group_size for c in configs] == [64, 32, 128]


def test_default_options_fall_back_to_rtn_where_the_hessians_do_not_fit(tokenized_moe: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    model = str(tokenized_moe)
    need = layer_hessian_bytes(Checkpoint.open(model).model_map("fine"))
    assert default_options(model, memory=2 * need) == list(DEFAULT_OPTIONS)
    assert default_options(model, memory=2 * need - 1) == list(RTN_OPTIONS)
    assert "not GPTQ" in caplog.text and "--max-memory" in caplog.text
    args = build_parser().parse_args(["search", model, "--budget", "3", "--max-memory", str(2 * need - 1)])
    search_cmd.config_from_args(args)
    assert args.options == list(RTN_OPTIONS), "--max-memory is the memory the rule reads"


def test_without_a_tokenizer_the_default_is_rtn_and_gptq_is_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A folder with token files but no tokenizer cannot be calibrated on text: the default falls back to RTN (and
    says so); GPTQ asked for explicitly is refused in one line naming the fixes, before anything is measured (it
    used to calibrate on windows of end-of-text tokens)."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    assert default_options(str(model)) == list(RTN_OPTIONS)
    assert "no tokenizer" in caplog.text
    assert default_options(str(model), calib_data=True) == list(DEFAULT_OPTIONS), "--calib-data: the user's text"
    code, _, err = mixprec("measure", str(model), "--work", str(tmp_path / "work"), "--bits", "2", "--windows", "4",
                           "--seq-len", "32", "--calib-windows", "4", "--options", "gptq-g64", capsys=capsys)
    assert code == 2 and "--calib-data" in err and "--options rtn-g64" in err, err
    assert not (tmp_path / "work" / "measure").exists()


@pytest.mark.slow
def test_default_search_ships_a_per_expert_recipe_that_compiles(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """No granularity or options flag: GPTQ variants of the three group sizes are quantized with their calibration,
    their fine tables measured, split per expert and projection, searched jointly, and the recipe compiles into
    mixprec's format and evaluates."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    _add_tokenizer(model)  # GPTQ calibrates on text: the model needs a tokenizer
    work, out = tmp_path / "work", tmp_path / "r.yaml"
    search = ["search", str(model), "--work", str(work), "--bits", "2", "3", "4", "--windows", "4", "--seq-len", "32",
              "--eval-windows", "4", "--studies-dir", str(tmp_path / "studies"), "--calib-windows", "4",
              "--calib-seq-len", "32"]
    code, _, err = mixprec(*search, "--budget", "3", "--trials", "4", "--out", str(out), capsys=capsys)
    assert code == 0, err
    for size in (32, 64, 128):
        assert (work / "variants" / f"gptq-b2-g{size}-sym" / "manifest.json").is_file()
    calibration = json.loads(next((work / "calibration").glob("*/calibration.json")).read_text())
    source = calibration["identity"]["data"]["source"]
    assert source.startswith("stdlib:train"), "the train split, apart from the measurement's"
    assert (work / "measure" / "drop-fine-gptq" / "table.csv").is_file()
    assert (work / "measure" / "split-expert-fine-gptq" / "table.csv").is_file()
    for size in (32, 128):
        assert (work / "measure" / f"split-expert-fine-gptq-g{size}" / "table.csv").is_file()
    recipe = Recipe.load(out)
    assert recipe.granularity == "expert-fine" and recipe.uses_options
    assert {recipe.quant_config(o).method for o in recipe.groups.values()} == {"gptq"}
    assert {recipe.quant_config(o).group_size for o in recipe.groups.values()} <= {32, 64, 128}
    assert any(name.endswith(".experts.3.down") for name in recipe.groups), sorted(recipe.groups)[:8]
    code, _, err = mixprec("compile", str(out), "--model", str(model), "--work", str(work), "--out",
                           str(tmp_path / "ckpt"), capsys=capsys)
    assert code == 0, err
    code, stdout, err = mixprec("eval", str(tmp_path / "ckpt"), "--reference", str(model), "--windows", "4",
                                "--seq-len", "32", capsys=capsys)
    assert code == 0 and "KL" in stdout, err
    shutil.rmtree(work / "calibration")  # finished tables: another budget neither calibrates nor quantizes again
    code, _, err = mixprec(*search, "--calib-windows", "5", "--budget", "3.5", "--trials", "2", "--out",
                           str(tmp_path / "r35.yaml"), capsys=capsys)
    assert code == 0 and Recipe.load(tmp_path / "r35.yaml").budget == Budget(bpw=3.5), err
    assert not (work / "calibration").exists()
