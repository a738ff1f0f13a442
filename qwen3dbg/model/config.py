"""The one typed Qwen3 / Qwen3-MoE config, parsed once from a Hugging Face `config.json`; nothing downstream
reads the raw JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from qwen3dbg.util.errors import UserError
from qwen3dbg.util.jsonio import read_given_json

MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
#: the fields that fix every tensor's shape: two configs that differ in one describe different models
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


@dataclass(frozen=True)
class Qwen3Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    torch_dtype: str = "bfloat16"
    max_position_embeddings: int = 40960
    hidden_act: str = "silu"
    # Qwen3 attends over the whole context: a window size may be present, but only with the flag off
    use_sliding_window: bool = False
    sliding_window: int | None = None
    # MoE (qwen3_moe only; zero experts means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = field(default_factory=tuple)

    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen3_moe" and self.num_experts > 0

    @property
    def n_rep(self) -> int:
        """Query heads per kv head: query head h reads kv head h // n_rep."""
        return self.num_attention_heads // self.num_key_value_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Transformers' rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        return self.is_moe and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def to_hf_dict(self) -> dict:
        """The config.json a released checkpoint of this shape carries."""
        d = asdict(self)
        d["architectures"] = [MODEL_TYPES[self.model_type]]
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["rope_scaling"] = None
        d["max_window_layers"] = self.num_hidden_layers
        d["attention_dropout"] = 0.0
        d["initializer_range"] = 0.02
        d["use_cache"] = True
        d["bos_token_id"] = 0
        d["eos_token_id"] = 1
        if not self.is_moe:
            for k in (
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "norm_topk_prob",
                "decoder_sparse_step",
                "mlp_only_layers",
            ):
                d.pop(k)
        else:
            d["router_aux_loss_coef"] = 0.001
            d["output_router_logits"] = False
        return d

    def shape_mismatches(self, other: "Qwen3Config") -> list[str]:
        """The shape fields in which two configs differ: non-empty means they describe different models."""
        return [f for f in SHAPE_FIELDS if getattr(self, f) != getattr(other, f)]

    def replace(self, **changes) -> "Qwen3Config":
        return replace(self, **changes)


def _opt(raw: dict, key: str, default):
    """raw[key], a null read as absent (Hugging Face writes null for unset fields)."""
    value = raw.get(key)
    return default if value is None else value


