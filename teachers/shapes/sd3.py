"""Training pieces of the ``sd3`` shapes teacher: SD3's rectified flow as ``StableDiffusion3Pipeline`` samples it.

- ``prompt_embeds``: the prompt states and pooled projections exactly as the pipeline's ``encode_prompt``
  makes them (both CLIP encoders' penultimate states side by side, zero-padded to ``joint_attention_dim``,
  then the ``max_sequence_length`` zero tokens that stand in for T5), but differentiable, so the text
  encoders train through them;
- ``draw_sigmas`` and ``rectified_flow``: Esser et al. 2024's objective, sigma ~ logit-normal(0, 1),
  z = (1 - sigma) x0 + sigma eps, target v = eps - x0, and the timestep the pipeline feeds the
  transformer for that sigma (sigma * 1000: ``FlowMatchEulerDiscreteScheduler``'s timesteps);
- ``velocity``: the transformer on those states with the 256 T5 zero tokens folded into one.

Why folding is exact: the zero tokens enter identical (``context_embedder`` of zeros), every joint block
treats each context token alike (per-token norms, modulation, projections and MLP; attention whose
output for a token depends on its own query only), so they stay identical in every block. Attention
over n identical keys and values is attention over one of them with log(n) added to its logit (its
softmax weight n times one copy's), so ``FoldedTailAttnProcessor`` computes the same image tokens, and
hence the same loss and gradients, from 17 context tokens instead of 272 (float32 rounding aside;
``tests/test_shapes_sd3.py`` checks both against the unfolded call). The EMA copy and every pipeline
keep diffusers' own processor: folding is installed for the training forward only.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler's: the pipeline's timestep is sigma * 1000
LOGIT_NORMAL = (0.0, 1.0)  # SD3's sigma distribution (Esser et al. 2024: logit-normal, m = 0, s = 1)


def prompt_embeds(text_encoder, text_encoder_2, input_ids, input_ids_2, *, joint_attention_dim: int,
                  t5_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, pooled_prompt_embeds)`` of ``StableDiffusion3Pipeline.encode_prompt`` without T5
    (``text_encoder_3=None``, ``max_sequence_length=t5_tokens``, no clip skip) for token ids from the
    pipeline's two tokenizers, with gradients: [B, L + t5_tokens, joint_attention_dim] and [B, 2 P]."""
    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids_2, output_hidden_states=True)
    clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    clip = F.pad(clip, (0, joint_attention_dim - clip.shape[-1]))
    t5 = clip.new_zeros(clip.shape[0], t5_tokens, joint_attention_dim)
    return torch.cat([clip, t5], dim=1), torch.cat([first[0], second[0]], dim=-1)


def draw_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """n noise levels from SD3's logit-normal: sigma = sigmoid(m + s u), u ~ N(0, 1)."""
    m, s = LOGIT_NORMAL
    return torch.sigmoid(m + s * torch.randn(n, generator=generator))


def rectified_flow(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor):
    """``(z, timestep, v)``: the state z = (1 - sigma) x0 + sigma eps, the pipeline's timestep for it
    (sigma * 1000) and the velocity target v = eps - x0 (dz / dsigma along the straight path)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * eps, sigma * NUM_TRAIN_TIMESTEPS, eps - x0


class FoldedTailAttnProcessor:
    """SD3's joint attention (image tokens, then context tokens) where the context's last token stands for
    ``repeats`` identical tokens: its key gets log(repeats) on its logit. With ``repeats`` 1 it is
    diffusers' ``JointAttnProcessor2_0``'s computation."""

    def __init__(self, repeats: int):
        self.repeats = int(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("FoldedTailAttnProcessor is for joint attention: encoder_hidden_states is required")
        batch, n_image = hidden_states.shape[:2]

        def split_heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        def project(x, to_q, to_k, to_v, norm_q, norm_k):
            q, k, v = split_heads(to_q(x)), split_heads(to_k(x)), split_heads(to_v(x))
            return (norm_q(q) if norm_q is not None else q), (norm_k(k) if norm_k is not None else k), v

        q, k, v = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        cq, ck, cv = project(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                             attn.norm_added_q, attn.norm_added_k)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = math.log(self.repeats)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        image, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


@contextlib.contextmanager
def folded_tail(transformer, repeats: int):
    """``FoldedTailAttnProcessor(repeats)`` in every attention of ``transformer`` for the block's duration."""
    before = transformer.attn_processors
    transformer.set_attn_processor(FoldedTailAttnProcessor(repeats))
    try:
        yield transformer
    finally:
        transformer.set_attn_processor(before)


def velocity(transformer, z, timestep, embeds, pooled, clip_tokens: int) -> torch.Tensor:
    """``transformer(z, timestep, embeds, pooled).sample`` with ``embeds``' tokens after the first
    ``clip_tokens`` (the T5 zeros: identical, checked) folded into one."""
    tail = embeds[:, clip_tokens:]
    if tail.shape[1] > 1 and not torch.equal(tail, tail[:, :1].expand_as(tail)):
        raise ValueError("the prompt states after the CLIP tokens are not identical: they cannot be folded")
    with folded_tail(transformer, tail.shape[1]):
        return transformer(hidden_states=z, timestep=timestep, encoder_hidden_states=embeds[:, : clip_tokens + 1],
                           pooled_projections=pooled).sample
