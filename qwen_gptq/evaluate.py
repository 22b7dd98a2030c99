"""Quality measurements: perplexity, and closeness of a quantized model to its original.

Protocol (the one every figure in this project uses): tokenize the text without
special tokens, take the first `windows` non-overlapping windows of `length`
tokens, report exp(mean next-token negative log-likelihood) computed in float32.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer


def eval_windows(tokenizer: Tokenizer, text: str, windows: int = 64, length: int = 512) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = min(windows, ids.numel() // length)
    if n == 0:
        raise BadInput(f"the evaluation text has {ids.numel()} tokens; need at least one window of {length}")
    return ids[: n * length].view(n, length)


@torch.no_grad()
def _logits(model, ids: torch.Tensor, device) -> torch.Tensor:
    return model(input_ids=ids.unsqueeze(0).to(device), use_cache=False).logits[0].float()


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: str | torch.device = "cpu") -> float:
    nll, count = 0.0, 0
    for w in windows:
        logits = _logits(model, w, device)
        nll += F.cross_entropy(logits[:-1], w[1:].to(logits.device), reduction="sum").item()
        count += w.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def compare(original: nn.Module, quantized: nn.Module, windows: torch.Tensor,
            device: str | torch.device = "cpu") -> dict:
    """Perplexity of both, top-1 agreement and mean KL(original || quantized) per token."""
    nll_o = nll_q = kl = 0.0
    agree = count = 0
    for w in windows:
        lo = _logits(original, w, device)[:-1]
        lq = _logits(quantized, w, device)[:-1]
        target = w[1:].to(lo.device)
        nll_o += F.cross_entropy(lo, target, reduction="sum").item()
        nll_q += F.cross_entropy(lq, target, reduction="sum").item()
        po, pq = F.log_softmax(lo, -1), F.log_softmax(lq, -1)
        kl += F.kl_div(pq, po, log_target=True, reduction="sum").item()
        agree += (lo.argmax(-1) == lq.argmax(-1)).sum().item()
        count += target.numel()
    ppl_o, ppl_q = math.exp(nll_o / count), math.exp(nll_q / count)
    return {
        "ppl_original": ppl_o,
        "ppl_quantized": ppl_q,
        "ppl_increase_pct": 100.0 * (ppl_q / ppl_o - 1.0),
        "top1_agreement": agree / count,
        "mean_kl": kl / count,
        "tokens": count,
        "windows": int(windows.shape[0]),
    }
