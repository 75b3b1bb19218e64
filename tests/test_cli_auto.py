"""The model- and flag-dependent defaults of measure and search (`mixprec.cli.auto`): `--granularity auto` (a
width per routed expert and projection, split from the fine table, for MoE models; `fine` wherever the recipe
must keep one width per layer's experts) and RTN at group sizes 64/32/128 as options unless one setting is asked.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_cli_auto.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mixprec.cli import build_parser, measure_cmd, search_cmd
from mixprec.cli.auto import DEFAULT_OPTIONS
from mixprec.formats.recipe import Recipe
from tests.test_search import _tiny_model, mixprec


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


def _options(command: str, *flags: str) -> list[str]:
    args = build_parser().parse_args([command, *flags])
    (search_cmd.config_from_args if command == "search" else measure_cmd.config_from_args)(args)
    return list(args.options)


@pytest.mark.parametrize("command", ["measure", "search"])
def test_default_options_are_rtn_group_sizes_unless_one_setting_is_asked(command: str,
                                                                         tiny_model_dirs: dict[str, Path]) -> None:
    model = [str(tiny_model_dirs["qwen2_moe"]), *(["--budget", "3"] if command == "search" else [])]
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


@pytest.mark.slow
def test_default_search_ships_a_per_expert_recipe_that_compiles(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """No granularity or options flag: the fine tables of the three RTN group sizes are measured, split per expert
    and projection, searched jointly, and the recipe compiles into mixprec's format and evaluates."""
    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    work, out = tmp_path / "work", tmp_path / "r.yaml"
    code, _, err = mixprec("search", str(model), "--work", str(work), "--bits", "2", "3", "4", "--windows", "4",
                           "--seq-len", "32", "--eval-windows", "4", "--studies-dir", str(tmp_path / "studies"),
                           "--budget", "3", "--trials", "4", "--out", str(out), capsys=capsys)
    assert code == 0, err
    assert (work / "measure" / "drop-fine" / "table.csv").is_file()
    assert (work / "measure" / "split-expert-fine" / "table.csv").is_file()
    for size in (32, 128):
        assert (work / "measure" / f"split-expert-fine-g{size}" / "table.csv").is_file()
    recipe = Recipe.load(out)
    assert recipe.granularity == "expert-fine" and recipe.uses_options
    assert {recipe.quant_config(o).group_size for o in recipe.groups.values()} <= {32, 64, 128}
    assert any(name.endswith(".experts.3.down") for name in recipe.groups), sorted(recipe.groups)[:8]
    code, _, err = mixprec("compile", str(out), "--model", str(model), "--work", str(work), "--out",
                           str(tmp_path / "ckpt"), capsys=capsys)
    assert code == 0, err
    code, stdout, err = mixprec("eval", str(tmp_path / "ckpt"), "--reference", str(model), "--windows", "4",
                                "--seq-len", "32", capsys=capsys)
    assert code == 0 and "KL" in stdout, err
