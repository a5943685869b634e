"""The configuration of a dense2moe model for transformers (`AutoConfig` with trust_remote_code).

Copied beside the weights of every dense2moe checkpoint; imports nothing but transformers. The keys are
Llama/Qwen's where they have one; `layers` lists each block: whether it has attention, its MLP width, and
its experts (0: a dense MLP).
"""

from transformers import PretrainedConfig


class Dense2MoEConfig(PretrainedConfig):
    model_type = "dense2moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 512, num_attention_heads: int = 8,
                 num_key_value_heads: int = 8, head_dim: int = 64, max_position_embeddings: int = 2048,
                 rms_norm_eps: float = 1e-5, rope_theta: float = 10000.0, attention_bias: bool = False,
                 attention_output_bias: bool = False, qk_norm: bool = False, norm_topk_prob: bool = True,
                 layers: list[dict] | None = None, router_aux_loss_coef: float = 0.0,
                 initializer_range: float = 0.02, use_cache: bool = True, tie_word_embeddings: bool = True,
                 ffn_activation: str = "silu", embedding_scale: float = 1.0, post_norms: bool = False,
                 sliding_attention_window: int = 0, rope_local_base_freq: float = 0.0, attention_scale: float = 0.0,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.attention_output_bias = attention_output_bias
        self.qk_norm = qk_norm
        self.norm_topk_prob = norm_topk_prob
        # Gemma-style blocks: "gelu" = GeGLU (tanh GELU); embeddings times embedding_scale; RMSNorm on the
        # attention's and each MLP's (expert's) output; layers marked `sliding_attention` see the last
        # sliding_attention_window positions with RoPE base rope_local_base_freq (not `sliding_window`, which
        # transformers' generate() would read as a window for every layer's cache); q.k scaled by attention_scale
        # (0: 1/sqrt(head_dim))
        self.ffn_activation = ffn_activation
        self.embedding_scale = embedding_scale
        self.post_norms = post_norms
        self.sliding_attention_window = sliding_attention_window
        self.rope_local_base_freq = rope_local_base_freq
        self.attention_scale = attention_scale
        # one entry per block: {"attention": bool, "intermediate_size": int, "num_experts": int,
        # "num_experts_per_tok": int, "sliding_attention": bool}
        self.layers = [dict(layer) for layer in (layers or [])]
        self.router_aux_loss_coef = router_aux_loss_coef   # weight of the load-balance loss in `loss`
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.pop("num_hidden_layers", None)   # always len(layers)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)
