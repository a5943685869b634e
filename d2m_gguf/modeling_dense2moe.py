"""A dense2moe model as a transformers model: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Copied beside the weights of every dense2moe checkpoint with model.py (the layers; the same file the
pipeline's PyTorch reference runs, so there is one forward pass) and configuration_dense2moe.py; imports
nothing but torch and transformers. What transformers adds here: the KV cache for generate() (entries only
for the blocks with attention), attention masks and padding, labels -> loss (+ the routers' load-balance
loss, weighted by `router_aux_loss_coef`), gradient checkpointing, tied embeddings.

Parameter names: model.embed_tokens, model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
self_attn.{q,k}_norm, post_attention_layernorm, mlp.{gate,up,down}_proj} for dense MLPs,
mlp.router (a linear layer with bias) and mlp.experts.{gate,up,down}_proj ([experts, out, in]) for MoE
blocks, model.norm, lm_head.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_dense2moe import Dense2MoEConfig
from .model import Decoder, Experts, MoEFFN, RMSNorm, hybrid_config_of


def attention_mask_4d(attention_mask: torch.Tensor | None, cache_position: torch.Tensor,
                      n_keys: int) -> torch.Tensor:
    """Boolean [B or 1, 1, T, S] (True: attend): causal over the cache and the new tokens, padding masked.
    A query with nothing to attend to (a padding token before the first real one) attends everywhere: its
    output is never used, and SDPA would give NaN."""
    keys = torch.arange(n_keys, device=cache_position.device)
    allowed = (keys[None, :] <= cache_position[:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :n_keys].bool()
    return allowed | ~allowed.any(-1, keepdim=True)


class Dense2MoEPreTrainedModel(PreTrainedModel):
    config_class = Dense2MoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]   # FSDP wraps whole blocks
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, Experts):
            for p in module.parameters():
                p.data.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class Dense2MoEForCausalLM(Dense2MoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: Dense2MoEConfig):
        super().__init__(config)
        self.model = Decoder(hybrid_config_of(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> Decoder:
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, logits_to_keep=0,
                **kwargs) -> MoeCausalLMOutputWithPast:
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, n_new = x.shape[:2]
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + n_new, device=x.device)
        if position_ids is None:
            position_ids = cache_position[None].expand(batch, n_new)
        mask = None   # plain causal attention (the reference's path) unless a cache or padding says otherwise
        if past or (attention_mask is not None and not bool(attention_mask.all())):
            mask = attention_mask_4d(attention_mask, cache_position, past + n_new)
        hidden = self.model.norm(self.model(x, position_ids, mask, past_key_values if use_cache else None))
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])

        balance = [m.last_balance for m in self.modules() if isinstance(m, MoEFFN) and m.last_balance is not None]
        aux_loss = torch.stack(balance).mean() if self.training and balance else None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
            if aux_loss is not None and self.config.router_aux_loss_coef:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         past_key_values=past_key_values if use_cache else None)


__all__ = ["Dense2MoEForCausalLM", "Dense2MoEPreTrainedModel"]
