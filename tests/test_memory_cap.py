"""Measure under a hard memory cap smaller than the model's bf16 size: streamed passes, in-memory cannot.

The cap is RLIMIT_DATA over what an idle interpreter with every module imported holds (tests/capped_run.py
says why that and not a cgroup). The model is a random Qwen3-MoE (40 layers, 16 experts of width 256, hidden
512: 570 MB in bf16, 1.14 GB in fp32); the run may add 90% of its bf16 size. Many small layers keep the test
short while the model is large against one layer and against the run's fixed costs (about 0.2 GB of address
space for the bf16 noise-floor kernels alone). The streamed run measures two batches of jobs (4 jobs, each
batch through all 40 layers) rather than the whole table, which would take 40 batches.

Run: .venv/bin/python -m pytest tests/test_memory_cap.py -q   (about a minute on two busy cores)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages.journal import JournalFileBackend
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from mixprec.measure.store import STUDY_NAME

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("capped") / "moe"
    config = AutoConfig.for_model("qwen3_moe", vocab_size=2048, hidden_size=512, num_hidden_layers=40,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=1024,
                                  moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
                                  norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=256)
    torch.manual_seed(0)
    # sharded as real checkpoints are: a layer's read maps only the shard(s) holding it
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="40MB")
    generator = torch.Generator().manual_seed(0)
    for split in ("calibration", "evaluation"):
        save_file({"tokens": torch.randint(3, 2048, (4000,), generator=generator, dtype=torch.int32)},
                  folder / f"{split}.safetensors")
    return folder


def _mixprec(args: list[str], cap: int | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["-m", "tests.capped_run", str(cap), args[1]] if cap is not None else ["-m", "mixprec"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *prefix, "-q", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent.parent)


def test_streamed_measure_fits_a_cap_below_the_bf16_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    bf16 = sum(f.stat().st_size for f in model_dir.glob("model-*.safetensors"))
    allowance = int(bf16 * 0.9)
    assert _mixprec(["quantize", str(model_dir), "--work", str(tmp_path), "--bits", "2", "4"]).returncode == 0
    measure = ["measure", str(model_dir), "--work", str(tmp_path), "--bits", "2", "4", "--windows", "4",
               "--seq-len", "32", "--device", "cpu", "--no-quantize", "--kinds", "routed_experts", "--max-jobs", "4",
               "--granularity", "layer"]
    whole = _mixprec([*measure, "--streaming", "off"], cap=allowance)
    assert whole.returncode != 0, "the cap must be too small for the in-memory model, or it proves nothing"
    assert "memory" in whole.stderr.lower(), whole.stderr[-2000:]
    streamed = _mixprec([*measure, "--streaming", "on"], cap=allowance)
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    journal = JournalFileBackend(str(tmp_path / "measure" / "drop-layer" / "journal.log"))
    study = optuna.load_study(study_name=STUDY_NAME, storage=optuna.storages.JournalStorage(journal))
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert len(done) == 4 and all(t.user_attrs["row"]["kl_mean"] > 0 for t in done)
