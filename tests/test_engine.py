"""KL engine contract: exact zeros, cached path == full forward, weights restored, batching, prefix reuse.

Run: .venv/bin/python -m pytest tests/test_engine.py -q
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from mixprec.core.errors import MixprecError
from mixprec.core.kl import compare_logits
from mixprec.measure.engine.core import EngineConfig, KLEngine
from mixprec.model.data import TokenWindows, WindowConfig, windows_from_tokens
from mixprec.model.loading import Checkpoint, load_model
from mixprec.quant import QuantConfig
from mixprec.quant.variants import Variant, apply_group, ensure_variants

BITS = (2, 4, 8)


@pytest.fixture(scope="module")
def qwen(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Checkpoint, variants at BITS and windows of the tiny Qwen2-MoE (dense layer 0, MoE layer 1)."""
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    work = tmp_path_factory.mktemp("engine_work")
    variants = ensure_variants(checkpoint, checkpoint.model_map("layer"), [QuantConfig(bits=b) for b in BITS], work)
    stream = torch.randint(3, 160, (2000,), generator=torch.Generator().manual_seed(1))
    windows = windows_from_tokens(stream, WindowConfig(seq_len=24, num_windows=10), "random", "calibration")
    return checkpoint, {v.bits: v for v in variants}, windows


def _engine(checkpoint: Checkpoint, variants: dict[int, Variant], windows: TokenWindows,
            granularity: str = "fine", **config: object) -> KLEngine:
    return KLEngine(load_model(checkpoint), checkpoint.model_map(granularity), windows, variants,
                    config=EngineConfig(batch_windows=4, **config))  # type: ignore[arg-type]


def _quantizable(engine: KLEngine) -> list[str]:
    return [g.name for g in engine.model_map.select()]


def test_identical_model_gives_exactly_zero(qwen) -> None:
    engine = _engine(*qwen)
    for result in (engine.evaluate({}), engine.evaluate({"layers.1.attn.q": None}), engine.evaluate_full({})):
        assert result.kl.numel() == 10 * 23
        assert torch.count_nonzero(result.kl) == 0
        assert bool(result.same_top1.all())


def test_cached_path_equals_full_forward_bitwise(qwen) -> None:
    engine = _engine(*qwen)
    for name in _quantizable(engine):
        cached, full = engine.evaluate({name: 2}), engine.evaluate_full({name: 2})
        assert torch.equal(cached.kl, full.kl), name
        assert float(cached.kl.mean()) > 0, f"{name} at 2 bits should differ from the reference"


def test_matches_independent_apply_group_forward(qwen) -> None:
    """The engine's number equals quantizing a copy with `apply_group` and comparing logits by hand."""
    checkpoint, variants, windows = qwen
    engine = _engine(checkpoint, variants, windows, granularity="layer")
    group = engine.model_map.group("layers.1.experts")
    model = load_model(checkpoint)
    quantized = copy.deepcopy(model)
    apply_group(dict(quantized.named_parameters()), group, variants[4])
    with torch.no_grad():
        ref, q = (m(input_ids=windows.tokens, use_cache=False).logits[:, :-1].reshape(-1, 160)
                  for m in (model, quantized))
    expected = compare_logits(ref, q, windows.tokens[:, 1:].reshape(-1))
    assert torch.allclose(engine.evaluate({group.name: 4}).kl, expected.kl, rtol=1e-4, atol=1e-9)


def test_weights_are_restored(qwen) -> None:
    engine = _engine(*qwen)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    engine.evaluate({name: 2 for name in _quantizable(engine)})
    engine.evaluate_many([{"layers.0.attn.o": 2}, {"layers.1.experts.down": 4}])
    with pytest.raises(MixprecError, match="variants for"):
        engine.evaluate({"layers.0.attn.q": 2, "layers.1.attn.q": 3})
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_batched_equals_single(qwen) -> None:
    engine = _engine(*qwen, max_batch_windows=12)
    assignments = [{name: bits} for name in _quantizable(engine) for bits in BITS]
    batched = engine.evaluate_many(assignments)
    calls = engine.layer_calls
    singles = [engine.evaluate(a) for a in assignments]
    assert engine.layer_calls - calls > calls, "batching should need fewer layer calls than one by one"
    for a, b, s in zip(assignments, batched, singles, strict=True):
        # A batched matmul may sum in another order: per-token KL moves by ~3e-8 at most, means by ~1e-10.
        assert torch.allclose(b.kl, s.kl, rtol=1e-3, atol=1e-7), a
        assert abs(float(b.kl.mean() - s.kl.mean())) <= 1e-3 * float(s.kl.mean()) + 1e-9, a


def kl_fp32_atol(vocab: int) -> float:
    """The absolute fp32 rounding error of one token's KL, used as the tolerance between two exact computations.

    A batched eager-attention matmul sums in another order than the single one, so logits differ by a few ulp.
    KL = sum_v p (log p - log q) is built from two fp32 log-softmaxes whose terms are of size ~log(V) and whose
    difference is then summed: its rounding error is a few eps32 * log(V) (4 of them here: ~4e-6 at V=4096).
    A wrong mask tiling would change the KL by its own size (1e-4..1e-1), far above this. The fixed 1e-7 used
    before was tighter than fp32 can promise and failed on some CPUs (4.8e-7 on one token of 230).
    """
    return 4 * torch.finfo(torch.float32).eps * math.log(vocab)


