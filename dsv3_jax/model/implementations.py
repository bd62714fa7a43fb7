"""Which implementation runs attention, decode and the routed experts, for a model on a backend.

`resolve(cfg, backend)` is the one place that turns the config's `attention_impl`, `decode_impl`
and `moe_impl` into what runs, and `resolved(cfg, backend)` is the config that says so: its
fields name the implementation itself ("pallas_gpu" / "pallas_tpu" for the kernels, names of
pallas_kernels.implementations), and the modules read them as they are, with no backend lookup
while tracing (`chosen`). The public functions of `api` resolve for the default backend (a
resolved config passes through unchanged); the trainer and generation resolve once, when built.

"auto" takes a Pallas kernel only where the kernel's own support predicate (`pallas_unsupported`
beside each kernel) holds for the model's shapes and the kernel is measured faster there
(benchmarks/RESULTS.md, one H200; on TPU, estimated from the kernels compiled for v5p and v6e:
`tpu_fallback`), and otherwise the XLA path, saying why. Shapes the GPU kernels
run only zero-padded (head dims or expert widths that are not whole 64-wide tiles, as `tiny`'s)
are not measured faster: there `auto` takes XLA (on one H200, `tiny` ran 529k tokens/s on XLA
after a 25 s compile; the padded kernels did not finish compiling and 32 steps in 150 s), while
an explicit "pallas" runs them padded. An explicit "pallas" on shapes its kernel cannot run is
refused with that reason, before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
import functools

from dsv3_jax.config import ModelConfig
from pallas_kernels import expert_dispatch, mla_attention, mla_decode
from pallas_kernels import implementations as kernels

# New tokens per sequence a decode step attends with: 1, or 2 for MTP verification.
DECODE_TOKENS = (1, 2)


@dataclasses.dataclass(frozen=True)
class Implementations:
    """What runs: attention ("xla" | "cudnn" | "pallas"), decode ("xla" | "pallas") and the
    routed experts ("dense" | "xla" | "pallas"), with a note for each "auto" that fell back.
    "pallas" is the backend's kernel ("pallas_gpu" | "pallas_tpu" in a `resolved` config)."""

    attention: str
    decode: str
    moe: str
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for start-up messages."""
        line = f"attention {self.attention}, decode {self.decode}, experts {self.moe}"
        return line + "".join(f"; {note}" for note in self.notes)


def _chip(backend: str) -> str:
    return {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)


def attention_unsupported(cfg: ModelConfig, chip: str) -> str | None:
    return mla_attention.pallas_unsupported(chip, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                            cfg.v_head_dim)


def decode_unsupported(cfg: ModelConfig, chip: str) -> str | None:
    for tokens in DECODE_TOKENS:
        reason = mla_decode.pallas_unsupported(chip, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                               cfg.n_heads, tokens)
        if reason:
            return reason
    return None


def moe_unsupported(cfg: ModelConfig, chip: str) -> str | None:
    return expert_dispatch.pallas_unsupported(chip, cfg.dim, cfg.moe_inter_dim,
                                              cfg.n_routed_experts, cfg.n_activated_experts)


def attention_padding(cfg: ModelConfig) -> str | None:
    """Why "auto" leaves the GPU attention kernel out at these head dims (padded), or None."""
    dims = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
    pads = mla_attention.gpu_head_padding(*dims)
    if not any(pads):
        return None
    padded = "/".join(str(d + p) for d, p in zip(dims, pads, strict=True))
    return (f"head dims {'/'.join(map(str, dims))} run on the GPU kernel only zero-padded to "
            f"{padded}, not measured faster than XLA")


def moe_padding(cfg: ModelConfig) -> str | None:
    """Why "auto" leaves the GPU expert kernels out at these widths (padded), or None."""
    pad_d, pad_f = expert_dispatch.gpu_padding(cfg.dim, cfg.moe_inter_dim)
    if not (pad_d or pad_f):
        return None
    return (f"dim={cfg.dim}, moe_inter_dim={cfg.moe_inter_dim} run on the GPU grouped matmuls "
            f"only zero-padded to {cfg.dim + pad_d}/{cfg.moe_inter_dim + pad_f}, not measured "
            f"faster than XLA")


# Why "auto" takes XLA on a TPU, per field (None: the TPU kernel where it is supported). Decided
# from the kernels compiled for v5p and v6e at DeepSeek-V3 and Moonlight shapes
# (`python -m benchmarks.tpu_kernels`: XLA's cost analysis and memory, not yet a TPU timing).
# Attention: XLA materializes the [B, N, T, T] scores (16.6 GiB of scratch for one DeepSeek-V3
# layer's forward+backward at T=4096, 1.8 GiB for the kernel) and its roofline estimate is 2.7-3.2x
# the kernel's. Decode: the kernel reads less at 128 heads (0.43 vs 0.53 ms on v5p), XLA at 16
# (0.30 vs 0.39 ms). Experts: the grouped matmul reads 2.2-4.6x XLA ragged_dot's bytes at its
# tiles, and larger tiles hit v5p's 16 MiB scoped VMEM before they catch up.
DECODE_KERNEL_MIN_HEADS = 64


def tpu_fallback(field: str, cfg: ModelConfig) -> str | None:
    """Why "auto" takes XLA over the TPU kernel for `field`, or None."""
    if field == "moe_impl":
        return ("the TPU grouped matmul reads 2.2-4.6x XLA ragged_dot's bytes "
                "(benchmarks.tpu_kernels)")
    dims = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
    if field == "attention_impl" and any(d % 64 for d in dims):
        return (f"head dims {'/'.join(map(str, dims))} are not whole 64-wide tiles: "
                "compiled, not estimated faster")
    if field == "decode_impl" and cfg.n_heads < DECODE_KERNEL_MIN_HEADS:
        return (f"n_heads={cfg.n_heads} < {DECODE_KERNEL_MIN_HEADS}: XLA's decode reads less "
                "there (benchmarks.tpu_kernels)")
    return None


def _pick(field: str, requested: str, chip: str, reason: str | None, notes: list[str],
          padded: str | None = None, on_tpu: str | None = None) -> str:
    """requested "auto": Pallas on GPU where supported without padding, on TPU where supported
    unless `on_tpu` says why not; an explicit "pallas" must be supported (padding allowed), and
    so must a kernel named outright ("pallas_gpu" / "pallas_tpu", as a resolved config has), on
    its own chip."""
    if requested in kernels.PALLAS_IMPLEMENTATIONS:
        if requested != kernels.PALLAS and kernels.chip_of(requested) != chip:
            reason = f"it is the {kernels.chip_of(requested)} kernel"
        if reason:
            raise ValueError(f"model.{field}={requested!r} cannot run on {chip}: {reason}. Use "
                             f"model.{field}='auto' (falls back to XLA) or 'xla'")
        return "pallas"
    if requested != "auto":
        return requested
    if chip == "tpu":
        padded = on_tpu
    elif chip != "gpu":
        return "xla"
    if reason or padded:
        notes.append(f"{field} auto -> xla: {reason or padded}")
        return "xla"
    return "pallas"


def resolve(cfg: ModelConfig, backend: str) -> Implementations:
    """The implementations `cfg` runs on `backend` ("cpu", "gpu"/"cuda", "tpu"). Raises
    ValueError for an explicit "pallas" the kernel cannot run at these shapes."""
    chip = _chip(backend)
    notes: list[str] = []
    attention = _pick("attention_impl", cfg.attention_impl, chip,
                      attention_unsupported(cfg, chip), notes, attention_padding(cfg),
                      tpu_fallback("attention_impl", cfg))
    decode = _pick("decode_impl", cfg.decode_impl, chip, decode_unsupported(cfg, chip), notes,
                   on_tpu=tpu_fallback("decode_impl", cfg))
    moe = _pick("moe_impl", cfg.moe_impl, chip, moe_unsupported(cfg, chip), notes,
                moe_padding(cfg), tpu_fallback("moe_impl", cfg))
    return Implementations(attention, decode, moe, tuple(notes))


@functools.lru_cache(maxsize=64)
def resolved(cfg: ModelConfig, backend: str) -> ModelConfig:
    """`cfg` with attention_impl, decode_impl and moe_impl naming what runs on `backend`, as
    `resolve` picks it ("pallas" becomes the backend's kernel, "pallas_gpu" or "pallas_tpu");
    a resolved config comes back unchanged. Raises as `resolve` does."""
    impls = resolve(cfg, backend)

    def concrete(name: str) -> str:
        return kernels.for_chip(_chip(backend)) if name == kernels.PALLAS else name

    return cfg.replace(attention_impl=concrete(impls.attention),
                       decode_impl=concrete(impls.decode), moe_impl=concrete(impls.moe))


UNRESOLVED = ("auto", kernels.PALLAS)  # requests that name no implementation until resolved


FIELDS = ("attention_impl", "decode_impl", "moe_impl")


def is_resolved(cfg: ModelConfig) -> bool:
    """Whether every implementation field of `cfg` names what runs (no "auto", no bare
    "pallas")."""
    return all(getattr(cfg, field) not in UNRESOLVED for field in FIELDS)


# What the FP8 dense linears (fp8.linear: attention projections, dense FFN, shared experts) run
# on a GPU: "pallas_gpu" (the Mosaic GPU FP8 kernel) or "xla_fp8" (XLA's FP8 dot per K chunk).
# Set from `python -m benchmarks.fp8_gemm --dense` on the H200 (not yet measured).
FP8_LINEAR_GPU = "pallas_gpu"
GPU_ONLY = ("pallas_gpu", "cudnn")  # implementations a resolved config names only on a GPU


def fp8_linear(cfg: ModelConfig) -> str:
    """fp8.linear's implementation for a `resolved` cfg with fp8="blockwise": FP8_LINEAR_GPU
    where the model runs on a GPU, which its resolved fields say by naming a GPU-only
    implementation (a GPU kernel, cuDNN attention), else "xla" (the emulation; also a GPU model
    resolved to XLA everywhere, such as `tiny`'s padded shapes). "xla" without FP8 (unused)."""
    if cfg.fp8 == "none":
        return "xla"
    on_gpu = any(chosen(cfg, field) in GPU_ONLY for field in FIELDS)
    return FP8_LINEAR_GPU if on_gpu else "xla"


def chosen(cfg: ModelConfig, field: str) -> str:
    """cfg.<field> ("attention_impl", "decode_impl" or "moe_impl") for a module to run: a
    `resolved` config names the implementation; "auto" or a bare "pallas" is refused, as it would
    depend on the backend read while tracing."""
    name = getattr(cfg, field)
    if name in UNRESOLVED:
        raise ValueError(f"model.{field}={name!r} is not resolved for a backend: build the model "
                         "from implementations.resolved(cfg, backend) (the functions of "
                         "dsv3_jax.model.api do)")
    return name
