"""Measure under a hard memory cap smaller than the model's bf16 size: streamed passes, in-memory cannot.

The cap is RLIMIT_DATA over what an idle interpreter with every module imported holds (tests/capped_run.py
says why that and not a cgroup). The model is a random Qwen3-MoE (40 layers, 16 experts of width 256, hidden
512: 570 MB in bf16, 1.14 GB in fp32); the run may add 90% of its bf16 size. Many small layers keep the test
short while the model is large against one layer and against the run's fixed costs (about 0.2 GB of address
space for the bf16 noise-floor kernels alone). The streamed run measures two batches of jobs (4 jobs, each
batch through all 40 layers) rather than the whole table, which would take 40 batches.

The second test runs every stage, quantize -> measure (the whole table) -> search (two composed trials, then the
held-out check) -> compile -> eval, each as its own capped process, on a model of fewer, wider layers (10 layers
of 64 experts: 520 MB in bf16) so that the whole table is 20 jobs. Every stage runs with its defaults (`auto`
streaming sees the cap through `available_memory`), and eval with `--streaming off` must fail under the same cap.

The third test collects GPTQ's Hessians (`quantize --method gptq`, attention only so that little time goes to the
solver) on the 40-layer model under the same cap: streamed it completes, on the whole fp32 model it cannot.

Run: .venv/bin/python -m pytest tests/test_memory_cap.py -q   (about a minute on two busy cores)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages.journal import JournalFileBackend
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mixprec.bundled import bundled_model_path
from mixprec.measure.store import STUDY_NAME
from mixprec.quant.variants import Variant

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA")]


def _random_moe(folder: Path, layers: int, experts: int, vocab: int = 2048) -> Path:
    config = AutoConfig.for_model("qwen3_moe", vocab_size=vocab, hidden_size=512, num_hidden_layers=layers,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=1024,
                                  moe_intermediate_size=256, num_experts=experts, num_experts_per_tok=4,
                                  norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=256)
    torch.manual_seed(0)
    # sharded as real checkpoints are: a layer's read maps only the shard(s) holding it
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="40MB")
    generator = torch.Generator().manual_seed(0)
    for split in ("calibration", "evaluation"):
        save_file({"tokens": torch.randint(3, 2048, (4000,), generator=generator, dtype=torch.int32)},
                  folder / f"{split}.safetensors")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 40-layer model, with the bundled model's tokenizer (GPTQ calibrates on tokenized stdlib text)."""
    tokenizer = bundled_model_path()
    vocab = max(2048, len(AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)))
    folder = _random_moe(tmp_path_factory.mktemp("capped") / "moe", layers=40, experts=16, vocab=vocab)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _random_moe(tmp_path_factory.mktemp("capped_wide") / "moe", layers=10, experts=64)


