"""Incremental decoding and text generation, the same for every model family.

A model answers `new_cache()` and `model(tokens, position_ids, cache=cache)`, which continues the
cached sequence with `tokens` and returns the last token's logits. What a cache holds is the model's
business (megalatent/nn/cache.py): every layer's K/V, or constant-size states, or one shared K/V cache
with a prefill that runs only what the last prompt token needs.

    prefill(model, prompt, cache)   -> logits of the prompt's last token  [b, vocab]
    decode_step(model, token, cache) -> logits of the next position        [b, vocab]
    generate(model, prompt, max_new_tokens, temperature=0 (greedy) | T, top_k, top_p)
"""
from __future__ import annotations

from typing import Optional

import torch

from megalatent.nn.cache import InferenceCache


def _advance(model, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    n = tokens.shape[1]
    position_ids = torch.arange(cache.length, cache.length + n, device=tokens.device).expand(tokens.shape[0], n)
    logits = model(tokens, position_ids, cache=cache)
    cache.length += n
    return logits[:, -1].float()


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """Process the prompt [b, P] into `cache`; the logits of its last token [b, vocab]."""
    return _advance(model, prompt, cache)


@torch.no_grad()
def decode_step(model, token: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """One new token [b] or [b, 1] -> the logits of the position after it [b, vocab]."""
    return _advance(model, token.view(-1, 1), cache)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens [b] from logits [b, vocab]: argmax at temperature 0, else sampled from
    softmax(logits / T) restricted to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p (nucleus)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens more likely than it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
             vocab_size: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """prompt [b, P] -> [b, P + new] tokens. `vocab_size` excludes the embedding's padding rows from
    sampling; generation stops early once every sequence has produced `eos_id`."""
    cache = model.new_cache()
    logits = prefill(model, prompt, cache)
    out = [prompt]
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        token = sample(logits[:, :vocab_size] if vocab_size else logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        out.append(token[:, None])
        if (eos_id is not None and bool(done.all())) or i == max_new_tokens - 1:
            break
        logits = decode_step(model, token, cache)
    return torch.cat(out, dim=1)
