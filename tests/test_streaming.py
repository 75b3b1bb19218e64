"""Streamed model runner: same numbers as the in-memory model, one layer resident at a time, read once per batch.

Run: .venv/bin/python -m pytest tests/test_streaming.py -q
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from mixprec.measure.engine.core import EngineConfig, KLEngine
from mixprec.measure.run import run_measure
from mixprec.measure.table import load_measurement
from mixprec.model.data import WindowConfig, windows_from_tokens
from mixprec.model.loading import Checkpoint, load_model
from mixprec.model.streaming import StreamedModel, open_model, weight_bytes
from mixprec.quant import QuantConfig
from mixprec.quant.variants import ensure_variants
from tests.measure_helpers import model_with_splits, small_config
from tests.tiny_models import TINY_CONFIGS


def _resident(streamed: StreamedModel) -> list[str]:
    return [name for name, p in streamed.model.named_parameters() if p.device.type != "meta"]


def _assert_streams_like(streamed: StreamedModel, reference: torch.nn.Module) -> None:
    """Bitwise the reference's logits, nothing resident before or after, at most one layer during the forward."""
    assert _resident(streamed) == [], "the skeleton holds no weights"
    resident_during: list[int] = []
    for layer in streamed.layers:
        layer.register_forward_pre_hook(lambda *_: resident_during.append(len(_resident(streamed))))
    tokens = torch.randint(3, 160, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=tokens, use_cache=False).logits
        actual = streamed.model(input_ids=tokens, use_cache=False).logits
    assert torch.equal(actual, expected), f"max diff {(actual - expected).abs().max():.3e}"
    assert _resident(streamed) == [], "every weight is released after the forward"
    per_layer = max(len(list(layer.parameters())) for layer in streamed.layers)
    assert max(resident_during) <= per_layer, "at most one layer is resident while a layer runs"


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_streamed_logits_equal_in_memory_bitwise(tiny_model_dirs: dict[str, Path], model_type: str) -> None:
    """Every family (per-expert keys fused on read, Mixtral renames, MLA, tied or not): identical logits."""
    checkpoint = Checkpoint.open(tiny_model_dirs[model_type])
    _assert_streams_like(StreamedModel(checkpoint), load_model(checkpoint))