def _mixprec(args: list[str], cap: int | None = None, model: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`mixprec ARGS`, under `cap` when given (`model`, default ARGS[1], is the folder whose code is preloaded)."""
    prefix = (["-m", "tests.capped_run", str(cap), str(model or args[1])] if cap is not None
              else ["-m", "mixprec"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *prefix, "-q", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent.parent)


def _allowance(model: Path) -> int:
    """90% of the checkpoint's bf16 size on disk."""
    return int(sum(f.stat().st_size for f in model.glob("model-*.safetensors")) * 0.9)


def test_streamed_measure_fits_a_cap_below_the_bf16_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    allowance = _allowance(model_dir)
    quantize = ["quantize", str(model_dir), "--work", str(tmp_path), "--bits", "2", "4", "--options"]  # RTN g64
    assert _mixprec(quantize).returncode == 0
    measure = ["measure", str(model_dir), "--work", str(tmp_path), "--bits", "2", "4", "--windows", "4",
               "--seq-len", "32", "--device", "cpu", "--no-quantize", "--kinds", "routed_experts", "--max-jobs", "4",
               "--granularity", "layer", "--options"]
    whole = _mixprec([*measure, "--streaming", "off"], cap=allowance)
    assert whole.returncode != 0, "the cap must be too small for the in-memory model, or it proves nothing"
    assert "memory" in whole.stderr.lower(), whole.stderr[-2000:]
    streamed = _mixprec([*measure, "--streaming", "on"], cap=allowance)
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    journal = JournalFileBackend(str(tmp_path / "measure" / "drop-layer" / "journal.log"))
    study = optuna.load_study(study_name=STUDY_NAME, storage=optuna.storages.JournalStorage(journal))
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert len(done) == 4 and all(t.user_attrs["row"]["kl_mean"] > 0 for t in done)


def test_gptq_hessians_stream_under_a_cap_below_the_bf16_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    """`quantize --method gptq` collects its Hessians one layer resident at a time under the cap (the default,
    `auto`, sees the cap); on the whole fp32 model (--streaming off) it cannot."""
    allowance = _allowance(model_dir)
    gptq = ["quantize", str(model_dir), "--method", "gptq", "--bits", "4", "--calib-windows", "4",
            "--calib-seq-len", "32", "--kinds", "attention"]  # few matrices to solve: the Hessians are what streams
    whole = _mixprec([*gptq, "--work", str(tmp_path / "whole"), "--streaming", "off"], cap=allowance)
    assert whole.returncode != 0, "the cap must be too small for the in-memory model, or it proves nothing"
    assert "memory" in whole.stderr.lower(), whole.stderr[-2000:]
    streamed = _mixprec([*gptq, "--work", str(tmp_path / "streamed")], cap=allowance)
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    folders = list((tmp_path / "streamed" / "variants").iterdir())
    assert len(folders) == 1
    variant = Variant.open(folders[0])
    assert variant.config.method == "gptq" and variant.manifest.calibration is not None
    assert len(variant.manifest.calibration["layers"]) == 41  # 40 layers + head


def test_every_stage_fits_a_cap_below_the_bf16_checkpoint(wide_model_dir: Path, tmp_path: Path) -> None:
    """quantize -> measure -> search -> compile -> eval, each under the cap; the capped streamed eval gives the
    uncapped in-memory eval's numbers."""
    model, work, cap = wide_model_dir, tmp_path / "work", _allowance(wide_model_dir)
    small = ["--seq-len", "32", "--device", "cpu"]
    stages = [["quantize", str(model), "--work", str(work), "--bits", "2", "4"],
              ["measure", str(model), "--work", str(work), "--bits", "2", "4", "--windows", "4", *small,
               "--no-quantize", "--granularity", "layer", "--options"],
              ["search", str(model), "--work", str(work), "--budget", "3.0", "--trials", "2", "--bits", "2", "4",
               "--granularity", "layer", "--options", "--windows", "4", "--eval-windows", "4", *small, "--no-measure",
               "--out", str(tmp_path / "recipe.yaml"), "--studies-dir", str(tmp_path / "studies")],
              ["compile", str(tmp_path / "recipe.yaml"), "--model", str(model), "--work", str(work),
               "--out", str(tmp_path / "out")]]
    for stage in stages:
        done = _mixprec(stage, cap=cap, model=model)
        assert done.returncode == 0, f"{stage[0]} under the cap: {done.stderr[-3000:]}"
    evaluate = ["eval", str(tmp_path / "out"), "--reference", str(model), "--windows", "4", "--seq-len", "32"]
    whole = _mixprec([*evaluate, "--streaming", "off"], cap=cap, model=model)
    assert whole.returncode != 0 and "memory" in whole.stderr.lower(), "the cap must bind: " + whole.stderr[-2000:]
    streamed = _mixprec([*evaluate, "--json", str(tmp_path / "capped.json")], cap=cap, model=model)
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert _mixprec([*evaluate, "--streaming", "off", "--json", str(tmp_path / "free.json")]).returncode == 0
    capped, free = (json.loads((tmp_path / f"{n}.json").read_text())["summary"] for n in ("capped", "free"))
    assert capped["kl_mean"] > 0 and json.dumps(capped) == json.dumps(free)  # text: empty buckets are NaN
