"""MobileVLM in Relax `nn`: vision tower + projector + MobileLLaMA, with MLC's entry points.

Exported functions (params packed, one method each): `embed`, `preprocess_image` and `vision_features`
(diagnostic boundaries used by `verify`), `image_embed` (RGB bytes in, as MLC's engine passes them), `prefill`, `decode`, `batch_prefill`, `batch_decode`,
`create_tir_paged_kv_cache`. The functions MLC's engine needs beside the model (logit processors,
softmax, the embedding buffer) are attached by `mobilevlm_mlc.compiler.export_model`, and `_metadata`
by `compile`, which knows the quantization and the parameter list.

Several sequences go through the decoder as one ragged row of tokens ([1, total, hidden]): the KV
cache knows from `begin_forward` which tokens belong to which sequence. So `batch_decode` runs its b
tokens as one [1, b] block, and every matmul reads each weight once for the whole batch.
"""

from __future__ import annotations

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from .clip import CLIPVisionTower
from .config import MobileVLMConfig
from .image_processing import preprocess_image
from .llama import LlamaModel
from .projector import LDPNetProjector, LDPNetV2Projector
from .quantization import GroupQuantScheme, QuantizedEmbedding, QuantizedLinear, quantize_linears

PROJECTORS = {"ldpnet": LDPNetProjector, "ldpnetv2": LDPNetV2Projector}


class MobileVLMForCausalLM(nn.Module):
    def __init__(
        self,
        config: MobileVLMConfig,
        quantization: GroupQuantScheme | None = None,
        image_coefficient_dtype: str = "float64",
    ):
        """`image_coefficient_dtype`: the image resampler's precision, float32 for devices without fp64."""
        text, vision = config.text, config.vision
        self.config = config
        self.image_coefficient_dtype = image_coefficient_dtype
        self.model = LlamaModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.vision_tower = CLIPVisionTower(vision)
        self.mm_projector = PROJECTORS[config.projector_type](vision.hidden_size, text.hidden_size, vision.grid_size)
        self.dtype = config.dtype
        if quantization is not None:  # the decoder only: its linears, embedding and lm_head
            quantize_linears(self.model, quantization, "model.")
            self.model.embed_tokens = QuantizedEmbedding(text.vocab_size, text.hidden_size, quantization)
            self.lm_head = QuantizedLinear(text.hidden_size, text.vocab_size, quantization)

    def _logits(self, hidden: Tensor) -> Tensor:
        logits = self.lm_head(hidden)
        return logits if logits.dtype == "float32" else logits.astype("float32")

    # ---- entry points -------------------------------------------------------------------------

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token ids [seq_len] -> embeddings [seq_len, hidden]."""
        return self.model.embed_tokens(input_ids)

    def _pixels(self, image: Tensor) -> Tensor:
        return self.preprocess_image(image).astype(self.dtype)

    def preprocess_image(self, image: Tensor) -> Tensor:
        """RGB bytes [1, H, W, 3] -> the pixels entering CLIP, float32 [1, 3, S, S] (diagnostic boundary)."""
        return preprocess_image(image, self.config.image_processor, self.image_coefficient_dtype)

    def vision_features(self, image: Tensor) -> Tensor:
        """RGB bytes [1, H, W, 3] -> CLIP features of the selected layer without CLS [patches, mm_hidden]."""
        features = self.vision_tower(self._pixels(image))
        return op.reshape(features, (features.shape[1], features.shape[2]))

    def image_embed(
        self,
        image: Tensor,
        resize_height: tirx.Var,
        resize_width: tirx.Var,
        crop_height: tirx.Var,
        crop_width: tirx.Var,
    ) -> Tensor:
        """RGB bytes [1, H, W, 3] of any size -> image tokens in the LLM's embedding space [image_tokens, hidden].
        MLC's signature: its engine passes four sizes, all 0 except for Phi-3-V; MobileVLM's sizes are its
        processor config's, so they are not read."""
        tokens = self.mm_projector(self.vision_tower(self._pixels(image)))
        return op.reshape(tokens, (tokens.shape[1], tokens.shape[2]))

    def prefill(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """Embeddings [1, seq_len, hidden] -> logits of the last position [1, 1, vocab] (float32)."""
        hidden = self.model(input_embeds, paged_kv_cache)
        hidden = op.tensor_expr_op(_te_last, name_hint="take_last", args=[hidden])
        return self._logits(hidden), paged_kv_cache

    def decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """Embedding of one token [1, 1, hidden] -> logits [1, 1, vocab] (float32)."""
        hidden = self.model(input_embeds, paged_kv_cache)
        return self._logits(hidden), paged_kv_cache

    def batch_prefill(
        self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache]:
        """Several sequences' chunks back to back [1, total, hidden] -> logits at `logit_positions` (each
        sequence's last token) [1, b, vocab] (float32)."""
        hidden = self.model(input_embeds, paged_kv_cache)
        hidden = op.take(hidden, logit_positions, axis=1)
        return self._logits(hidden), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """One token of each of b sequences [b, 1, hidden] -> logits [b, 1, vocab] (float32)."""
        b, _, hidden_size = input_embeds.shape
        hidden = self.model(op.reshape(input_embeds, (1, b, hidden_size)), paged_kv_cache)
        logits = self._logits(hidden)
        return op.reshape(logits, (b, 1, self.config.text.vocab_size)), paged_kv_cache

    def create_tir_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        text = self.config.text
        return TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, text.num_hidden_layers]),
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads,
            qk_head_dim=text.head_dim,
            v_head_dim=text.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=text.rope_theta,
            rope_scaling={},
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=text.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=Target.current(),
        )

    # ---- export spec --------------------------------------------------------------------------

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        hidden = self.config.text.hidden_size
        image = nn.spec.Tensor([1, "image_height", "image_width", 3], "uint8")
        packed = {"param_mode": "packed", "effect_mode": "none"}
        spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "preprocess_image": {"image": image, "$": packed},
            "vision_features": {"image": image, "$": packed},
            "image_embed": {
                "image": image,
                "resize_height": nn.spec.Int(),
                "resize_width": nn.spec.Int(),
                "crop_height": nn.spec.Int(),
                "crop_width": nn.spec.Int(),
                "$": packed,
            },
            "prefill": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", hidden], self.dtype),
                "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": packed,
            },
            "decode": {
                "input_embeds": nn.spec.Tensor([1, 1, hidden], self.dtype),
                "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": packed,
            },
            "batch_prefill": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", hidden], self.dtype),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": packed,
            },
            "batch_decode": {
                "input_embeds": nn.spec.Tensor(["batch_size", 1, hidden], self.dtype),
                "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": packed,
            },
            "create_tir_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


def _te_last(x: te.Tensor) -> te.Tensor:
    """[b, s, d] -> [b, 1, d]: the position whose logits choose the next token."""
    b, s, d = x.shape
    return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="take_last")
