"""Interop with transformers and with a real pretrained model (SmolLM2-135M-Instruct via GGUF).

References are independent of our code: transformers' own Qwen3/Llama implementations, its own
GGUF loader, and llama.cpp's q/k permutation (copied below from ``convert_hf_to_gguf.py``).
"""

from __future__ import annotations


import pytest
import torch

import mmafm
from mmafm.interop.hf import (
    InteropError,
    from_hf,
    hf_config,
    save_hf,
    state_dict_from_hf,
    state_dict_to_hf,
    to_hf,
)

transformers = pytest.importorskip("transformers")


def llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp ``LlamaModel.permute`` (convert_hf_to_gguf.py), the reference we must invert."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_text_model(qk_norm: bool = True, tie: bool = True, seed: int = 0):
    """A small dense TextModel with every parameter randomised (norm scales too, so a swapped
    q_norm/k_norm or attn_norm/ffn_norm mapping changes the logits)."""
    torch.manual_seed(seed)
    model = mmafm.create_model(
        "afm_2024_device_tiny", vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, ffn_dim=96, qk_norm=qk_norm, tie_embeddings=tie, max_seq_len=64,
        rope_theta=10000.0,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))
    return model.eval()


def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=ids).logits


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("tie", [True, False])
def test_export_qwen3_matches_transformers_and_imports_back(tie):
    model = tiny_text_model(qk_norm=True, tie=tie)
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    hf_model = to_hf(model)
    assert type(hf_model).__name__ == "Qwen3ForCausalLM"
    expected = hf_logits(hf_model, ids)
    torch.testing.assert_close(our_logits(model, ids), expected, atol=1e-4, rtol=0)

    back = from_hf(hf_model)
    assert back.config.qk_norm and back.config.tie_embeddings == tie
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(our_logits(back, ids), expected, atol=1e-4, rtol=0)


def test_imported_model_rebuilds_through_save_model(tmp_path):
    """A model imported from transformers has no preset: mmafm.load_model rebuilds it from the
    config recorded by mmafm.save_model, and it still computes transformers' logits."""
    model = tiny_text_model(qk_norm=False, tie=False, seed=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    hf_model = to_hf(model)
    imported = from_hf(hf_model)
    assert not hasattr(imported, "model_spec")
    loaded = mmafm.load_model(mmafm.save_model(tmp_path / "imported", imported), family="text")
    assert loaded.model_spec.preset is None and loaded.config == imported.config
    torch.testing.assert_close(our_logits(loaded, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_export_llama_layout_through_save_pretrained(tmp_path):
    model = tiny_text_model(qk_norm=False, tie=False, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 17))
    folder = save_hf(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    expected = hf_logits(reloaded, ids)
    torch.testing.assert_close(our_logits(model, ids), expected, atol=1e-4, rtol=0)
    back = from_hf(folder)
    assert not back.config.qk_norm
    torch.testing.assert_close(our_logits(back, ids), expected, atol=1e-4, rtol=0)


def test_hf_config_fields_and_name_mapping():
    config = mmafm.get_config("afm_2024_device")
    cfg = hf_config(config)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("qwen3", 3072, 26)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (24, 8, 128)
    assert (cfg.intermediate_size, cfg.vocab_size) == (8064, 49152)
    assert cfg.rope_parameters["rope_theta"] == 500_000 and cfg.tie_word_embeddings
    model = tiny_text_model()
    ours = {k: v for k, v in model.state_dict().items() if k in dict(model.named_parameters())}
    hf_names = state_dict_to_hf(ours, model.config)
    assert "model.layers.1.self_attn.k_norm.weight" in hf_names
    assert "model.layers.0.post_attention_layernorm.weight" in hf_names
    assert set(state_dict_from_hf(hf_names, model.config)) == set(ours)


def test_export_refuses_what_transformers_cannot_represent():
    with pytest.raises(InteropError, match="qk_norm"):
        hf_config(tiny_text_model(qk_norm=False).config, layout="qwen3")
    with pytest.raises(InteropError, match="qk_norm"):
        hf_config(tiny_text_model(qk_norm=True).config, layout="llama")
    with pytest.raises(InteropError, match="layout"):
        hf_config(tiny_text_model().config, layout="gpt2")
    for config, field in ((mmafm.get_config("afm_2025_device_tiny"), "kv_share_segments"),
                          (mmafm.get_config("afm_2025_server_tiny"), "local_global_pattern"),
                          (mmafm.get_config("afm_2024_device_tiny", num_experts=4), "num_experts")):
        with pytest.raises(InteropError, match=f"dense.*{field}"):
            hf_config(config)


def test_unpermute_inverts_llama_cpp_permutation():
    from mmafm.interop.smollm2 import unpermute_rope_rows

    weight = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(weight, 3), 3), weight)
    assert not torch.equal(llama_cpp_permute(weight, 3), weight)
    with pytest.raises(InteropError, match="heads"):
        unpermute_rope_rows(torch.randn(10, 4), 3)


# --- SmolLM2-135M-Instruct, a real pretrained model (slow: 135M parameters on CPU) ---------------

@pytest.fixture(scope="module")
def smollm2():
    """``(transformers Llama, our TextModel, tokenizer)`` from one conversion of the GGUF file."""
    pytest.importorskip("gguf")
    from mmafm.interop.smollm2 import (
        convert_gguf,
        hf_llama_from_converted,
        load_smollm2_tokenizer,
        smollm2_gguf_path,
    )
    from mmafm.interop.hf import from_hf_state_dict

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    hf_cfg, tensors = convert_gguf(path)
    return hf_llama_from_converted(hf_cfg, tensors), from_hf_state_dict(hf_cfg, tensors), load_smollm2_tokenizer(path)


QUESTIONS = ("What is the capital of France?", "What is 2 + 2?")
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def smollm2_answers(smollm2):
    """Greedy answers to QUESTIONS: ``[(ours, transformers'), ...]`` token lists."""
    from mmafm.inference import generate
    from mmafm.interop.smollm2 import chat_prompt

    hf_model, model, tokenizer = smollm2
    answers = []
    for question in QUESTIONS:
        ids = chat_prompt(tokenizer, question)
        with torch.no_grad():
            theirs = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1]:].tolist()
        answers.append((generate(model, ids, max_new_tokens=NEW_TOKENS)[0], theirs))
    return answers


@pytest.mark.slow
def test_smollm2_conversion_equals_transformers_gguf_loader(smollm2):
    """Our dequantise + un-permute equals transformers' own GGUF loader, tensor for tensor."""
    pytest.importorskip("accelerate")
    from mmafm.interop.smollm2 import smollm2_gguf_path

    hf_model, model, _ = smollm2
    path = smollm2_gguf_path()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).state_dict()
    ours = hf_model.state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, atol=0, rtol=0, msg=name)
    assert model.config.qk_norm is False and model.config.tie_embeddings
    assert (model.config.dim, model.config.n_layers, model.config.n_kv_heads) == (576, 30, 3)


@pytest.mark.slow
def test_smollm2_greedy_decode_matches_transformers_token_for_token(smollm2, smollm2_answers):
    tokenizer = smollm2[2]
    for question, (ours, theirs) in zip(QUESTIONS, smollm2_answers):
        assert len(ours) == NEW_TOKENS
        assert ours == theirs, (question, tokenizer.decode(ours), tokenizer.decode(theirs))


@pytest.mark.slow
def test_smollm2_answers_a_simple_question(smollm2, smollm2_answers):
    france, arithmetic = (smollm2[2].decode(ours) for ours, _ in smollm2_answers)
    assert "Paris" in france, france
    assert "4" in arithmetic, arithmetic
