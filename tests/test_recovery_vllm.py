"""The PEFT adapter fabricq writes is in the form vLLM's LoRA loader reads over a compressed-tensors
base. vLLM needs a GPU and is not installed here, so each rule below is one read in vLLM's source
(vllm-project/vllm, main branch as stored by the code index; file and function named at each
check) and asserted against an adapter written by `fabricq.recovery.adapter.save_peft_adapter`
for a small Llama, the architecture of fabricq's default model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from fabricq.quant.gptq import rtn_quantize
from fabricq.quant.grid import QuantScheme
from fabricq.recovery.adapter import CONFIG_NAME, WEIGHTS_NAME, save_peft_adapter
from fabricq.recovery.lora import attach_lora

# vllm/config/lora.py: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`, the values a
# server's --max-lora-rank takes; an adapter's r must not exceed the one chosen.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vllm/model_executor/models/llama.py `LlamaForCausalLM.packed_modules_mapping` (qkv_proj → q/k/v,
# gate_up_proj → gate/up) expanded over its Linear layers, as vllm/lora/worker_manager.py
# `WorkerLoRAManager._load_adapter` builds `expected_lora_modules`.
LLAMA_EXPECTED_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _parse_fine_tuned_lora_name(name: str) -> tuple[str, str]:
    """vllm/lora/utils.py `parse_fine_tuned_lora_name`, the branch for `lora_A`/`lora_B` weights:
    the `base_model.model.` prefix is removed, the name must end in `.lora_A.weight` or
    `.lora_B.weight`, and what precedes is the module's name in the base model. Any other form
    raises (`… is unsupported LoRA weight`)."""
    start = 2 if "base_model.model." in name else 0
    parts = name.split(".")
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[start:-2]), parts[-2]
    raise ValueError(f"{name} is unsupported LoRA weight")


@pytest.fixture(scope="module", params=[8, 32])
def written(request, tmp_path_factory):
    model = _tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    quantized = {n: rtn_quantize(model.get_submodule(n).weight.detach(), QuantScheme(4, 32, True, "none")) for n in names}
    rank = request.param
    modules = attach_lora(model, quantized, names, rank=rank, alpha=2 * rank)
    folder = tmp_path_factory.mktemp(f"adapter-r{rank}")
    save_peft_adapter(folder, modules, names + ["lm_head"], base_model="OUTPUT")
    config = json.loads((folder / CONFIG_NAME).read_text())
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    return {"model": model, "modules": modules, "config": config, "tensors": tensors, "rank": rank, "folder": folder}


def test_config_has_the_fields_vllm_requires(written):
    # vllm/lora/peft_helper.py `PEFTHelper.from_dict`: r, lora_alpha and target_modules are required.
    config = written["config"]
    assert {"r", "lora_alpha", "target_modules"} <= set(config)
    # `PEFTHelper.__post_init__`: r must be a positive integer; `validate_legal`: r ≤ max_lora_rank,
    # which is at most 512.
    assert isinstance(config["r"], int) and 0 < config["r"] <= max(VLLM_MAX_LORA_RANKS)
    assert config["r"] == written["rank"] and config["r"] in VLLM_MAX_LORA_RANKS  # a server flag value fits exactly
    # `PEFTHelper.lora_alpha: int`; the scaling is lora_alpha / r unless use_rslora (then / sqrt r):
    # it must be fabricq's alpha / rank.
    assert isinstance(config["lora_alpha"], int)
    assert not config.get("use_rslora", False)
    module = next(iter(written["modules"].values()))
    assert config["lora_alpha"] / config["r"] == pytest.approx(module.scaling)


def test_config_has_no_feature_vllm_refuses(written):
    # vllm/lora/peft_helper.py `PEFTHelper._validate_features`: modules_to_save must be None (or
    # empty), use_dora false; `validate_legal`: bias must be "none" ("Adapter bias is not supported").
    config = written["config"]
    assert not config.get("modules_to_save")
    assert not config.get("use_dora", False)
    assert config.get("bias", "none") == "none"
    # `validate_legal`: trainable_token_indices must fit --max-lora-trainable-tokens: none here.
    assert config.get("trainable_token_indices") is None
    # peft's own LoraConfig spelling of a causal LM adapter (vLLM reads it as PEFT writes it).
    assert config["peft_type"] == "LORA"


def test_tensor_names_parse_to_the_base_models_modules(written):
    model, tensors = written["model"], written["tensors"]
    module_names = {n for n, _ in model.named_modules()}
    parsed: dict[str, set] = {}
    for key in tensors:
        module, kind = _parse_fine_tuned_lora_name(key)
        assert key.startswith("base_model.model.")
        # The module name is the base model's own (the checkpoint's names: fabricq's export keeps
        # transformers' module names, `<module>.weight_packed`).
        assert module in module_names, module
        parsed.setdefault(module, set()).add(kind)
    # vllm/lora/lora_model.py `LoRAModel.from_lora_tensors`: each module gets lora_a and lora_b
    # from its two tensors; a module with only one would be served without the other.
    assert all(kinds == {"lora_A", "lora_B"} for kinds in parsed.values())
    assert set(parsed) == set(written["modules"])


def test_adapted_modules_are_ones_vllm_expects(written):
    # vllm/lora/lora_model.py `LoRAModel.from_local_checkpoint.check_unexpected_modules`: the last
    # part of every module name must be among the model's expected LoRA modules, else the adapter
    # is refused ("While loading …, expected target modules in …").
    for key in written["tensors"]:
        module, _ = _parse_fine_tuned_lora_name(key)
        assert module.rsplit(".", 1)[-1] in LLAMA_EXPECTED_MODULES, module
    # No embedding or output-embedding adapters (`lora_embedding_A/B`, the extra-vocabulary path):
    # fabricq adapts quantized Linear modules only.
    assert not any("embed" in k or "lm_head" in k for k in written["tensors"])
    # target_modules, when vLLM's LoRAConfig.target_modules restricts loading, is matched by
    # suffix: the suffix form fabricq writes for a full selection.
    assert sorted(written["config"]["target_modules"]) == sorted(LLAMA_EXPECTED_MODULES)


def test_tensor_shapes_and_dtypes_are_what_vllm_stacks(written):
    # vllm/lora/layers/base_linear.py `BaseLinearLayerWithLoRA.set_lora` copies lora_a into
    # lora_a_stacked[..., :r, :in] and lora_b into lora_b_stacked[..., :out, :r]: PEFT's
    # (r, in_features) and (out_features, r) layouts; `from_lora_tensors` casts to the serving
    # dtype (`tensor.to(device=device, dtype=dtype)`), so any floating dtype loads.
    rank = written["rank"]
    for name, module in written["modules"].items():
        a = written["tensors"][f"base_model.model.{name}.lora_A.weight"]
        b = written["tensors"][f"base_model.model.{name}.lora_B.weight"]
        assert tuple(a.shape) == (rank, module.in_features) and tuple(b.shape) == (module.out_features, rank)
        assert a.dtype in (torch.float32, torch.float16, torch.bfloat16) and a.dtype == b.dtype
        assert a.is_contiguous() and b.is_contiguous()
    # Within one packed vLLM layer (qkv_proj, gate_up_proj) every slice has the adapter's one rank.
    assert {t.shape[0] for k, t in written["tensors"].items() if k.endswith("lora_A.weight")} == {rank}


# ---------------------------------------------------------------------------------------------
# The configured alpha and only the adapted modules, as PEFT loads them
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank, alpha, dropout, chosen, target_modules", [
    # alpha ≠ 2·rank; suffixes that select exactly the adapted modules (all layers' q and v)
    (4, 12, 0.0, lambda n: n.endswith(("q_proj", "v_proj")), ["q_proj", "v_proj"]),
    # a fractional alpha; modules no suffix selects alone (layer 0's o_proj, layer 1's up_proj): full names
    (8, 3.5, 0.25, lambda n: n in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.up_proj"),
     ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.up_proj"]),
], ids=["suffixes", "full-names"])
def test_peft_loads_the_configured_alpha_onto_the_adapted_modules_only(tmp_path, rank, alpha, dropout, chosen,
                                                                       target_modules):
    """An adapter on some of the quantized modules, with an alpha that is not 2·rank: the folder
    names that alpha (and the dropout) and exactly those modules, and `load_with_adapter`
    (transformers, then PEFT, as a user loads it) computes fabricq's logits with LoRA layers on
    those modules alone."""
    from peft.tuners.lora import LoraLayer

    from fabricq.recovery.adapter import ADAPTER_DIR, load_with_adapter

    model = _tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    targets = [n for n in names if chosen(n)]
    quantized = {n: rtn_quantize(model.get_submodule(n).weight.detach(), QuantScheme(4, 32, True, "none"))
                 for n in targets}
    # The base as exported: the adapted modules hold their dequantized weights, the others stay.
    with torch.no_grad():
        for n in targets:
            model.get_submodule(n).weight.copy_(quantized[n].dequantize())
    model.save_pretrained(tmp_path)
    modules = attach_lora(model, quantized, targets, rank=rank, alpha=alpha, dropout=dropout)
    model.eval()  # the new modules' dropout off, as in the served model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in modules.values():  # B ≠ 0: the adapter changes the output, by alpha / rank
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=generator))
    save_peft_adapter(tmp_path / ADAPTER_DIR, modules, names + ["lm_head"], base_model=str(tmp_path))

    config = json.loads((tmp_path / ADAPTER_DIR / CONFIG_NAME).read_text())
    assert config["r"] == rank and config["lora_alpha"] == alpha and config["lora_dropout"] == dropout
    assert sorted(config["target_modules"]) == target_modules
    assert (config["task_type"], config["bias"]) == ("CAUSAL_LM", "none")
    served = load_with_adapter(tmp_path, dtype=torch.float32)
    assert type(served).__name__ == "PeftModelForCausalLM"
    wrapped = {n.removeprefix("base_model.model.") for n, m in served.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(targets)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = served(input_ids=ids).logits
        with served.disable_adapter():
            base = served(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert float((base - ours).abs().max()) > 1e-2
    # Written in another dtype on request, both matrices.
    save_peft_adapter(tmp_path / "bf16", modules, names + ["lm_head"], dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / WEIGHTS_NAME), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}  # noqa: SIM118


def test_a_loaded_model_is_decompressed_only_while_a_module_is_still_packed():
    """`decompress_loaded` calls the quantizer's compressor once when some module still holds
    `weight_packed` (transformers 5 leaves them so), and leaves a dense or unquantized model alone."""
    from types import SimpleNamespace

    from fabricq.recovery.adapter import decompress_loaded

    class Model(torch.nn.Module):
        def __init__(self, packed: bool, compressor):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)
            if packed:
                self.layer.register_buffer("weight_packed", torch.zeros(1, dtype=torch.int32))
            if compressor is not None:
                self.hf_quantizer = SimpleNamespace(compressor=compressor)

    class Compressor:
        def __init__(self):
            self.calls = []

        def decompress_model(self, model):
            self.calls.append(model)

    compressor = Compressor()
    packed = Model(True, compressor)
    decompress_loaded(packed)
    assert compressor.calls == [packed]
    dense = Model(False, Compressor())
    decompress_loaded(dense)
    assert dense.hf_quantizer.compressor.calls == []
    decompress_loaded(Model(True, None))  # no quantizer: nothing to call, nothing fails