def test_batched_with_eager_attention_mask(tiny_model_dirs: dict[str, Path], qwen) -> None:
    """An eager attention mask has a batch dimension; tiling it must give the single-assignment result."""
    checkpoint, variants, windows = qwen
    model = load_model(checkpoint)
    model.config._attn_implementation = "eager"
    engine = KLEngine(model, checkpoint.model_map("layer"), windows, variants,
                      config=EngineConfig(batch_windows=4, max_batch_windows=12))
    assert engine._ref.kwargs[0][0]["attention_mask"] is not None
    assignments = [{"layers.0.attn": 2}, {"layers.0.attn": 4}, {"layers.0.mlp": 2}]
    atol = kl_fp32_atol(model.config.vocab_size)
    for batched, a in zip(engine.evaluate_many(assignments), assignments, strict=True):
        single = engine.evaluate_full(a).kl
        assert torch.allclose(batched.kl, single, rtol=1e-3, atol=atol), (a, float((batched.kl - single).abs().max()))


def test_shared_prefix_starts_late_and_stays_exact(qwen) -> None:
    engine = _engine(*qwen)
    base = {name: 4 for name in _quantizable(engine)}
    engine.evaluate(base)
    before = engine.layer_forwards
    changed = dict(base, **{"layers.1.experts.down": 2})
    result = engine.evaluate(changed)
    assert engine.layer_forwards - before == 1, "only the last layer differs, so only it should rerun"
    assert torch.equal(result.kl, engine.evaluate_full(changed).kl)


def test_no_prefix_cache_still_exact(qwen) -> None:
    engine = _engine(*qwen, prefix_cache_mib=0, ref_logits_mib=0)
    base = {name: 4 for name in _quantizable(engine)}
    engine.evaluate(base)
    before = engine.layer_forwards
    assert torch.equal(engine.evaluate(base).kl, engine.evaluate_full(base).kl)
    assert engine.layer_forwards - before == 2 + 2


def test_chunk_ranges_are_bitwise_rows_of_the_full_evaluation(qwen) -> None:
    """A screened evaluation (some chunks of windows) is exactly those windows' rows of a full one, from the
    reference or from a cached prefix, and a full evaluation after partial ones is what it was."""
    engine = _engine(*qwen)
    assert engine.chunk_sequences == (4, 4, 2)
    names = _quantizable(engine)
    base = {name: 4 for name in names}
    changed = dict(base, **{names[len(names) // 2]: 2})
    full = {"base": _engine(*qwen).evaluate(base).kl, "changed": _engine(*qwen).evaluate(changed).kl}
    rows = [0, 4 * 23, 8 * 23, 10 * 23]
    for chunks in (range(0, 1), range(1, 3), range(2, 3), range(0, 3)):
        part = engine.evaluate(changed, chunks=chunks).kl  # first from the reference, later from cached chunks
        assert torch.equal(part, full["changed"][rows[chunks.start]:rows[chunks.stop]]), chunks
    engine.evaluate(base, chunks=range(0, 1))
    assert torch.equal(engine.evaluate(base).kl, full["base"]), "a partial run must not stand for all chunks"
    assert torch.equal(engine.evaluate(changed).kl, full["changed"])


def test_screened_then_rest_costs_one_full_evaluation(qwen) -> None:
    """Screen + remaining chunks run each chunk once (counted in token-layers), and afterwards the whole
    recipe's states are cached: evaluating it in full again reruns no decoder layer."""
    engine = _engine(*qwen)
    recipe = {name: 2 for name in _quantizable(engine)}  # layer 0 changes: every layer runs
    tokens, layers = engine.num_tokens, engine.num_layers
    screen = engine.evaluate(recipe, chunks=range(0, 1)).kl
    assert engine.token_layers == 4 * 23 * layers
    rest = engine.evaluate(recipe, chunks=range(1, 3)).kl
    assert engine.token_layers == tokens * layers, "screen + rest must cost exactly one full evaluation"
    before = engine.layer_forwards
    again = engine.evaluate(recipe).kl
    assert engine.layer_forwards == before and engine.token_layers == tokens * layers
    assert torch.equal(torch.cat([screen, rest]), again)
    assert torch.equal(again, engine.evaluate_full(recipe).kl)
    for bad in (range(0, 0), range(2, 4), range(0, 3, 2), [0, 1]):
        with pytest.raises(MixprecError, match="must be a non-empty range"):
            engine.evaluate(recipe, chunks=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe", "qwen3_moe", "llama"])
def test_other_families_cached_equals_full(tiny_model_dirs: dict[str, Path], model_type: str,
                                           tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_model_dirs[model_type])
    variants = ensure_variants(checkpoint, checkpoint.model_map("layer"), [QuantConfig(bits=3)], tmp_path)
    windows = windows_from_tokens(torch.arange(3, 160).repeat(4), WindowConfig(16, 6), "ramp", "calibration")
    engine = KLEngine(load_model(checkpoint), checkpoint.model_map("layer"), windows, {3: variants[0]},
                      config=EngineConfig(batch_windows=4))
    for group in engine.model_map.select():
        assert torch.equal(engine.evaluate({group.name: 3}).kl, engine.evaluate_full({group.name: 3}).kl)


def test_bad_assignments_name_the_problem(qwen) -> None:
    engine = _engine(*qwen)
    with pytest.raises(MixprecError, match="nearest"):
        engine.evaluate({"layers.1.atn.q": 2})
    with pytest.raises(MixprecError, match="not in the 2-bit variant"):
        engine.evaluate({"embed": 2})
    assert engine.num_sequences == 10
