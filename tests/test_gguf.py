"""GGUF output proven in llama.cpp: recipe types read back, logits against mixprec's dequantized model,
and the `--tensor-type-file` reproducing the same file through `llama_model_quantize`.

Run: .venv/bin/python -m pytest tests/test_gguf.py -q
Needs llama-cpp-python and gguf (runs/setup.sh installs both, so CI runs these tests). The model is a
tiny Qwen2-MoE in the layout llama.cpp's `qwen2moe` graph computes (every layer MoE with a shared
expert, no top-k renormalisation), with rows of 256 so the K-quants are really used (no fallback), and
weights rounded to fp16 so an F16 GGUF holds them exactly.
"""

from __future__ import annotations

import ctypes
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from gguf import GGUFReader  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from mixprec.bundled.bpe import TokenizerConfig, train_tokenizer  # noqa: E402
from mixprec.checkpoint.gguf import compile_gguf, llama_quantize_types  # noqa: E402
from mixprec.checkpoint.qformat import CompileError  # noqa: E402
from mixprec.cli import main  # noqa: E402
from mixprec.formats.llamacpp import (  # noqa: E402
    match_tensor_type,
    read_tensor_type_file,
    write_tensor_type_file,
)
from mixprec.formats.recipe import ModelRef, Recipe  # noqa: E402
from mixprec.model.data import WindowConfig, windows_from_tokens  # noqa: E402
from mixprec.model.loading import Checkpoint, load_model  # noqa: E402
from mixprec.quant import QuantSettings  # noqa: E402
from mixprec.quant.calibration import Calibration  # noqa: E402
from mixprec.quant.ggml import LADDERS  # noqa: E402
from mixprec.quant.hessians import CalibConfig  # noqa: E402
from mixprec.quant.variants import Variant, apply_group, ensure_variants  # noqa: E402

GGUF_SETTINGS = QuantSettings(method="gguf")
IQ_SETTINGS = QuantSettings(method="gguf-iq")
#: fine-granularity part -> bits per layer: every K-quant of the ladder and Q8_0 appear.
MIX = [{"attn.q": 8, "attn.kv": 6, "attn.o": 5, "experts.gate_up": 2, "experts.down": 3, "shared.gate_up": 4,
        "shared.down": 5},
       {"attn.q": 4, "attn.kv": 8, "attn.o": 3, "experts.gate_up": 3, "experts.down": 2, "shared.gate_up": 6,
        "shared.down": 4}]
#: The i-quant ladder with its 1-bit rung (IQ1_M) on the routed experts, as quant publishers use it.
IQ_MIX = [{"attn.q": 4, "attn.kv": 4, "attn.o": 1, "experts.gate_up": 1, "experts.down": 1, "shared.gate_up": 2,
           "shared.down": 4},
          {"attn.q": 2, "attn.kv": 4, "attn.o": 4, "experts.gate_up": 1, "experts.down": 2, "shared.gate_up": 4,
           "shared.down": 2}]


