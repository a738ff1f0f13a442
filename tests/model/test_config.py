import json

import pytest

from qwen3dbg.model.config import load_config, parse_config
from qwen3dbg.model.synth import PRESETS
from qwen3dbg.util.errors import UserError

RELEASED_0_6B = {  # field spellings of the released Qwen3-0.6B config.json
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
    "hidden_act": "silu",
}


def test_released_spelling_parses_with_explicit_head_dim():
    cfg = parse_config(RELEASED_0_6B)
    assert cfg.head_dim == 128 != cfg.hidden_size // cfg.num_attention_heads
    assert cfg.rope_theta == 1e6 and cfg.torch_dtype == "bfloat16" and cfg.tie_word_embeddings
    assert not cfg.is_moe and cfg.n_rep == 2


def test_transformers5_spelling_gives_the_same_config():
    v5 = {k: v for k, v in RELEASED_0_6B.items() if k not in ("rope_theta", "torch_dtype", "rope_scaling")}
    v5 |= {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000}, "dtype": "bfloat16"}
    assert parse_config(v5) == parse_config(RELEASED_0_6B)


def test_moe_fields_from_either_spelling_and_sparse_layers():
    raw = PRESETS["tiny-moe"].config.to_hf_dict() | {"mlp_only_layers": [1], "decoder_sparse_step": 1}
    local = {k: v for k, v in raw.items() if k != "num_experts"} | {"num_local_experts": raw["num_experts"]}
    a, b = parse_config(raw), parse_config(local)
    assert a == b and a.num_experts == 8
    assert [a.is_moe_layer(i) for i in range(3)] == [True, False, True]


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"model_type": "llama"}, "not a Qwen3 model"),
        ({"model_type": "qwen3"}, "lacks the field"),
        (RELEASED_0_6B | {"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "not supported"),
        (RELEASED_0_6B | {"num_key_value_heads": 5}, "not a multiple"),
        (
            {k: v for k, v in RELEASED_0_6B.items() if k != "head_dim"} | {"num_attention_heads": 0},
            "num_attention_heads is 0",
        ),
        (RELEASED_0_6B | {"num_key_value_heads": 0}, "num_key_value_heads is 0"),
        (RELEASED_0_6B | {"head_dim": 0}, "head_dim is 0"),
        (RELEASED_0_6B | {"vocab_size": "151936"}, "vocab_size is '151936'"),
        (RELEASED_0_6B | {"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false', it must be true or false"),
        (RELEASED_0_6B | {"rms_norm_eps": -1e-6}, "rms_norm_eps is -1e-06"),
        (
            RELEASED_0_6B
            | {
                "model_type": "qwen3_moe",
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 64,
                "decoder_sparse_step": 0,
            },
            "decoder_sparse_step is 0",
        ),
    ],
)
def test_bad_configs_are_one_clear_error(raw, words):
    with pytest.raises(UserError, match=words):
        parse_config(raw)


def test_load_config_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_0_6B))
    assert load_config(tmp_path).num_hidden_layers == 28


def test_a_malformed_config_in_a_folder_named_with_braces_is_still_one_clear_error(tmp_path):
    model = tmp_path / "{why}{0}"  # the path is quoted in the message, never read as a template
    model.mkdir()
    (model / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"\{why\}\{0\}/config.json cannot be used: it is not valid JSON"):
        load_config(model)


def test_a_window_with_the_flag_off_is_kept_and_written_back_and_the_flag_on_is_refused():
    cfg = parse_config(RELEASED_0_6B | {"sliding_window": 32768, "use_sliding_window": False})
    assert cfg.sliding_window == 32768 and parse_config(cfg.to_hf_dict()) == cfg
    with pytest.raises(UserError, match="use_sliding_window is true.*set it to false"):
        parse_config(RELEASED_0_6B | {"sliding_window": 4096, "use_sliding_window": True})