@pytest.fixture(scope="module")
def qwen(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    work = tmp_path_factory.mktemp("stream_work")
    variants = ensure_variants(checkpoint, checkpoint.model_map("fine"), [QuantConfig(bits=b) for b in (2, 4)], work)
    stream = torch.randint(3, 160, (2000,), generator=torch.Generator().manual_seed(1))
    windows = windows_from_tokens(stream, WindowConfig(seq_len=24, num_windows=10), "random", "calibration")
    return checkpoint, {v.bits: v for v in variants}, windows


def test_engine_streamed_equals_in_memory_bitwise(qwen) -> None:
    """Reference capture, batched candidates, the naive path and the head swap give identical per-token KL."""
    checkpoint, variants, windows = qwen
    model_map = checkpoint.model_map("fine")
    config = EngineConfig(batch_windows=4)
    memory = KLEngine(load_model(checkpoint), model_map, windows, variants, config=config)
    streamed = KLEngine(StreamedModel(checkpoint), model_map, windows, variants, config=config)
    names = [g.name for g in model_map.select()]
    assignments = [{name: 2} for name in names] + [dict.fromkeys(names, 4)]
    for got, want in zip(streamed.evaluate_many(assignments), memory.evaluate_many(assignments), strict=True):
        assert torch.equal(got.kl, want.kl) and float(want.kl.mean()) > 0
    assert torch.equal(streamed.evaluate_full({"layers.1.experts.down": 2}).kl,
                       memory.evaluate_full({"layers.1.experts.down": 2}).kl)
    assert torch.equal(streamed.evaluate({"layers.0.mlp.down": 4}).kl, memory.evaluate({"layers.0.mlp.down": 4}).kl)


def test_each_layer_is_read_once_per_batch(qwen) -> None:
    """All jobs of a batch go through a layer together, so a streamed batch reads layers first..L once each."""
    checkpoint, variants, windows = qwen
    model = StreamedModel(checkpoint)
    engine = KLEngine(model, checkpoint.model_map("fine"), windows, variants, config=EngineConfig(batch_windows=4))
    layer1 = model.layers[1]
    per_layer1 = len(list(layer1.parameters()))
    head_params = len(list(engine.model.lm_head.parameters())) + len(list(engine.model.model.norm.parameters()))
    before = model.reads
    engine.evaluate_many([{"layers.1.attn.q": 2}, {"layers.1.experts.down": 4}, {"layers.1.shared.down": 2}])
    assert model.reads - before == per_layer1 + head_params
    assert _resident(model) == []


def test_measure_table_streamed_equals_in_memory(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`mixprec measure --streaming on` writes the same table as `--streaming off` (every KL column equal)."""
    model = model_with_splits(tiny_model_dirs["qwen3_moe"], tmp_path / "tiny")
    tables = {}
    for mode in ("off", "on"):
        folder = run_measure(small_config(model, tmp_path / mode, streaming=mode))
        assert folder is not None
        measurement = load_measurement(folder)
        assert measurement.summary.engine["streamed"] is (mode == "on")
        tables[mode] = measurement.table.sort_values(["group", "bits"]).reset_index(drop=True)
    columns = ["group", "bits", "kl_mean", "kl_se", "kl_p99", "same_top1", "dkl"]
    pd.testing.assert_frame_equal(tables["on"][columns], tables["off"][columns], check_exact=True)


def test_auto_streams_only_when_the_model_does_not_fit(qwen) -> None:
    checkpoint = qwen[0]
    size = weight_bytes(checkpoint)
    cpu = torch.device("cpu")
    assert isinstance(open_model(checkpoint, "auto", cpu, max_memory=size), StreamedModel)
    assert not isinstance(open_model(checkpoint, "auto", cpu, max_memory=4 * size), StreamedModel)


def test_token_chunked_logits_equal_whole_chunk_logits(qwen) -> None:
    """With a logits budget below one chunk's logits, the head and KL run in slices of tokens: same tokens,
    same per-token KL to fp32 rounding (the head's matmul over fewer rows may round differently)."""
    checkpoint, variants, windows = qwen
    model_map = checkpoint.model_map("fine")
    model = load_model(checkpoint)
    whole = KLEngine(model, model_map, windows, variants, config=EngineConfig(batch_windows=4))
    sliced = KLEngine(model, model_map, windows, variants, config=EngineConfig(batch_windows=4, logits_mib=0.01))
    assert len(sliced._row_slices(sliced._ref.inputs[-1][0])) > 1, "the budget must force token slices"
    assignments = [{"layers.1.experts.down": 2}, {"layers.0.attn.q": 4}]
    for got, want in zip(sliced.evaluate_many(assignments), whole.evaluate_many(assignments), strict=True):
        assert got.kl.shape == want.kl.shape
        torch.testing.assert_close(got.kl, want.kl, rtol=1e-4, atol=1e-9)
        assert torch.equal(got.same_top1, want.same_top1)
    assert float(sliced.evaluate({}).kl.abs().max()) < 1e-6, "the unchanged model stays at (near) zero"


def test_memory_budget_caps_every_cache() -> None:
    capped = EngineConfig().within(100 * 2**20)
    assert capped.prefix_cache_mib == 10 and capped.weight_cache_mib == 5 and capped.ref_logits_mib == 10
    assert capped.logits_mib == 5 and capped.state_dtype == "auto"
    assert EngineConfig().within(2**40) == EngineConfig(state_dtype="auto"), "a large budget caps no cache"


def test_tensor_writer_reads_back_like_save_file(tmp_path: Path) -> None:
    """Tensors written one at a time read back identically through safetensors' own reader and ours."""
    from safetensors import safe_open

    from mixprec.model.tensorfile import TensorFile, TensorWriter

    generator = torch.Generator().manual_seed(3)
    tensors = {"a.codes": torch.randint(0, 16, (7, 5), dtype=torch.uint8, generator=generator),
               "a.scales": torch.randn(7, 1, generator=generator).to(torch.float16),
               "b": torch.randn(3, 4, 2, generator=generator).to(torch.bfloat16),
               "c": torch.randn(3, generator=generator)[::2], "empty": torch.zeros(0, 4), "flag": torch.tensor([True])}
    with TensorWriter(tmp_path / "w.safetensors", {"format": "pt", "k": "v"}) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        with pytest.raises(ValueError, match="twice"):
            writer.add("b", tensors["b"])
    assert not (tmp_path / "w.safetensors.spool").exists()
    with safe_open(tmp_path / "w.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt", "k": "v"}
        assert sorted(handle.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor) and handle.get_tensor(name).dtype == tensor.dtype
    with TensorFile(tmp_path / "w.safetensors") as file:
        assert torch.equal(file.get_tensor("b"), tensors["b"])


def test_streamed_quantize_equals_in_memory_quantization(qwen) -> None:
    """Every stored matrix equals quantizing the checkpoint's tensor held whole in memory (the old path)."""
    from mixprec.quant import get_quantizer

    checkpoint, variants, _ = qwen
    for variant in variants.values():
        quantizer = get_quantizer(variant.config)
        refs = [ref for group in checkpoint.model_map("fine").groups for ref in group.weights
                if ref.unit in variant.manifest.units]
        assert refs
        for ref in refs:
            expected = quantizer.quantize(ref.slice_disk(checkpoint.read(ref.key).to(torch.float32)))
            stored = variant.quantized(ref)
            assert torch.equal(stored.codes, expected.codes) and torch.equal(stored.scales, expected.scales)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_streamed_compiled_candidate_equals_mixprec_load_bitwise(tiny_model_dirs: dict[str, Path], model_type: str,
                                                                 tmp_path: Path) -> None:
    """A compiled checkpoint run layer by layer (matrices dequantized while their layer runs) gives the logits of
    `mixprec.load`'s whole dequantized model, with at most one layer resident."""
    from mixprec.checkpoint.load import CompiledCheckpoint, load
    from mixprec.checkpoint.streamed import StreamedCompiled
    from tests.test_compile import compile_tiny

    _, _, out = compile_tiny(tiny_model_dirs[model_type], tmp_path)
    _assert_streams_like(StreamedCompiled(CompiledCheckpoint.open(out)), load(out))


def test_search_streamed_equals_in_memory(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`mixprec search --streaming on --max-memory` runs its engines on a streamed model and finds the same
    recipe with the same calibration and held-out KL as `--streaming off`."""
    import argparse

    from mixprec.cli import search_cmd
    from mixprec.search.inputs import measure_missing, prepare
    from mixprec.search.pipeline import EngineCache, run_stage
    from tests.test_search import _tiny_model

    model = _tiny_model(tiny_model_dirs, tmp_path, monkeypatch)
    parser = argparse.ArgumentParser()
    search_cmd.register(parser.add_subparsers())
    results, models = {}, {}
    for mode in ("off", "on"):
        args = parser.parse_args(["search", str(model), "--work", str(tmp_path / "work"), "--bits", "2", "4",
                                  "--windows", "4", "--seq-len", "32", "--eval-windows", "4", "--budget", "3",
                                  "--trials", "4", "--granularity", "layer", "--uniform-group-sizes", "64",
                                  "--studies-dir", str(tmp_path / mode), "--streaming", mode, "--max-memory", "2GB"])
        config = search_cmd.config_from_args(args)
        assert (config.measure.streaming, config.measure.max_memory) == (mode, 2 * 10**9)
        measure_missing(config)
        engines = EngineCache.for_config(config)
        results[mode] = run_stage(config, prepare(config), engines)
        models[mode] = list(engines._models.values())
    assert [type(m).__name__ for m in models["on"]] == ["StreamedModel"]
    assert not any(isinstance(m, StreamedModel) for m in models["off"])
    assert results["on"].recipe.groups == results["off"].recipe.groups
    assert results["on"].comparison == results["off"].comparison


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_streamed_hessians_equal_in_memory_bitwise(tiny_model_dirs: dict[str, Path], model_type: str) -> None:
    """GPTQ's Hessian collection on a streamed model (one layer resident, read once) gives every matrix's Hessian,
    routing statistics and token counts exactly as on the whole model, and leaves nothing resident."""
    from mixprec.quant.hessians import CalibConfig, collect_hessians

    checkpoint = Checkpoint.open(tiny_model_dirs[model_type])
    model_map = checkpoint.model_map("layer")
    tokens = torch.randint(3, 160, (5, 16), generator=torch.Generator().manual_seed(2))
    config = CalibConfig(5, 16, batch_windows=2, fallback_tokens_per_input=2.0)  # starved experts: the fallback
    streamed = StreamedModel(checkpoint)
    whole = list(collect_hessians(load_model(checkpoint), model_map, tokens, config))
    got = []
    for result in collect_hessians(streamed, model_map, tokens, config):
        assert _resident(streamed) == [], "a layer is released before its Hessians are handed over"
        got.append(result)
    assert [r.layer for r in got] == [r.layer for r in whole] and len(whole) == model_map.num_layers + 1
    for a, b in zip(got, whole, strict=True):
        assert a.tokens == b.tokens and a.hessians.keys() == b.hessians.keys() and a.hessians
        assert all(torch.equal(a.hessians[k], b.hessians[k]) for k in b.hessians), f"layer {b.layer}"
        assert {n: s.to_dict() for n, s in a.experts.items()} == {n: s.to_dict() for n, s in b.experts.items()}
    layer_reads = sum(len(list(layer.parameters())) for layer in streamed.layers)
    assert streamed.reads == layer_reads + 2, "each layer is read once, and the embedding and final norm"


def test_mixprec_load_streams_a_compiled_checkpoint(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`mixprec.load(..., streaming="on")` gives the model class with no weight resident between forwards, whose
    logits and greedy generation equal the whole dequantized model's; `auto` keeps a small model whole."""
    import mixprec
    from mixprec.checkpoint.load import load
    from tests.test_compile import compile_tiny

    _, _, out = compile_tiny(tiny_model_dirs["qwen2_moe"], tmp_path)
    whole, streamed = load(out), mixprec.load(out, streaming="on")
    assert type(streamed) is type(whole) and {p.device.type for p in streamed.parameters()} == {"meta"}
    tokens = torch.randint(3, 160, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=tokens).logits, whole(input_ids=tokens).logits)
    assert torch.equal(streamed.generate(tokens[:1, :4], max_new_tokens=4, do_sample=False),
                       whole.generate(tokens[:1, :4], max_new_tokens=4, do_sample=False))
    assert {p.device.type for p in streamed.parameters()} == {"meta"}, "every layer released after running"
    assert next(mixprec.load(out).parameters()).device.type == "cpu"


def test_bf16_states_stay_below_the_noise_floor_and_auto_uses_them_only_when_tight(qwen) -> None:
    """Hidden states kept in bf16 change every job's KL (they are rounded) by less than the bf16-compute noise
    floor, halve the state memory, and `auto` (a memory budget) picks them only for a streamed model whose
    states do not fit the in-flight share."""
    checkpoint, variants, windows = qwen
    model_map = checkpoint.model_map("fine")

    def engine(model, **config) -> KLEngine:  # type: ignore[no-untyped-def]
        return KLEngine(model, model_map, windows, variants, config=EngineConfig(batch_windows=4, **config))

    fp32, bf16 = engine(StreamedModel(checkpoint)), engine(StreamedModel(checkpoint), state_dtype="bfloat16")
    assert bf16._ref.inputs[0][0].dtype == torch.bfloat16 and bf16._ref.inputs[-1][0].dtype == torch.float32
    floor = float(fp32.evaluate_full({}, autocast_dtype=torch.bfloat16).kl.double().mean())
    jobs = [{g.name: bits} for g in model_map.select() for bits in (2, 4)]
    deltas = [abs(float(a.kl.double().mean()) - float(b.kl.double().mean()))
              for a, b in zip(fp32.evaluate_many(jobs), bf16.evaluate_many(jobs), strict=True)]
    assert all(d > 0 for d in deltas), "every job ran on rounded states"
    assert sum(deltas) / len(deltas) < floor / 2, (deltas, floor)  # measured: mean 0.25x the floor
    state_mib = sum(t.numel() for t in fp32._ref.inputs[0]) * 4 / 2**20
    assert engine(StreamedModel(checkpoint), state_dtype="auto", prefix_cache_mib=state_mib).state_dtype \
        == torch.bfloat16
    assert engine(StreamedModel(checkpoint), state_dtype="auto", prefix_cache_mib=100 * state_mib).state_dtype \
        == torch.float32
    assert engine(load_model(checkpoint), state_dtype="auto", prefix_cache_mib=state_mib).state_dtype == torch.float32
    assert EngineConfig().within(2**30).state_dtype == "auto" and EngineConfig().state_dtype == "float32"


def test_prefetching_the_next_layer_changes_no_number(qwen) -> None:
    """With prefetch (layer j+1 read in the background while layer j runs; on CUDA into pinned memory and copied on
    a side stream) the engine gives bitwise the same KL, reads each layer once per batch, and holds at most the
    running layer and the next one."""
    checkpoint, variants, windows = qwen
    model_map = checkpoint.model_map("fine")
    plain = KLEngine(StreamedModel(checkpoint), model_map, windows, variants, config=EngineConfig(batch_windows=4))
    model = StreamedModel(checkpoint, prefetch=True)
    ahead = KLEngine(model, model_map, windows, variants, config=EngineConfig(batch_windows=4))
    resident_during: list[int] = []
    ahead_during: list[int] = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda *_: resident_during.append(len(_resident(model))))
        layer.register_forward_pre_hook(lambda *_: ahead_during.append(len(model._pending)))
    jobs = [{g.name: 2} for g in model_map.select()]
    reads = model.reads
    for got, want in zip(ahead.evaluate_many(jobs), plain.evaluate_many(jobs), strict=True):
        assert torch.equal(got.kl, want.kl)
    assert model.reads - reads == sum(len(list(layer.parameters())) for layer in model.layers) + 2, \
        "each layer, the norm and the head read once (the embedding is not needed: jobs start at layer 0)"
    per_layer = max(len(list(layer.parameters())) for layer in model.layers)
    assert max(resident_during) <= per_layer and 0 < max(ahead_during) <= per_layer, "the next layer only"
    assert not model._pending and _resident(model) == []
    model.close()
