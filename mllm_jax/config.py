"""Typed model configs. Plain dataclasses, made gin-configurable by ``mllm_jax.gin_setup`` (one place registers every
config class, so a recipe can say ``LLMConfig.n_layers = 8``). Field names are the contract between the model
library, the pipeline cost model, HF import and train.py: add fields, do not rename them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling of RoPE (rope_type="llama3" in transformers)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LLMConfig:
    """One decoder-only LLM covering Llama, Qwen2, Mistral and Gemma (1/2) by options."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int | None = None  # None -> d_model // n_heads (Gemma sets it independently)
    d_ff: int = 11008
    activation: str = "silu"  # gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    norm_eps: float = 1e-5
    norm_scale_plus_one: bool = False  # Gemma: RMSNorm weight applied as (1 + w)
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(d_model)
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # Mistral
    # 0: every layer uses sliding_window (Mistral). N > 0: layer i is global when (i + 1) % N == 0, local otherwise
    # (Gemma 2: 2, i.e. even layers local; Gemma 3: 6).
    sliding_window_pattern: int = 0
    attn_logit_softcap: float | None = None  # Gemma 2
    final_logit_softcap: float | None = None  # Gemma 2
    query_pre_attn_scalar: float | None = None  # Gemma 2: softmax scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    post_norms: bool = False  # Gemma 2: extra norms after attention and MLP
    max_position_embeddings: int = 4096  # informational (RoPE has no table); HF config round trip
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k before RoPE (q_norm / k_norm)
    # Gemma 3: the sliding-window (local) layers rotate with this base (HF rope_local_base_freq) and no scaling; the
    # global layers keep rope_theta and the scaling. None: every layer uses rope_theta.
    rope_local_theta: float | None = None
    rope_linear_factor: float = 1.0  # HF rope_type "linear" (Gemma 3 4B+ global layers): positions divided by this
    # M-RoPE (Qwen2-VL / Qwen2.5-VL): the rotary frequencies split into (temporal, height, width) sections of these
    # sizes (sum = head_dim / 2), each rotated by its own axis of the batch's rope_positions [B, S, 3].
    mrope_section: tuple[int, ...] | None = None
    # ---- Mixture of experts (mllm_jax.moe; docs/moe.md). n_experts = 0: every MLP is dense.
    n_experts: int = 0
    experts_per_token: int = 2  # top-k
    moe_d_ff: int | None = None  # one expert's hidden size (None -> d_ff)
    router_activation: str = "softmax"  # "softmax" (Mixtral, Qwen2/3-MoE) | "sigmoid" (per-expert gates)
    norm_topk_prob: bool = True  # renormalise the k selected gates to sum to 1 (Mixtral, Qwen3-MoE); Qwen2-MoE: False
    shared_expert_d_ff: int = 0  # > 0: a dense shared expert beside the routed ones (Qwen2-MoE)
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output times sigmoid(x . w_gate)
    # Layer i is MoE when i >= moe_first_dense_layers and (i + 1) % moe_layer_freq == 0 (HF decoder_sparse_step;
    # DeepSeek first_k_dense_replace); the other layers keep the dense MLP of size d_ff.
    moe_layer_freq: int = 1
    moe_first_dense_layers: int = 0
    router_aux_loss_coef: float = 0.0  # load-balancing loss (HF load_balancing_loss_func, per MoE layer, averaged)
    router_z_loss_coef: float = 0.0  # mean over tokens of logsumexp(router logits)^2, averaged over MoE layers
    moe_capacity_factor: float | None = None  # None: dropless; c: each expert takes ceil(c * tokens * k / E) rows
    # Grouped matmul: "auto" (TPU/GPU: jax.lax.ragged_dot; CPU: "tiled"), "ragged_dot", "tiled" (row tiles of one
    # expert each, a batched matmul over tiles), "megablox" (TPU Pallas gmm), "dense" (every expert on every token:
    # the test oracle).
    moe_impl: str = "auto"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_moe_d_ff(self) -> int:
        return self.moe_d_ff if self.moe_d_ff is not None else self.d_ff

    def is_moe_layer(self, i: int) -> bool:
        """Layer i's MLP is a mixture of experts (the one home of the MoE/dense layer pattern)."""
        return (self.n_experts > 0 and i >= self.moe_first_dense_layers and self.moe_layer_freq > 0
                and (i + 1) % self.moe_layer_freq == 0)

    @property
    def moe_layers(self) -> tuple:
        return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))


