"""The model configuration: DeepSeek-V3's official fields, presets, and the Hugging Face mapping.

Field names follow the official `inference/model.py` ModelArgs (SPEC.md section 1); `from_hf` and
`to_hf` translate to and from Hugging Face's DeepseekV3Config `config.json`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pallas_kernels import implementations as kernels

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_attention_out",
                  "save_kernels")
# "auto" or what the kernel entry points take (pallas_kernels.implementations): "auto" and
# "pallas" are resolved for a backend (dsv3_jax.model.implementations) to what the model runs.
ATTENTION_IMPLS = ("auto", *kernels.MLA_ATTENTION)
DECODE_IMPLS = ("auto", *kernels.MLA_DECODE)
MOE_IMPLS = ("auto", *kernels.ROUTED_EXPERTS)
DTYPES = ("float32", "bfloat16")
# "blockwise": DeepSeek-V3's FP8 recipe (dsv3_jax/model/fp8.py) on the attention projections and
# the dense, shared and routed experts' GEMMs.
FP8_MODES = ("none", "blockwise")
# config.json fields that decide which tensors a checkpoint holds and their shapes. transformers
# would take DeepSeek-V3 671B's values for a missing one, which fit no other model's files, so
# `from_hf` refuses a config without them; every other field takes transformers' default.
HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
               "num_hidden_layers", "first_k_dense_replace", "num_attention_heads",
               "n_routed_experts", "n_shared_experts", "q_lora_rank", "kv_lora_rank",
               "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 architecture plus the implementation choices of this stack.

    Architecture fields keep the official names (HF names in comments). Implementation fields
    (`dtype`, `remat`, `attention_impl`, `decode_impl`, `moe_impl`, `fp8`) change how, not what,
    the model computes (`fp8` within E4M3's rounding).
    """

    vocab_size: int = 129280  # vocab_size
    dim: int = 7168  # hidden_size
    inter_dim: int = 18432  # intermediate_size (dense FFN)
    moe_inter_dim: int = 2048  # moe_intermediate_size
    n_layers: int = 61  # num_hidden_layers
    n_dense_layers: int = 3  # first_k_dense_replace
    n_heads: int = 128  # num_attention_heads
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8  # num_experts_per_tok
    n_expert_groups: int = 8  # n_group
    n_limited_groups: int = 4  # topk_group
    score_func: str = "sigmoid"  # scoring_func
    route_scale: float = 2.5  # routed_scaling_factor
    q_lora_rank: int = 1536  # 0 means no query compression (HF: null)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    norm_eps: float = 1e-6  # rms_norm_eps
    max_seq_len: int = 163840  # max_position_embeddings
    original_seq_len: int = 4096  # rope_scaling.original_max_position_embeddings
    rope_theta: float = 10000.0
    rope_factor: float = 40.0  # rope_scaling.factor
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0  # rope_scaling.mscale
    mscale_all_dim: float = 1.0  # rope_scaling.mscale_all_dim
    mtp_depth: int = 1  # num_nextn_predict_layers
    init_std: float = 0.006  # paper 4.2 (HF initializer_range)
    # Implementation choices.
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: str = "none"
    # "auto": the fastest measured implementation the kernels support for the backend and these
    # shapes; "pallas": the backend's kernel (dsv3_jax/model/implementations.py resolves both, to
    # "pallas_gpu" / "pallas_tpu" where a kernel runs); decode is the absorbed attention of
    # generation.
    attention_impl: str = "auto"
    decode_impl: str = "auto"
    moe_impl: str = "auto"
    # "none" | "blockwise": E4M3 GEMMs with 1x128 activation tiles and 128x128 weight blocks.
    fp8: str = "none"

    def __post_init__(self):
        validate(self)

    # Derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_expert_groups

    @property
    def yarn_active(self) -> bool:
        """YaRN is applied only when the model runs past its original context (official code)."""
        return self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        """192^-0.5, times mscale^2 when YaRN is active (SPEC.md section 2)."""
        scale = self.qk_head_dim**-0.5
        if self.yarn_active:
            scale *= yarn_mscale(self.rope_factor, self.mscale_all_dim) ** 2
        return scale

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json",
                **overrides: Any) -> ModelConfig:
        """Build from a Hugging Face DeepseekV3Config dict (`config.json`).

        A missing field takes the default transformers' DeepseekV3Config takes, so both read the
        same model, except the fields in HF_REQUIRED (tensor shapes), which are refused by name.
        `source` names the dict in error messages (the file it was read from).
        """
        missing = [name for name in HF_REQUIRED if name not in hf]
        if missing:
            example = DEEPSEEK_V3_671B.to_hf()
            raise ValueError(
                f"{source} has no {', '.join(missing)}: "
                f"{'it sets' if len(missing) == 1 else 'they set'} the shapes of the tensors, so "
                "there is no default to assume; add it to the file (DeepSeek-V3 671B: "
                f"{', '.join(f'{n}={example[n]}' for n in missing)})")
        model_type = hf.get("model_type", "deepseek_v3")
        if model_type != "deepseek_v3":
            raise ValueError(
                f"{source} model_type is {model_type!r}; only 'deepseek_v3' (DeepSeek-V3 "
                "routing: sigmoid scores with a selection bias) is supported")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        max_pos = hf.get("max_position_embeddings", 4096)
        fields: dict[str, Any] = dict(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            inter_dim=hf["intermediate_size"],
            moe_inter_dim=hf["moe_intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_dense_layers=hf["first_k_dense_replace"] or 0,
            n_heads=hf["num_attention_heads"],
            n_routed_experts=hf["n_routed_experts"],
            n_shared_experts=hf["n_shared_experts"] or 0,
            n_activated_experts=hf.get("num_experts_per_tok", 8),
            n_expert_groups=_hf_value(hf, "n_group", 8, null=1),  # null: no groups
            n_limited_groups=_hf_value(hf, "topk_group", 4, null=1),
            score_func=hf.get("scoring_func", "sigmoid"),
            route_scale=hf.get("routed_scaling_factor", 2.5),
            q_lora_rank=hf["q_lora_rank"] or 0,  # null: no query compression
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_seq_len=max_pos,
            rope_theta=theta,
            mtp_depth=_hf_value(hf, "num_nextn_predict_layers",
                                _hf_value(hf, "num_mtp_layers", 1, null=0), null=0),
            init_std=hf.get("initializer_range", 0.02),
        )
        if hf.get("norm_topk_prob", True) is not True:
            raise ValueError(f"{source} norm_topk_prob must be true for DeepSeek-V3 routing")
        if hf.get("moe_layer_freq", 1) != 1:
            raise ValueError(
                f"{source} moe_layer_freq={hf['moe_layer_freq']}; only 1 (every layer after "
                "first_k_dense_replace is MoE) is supported")
        if rope_type == "yarn":
            fields.update(_yarn_fields(rope, max_pos, source))
        elif rope_type == "default":
            fields.update(original_seq_len=max_pos, rope_factor=1.0)
        else:
            raise ValueError(f"{source} rope type {rope_type!r} is not one of yarn, default")
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict (DeepseekV3Config names, released layout)."""
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.inter_dim,
            "moe_intermediate_size": self.moe_inter_dim,
            "num_hidden_layers": self.n_layers,
            "first_k_dense_replace": self.n_dense_layers,
            "moe_layer_freq": 1,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts,
            "n_group": self.n_expert_groups,
            "topk_group": self.n_limited_groups,
            "scoring_func": self.score_func,
            "topk_method": "noaux_tc",
            "norm_topk_prob": True,
            "routed_scaling_factor": self.route_scale,
            "q_lora_rank": self.q_lora_rank or None,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_interleave": True,
            "num_nextn_predict_layers": self.mtp_depth,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "initializer_range": self.init_std,
            "bos_token_id": 0,
            "eos_token_id": 1,
        }
        if self.yarn_active:
            hf["rope_scaling"] = {
                "type": "yarn",
                "rope_type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
                "mscale": self.mscale,
                "mscale_all_dim": self.mscale_all_dim,
            }
        else:
            hf["rope_scaling"] = None
        return hf


def _hf_value(hf: dict[str, Any], name: str, default: Any, null: Any) -> Any:
    """hf[name]: `default` (transformers') when missing, `null` when given as null."""
    value = hf.get(name, default)
    return null if value is None else value


def _yarn_fields(rope: dict[str, Any], max_pos: int, source: str) -> dict[str, Any]:
    """The YaRN fields of a `rope_scaling` dict, read as transformers reads them (beta_fast 32
    and beta_slow 1 when missing; mscale and mscale_all_dim count only together); what
    ModelConfig cannot express is refused by name."""
    where = f"{source} rope_scaling (yarn)"
    if "factor" not in rope:
        raise ValueError(f"{where} has no factor (the context extension; DeepSeek-V3: 40), "
                         "which transformers requires too")
    if "original_max_position_embeddings" not in rope:
        raise ValueError(
            f"{where} has no original_max_position_embeddings (the pretraining context; "
            f"DeepSeek-V3: 4096): transformers would take max_position_embeddings={max_pos}, "
            "so YaRN would rescale positions inside the original context, which ModelConfig "
            "does not express; add it to the file")
    original = rope["original_max_position_embeddings"]
    if max_pos <= original:
        raise ValueError(
            f"{source} asks for YaRN but max_position_embeddings={max_pos} is not above "
            f"original_max_position_embeddings={original}; YaRN applies only beyond it")
    factor = rope["factor"]
    if factor is None:  # transformers: the ratio of the two contexts
        factor = max_pos / original
    # transformers scales cos/sin by yarn_mscale(factor, mscale) / yarn_mscale(factor,
    # mscale_all_dim) when both are set (nonzero), else by yarn_mscale(factor, 1), and the
    # softmax by yarn_mscale(factor, mscale_all_dim)^2 when mscale_all_dim is set.
    mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if all_dim and not mscale:
        raise ValueError(
            f"{where} gives mscale_all_dim={all_dim} without mscale: transformers then scales "
            "cos/sin by yarn_mscale(factor) alone, which ModelConfig does not express; add "
            "mscale (DeepSeek-V3: mscale = mscale_all_dim = 1.0)")
    if mscale not in (None, 0, 1) and not all_dim:
        raise ValueError(
            f"{where} gives mscale={mscale} without mscale_all_dim: transformers then ignores "
            "mscale; add mscale_all_dim (DeepSeek-V3: mscale = mscale_all_dim = 1.0)")
    return dict(original_seq_len=original, rope_factor=factor,
                beta_fast=rope.get("beta_fast") or 32, beta_slow=rope.get("beta_slow") or 1,
                mscale=mscale if all_dim else 1.0, mscale_all_dim=all_dim or 0.0)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def validate(cfg: ModelConfig) -> None:
    """Raise ValueError naming the first impossible field and what would be right."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"ModelConfig: {msg}")

    for name in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                 "n_routed_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "max_seq_len", "original_seq_len"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive integer")
    for name in ("n_dense_layers", "n_shared_experts", "q_lora_rank", "mtp_depth"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and value >= 0, f"{name}={value!r} must be an integer >= 0")
    need(cfg.n_dense_layers <= cfg.n_layers,
         f"n_dense_layers={cfg.n_dense_layers} exceeds n_layers={cfg.n_layers}")
    need(cfg.n_activated_experts <= cfg.n_routed_experts,
         f"n_activated_experts (top-k)={cfg.n_activated_experts} exceeds "
         f"n_routed_experts={cfg.n_routed_experts}")
    need(cfg.n_routed_experts % cfg.n_expert_groups == 0,
         f"n_routed_experts={cfg.n_routed_experts} is not divisible by "
         f"n_expert_groups={cfg.n_expert_groups}")
    need(cfg.n_limited_groups <= cfg.n_expert_groups,
         f"n_limited_groups (topk_group)={cfg.n_limited_groups} exceeds "
         f"n_expert_groups={cfg.n_expert_groups}")
    if cfg.n_routed_experts % cfg.n_expert_groups == 0:
        per_group = cfg.n_routed_experts // cfg.n_expert_groups
        need(cfg.n_expert_groups == 1 or per_group >= 2,
             f"{per_group} expert per group: group scores sum the top-2 experts of each group, so "
             "groups need at least 2 experts (use fewer n_expert_groups)")
        need(cfg.n_activated_experts <= cfg.n_limited_groups * per_group,
             f"n_activated_experts={cfg.n_activated_experts} exceeds the experts in the "
             f"{cfg.n_limited_groups} kept groups ({cfg.n_limited_groups * per_group})")
    need(cfg.qk_rope_head_dim % 2 == 0,
         f"qk_rope_head_dim={cfg.qk_rope_head_dim} must be even (RoPE rotates pairs)")
    need(cfg.score_func == "sigmoid",
         f"score_func={cfg.score_func!r}: DeepSeek-V3 routing uses 'sigmoid'")
    need(cfg.route_scale > 0, f"route_scale={cfg.route_scale} must be positive")
    need(cfg.norm_eps > 0, f"norm_eps={cfg.norm_eps} must be positive")
    need(cfg.rope_theta > 0, f"rope_theta={cfg.rope_theta} must be positive")
    need(cfg.rope_factor >= 1, f"rope_factor={cfg.rope_factor} must be >= 1")
    need(cfg.beta_fast > cfg.beta_slow > 0,
         f"beta_fast={cfg.beta_fast} must exceed beta_slow={cfg.beta_slow} > 0")
    need(cfg.init_std > 0, f"init_std={cfg.init_std} must be positive")
    need(cfg.dtype in DTYPES, f"dtype={cfg.dtype!r} is not one of {DTYPES}")
    need(cfg.remat in REMAT_POLICIES, f"remat={cfg.remat!r} is not one of {REMAT_POLICIES}")
    need(cfg.attention_impl in ATTENTION_IMPLS,
         f"attention_impl={cfg.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    need(cfg.decode_impl in DECODE_IMPLS,
         f"decode_impl={cfg.decode_impl!r} is not one of {DECODE_IMPLS}")
    need(cfg.moe_impl in MOE_IMPLS, f"moe_impl={cfg.moe_impl!r} is not one of {MOE_IMPLS}")
    need(cfg.fp8 in FP8_MODES, f"fp8={cfg.fp8!r} is not one of {FP8_MODES}")


# Presets ---------------------------------------------------------------------------------------

DEEPSEEK_V3_671B = ModelConfig()  # exactly SPEC.md section 1 (official config_671B.json)

MOONLIGHT_16B_A3B = ModelConfig(
    vocab_size=163840, dim=2048, inter_dim=11264, moe_inter_dim=1408, n_layers=27,
    n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
    n_expert_groups=1, n_limited_groups=1, route_scale=2.446, q_lora_rank=0, kv_lora_rank=512,
    norm_eps=1e-5, max_seq_len=8192, original_seq_len=8192, rope_theta=50000.0, rope_factor=1.0,
    mtp_depth=0,
)

# CPU tests: 1 dense + 2 MoE layers, 16 experts in 4 groups, q_lora on, MTP depth 1.
TINY = ModelConfig(
    vocab_size=320, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1,
    n_heads=4, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
    n_limited_groups=2, route_scale=2.5, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, max_seq_len=512, original_seq_len=512, rope_factor=1.0,
    mtp_depth=1, init_std=0.02,
)

# One H200: the DeepSeek-V3 architecture (64 experts in 8 groups, top-8 from 4 groups, one shared
# expert, kv_lora 512, q_lora on, head dims 128/64/128, MTP 1) at about 2.7B parameters, so
# AdamW at sequence length 4096 fits 141 GB. Widths are multiples of 512 so the expert GEMMs
# (K, N = 2048, 1024) run near the matrix units' rate.
SMALL = ModelConfig(
    vocab_size=129280, dim=2048, inter_dim=5632, moe_inter_dim=1024, n_layers=6,
    n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=1, n_activated_experts=8,
    n_expert_groups=8, n_limited_groups=4, route_scale=2.5, q_lora_rank=768, kv_lora_rank=512,
    max_seq_len=4096, original_seq_len=4096, rope_factor=1.0, mtp_depth=1, dtype="bfloat16",
)

PRESETS: dict[str, ModelConfig] = {
    "deepseek_v3_671b": DEEPSEEK_V3_671B,
    "moonlight_16b_a3b": MOONLIGHT_16B_A3B,
    "small": SMALL,
    "tiny": TINY,
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with field overrides; unknown names and fields raise a clear error."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(fields)}")
    return PRESETS[name].replace(**overrides)