def _save_llama_cpp_moe(directory: Path, vocab_size: int = 160) -> Path:
    config = AutoConfig.for_model(
        "qwen2_moe", vocab_size=vocab_size, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=256,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[], decoder_sparse_step=1,
        qkv_bias=True, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.08,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    model.save_pretrained(directory)
    return directory


def _recipe(checkpoint: Checkpoint, mix: list[dict[str, int]] | None,
            settings: QuantSettings = GGUF_SETTINGS) -> Recipe:
    model_map = checkpoint.model_map("fine")
    groups: dict[str, int | None] = {}
    for group in model_map.select():
        part = group.name.split(".", 2)[2]
        groups[group.name] = None if mix is None else mix[group.layer][part]
    return Recipe(ModelRef("tiny", checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                  settings, groups)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("gguf")
    checkpoint = Checkpoint.open(_save_llama_cpp_moe(root / "model"))
    recipe = _recipe(checkpoint, MIX)
    ensure_variants(checkpoint, checkpoint.model_map("layer"), [GGUF_SETTINGS.config(b) for b in (2, 3, 4, 5, 6, 8)],
                    root / "work")
    report = compile_gguf(recipe, checkpoint, root / "work", root / "mixed.gguf")
    return {"root": root, "checkpoint": checkpoint, "recipe": recipe, "report": report, "gguf": root / "mixed.gguf",
            "work": root / "work"}


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def _expected_types(recipe: Recipe, method: str = "gguf") -> dict[str, str]:
    """Derived from the recipe by hand: llama.cpp tensor name per group part, the ladder's type."""
    names = {"attn.q": ["attn_q"], "attn.kv": ["attn_k", "attn_v"], "attn.o": ["attn_output"],
             "experts.gate_up": ["ffn_gate_exps", "ffn_up_exps"], "experts.down": ["ffn_down_exps"],
             "shared.gate_up": ["ffn_gate_shexp", "ffn_up_shexp"], "shared.down": ["ffn_down_shexp"]}
    expected = {}
    for group, bits in recipe.groups.items():
        _, layer, part = group.split(".", 2)
        for name in names[part]:
            expected[f"blk.{layer}.{name}.weight"] = LADDERS[method][bits]
    return expected


def test_tensor_types_read_back_equal_the_recipe(built: dict) -> None:
    types = _types(built["gguf"])
    expected = _expected_types(built["recipe"])
    assert {name: types[name] for name in expected} == expected
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "F16"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.1.attn_norm.weight"] == "F32"


def test_routed_experts_are_one_3d_tensor_per_projection(built: dict) -> None:
    tensors = {t.name: t for t in GGUFReader(built["gguf"]).tensors}
    assert list(tensors["blk.0.ffn_down_exps.weight"].shape) == [256, 256, 4]  # ggml order: in, out, experts
    assert not any(".experts." in name for name in tensors)


def test_quantized_bytes_are_the_variants_blocks(built: dict) -> None:
    """The file holds the blocks mixprec measured: the size report counts exactly the variants' bits."""
    checkpoint, recipe, report = built["checkpoint"], built["recipe"], built["report"]
    model_map = checkpoint.model_map("fine")
    predicted = 0
    for name, bits in recipe.groups.items():
        variant = Variant.open(built["root"] / "work" / "variants" / recipe.quant_config(bits).variant_id)
        predicted += variant.storage_bits(model_map.group(name))
    assert report["actual"]["quantized_bytes"] * 8 == predicted == report["predicted"]["quantized_bytes"] * 8
    assert report["actual"]["folder_bytes"] == built["gguf"].stat().st_size
    reader = GGUFReader(built["gguf"])
    assert sum(int(t.n_bytes) for t in reader.tensors) == report["actual"]["tensor_bytes"]


def _llama_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                          n_threads=2)
    try:
        llm.eval(tokens)
        return torch.tensor(np.array(llm.scores[: len(tokens)]), dtype=torch.float32)
    finally:
        llm.close()


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _mixprec_model(built: dict) -> torch.nn.Module:
    checkpoint, recipe = built["checkpoint"], built["recipe"]
    model, model_map = load_model(checkpoint), checkpoint.model_map("fine")
    params = dict(model.named_parameters())
    for name, bits in recipe.groups.items():
        apply_group(params, model_map.group(name),
                    Variant.open(built["work"] / "variants" / recipe.quant_config(bits).variant_id))
    return model


def _engine_and_quantization_kl(built: dict) -> tuple[float, float]:
    """KL(mixprec's dequantized model ‖ llama.cpp running the GGUF) and KL(reference ‖ mixprec's model), on the
    same 48 tokens: the first is what llama.cpp adds, the second the recipe's own quantization error."""
    tokens = torch.randint(3, 160, (48,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        reference = load_model(built["checkpoint"])(torch.tensor([tokens])).logits[0]
        measured = _mixprec_model(built)(torch.tensor([tokens])).logits[0]
    served = _llama_logits(built["gguf"], tokens)
    return _kl(measured, served), _kl(reference, measured)


def test_llama_cpp_runs_the_gguf_as_mixprec_measured_it(built: dict) -> None:
    """KL(mixprec's dequantized model ‖ llama.cpp) is far below the recipe's own quantization KL."""
    engine_kl, quant_kl = _engine_and_quantization_kl(built)
    print(f"KL(mixprec dequantized ‖ llama.cpp) {engine_kl:.2e}, quantization KL {quant_kl:.2e}")
    assert quant_kl > 1e-3, quant_kl
    assert engine_kl < 0.02 * quant_kl, (engine_kl, quant_kl)


def _random_calibration(checkpoint: Checkpoint, cache: Path) -> Calibration:
    """Hessians on 6 x 32 random tokens (the tiny model has no tokenizer), enough to route every expert."""
    tokens = torch.randint(3, 160, (6 * 32,), generator=torch.Generator().manual_seed(1))
    windows = windows_from_tokens(tokens, WindowConfig(32, 6), "random", "quantizer-calibration")
    return Calibration(checkpoint, windows, CalibConfig(num_windows=6, seq_len=32, batch_windows=6), cache)


@pytest.fixture(scope="module")
def built_iq(built: dict) -> dict:
    """The same model as a gguf-iq recipe whose routed experts (and one attention output) sit at width 1, IQ1_M,
    with importance matrices from a small random-token calibration."""
    root, checkpoint = built["root"], built["checkpoint"]
    ensure_variants(checkpoint, checkpoint.model_map("layer"), [IQ_SETTINGS.config(b) for b in (1, 2, 4)],
                    root / "work-iq", calibration=_random_calibration(checkpoint, root / "calibration"))
    recipe = _recipe(checkpoint, IQ_MIX, IQ_SETTINGS)
    report = compile_gguf(recipe, checkpoint, root / "work-iq", root / "iq1.gguf")
    return {**built, "recipe": recipe, "report": report, "gguf": root / "iq1.gguf", "work": root / "work-iq"}


def test_iq1_m_rung_is_written_and_counted_exactly(built_iq: dict) -> None:
    types, tensors = _types(built_iq["gguf"]), {t.name: t for t in GGUFReader(built_iq["gguf"]).tensors}
    assert {name: types[name] for name in _expected_types(built_iq["recipe"], "gguf-iq")} == \
        _expected_types(built_iq["recipe"], "gguf-iq")
    assert {"IQ1_M", "IQ2_XXS", "IQ4_XS"} <= set(types.values())
    assert int(tensors["blk.0.ffn_gate_exps.weight"].n_bytes) * 8 == 256 * 256 * 4 * 1.75
    assert built_iq["report"]["actual"]["quantized_bytes"] == built_iq["report"]["predicted"]["quantized_bytes"]


def test_llama_cpp_runs_the_iq1_m_gguf_as_mixprec_measured_it(built_iq: dict) -> None:
    """llama.cpp evaluates the IQ1_M tensors as mixprec's dequantized model does (the gguf package reading
    libggml's blocks); what is left is llama.cpp's 8-bit activations in its i-quant dot products."""
    engine_kl, quant_kl = _engine_and_quantization_kl(built_iq)
    print(f"IQ1_M recipe: KL(mixprec dequantized ‖ llama.cpp) {engine_kl:.2e}, quantization KL {quant_kl:.2e}")
    assert math.isfinite(engine_kl) and quant_kl > 1e-3, quant_kl
    assert engine_kl < 0.02 * quant_kl, (engine_kl, quant_kl)


def test_tensor_type_file_reproduces_the_types_through_llama_quantize(built: dict) -> None:
    """F16 GGUF + our override file + `--pure` -> the same types and the very same blocks."""
    root, checkpoint = built["root"], built["checkpoint"]
    compile_gguf(_recipe(checkpoint, None), checkpoint, root / "work", root / "f16.gguf")
    write_tensor_type_file(str(root / "types.txt"), llama_quantize_types(built["recipe"], checkpoint))
    items = read_tensor_type_file((root / "types.txt").read_text())
    overrides = (llama_cpp.llama_model_tensor_override * (len(items) + 1))()
    for slot, (pattern, qtype) in zip(overrides, items, strict=False):
        slot.pattern, slot.type = pattern.encode(), _ggml_type_id(qtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True, 2
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(root / "f16.gguf").encode(), str(root / "requant.gguf").encode(),
                                        ctypes.byref(params))
    assert rc == 0
    ours, theirs = GGUFReader(built["gguf"]), GGUFReader(root / "requant.gguf")
    assert _types(root / "requant.gguf") == _types(built["gguf"])
    data = {t.name: np.asarray(t.data) for t in theirs.tensors}
    for tensor in ours.tensors:
        assert np.array_equal(np.asarray(tensor.data), data[tensor.name]), tensor.name
    assert all(match_tensor_type(items, name) is not None for name in llama_quantize_types(built["recipe"], checkpoint))


def _ggml_type_id(name: str) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType[name])


def test_non_ggml_recipe_and_unfaithful_layout_are_refused(built: dict, tiny_model_dirs: dict, tmp_path: Path) -> None:
    checkpoint = built["checkpoint"]
    rtn = Recipe(built["recipe"].model, built["recipe"].granularity, QuantSettings(), built["recipe"].groups)
    with pytest.raises(CompileError, match="--method gguf"):
        compile_gguf(rtn, checkpoint, built["root"] / "work", tmp_path / "x.gguf")
    dense_first = Checkpoint.open(tiny_model_dirs["qwen2_moe"])  # mlp_only_layers=[0], norm_topk_prob=True
    recipe = Recipe(ModelRef("t", "qwen2_moe", dense_first.fingerprint), built["recipe"].granularity, GGUF_SETTINGS,
                    {g.name: None for g in dense_first.model_map("fine").select()})
    with pytest.raises(CompileError, match="every layer MoE"):
        compile_gguf(recipe, dense_first, tmp_path / "work", tmp_path / "y.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_cli_compile_format_gguf_writes_file_and_override(built: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    recipe_path = tmp_path / "recipe.yaml"
    built["recipe"].save(recipe_path)
    out, types = tmp_path / "cli.gguf", tmp_path / "cli-types.txt"
    rc = main(["compile", str(recipe_path), "--format", "gguf", "--out", str(out), "--model",
               str(built["checkpoint"].path), "--work", str(built["root"] / "work"),
               "--export-llama-quantize", str(types)])
    assert rc == 0
    assert _types(out) == _types(built["gguf"])
    assert "^blk\\.0\\.ffn_down_exps\\.weight$=q3_k" in types.read_text().split()
    assert "Q2_K" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("method,bits,budget", [("gguf", ["2", "4", "8"], "4"), ("gguf-iq", ["1", "2", "8"], "2")])
def test_pipeline_quantize_search_compile_in_ggml_types(built: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture, method: str, bits: list[str],
                                                         budget: str) -> None:
    """measure, DP, study and recipe run unchanged over ggml types (gguf-iq with its 1-bit IQ1_M rung, which a
    2.0 bpw budget must use: IQ2_XXS alone is 2.06); the recipe becomes a GGUF llama.cpp runs."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    if method == "gguf-iq":  # its imatrix comes from text calibration: the model needs a tokenizer
        _save_llama_cpp_moe(model, vocab_size=320)
        train_tokenizer([Path(pytest.__file__).read_text(encoding="utf-8")],
                        TokenizerConfig(vocab_size=320)).save_pretrained(model)
        assert main(["quantize", str(model), "--work", str(tmp_path / "work"), "--method", method, "--bits", *bits,
                     "--calib-windows", "4", "--calib-seq-len", "32"]) == 0, capsys.readouterr().err
    else:
        shutil.copytree(built["checkpoint"].path, model)
    generator = torch.Generator().manual_seed(0)
    for split in ("calibration", "evaluation"):
        save_file({"tokens": torch.randint(3, 160, (2048,), generator=generator, dtype=torch.int32)},
                  model / f"{split}.safetensors")
    recipe_path, types, out = tmp_path / "r.yaml", tmp_path / "types.txt", tmp_path / "r.gguf"
    common = [str(model), "--work", str(tmp_path / "work"), "--method", method, "--bits", *bits,
              "--windows", "4", "--seq-len", "32", "--eval-windows", "4", "--studies-dir", str(tmp_path / "studies")]
    assert main(["search", *common, "--budget", budget, "--trials", "4", "--out", str(recipe_path),
                 "--export-llama-quantize", str(types)]) == 0, capsys.readouterr().err
    recipe = Recipe.load(recipe_path)
    assert recipe.quantizer.method == method and recipe.achieved["bpw"] <= float(budget)
    assert main(["compile", str(recipe_path), "--format", "gguf", "--out", str(out), "--model", str(model),
                 "--work", str(tmp_path / "work")]) == 0
    written = _types(out)
    items = read_tensor_type_file(types.read_text())
    assert all(match_tensor_type(items, name) == qtype for name, qtype in written.items() if qtype != "F32")
    assert (method == "gguf-iq") == ("IQ1_M" in written.values())
    assert _llama_logits(out, list(range(3, 35))).isfinite().all()


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "olmoe", "glm4_moe",
                                        "llama", "qwen3"])
def test_every_quantizable_matrix_of_every_family_has_one_llama_cpp_tensor(model_type: str,
                                                                           tiny_model_dirs: dict) -> None:
    """Naming is data: each family's matrices land on distinct llama.cpp tensors (experts on distinct slices)."""
    from mixprec.formats.llamacpp import gguf_name

    checkpoint = Checkpoint.open(tiny_model_dirs[model_type])
    slots = [gguf_name(ref.key) for group in checkpoint.model_map("fine").groups for ref in group.weights]
    assert None not in slots
    assert len(set(slots)) == len(slots)
    names = {slot.name for slot in slots}  # type: ignore[union-attr]
    assert "token_embd.weight" in names and "output.weight" in names and "blk.1.attn_output.weight" in names
    if model_type not in ("llama", "qwen3"):
        assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"} <= names


def test_eval_scores_a_gguf_in_llama_cpp_and_refuses_another_reference(built: dict, tmp_path: Path,
                                                                         tiny_model_dirs: dict[str, Path]) -> None:
    """`mixprec eval FILE.gguf` runs the file in llama.cpp: its mean KL is the one llama.cpp's own logits give."""
    from mixprec.checkpoint.evaluate import EvalConfig, evaluate
    from mixprec.core.errors import FingerprintMismatchError
    from mixprec.model.data import WindowConfig, load_windows
    from tests.measure_helpers import model_with_splits

    model = model_with_splits(built["checkpoint"].path, tmp_path / "model")
    result = evaluate(built["gguf"], model, EvalConfig(seq_len=32, num_windows=3, streaming="off"))
    assert result.candidate_format == "gguf"
    windows = load_windows(model, "evaluation", WindowConfig(32, 3)).tokens
    with torch.no_grad():
        reference = load_model(built["checkpoint"])(windows).logits[:, :-1]
    direct = [_kl(reference[i], _llama_logits(built["gguf"], windows[i].tolist())[:-1]) for i in range(3)]
    assert result.summary.kl_mean == pytest.approx(sum(direct) / 3, rel=1e-3)
    other = model_with_splits(tiny_model_dirs["qwen2_moe"], tmp_path / "other")
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        evaluate(built["gguf"], other, EvalConfig(seq_len=32, num_windows=3, streaming="off"))
    assert main(["eval", str(built["gguf"]), "--reference", str(model), "--windows", "2", "--seq-len", "32",
                 "--streaming", "off"]) == 0


def test_as_ggml_recipe_keeps_every_width_or_rounds_it_up(built: dict) -> None:
    from mixprec.checkpoint.gguf import as_ggml_recipe

    recipe = built["recipe"]
    assert as_ggml_recipe(recipe) is recipe  # already ggml
    names = list(recipe.groups)
    rtn = Recipe(recipe.model, recipe.granularity, QuantSettings(method="rtn"),
                 {name: [2, 3, 4, 5, 6, 7, 8, None, "gptq-b4-g32"][i % 9] for i, name in enumerate(names)})
    mapped = as_ggml_recipe(rtn)
    assert mapped.quantizer.method == "gguf" and mapped.provenance["mapped_from"] == "rtn"
    assert [mapped.groups[n] for n in names] == [[2, 3, 4, 5, 6, 8, 8, None, 4][i % 9] for i in range(len(names))]


def test_olmoe_gguf_runs_in_llama_cpp_as_mixprec_measured_it(tmp_path: Path) -> None:
    """OLMoE (no shared expert, q/k norms over the whole projection): written, loaded and computed as measured."""
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("olmoe", num_key_value_heads=4)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())  # exact in F16, as the file holds them
    model.save_pretrained(tmp_path / "model")
    checkpoint = Checkpoint.open(tmp_path / "model")
    model_map = checkpoint.model_map("fine")
    widths = (2, 3, 4, 5, 6, 8)
    groups = {g.name: widths[i % len(widths)] for i, g in enumerate(model_map.select())}
    recipe = Recipe(ModelRef("tiny-olmoe", checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                    GGUF_SETTINGS, groups)
    ensure_variants(checkpoint, checkpoint.model_map("layer"), [GGUF_SETTINGS.config(b) for b in widths],
                    tmp_path / "work")
    report = compile_gguf(recipe, checkpoint, tmp_path / "work", tmp_path / "olmoe.gguf")
    assert report["arch"] == "olmoe"
    tokens = torch.randint(3, 160, (48,), generator=torch.Generator().manual_seed(5)).tolist()
    measured = load_model(checkpoint)
    params = dict(measured.named_parameters())
    for name, bits in groups.items():
        apply_group(params, model_map.group(name),
                    Variant.open(tmp_path / "work" / "variants" / GGUF_SETTINGS.config(bits).variant_id))
    with torch.no_grad():
        reference = load_model(checkpoint)(torch.tensor([tokens])).logits[0]
        dequantized = measured(torch.tensor([tokens])).logits[0]
    served = _llama_logits(tmp_path / "olmoe.gguf", tokens)
    engine_kl, quant_kl = _kl(dequantized, served), _kl(reference, dequantized)
    print(f"olmoe: KL(mixprec dequantized ‖ llama.cpp) {engine_kl:.2e}, quantization KL {quant_kl:.2e}")
    assert quant_kl > 3e-5, quant_kl
    assert engine_kl < 0.02 * quant_kl, (engine_kl, quant_kl)


def test_olmoe_layouts_llama_cpp_computes_differently_are_refused(tmp_path: Path) -> None:
    from tests.tiny_models import save_tiny_model

    checkpoint = Checkpoint.open(save_tiny_model("olmoe", tmp_path / "model"))  # 2 KV heads for 4 query heads
    model_map = checkpoint.model_map("fine")
    recipe = Recipe(ModelRef("tiny-olmoe", checkpoint.model_type, checkpoint.fingerprint), model_map.granularity,
                    GGUF_SETTINGS, {g.name: None for g in model_map.select()})
    with pytest.raises(CompileError, match="num_key_value_heads"):
        compile_gguf(recipe, checkpoint, tmp_path / "work", tmp_path / "x.gguf")
