"""The GGUF architectures registry (one class per llama.cpp architecture, `@register`), which config goes to which,
their refusals, and the config parsing they share with config_check and the memory plan (rope, head_dim)."""

import json

import numpy as np
import pytest

from bitcpm_cli.core.conversion.gguf.arch import (
    ARCHITECTURES,
    GgufArchitecture,
    LlamaArchitecture,
    MiniCPMArchitecture,
    register,
    select_architecture,
)
from bitcpm_cli.core.errors import CheckFailed, ConfigError, InputError
from bitcpm_cli.core.model.config import PER_LAYER_ROPE, head_dim, rope_blocks, rope_parameters

LONGROPE_NOTE = ("LongRoPE: written as llama.cpp's minicpm architecture with neutral scales (its llama architecture "
                 "cannot hold both factor lists)")


def tiny(**changes):
    """A tiny Llama config.json (head_dim 8 from hidden_size / heads)."""
    config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 1024,
              "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def longrope(n=4, **extra):
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
            "short_factor": [1.0 + i for i in range(n)], "long_factor": [0.5 + i for i in range(n)], **extra}


class Writer:
    """Records gguf-py `add_*` calls in order."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        return lambda *args: self.calls.append((method, args))

    def values(self):
        return {method: args[0] for method, args in self.calls}


# ---- the registry ------------------------------------------------------------------------------------------------
def test_the_registry_holds_exactly_llama_and_minicpm():
    assert ARCHITECTURES == {"llama": LlamaArchitecture, "minicpm": MiniCPMArchitecture}
    assert LlamaArchitecture.name == "llama" and MiniCPMArchitecture.name == "minicpm"
    assert LlamaArchitecture.model_types == ("llama", "mistral")
    assert MiniCPMArchitecture.model_types == ("minicpm",)
    assert all(issubclass(cls, GgufArchitecture) for cls in ARCHITECTURES.values())


@pytest.mark.parametrize("config, chosen, notes", [
    (tiny(), LlamaArchitecture, []),
    (tiny(model_type=None), LlamaArchitecture, []),
    (tiny(model_type="mistral", sliding_window=None), LlamaArchitecture, []),
    (tiny(model_type="minicpm", scale_emb=12, scale_depth=1.4, dim_model_base=16), MiniCPMArchitecture, []),
    (tiny(model_type="minicpm", scale_emb=1, scale_depth=1, dim_model_base=32, rope_parameters=longrope()),
     MiniCPMArchitecture, []),
    (tiny(rope_parameters=longrope()), MiniCPMArchitecture, [LONGROPE_NOTE]),
    (tiny(rope_scaling=longrope()), MiniCPMArchitecture, [LONGROPE_NOTE]),
    (tiny(model_type="mistral", rope_parameters=longrope()), MiniCPMArchitecture, [LONGROPE_NOTE]),
])
def test_each_config_goes_to_its_architecture(config, chosen, notes):
    arch = select_architecture(config)
    assert type(arch) is chosen and arch.name == chosen.name
    assert arch.notes == notes
    assert arch.model_type == (config.get("model_type") or "llama")


def test_a_llama_config_with_minicpm_scales_is_llama_with_a_note():
    arch = select_architecture(tiny(scale_emb=12, scale_depth=1.4))
    assert type(arch) is LlamaArchitecture
    assert arch.notes == [("config.json sets scale_emb, scale_depth but model_type 'llama' does not use them "
                          "(transformers ignores them too, so they are written as 1.0): set model_type minicpm if the "
                          "model was trained with them")]
    longrope_llama = select_architecture(tiny(scale_emb=12, rope_parameters=longrope()))
    assert type(longrope_llama) is MiniCPMArchitecture
    assert len(longrope_llama.notes) == 2 and longrope_llama.notes[0].startswith("config.json sets scale_emb but")
    assert longrope_llama.notes[1] == LONGROPE_NOTE


def test_an_unsupported_model_type_is_an_input_error_naming_the_supported_ones():
    with pytest.raises(InputError) as info:
        select_architecture(tiny(model_type="qwen2"))
    assert str(info.value) == "GGUF export supports model_type llama, mistral and minicpm, not 'qwen2'"
    assert info.value.hint == "export a Llama- or MiniCPM-style decoder"


def test_one_class_with_register_is_a_new_architecture():
    """The recipe for a new architecture: one class with @register; select_architecture then picks it."""

    @register("toy")
    class ToyArchitecture(GgufArchitecture):
        model_types = ("toyformer",)

        def config_notes(self):
            return ["toy"]

    try:
        assert list(ARCHITECTURES) == ["llama", "minicpm", "toy"] and ToyArchitecture.name == "toy"
        arch = select_architecture(tiny(model_type="toyformer"))
        assert type(arch) is ToyArchitecture and arch.name == "toy" and arch.notes == ["toy"]
        assert arch.head_dim == 8 and arch.kv_heads == 2
        assert type(select_architecture(tiny())) is LlamaArchitecture  # the others keep their configs
        with pytest.raises(InputError, match="model_type llama, mistral, minicpm and toyformer, not 'qwen2'"):
            select_architecture(tiny(model_type="qwen2"))
        with pytest.raises(CheckFailed, match="hidden_act 'gelu'"):  # the base class's refusals come with it
            select_architecture(tiny(model_type="toyformer", hidden_act="gelu"))
    finally:
        del ARCHITECTURES["toy"]
    with pytest.raises(InputError):
        select_architecture(tiny(model_type="toyformer"))


def test_a_claiming_class_takes_configs_another_one_owns():
    @register("toy")
    class ToyArchitecture(GgufArchitecture):
        model_types = ("toyformer",)

        @classmethod
        def claims(cls, model_type, rope):
            return model_type == "llama" and rope["rope_type"] == "linear"

    try:
        assert type(select_architecture(tiny(rope_scaling={"type": "linear", "factor": 2.0}))) is ToyArchitecture
        assert type(select_architecture(tiny())) is LlamaArchitecture
    finally:
        del ARCHITECTURES["toy"]


def test_register_refuses_a_name_or_model_type_taken_already():
    with pytest.raises(ValueError, match="registered twice"):
        register("llama")(type("Again", (GgufArchitecture,), {"model_types": ("again",)}))
    with pytest.raises(ValueError, match="mistral \\(by llama\\)"):
        register("other")(type("Other", (GgufArchitecture,), {"model_types": ("mistral",)}))
    assert set(ARCHITECTURES) == {"llama", "minicpm"}


# ---- refusals ----------------------------------------------------------------------------------------------------
def test_refusals_list_every_problem_at_once():
    config = tiny(model_type="mistral", hidden_act="gelu", sliding_window=4096,
                  rope_parameters={"rope_type": "yarn", "factor": 4.0}, partial_rotary_factor=0.5)
    with pytest.raises(CheckFailed) as info:
        select_architecture(config)
    assert str(info.value) == "cannot export model_type 'mistral' exactly: hidden_act 'gelu': llama.cpp's llama / " \
                              "minicpm use silu"
    assert info.value.problems == [
        "hidden_act 'gelu': llama.cpp's llama / minicpm use silu",
        "sliding_window 4096: llama.cpp's llama architecture attends to the whole context",
        "rope type 'yarn': only default, linear and longrope rope are exported",
        "partial_rotary_factor: llama.cpp's llama / minicpm rotate the whole head",
    ]
    assert info.value.hint == "llama.cpp would compute a different model; nothing was written"


def test_a_longrope_mistral_with_a_sliding_window_is_refused_too():
    with pytest.raises(CheckFailed) as info:
        select_architecture(tiny(model_type="mistral", sliding_window=4096, rope_parameters=longrope()))
    assert "sliding_window 4096" in str(info.value) and info.value.problems == []


def test_longrope_factor_lists_of_the_wrong_length_are_both_named():
    with pytest.raises(CheckFailed) as info:
        select_architecture(tiny(rope_parameters=longrope(n=3)))
    assert info.value.problems == ["rope short_factor: needs 4 values (head_dim / 2), has 3",
                                   "rope long_factor: needs 4 values (head_dim / 2), has 3"]


def test_a_single_problem_is_the_message_alone():
    with pytest.raises(CheckFailed) as info:
        select_architecture(tiny(model_type="minicpm", scale_emb=12, scale_depth=1.4, dim_model_base=16,
                                 partial_rotary_factor=0.5))
    assert str(info.value) == ("cannot export model_type 'minicpm' exactly: partial_rotary_factor: llama.cpp's llama "
                               "/ minicpm rotate the whole head")
    assert info.value.problems == []


def test_a_sliding_window_outside_mistral_is_what_transformers_ignores():
    assert type(select_architecture(tiny(sliding_window=4096))) is LlamaArchitecture


# ---- what each architecture writes ----------------------------------------------------------------------------------
def test_only_minicpm_writes_the_minicpm_scales():
    pytest.importorskip("gguf", reason="metadata needs gguf-py (the gguf extra)")
    llama, minicpm = Writer(), Writer()
    select_architecture(tiny(scale_emb=12)).metadata(llama)
    select_architecture(tiny(model_type="minicpm", scale_emb=12, scale_depth=1.4, dim_model_base=16)).metadata(minicpm)
    assert [m for m, _ in minicpm.calls[:-3]] == [m for m, _ in llama.calls]  # the shared part, in the same order
    assert [m for m, _ in minicpm.calls[-3:]] == ["add_embedding_scale", "add_residual_scale", "add_logit_scale"]
    values = minicpm.values()
    assert values["add_embedding_scale"] == 12.0
    assert values["add_residual_scale"] == pytest.approx(1.4 / 2 ** 0.5)
    assert values["add_logit_scale"] == 2.0
    assert values["add_head_count"] == 4 and values["add_head_count_kv"] == 2 and values["add_key_length"] == 8


def test_a_minicpm_config_without_its_scales_is_refused_naming_them():
    """MiniCPM's own code defaults each scale to 1 (logits / hidden_size) and llama.cpp's converter refuses such a
    config: no value bitcpm could write is known to be the trained one (issue 23 item 12)."""
    with pytest.raises(ConfigError) as info:
        select_architecture(tiny(model_type="minicpm"))
    assert str(info.value) == ("config.json (model_type 'minicpm') does not set scale_emb, scale_depth and "
                               "dim_model_base: GGUF export cannot tell the scales the model was trained with")
    with pytest.raises(ConfigError, match="does not set dim_model_base:"):
        select_architecture(tiny(model_type="minicpm", scale_emb=12, scale_depth=1.4))
    with pytest.raises(ConfigError, match="dim_model_base: config.json says 0"):
        select_architecture(tiny(model_type="minicpm", scale_emb=12, scale_depth=1.4, dim_model_base=0))


def test_a_longrope_llama_writes_neutral_scales_whatever_its_config_sets():
    """transformers' Llama ignores scale_emb / scale_depth / dim_model_base; the minicpm architecture chosen for its
    LongRoPE must too (it wrote them: mean KLD 2.38 against the HF model on the published BitCPM4-1B config)."""
    pytest.importorskip("gguf", reason="metadata needs gguf-py (the gguf extra)")
    writer = Writer()
    arch = select_architecture(tiny(scale_emb=12, scale_depth=1.4, dim_model_base=16, rope_parameters=longrope()))
    assert type(arch) is MiniCPMArchitecture
    arch.metadata(writer)
    values = writer.values()
    assert (values["add_embedding_scale"], values["add_residual_scale"], values["add_logit_scale"]) == (1.0, 1.0, 1.0)


def test_refusal_texts_name_the_registered_architectures(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "toy", GgufArchitecture)
    assert select_architecture(tiny()).__class__ is LlamaArchitecture
    with pytest.raises(CheckFailed, match="llama.cpp's llama / minicpm / toy use silu"):
        select_architecture(tiny(hidden_act="gelu"))


def test_rope_metadata_linear_and_longrope():
    gguf = pytest.importorskip("gguf", reason="metadata needs gguf-py (the gguf extra)")
    linear = Writer()
    select_architecture(tiny(rope_scaling={"type": "linear", "factor": 2.0})).metadata(linear)
    assert linear.values()["add_rope_scaling_type"] == gguf.RopeScalingType.LINEAR
    assert linear.values()["add_rope_scaling_factor"] == 2.0
    long = Writer()
    arch = select_architecture(tiny(rope_parameters=longrope(attention_factor=1.5)))
    arch.metadata(long)
    values = long.values()
    assert values["add_rope_scaling_type"] == gguf.RopeScalingType.LONGROPE
    assert values["add_context_length"] == 256 and values["add_rope_scaling_orig_ctx_len"] == 256
    assert values["add_rope_scaling_attn_factors"] == 1.5
    assert [name for name, _ in arch.extra_tensors()] == ["rope_factors_long.weight", "rope_factors_short.weight"]
    assert np.array_equal(arch.extra_tensors()[1][1], np.asarray([1.0, 2.0, 3.0, 4.0], dtype=np.float32))
    assert select_architecture(tiny()).extra_tensors() == []


def test_prepare_interleaves_the_rotary_halves_of_q_and_k_only():
    arch = select_architecture(tiny())
    q = np.arange(32 * 3).reshape(32, 3)
    rows = arch.prepare("model.layers.0.self_attn.q_proj.weight", q)[:, 0] // 3
    assert rows[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # head 0: first half and second half interleaved
    k = np.arange(16 * 3).reshape(16, 3)
    assert (arch.prepare("model.layers.0.self_attn.k_proj.weight", k)[:, 0] // 3)[8:].tolist() == \
        [8, 12, 9, 13, 10, 14, 11, 15]  # two KV heads
    v = np.arange(16 * 3).reshape(16, 3)
    assert arch.prepare("model.layers.0.self_attn.v_proj.weight", v) is v


# ---- the config parsing they share -------------------------------------------------------------------------------
def test_rope_parameters_flat_transformers_4():
    rope = rope_parameters(tiny(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=5000.0))
    assert rope == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    assert rope_parameters(tiny()) == {"rope_type": "default", "rope_theta": 10000.0}
    assert rope_parameters(tiny(rope_theta=None)) == {"rope_type": "default", "rope_theta": 10000.0}


def test_rope_parameters_flat_transformers_5_wins_over_rope_scaling():
    config = tiny(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
                  rope_scaling={"type": "linear", "factor": 2.0, "extra": 1})
    assert rope_parameters(config) == {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0, "type": "linear",
                                       "extra": 1}
    rope = rope_parameters(tiny(rope_parameters={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
                                max_position_embeddings=4096))
    assert rope["original_max_position_embeddings"] == 4096 and rope["rope_theta"] == 10000.0
    rope = rope_parameters(tiny(rope_parameters={"rope_type": "longrope"}, original_max_position_embeddings=512))
    assert rope["original_max_position_embeddings"] == 512


def test_rope_parameters_per_layer_type_are_one_block_or_refused():
    block = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    same = tiny(rope_parameters={"full_attention": dict(block), "sliding_attention": dict(block)})
    assert rope_blocks(same) == [("rope_parameters.full_attention", block), ("rope_parameters.sliding_attention", block)]
    assert rope_parameters(same) == block
    assert select_architecture(same).rope == block
    differ = tiny(rope_parameters={"full_attention": block, "sliding_attention": {"rope_type": "default",
                                                                                  "rope_theta": 10000.0}})
    rope = rope_parameters(differ)
    assert rope["rope_type"] == PER_LAYER_ROPE == "per-layer"
    assert set(rope["blocks"]) == {"rope_parameters.full_attention", "rope_parameters.sliding_attention"}
    with pytest.raises(CheckFailed, match="rope type 'per-layer': only default, linear and longrope"):
        select_architecture(differ)


def test_rope_parameters_refuse_a_rope_key_that_is_not_a_block():
    with pytest.raises(ConfigError, match=r"config.json: rope_scaling must be an object, not str \(linear\)"):
        rope_parameters(tiny(rope_scaling="linear"))
    with pytest.raises(ConfigError, match="rope_parameters must be an object, not list"):
        select_architecture(tiny(rope_parameters=[1, 2]))
    assert rope_parameters(tiny(rope_scaling=None, rope_parameters={})) == {"rope_type": "default",
                                                                            "rope_theta": 10000.0}


def test_rope_blocks_flat_and_both_keys():
    assert rope_blocks(tiny()) == []
    config = tiny(rope_scaling={"type": "linear", "factor": 2.0}, rope_parameters=longrope())
    assert [key for key, _ in rope_blocks(config)] == ["rope_scaling", "rope_parameters"]


def test_head_dim_and_its_fallback(tmp_path):
    from bitcpm_cli.core.training.memory_plan import Shape

    assert head_dim(tiny(head_dim=16)) == 16
    assert head_dim(tiny()) == 32 // 4
    assert head_dim(tiny(head_dim=0)) == 8  # 0 or null falls back too
    for config in (tiny(head_dim=16), tiny()):  # the memory plan takes the same head_dim
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert Shape.from_config(tmp_path / "config.json").head_dim == head_dim(config)
        assert select_architecture(config).head_dim == head_dim(config)
