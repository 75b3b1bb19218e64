"""GPTQ quantizer and MoE-aware calibration: error compensation, code ranges, real routing, empty experts, variants.

Run: .venv/bin/python -m pytest -q tests/test_gptq.py
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mixprec.bundled.bpe import TokenizerConfig, train_tokenizer
from mixprec.cli import main as cli_main
from mixprec.core.errors import MixprecError, QuantConfigError
from mixprec.model.data import WindowConfig, windows_from_tokens
from mixprec.model.loading import Checkpoint, load_model
from mixprec.model.modelmap import build_model_map
from mixprec.quant import QuantConfig, get_quantizer
from mixprec.quant.calibration import Calibration, stdlib_train_windows
from mixprec.quant.gptq import GPTQQuantizer, GPTQSettings
from mixprec.quant.hessians import (
    CalibConfig,
    HessianSum,
    blend_hessian,
    collect_hessians,
    hessian_key,
    layer_hessian_bytes,
)
from mixprec.quant.variants import ensure_variants
from tests.tiny_models import _COMMON, TINY_CONFIGS, build_tiny_model

CALIB = CalibConfig(num_windows=6, seq_len=32, batch_windows=4)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """GPTQ runs many tiny ops; on a busy 2-core machine intra-op threads cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer_problem(rows: int = 96, cols: int = 128, tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated, unevenly scaled calibration inputs, as real activations are."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(rows, cols, generator=g) * 0.05
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, generator=g) @ mix + 0.3 * torch.randn(tokens, cols, generator=g)
    return weight, x * torch.linspace(0.2, 3.0, cols)


def _output_error(weight: torch.Tensor, deq: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (deq - weight).T) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_output_error_below_rtn_on_calibration_inputs(bits: int, act_order: bool, clip_search: bool) -> None:
    """Same grid (clipping search or not) for both: the gap is GPTQ's error compensation alone."""
    weight, x = _layer_problem()
    hessian = x.T @ x / x.shape[0]
    rtn = get_quantizer(QuantConfig(method="rtn", bits=bits, clip_search=clip_search)).quantize(weight).dequantize()
    settings = GPTQSettings(act_order=act_order, clip_search=clip_search)
    deq = GPTQQuantizer(QuantConfig(method="gptq", bits=bits), settings).quantize(weight, hessian).dequantize()
    rtn_err, gptq_err = _output_error(weight, rtn, x), _output_error(weight, deq, x)
    assert gptq_err < 0.9 * rtn_err, f"{bits} bits {settings}: GPTQ {gptq_err:.3e} vs RTN {rtn_err:.3e}"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_in_range_and_consistent_with_scales(bits: int, symmetric: bool) -> None:
    weight, x = _layer_problem(rows=40, cols=100)  # 100 columns: a partial last group
    config = QuantConfig(method="gptq", bits=bits, group_size=32, symmetric=symmetric)
    q = get_quantizer(config).quantize(weight, x.T @ x)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scales.shape == (40, 4) and q.scales.dtype == torch.float16 and torch.isfinite(q.scales.float()).all()
    if symmetric:
        assert q.zeros is None
    else:
        assert int(q.zeros.max()) <= 2**bits - 1
    assert q.storage_bits() == config.bits_per_weight((40, 100)) * 4000
    assert float(((q.dequantize() - weight) ** 2).mean()) < float((weight**2).mean()) * (0.5 if bits > 2 else 1.0)


@pytest.mark.parametrize("clip_search", [False, True])
def test_uncorrelated_inputs_reduce_to_rtn(clip_search: bool) -> None:
    """With H = I there is nothing to compensate: act-order GPTQ must give RTN's codes exactly."""
    weight, _ = _layer_problem()
    rtn = get_quantizer(QuantConfig(method="rtn", bits=3, clip_search=clip_search)).quantize(weight)
    gptq = GPTQQuantizer(QuantConfig(method="gptq", bits=3), GPTQSettings(act_order=True, clip_search=clip_search))
    q = gptq.quantize(weight, torch.eye(weight.shape[1]))
    assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scales, rtn.scales)