@dataclass(frozen=True)
class VisionConfig:
    """ViT / CLIP / SigLIP vision tower from NHWC pixels."""

    kind: str = "clip"  # "vit" | "clip" | "siglip"
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (CLIP) | "gelu" (ViT) | "gelu_tanh" (SigLIP)
    norm_eps: float = 1e-5
    class_token: bool = True  # CLIP/ViT have one; SigLIP does not
    pre_norm: bool = True  # CLIP's pre_layrnorm before the transformer
    post_norm: bool = False  # final LayerNorm (SigLIP post_layernorm; applied only when select_layer == -1)
    select_layer: int = -1  # hidden state fed to the projector (LLaVA: -2)
    drop_class_token: bool = True  # drop the class token from the output features (LLaVA does)
    # Init std of the position embeddings. CLIP's 0.02 is tiny next to the patch embeddings, so a small ViT trained
    # from scratch barely tells patches apart (it cannot say *where* a shape is); ~1.0 makes positions visible.
    position_init_std: float = 0.02

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """The encoder's sequence length: the patches and the class token (HF's num_positions)."""
        return self.num_patches + (1 if self.class_token else 0)

    @property
    def num_features(self) -> int:
        """Tokens per image given to the projector."""
        return self.num_positions - (1 if self.class_token and self.drop_class_token else 0)