def _whole(key: str, value, least: int = 1) -> int:
    """A count: a JSON integer of at least `least` (0 heads or a string "4" would fail far from here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{key} is {value!r}, it must be a whole number of at least {least}")
    return value


def _real(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"{key} is {value!r}, it must be a positive number")
    return float(value)


def _flag(key: str, value) -> bool:
    """A JSON true/false: the string "false" is truthy, so it must not pass as a bool."""
    if not isinstance(value, bool):
        raise UserError(f"{key} is {value!r}, it must be true or false")
    return value


def _section(raw: dict, key: str) -> dict:
    """An optional nested object (rope_parameters, rope_scaling): absent or null reads as empty."""
    value = _opt(raw, key, {})
    if not isinstance(value, dict):
        raise UserError(f"{key} is {value!r}, it must be an object or null")
    return value


def _rope_theta(raw: dict) -> float:
    params, scaling = _section(raw, "rope_parameters"), _section(raw, "rope_scaling")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UserError(f"rope type {rope_type!r} is not supported: qwen3dbg implements Qwen3's default RoPE only")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise UserError("config.json has neither rope_parameters.rope_theta nor rope_theta")
    return _real("rope_theta", theta)


# Field names are Hugging Face's. Both spellings in the wild are accepted: released checkpoints (`rope_theta`,
# `num_experts`, `torch_dtype`) and transformers 5.x (`rope_parameters`, `num_local_experts`, `dtype`).
def parse_config(raw: dict) -> Qwen3Config:
    """Turn a config.json dict into a Qwen3Config, or say in one sentence why it is not one."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise UserError(
            f"model_type {model_type!r} is not a Qwen3 model: qwen3dbg reads 'qwen3' and 'qwen3_moe' configs"
        )
    try:
        hidden = _whole("hidden_size", raw["hidden_size"])
        heads = _whole("num_attention_heads", raw["num_attention_heads"])
        # Qwen3's head_dim is explicit and is NOT hidden // heads (0.6B: 128, not 64).
        head_dim = _whole("head_dim", _opt(raw, "head_dim", hidden // heads))
        num_experts = _whole("num_experts", _opt(raw, "num_experts", _opt(raw, "num_local_experts", 0)), 0)
        cfg = Qwen3Config(
            model_type=model_type,
            vocab_size=_whole("vocab_size", raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=_whole("intermediate_size", raw["intermediate_size"]),
            num_hidden_layers=_whole("num_hidden_layers", raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=_whole("num_key_value_heads", _opt(raw, "num_key_value_heads", heads)),
            head_dim=head_dim,
            rope_theta=_rope_theta(raw),
            rms_norm_eps=_real("rms_norm_eps", _opt(raw, "rms_norm_eps", 1e-6)),
            tie_word_embeddings=_flag("tie_word_embeddings", _opt(raw, "tie_word_embeddings", False)),
            attention_bias=_flag("attention_bias", _opt(raw, "attention_bias", False)),
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
            max_position_embeddings=_whole("max_position_embeddings", _opt(raw, "max_position_embeddings", 40960)),
            hidden_act=str(raw.get("hidden_act", "silu")),
            use_sliding_window=_flag("use_sliding_window", _opt(raw, "use_sliding_window", False)),
            sliding_window=None
            if raw.get("sliding_window") is None
            else _whole("sliding_window", raw["sliding_window"]),
            num_experts=num_experts if model_type == "qwen3_moe" else 0,
            num_experts_per_tok=_whole("num_experts_per_tok", _opt(raw, "num_experts_per_tok", 0), 0),
            moe_intermediate_size=_whole("moe_intermediate_size", _opt(raw, "moe_intermediate_size", 0), 0),
            norm_topk_prob=_flag("norm_topk_prob", _opt(raw, "norm_topk_prob", False)),
            decoder_sparse_step=_whole("decoder_sparse_step", _opt(raw, "decoder_sparse_step", 1)),
            mlp_only_layers=tuple(_whole("mlp_only_layers", i, 0) for i in _opt(raw, "mlp_only_layers", ())),
        )
    except KeyError as e:
        raise UserError(f"config.json lacks the field {e.args[0]!r} that a {model_type} config must have") from None
    except TypeError as e:
        raise UserError(f"config.json has a field of the wrong type: {e}") from None
    if cfg.hidden_act != "silu":
        raise UserError(f"hidden_act {cfg.hidden_act!r} is not Qwen3's 'silu'")
    if cfg.use_sliding_window:
        raise UserError(
            "use_sliding_window is true: qwen3dbg implements Qwen3's full attention only, "
            "as every released Qwen3 config has it (set it to false)"
        )
    if heads % cfg.num_key_value_heads:
        raise UserError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {cfg.num_key_value_heads}"
        )
    if cfg.is_moe and not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
        raise UserError(
            f"num_experts_per_tok {cfg.num_experts_per_tok} must be between 1 and num_experts {cfg.num_experts}"
        )
    return cfg


def load_config(model_dir: str | Path) -> Qwen3Config:
    path = Path(model_dir)
    if path.is_dir():
        path = path / "config.json"
    raw = read_given_json(
        path,
        missing=f"no config.json at {path}: pass a model directory made by `qwen3dbg make-model` or a HF checkpoint",
        unusable=lambda why: f"{path} cannot be used: {why}",
    )
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a JSON {type(raw).__name__}, not an object")
    return parse_config(raw)