def test_dead_inputs_and_missing_hessian() -> None:
    weight, x = _layer_problem()
    x[:, :10] = 0.0  # inputs never active in calibration
    q = get_quantizer(QuantConfig(method="gptq", bits=4)).quantize(weight, x.T @ x)
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(QuantConfigError, match="needs the Hessian"):
        get_quantizer(QuantConfig(method="gptq")).quantize(weight)
    with pytest.raises(QuantConfigError, match="does not match"):
        get_quantizer(QuantConfig(method="gptq")).quantize(weight, torch.eye(5))
    with pytest.raises(QuantConfigError, match="damp"):
        GPTQSettings(damp=0.0)


def test_blend_weights_own_hessian_by_token_count() -> None:
    own, fallback = HessianSum(3), torch.diag(torch.tensor([2.0, 2.0, 2.0]))
    own.add(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # 2 tokens, unit mean diagonal after scaling
    h, alpha = blend_hessian(own, fallback, threshold=8)
    assert alpha == 0.25
    expected = 0.25 * torch.diag(torch.tensor([1.5, 1.5, 0.0])) + 0.75 * torch.eye(3)
    assert torch.allclose(h, expected)
    assert blend_hessian(own, fallback, threshold=2)[1] == 1.0
    assert torch.equal(blend_hessian(HessianSum(3), fallback, threshold=4)[0], torch.eye(3))
    zero = torch.zeros(3, 3)  # a fallback with no signal (all-padding calibration): each expert its own copy
    first, second = (blend_hessian(HessianSum(3), zero, threshold=4)[0] for _ in range(2))
    assert torch.equal(first, zero) and first.data_ptr() not in (second.data_ptr(), zero.data_ptr())


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_quantizable_matrix_of_every_family_gets_a_hessian(model_type: str) -> None:
    model = build_tiny_model(model_type)
    mm = build_model_map({n: tuple(p.shape) for n, p in model.named_parameters()}, model_type,
                         model.config.num_hidden_layers)
    tokens = torch.randint(3, 160, (4, 16), generator=torch.Generator().manual_seed(0))
    hessians = {k: h for layer in collect_hessians(model, mm, tokens, CALIB) for k, h in layer.hessians.items()}
    for group in mm.groups:
        if group.kind.value == "embedding":
            continue
        for ref in group.weights:
            h = hessians[hessian_key(ref.param, ref.expert)]
            assert h.shape == (ref.shape[1], ref.shape[1]) and torch.isfinite(h).all(), f"{model_type}: {ref.unit}"


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3", "llama"])
def test_layer_hessian_bytes_is_what_calibration_really_holds(model_type: str) -> None:
    """The estimate that decides whether GPTQ is a default (before any calibration) equals the largest layer's
    Hessians that collection really yields, for MoE layouts (per expert) and a dense one."""
    model = build_tiny_model(model_type)
    mm = build_model_map({n: tuple(p.shape) for n, p in model.named_parameters()}, model_type,
                         model.config.num_hidden_layers)
    tokens = torch.randint(3, 160, (2, 16), generator=torch.Generator().manual_seed(0))
    held = [sum(4 * h.numel() for h in layer.hessians.values())
            for layer in collect_hessians(model, mm, tokens, CALIB, include_head=False)]
    assert layer_hessian_bytes(mm) == max(held) > 0


def _router_capture(model: torch.nn.Module, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Independent record of one MoE layer's input and top-k choices, from the router module itself."""
    inputs, indices = [], []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...]) -> None:
        inputs.append(args[0].reshape(-1, args[0].shape[-1]))
        indices.append(out[2])

    model.model.layers[layer].mlp.gate.register_forward_hook(record)
    return inputs, indices