@dataclass(frozen=True)
class NativeVisionConfig:
    """The Qwen2-VL / Qwen2.5-VL vision tower: images and videos at their own resolution (docs/native_resolution.md).

    An image of H x W pixels (resized to multiples of ``patch_size * spatial_merge_size`` within [min_pixels,
    max_pixels]) becomes a (t, h, w) grid of patches of ``temporal_patch_size`` frames (an image is repeated to fill
    them); a video's frames sampled at ``fps`` give t = frames / temporal_patch_size. All instances of a batch are
    packed into rows of ``patches_per_row`` patches, one segment per instance (the batch contract in
    docs/contracts.md); the projector ("patch_merger") merges each 2x2 patch group, so an instance becomes
    t * h * w / spatial_merge_size**2 LLM tokens.
    """

    kind: str = "qwen2_vl"  # "qwen2_vl" | "qwen2_5_vl"
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_channels: int = 3
    d_model: int = 1280  # HF embed_dim (Qwen2-VL) / hidden_size (Qwen2.5-VL)
    n_layers: int = 32  # HF depth
    n_heads: int = 16
    d_ff: int = 5120  # Qwen2-VL: mlp_ratio * embed_dim (plain MLP); Qwen2.5-VL: intermediate_size (gated MLP)
    activation: str = "quick_gelu"  # Qwen2-VL: quick_gelu; Qwen2.5-VL: silu
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # the 2-D rotary embedding's base (HF vision_config rope_parameters.rope_theta)
    window_size: int = 0  # Qwen2.5-VL: 112 (pixels); 0: every layer attends over its whole temporal slice (as HF:
    # each temporal patch index of an instance is its own attention segment)
    full_attention_layers: tuple[int, ...] = ()  # Qwen2.5-VL: (7, 15, 23, 31); the other layers use windows
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    fps: float = 2.0  # video frames sampled per second
    tokens_per_second: float = 0.0  # Qwen2.5-VL (its config's value): M-RoPE temporal positions per second of video;
    # 0 (Qwen2-VL): one temporal position per grid step
    patches_per_row: int = 1024  # the static length of a packed patch row (a multiple of spatial_merge_size**2)

    @property
    def merge_units(self) -> int:
        return self.spatial_merge_size**2

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch (HF pixel_values' last axis): channels x temporal x patch x patch."""
        return self.num_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class AudioConfig:
    """Whisper encoder from log-mel frames [B, T, n_mels]; T = 2 * max_source_positions (3000 for 30 s)."""

    kind: str = "whisper"
    n_mels: int = 80
    max_source_positions: int = 1500
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    activation: str = "gelu"
    norm_eps: float = 1e-5

    @property
    def num_frames(self) -> int:
        return 2 * self.max_source_positions

    @property
    def num_positions(self) -> int:
        """The encoder's sequence length after its strided convolution."""
        return self.max_source_positions

    @property
    def num_features(self) -> int:
        """Tokens per clip given to the projector."""
        return self.num_positions


@dataclass(frozen=True)
class ProjectorConfig:
    """Encoder features -> LLM embeddings. "linear", "mlp" (Linear, act, Linear: LLaVA), "resampler",
    "patch_merger" or "gemma3"."""

    kind: str = "mlp"  # "linear" | "mlp" | "resampler" | "patch_merger" (Qwen2-VL: norm, 2x2 merge, MLP) | "gemma3"
    hidden_dim: int | None = None  # mlp: None -> the LLM's d_model; patch_merger: None -> d_enc * merge_size**2
    activation: str = "gelu"
    num_queries: int = 64  # resampler: output tokens per instance
    n_heads: int = 8  # resampler cross-attention heads
    n_layers: int = 1  # resampler cross-attention blocks

    merge_size: int = 2  # patch_merger: spatial_merge_size (merge_size**2 consecutive patches -> one token)
    norm: str = "layer"  # patch_merger: its input norm, "layer" (Qwen2-VL) | "rms" (Qwen2.5-VL)

    # gemma3 (Gemma 3's multi_modal_projector): the square P x P patch grid average-pooled to t x t = tokens_per_image
    # tokens (HF mm_tokens_per_image; P a multiple of t), RMSNorm with (1 + w) and eps norm_eps (HF: the vision
    # tower's layer_norm_eps), then a Linear without bias. boi/eoi: the text tokens HF's processor writes around each
    # image's placeholder run (None: Gemma 3's 255999 / 256000), kept for the processor and the export.
    tokens_per_image: int = 256
    norm_eps: float = 1e-6
    boi_token_id: int | None = None
    eoi_token_id: int | None = None

    def output_tokens(self, encoder_tokens: int) -> int:
        """Tokens per instance after projection: a resampler emits its queries, a patch merger one per merge group,
        gemma3 its pooled grid, the others one per encoder token."""
        if self.kind == "resampler":
            return self.num_queries
        if self.kind == "gemma3":
            side, t = math.isqrt(encoder_tokens), math.isqrt(self.tokens_per_image)
            if t * t != self.tokens_per_image or side * side != encoder_tokens or side % t:
                raise ValueError(f"gemma3 projector: tokens_per_image={self.tokens_per_image} must be a square t*t "
                                 f"and the encoder's {encoder_tokens} patches a square grid whose side is a multiple "
                                 f"of t (average pooling in t x t blocks)")
            return self.tokens_per_image
        if self.kind == "patch_merger":
            return encoder_tokens // self.merge_size**2
        return encoder_tokens


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")  # any of q k v o gate up down
    modules: tuple[str, ...] = ("llm",)  # "llm" and/or encoder names


@dataclass(frozen=True)
class RunSettings:
    """How a tower runs, as opposed to what it is: the static settings of a forward pass that every tower (encoders,
    projectors, LLM) takes as one object. Built from a ModelConfig by ``ModelConfig.run_settings``."""

    dtype: str = "float32"  # compute dtype
    remat: str = "none"
    layer_loop: str = "scan"
    attention_impl: str = "auto"
    span_isolated: bool = False  # LLM only
    context_method: str = "allgather"  # LLM only (ContextConfig.attention)
    lora_scale: float = 0.0  # alpha / rank of the tower's adapters, 0 without


@dataclass(frozen=True)
class ModelConfig:
    """A multimodal model: encoders and projectors keyed by modality name, one LLM.

    ``placeholder_ids[name]`` is the token id whose runs in the text are replaced by that modality's projected
    features. ``trainable`` maps "llm", "encoders/<name>" and "projectors/<name>" to bool (missing -> True).
    """

    llm: LLMConfig = field(default_factory=LLMConfig)
    encoders: dict = field(default_factory=dict)  # name -> VisionConfig | AudioConfig
    projectors: dict = field(default_factory=dict)  # name -> ProjectorConfig
    placeholder_ids: dict = field(default_factory=dict)  # name -> int token id
    # More ids that mark a modality's placeholder, {token id: name}: HF Qwen2-VL's <|video_pad|> (video_token_id) for
    # "vision", whose placeholder is <|image_pad|>. A prompt may hold either; the features replace both and
    # check_batch counts both (placeholder_tokens); our data writes placeholder_ids.
    placeholder_aliases: dict = field(default_factory=dict)
    trainable: dict = field(default_factory=dict)
    lora: LoRAConfig | None = None
    span_isolated: bool = False  # Cornstarch semantics: encoder tokens see only their own span
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16" (parameters stay float32)
    remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs) | "dots_no_batch"
    attention_impl: str = "auto"  # kernels.attention impl
    layer_loop: str = "scan"  # "scan" (lax.scan over stacked layers) | "unrolled" (faster on CPU, slower to compile)
    # How the LLM's placeholder (media) tokens attend: "bidirectional" (a span's tokens see each other both ways, the
    # mask rule of kernels.meta) or "causal" (like text: how HF Qwen2-VL and LLaVA were trained).
    media_attention: str = "bidirectional"

    def is_trainable(self, key: str) -> bool:
        return bool(self.trainable.get(key, True))

    def run_settings(self, *, context_method: str = "allgather", lora_scale: float = 0.0) -> RunSettings:
        """The settings every tower of this model runs with (``lora_scale``: the tower's own adapters)."""
        return RunSettings(dtype=self.dtype, remat=self.remat, layer_loop=self.layer_loop,
                           attention_impl=self.attention_impl, span_isolated=self.span_isolated,
                           context_method=context_method, lora_scale=lora_scale)

    def placeholder_tokens(self, name: str) -> tuple[int, ...]:
        """Every token id that marks a placeholder of modality ``name``: placeholder_ids[name], then its aliases."""
        return (int(self.placeholder_ids[name]),
                *sorted(int(i) for i, n in self.placeholder_aliases.items() if n == name))

    def features_per_instance(self, name: str) -> int:
        """LLM tokens one instance (image, clip) of modality ``name`` becomes: the length of its placeholder run.

        The one home of this number: the processor, the data, the cost model and the model all read it here."""
        if name not in self.encoders or name not in self.projectors:
            raise ValueError(f"modality {name!r} needs an encoder and a projector; the model has encoders "
                             f"{sorted(self.encoders)} and projectors {sorted(self.projectors)}")
        if self.is_native_resolution(name):
            raise ValueError(f"modality {name!r} is native-resolution ({self.encoders[name].kind}): its instances have "
                             f"no fixed feature count; count an instance's tokens from its patch grid "
                             f"(docs/native_resolution.md)")
        return int(self.projectors[name].output_tokens(self.encoders[name].num_features))

    def features_per_row(self, name: str) -> int:
        """Projected tokens per row of ``encoder_inputs[name]``, the unit ``feature_index`` counts in: an instance's
        (features_per_instance), or for a native-resolution modality a packed patch row's (patches_per_row merged)."""
        if self.is_native_resolution(name):
            return int(self.projectors[name].output_tokens(self.encoders[name].patches_per_row))
        return self.features_per_instance(name)

    def is_native_resolution(self, name: str) -> bool:
        """Modality ``name`` takes images/videos at their own size, packed into patch rows (NativeVisionConfig)."""
        return isinstance(self.encoders.get(name), NativeVisionConfig)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