def test_expert_hessians_come_from_routed_tokens() -> None:
    model = build_tiny_model("qwen2_moe")
    mm = build_model_map({n: tuple(p.shape) for n, p in model.named_parameters()}, "qwen2_moe", 2)
    tokens = torch.randint(3, 160, (6, 32), generator=torch.Generator().manual_seed(0))
    inputs, indices = _router_capture(model, 1)
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    x, index = torch.cat(inputs), torch.cat(indices)
    layers = list(collect_hessians(model, mm, tokens, CalibConfig(6, 32, 4, fallback_tokens_per_input=0.0)))
    stats = layers[1].experts["model.layers.1.mlp.experts"]
    experts = model.model.layers[1].mlp.experts
    assert sum(stats.tokens) == tokens.numel() * 2, "top-2 routing: every token counted twice"
    for e in range(4):
        routed = x[(index == e).any(-1)]
        assert stats.tokens[e] == routed.shape[0]
        h = layers[1].hessians[hessian_key("model.layers.1.mlp.experts.gate_up_proj", e)]
        assert torch.allclose(h, routed.T @ routed / routed.shape[0], rtol=1e-4, atol=1e-6)
        gate, up = routed @ experts.gate_up_proj[e, :32].T, routed @ experts.gate_up_proj[e, 32:].T
        inter = torch.nn.functional.silu(gate) * up
        h_down = layers[1].hessians[hessian_key("model.layers.1.mlp.experts.down_proj", e)]
        assert torch.allclose(h_down, inter.T @ inter / routed.shape[0], rtol=1e-4, atol=1e-6)
    shared = layers[1].hessians["model.layers.1.mlp.shared_expert.gate_proj.weight"]
    assert torch.allclose(shared, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6), "shared expert sees every token"


def test_expert_with_no_routed_tokens_gets_all_token_hessian() -> None:
    model = build_tiny_model("qwen2_moe")
    mm = build_model_map({n: tuple(p.shape) for n, p in model.named_parameters()}, "qwen2_moe", 2)
    # the router never picks expert 0: its choices are rewritten to expert 3
    model.model.layers[1].mlp.gate.register_forward_hook(
        lambda m, args, out: (out[0], out[1], torch.where(out[2] == 0, 3, out[2])))
    tokens = torch.randint(3, 160, (6, 32), generator=torch.Generator().manual_seed(0))
    layer = list(collect_hessians(model, mm, tokens, CALIB))[1]
    stats = layer.experts["model.layers.1.mlp.experts"]
    assert stats.tokens[0] == 0 and stats.alpha_gate_up[0] == 0.0 and stats.alpha_down[0] == 0.0
    assert all(a == 1.0 for a in stats.alpha_gate_up[1:]), "experts with enough tokens use their own Hessian"
    all_tokens = layer.hessians["model.layers.1.mlp.shared_expert.gate_proj.weight"]
    h = layer.hessians[hessian_key("model.layers.1.mlp.experts.gate_up_proj", 0)]
    assert torch.allclose(h, all_tokens / torch.diagonal(all_tokens).mean(), rtol=1e-4, atol=1e-6)
    h_down = layer.hessians[hessian_key("model.layers.1.mlp.experts.down_proj", 0)]
    assert torch.isfinite(h_down).all() and float(torch.diagonal(h_down).min()) > 0
    down = model.model.layers[1].mlp.experts.down_proj[0].detach()
    q = get_quantizer(QuantConfig(method="gptq", bits=3)).quantize(down, h_down)
    assert int(q.codes.max()) <= 7 and torch.isfinite(q.dequantize()).all()


def _proxy_error(variant_q: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = variant_q - weight
    return float(torch.trace(delta @ hessian @ delta.T))


def test_gptq_variants_record_calibration_and_beat_rtn(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_model_dirs["qwen2_moe"])
    mm = checkpoint.model_map("layer")
    tokens = torch.randint(3, 160, (200 * 32,), generator=torch.Generator().manual_seed(0))
    windows = windows_from_tokens(tokens, WindowConfig(32, 6), "random", "quantizer-calibration")
    calibration = Calibration(checkpoint, windows, CALIB, tmp_path / "calibration")
    rtn, = ensure_variants(checkpoint, mm, [QuantConfig(method="rtn", bits=3)], tmp_path)
    gptq, = ensure_variants(checkpoint, mm, [QuantConfig(method="gptq", bits=3)], tmp_path, calibration=calibration)
    assert rtn.manifest.calibration is None and "calibration" not in rtn.manifest.to_dict()
    record = gptq.manifest.calibration
    assert gptq.manifest.quant_config.method == "gptq"
    assert record["identity"]["data"] == json.loads(json.dumps(windows.spec.to_dict()))
    assert sum(record["layers"]["1"]["experts"]["model.layers.1.mlp.experts"]["tokens"]) == 6 * 32 * 2
    params = {name: p.detach() for name, p in load_model(checkpoint).named_parameters()}
    errors = {"rtn": 0.0, "gptq": 0.0}
    for group in mm.select():
        for ref in group.weights:
            weight, hessian = ref.slice_memory(params[ref.param]), calibration.hessian(group, ref)
            for name, variant in (("rtn", rtn), ("gptq", gptq)):
                errors[name] += _proxy_error(variant.dequantized(ref), weight, hessian)
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
    stats_mtime = (calibration.cache_dir / "calibration.json").stat().st_mtime_ns
    again, = ensure_variants(checkpoint, mm, [QuantConfig(method="gptq", bits=3)], tmp_path,
                             calibration=Calibration(checkpoint, windows, CALIB, tmp_path / "calibration"))
    assert again.manifest.file_sha256 == gptq.manifest.file_sha256
    assert (calibration.cache_dir / "calibration.json").stat().st_mtime_ns == stats_mtime, "Hessians recomputed"
    other = windows_from_tokens(tokens.flip(0), WindowConfig(32, 6), "random-flipped", "quantizer-calibration")
    rebuilt, = ensure_variants(checkpoint, mm, [QuantConfig(method="gptq", bits=3)], tmp_path,
                               calibration=Calibration(checkpoint, other, CALIB, tmp_path / "calibration"))
    assert rebuilt.manifest.calibration_identity["data"]["source"] == "random-flipped"


@pytest.fixture(scope="module")
def tokenized_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-MoE saved with a real BPE tokenizer (vocabulary 320), so text calibration paths run."""
    folder = tmp_path_factory.mktemp("tokenized_moe")
    texts = [Path(torch.__file__).read_text(encoding="utf-8"), Path(json.__file__).read_text(encoding="utf-8")]
    train_tokenizer(texts, TokenizerConfig(vocab_size=320)).save_pretrained(folder)
    config = AutoConfig.for_model("qwen2_moe", **(_COMMON | {"vocab_size": 320}), **TINY_CONFIGS["qwen2_moe"])
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_cli_quantize_gptq_with_text_files(tokenized_model: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(Path(pytest.__file__).read_text(encoding="utf-8") * 3, encoding="utf-8")
    code = cli_main(["quantize", str(tokenized_model), "--method", "gptq", "--bits", "4", "--calib-windows", "4",
                     "--calib-seq-len", "32", "--calib-data", str(text), "--no-act-order", "--damp", "0.05",
                     "--work", str(tmp_path / "work")])
    assert code == 0 and "gptq-b4-g64-sym" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "work/variants/gptq-b4-g64-sym/manifest.json").read_text())
    identity = manifest["calibration"]["identity"]
    assert identity["solver"] == {"act_order": False, "block_size": 128, "clip_search": False, "damp": 0.05}
    assert identity["data"]["source"] == str(text) and identity["data"]["num_tokens"] == 4 * 32


def test_default_calibration_text_is_the_train_split(tokenized_model: Path) -> None:
    windows = stdlib_train_windows(tokenized_model, WindowConfig(32, 4))
    assert windows.tokens.shape == (4, 32) and windows.spec.split == "train"
    assert windows.spec.source.startswith("stdlib:train[")
    from mixprec.bundled.corpus import load_corpus

    held_out = {"splits": {"evaluation": {"files": [load_corpus().train.files[0].rel_path]}}}
    (tokenized_model / "splits.json").write_text(json.dumps(held_out))
    try:
        with pytest.raises(MixprecError, match="held out"):
            stdlib_train_windows(tokenized_model, WindowConfig(32, 4))
    finally:
        (tokenized_model / "splits.json").unlink()
