"""Calibration data: everything between the file and the token batches.

Read and validate (before any model loads), select (`--seed`, `--num-samples`),
tokenize as ChatML, and group into padded batches.

Accepted inputs (a JSON list, or JSON Lines with one sample per line):

    {"id": ..., "conversations": [{"from": "user"|"assistant"|"system", "value": str}, ...]}
    {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}
    {"text": str}

Conversations become ChatML the way Qwen's run_gptq.py builds them: a system turn
("You are a helpful assistant." unless the sample brings its own), then
`<|im_start|>{role}\\n{value}<|im_end|>\\n` per turn; a conversation that starts
with an assistant turn loses that turn, as run_gptq.py does. Every sample is
truncated to max_len tokens.

Which ids are special (im_start/im_end, padding, end of turn) is asked of the tokenizer
here only.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import BadInput

if TYPE_CHECKING:  # transformers' tokenizers, or a model's own (Qwen1's tiktoken one)
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger("qwen_gptq")

SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


@dataclass
class Sample:
    """One validated sample: a conversation (list of (role, text)) or plain text."""

    messages: list[tuple[str, str]] | None = None
    text: str | None = None


def read_samples(path: str | Path) -> list[Sample]:
    """Read and validate a calibration file; BadInput names the sample and field."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"calibration file {str(path)!r} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read calibration file {str(path)!r}: {e}") from None
    items = _parse(raw, path)
    if not items:
        raise BadInput(f"calibration file {str(path)!r} holds no samples")
    return [_validate(i, item) for i, item in enumerate(items)]


def _text_of(content: object, at: str, field: str) -> object:
    """A turn's text: a string, or a list of parts (the multimodal message format) that are
    all text. Image and video parts are refused: calibration is text-only for now (the
    language model of a vision-language checkpoint is what gets quantized)."""
    if not isinstance(content, list):
        return content
    kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
    other = [k for k in kinds if k != "text"]
    if other:
        raise BadInput(f"{at}: field {field!r} has {', '.join(map(str, dict.fromkeys(other)))} parts; calibration "
                       "data must be text (the language model is quantized, the vision tower is kept as it is)")
    return "".join(p.get("text", "") for p in content)


def select(samples: list[Sample], num_samples: int | None, seed: int | None) -> list[Sample]:
    """Shuffle with `seed` (when given), then keep the first `num_samples` (when given)."""
    samples = list(samples)
    if seed is not None:
        random.Random(seed).shuffle(samples)
    return samples if num_samples is None else samples[:num_samples]


def _parse(raw: str, path: Path) -> list:
    stripped = raw.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        return data
    if stripped.startswith("{"):
        # A single JSON object, or JSON Lines.
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and ("conversations" in data or "messages" in data or "text" in data):
                return [data]
        except json.JSONDecodeError:
            pass
        items = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        return items
    raise BadInput(
        f"{path}: expected a JSON list of samples or JSON Lines, got "
        f"{'an empty file' if not stripped else repr(stripped[:20])}"
    )


def _validate(i: int, item) -> Sample:
    where = f"sample {i}"
    if not isinstance(item, dict):
        raise BadInput(f"{where}: expected an object, got {type(item).__name__}")
    if "id" in item:
        where += f" (id {item['id']!r})"
    if "conversations" in item:
        turns, role_key, text_key, field = item["conversations"], "from", "value", "conversations"
    elif "messages" in item:
        turns, role_key, text_key, field = item["messages"], "role", "content", "messages"
    elif "text" in item:
        text = item["text"]
        if not isinstance(text, str) or not text.strip():
            raise BadInput(f"{where}: field 'text' must be a non-empty string")
        return Sample(text=text)
    else:
        raise BadInput(f"{where}: needs a 'conversations', 'messages' or 'text' field (has {sorted(item)})")
    if not isinstance(turns, list) or not turns:
        raise BadInput(f"{where}: field {field!r} must be a non-empty list of turns")
    messages = []
    for j, turn in enumerate(turns):
        at = f"{where}, {field}[{j}]"
        if not isinstance(turn, dict):
            raise BadInput(f"{at}: expected an object, got {type(turn).__name__}")
        role, text = turn.get(role_key), _text_of(turn.get(text_key), at, text_key)
        if role not in ROLES:
            raise BadInput(f"{at}: field {role_key!r} is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(text, str) or not text.strip():
            raise BadInput(f"{at}: field {text_key!r} must be a non-empty string")
        if role == "system" and j != 0:
            raise BadInput(f"{at}: a system turn may only come first")
        messages.append((role, text))
    # run_gptq.py drops a leading non-user turn (other than the system prompt).
    body = messages[1:] if messages[0][0] == "system" else messages
    if body and body[0][0] == "assistant":
        body = body[1:]
    if not body:
        raise BadInput(f"{where}: field {field!r} has no user or assistant turn")
    system = messages[0][1] if messages[0][0] == "system" else SYSTEM_PROMPT
    return Sample(messages=[("system", system)] + body)


# --------------------------------------------------------------------------- tokenization


def chatml_ids(tokenizer: Tokenizer, messages: list[tuple[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation in ChatML (ending with the assistant's header when
    add_generation_prompt).

    Uses the tokenizer's chat template when it has one; otherwise (Qwen1's tiktoken
    tokenizer) builds the ids by hand from im_start/im_end, as run_gptq.py does.
    """

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if getattr(tokenizer, "chat_template", None):
        return encode(tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        ))
    im_start, im_end = special_ids(tokenizer)
    nl = encode("\n")
    ids: list[int] = []
    for role, content in messages:
        ids += [im_start] + encode(role) + nl + encode(content) + [im_end] + nl
    if add_generation_prompt:
        ids += [im_start] + encode("assistant") + nl
    return ids


def chatml_prompt_ids(tokenizer: Tokenizer, prompt: str, system: str = SYSTEM_PROMPT) -> list[int]:
    """Ids of a one-turn chat prompt ending with the assistant's header (for generation)."""
    return chatml_ids(tokenizer, [("system", system), ("user", prompt)], add_generation_prompt=True)


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(im_start, im_end) ids: Qwen1 tokenizers expose im_start_id/im_end_id."""
    start = getattr(tokenizer, "im_start_id", None)
    end = getattr(tokenizer, "im_end_id", None)
    if start is None or end is None:
        start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        unk = getattr(tokenizer, "unk_token_id", None)
        if start is None or end is None or start == unk or end == unk:
            raise BadInput("the tokenizer has no chat template and no <|im_start|>/<|im_end|> tokens")
    return int(start), int(end)


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The id padding uses: pad, else Qwen1's end-of-document, else end of sequence."""
    for attr in ("pad_token_id", "eod_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def stop_token_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids that end a generated chat turn."""
    stop = {t for t in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "im_end_id", None),
                        getattr(tokenizer, "eod_id", None)) if isinstance(t, int)}
    for token in ("<|im_end|>", "<|endoftext|>"):
        t = tokenizer.convert_tokens_to_ids(token)
        if isinstance(t, int):
            stop.add(t)
    return stop


def tokenize_samples(samples: list[Sample], tokenizer: Tokenizer, max_len: int) -> list[torch.Tensor]:
    """One 1-D LongTensor of ids per sample, truncated to max_len."""
    out = []
    for i, s in enumerate(samples):
        if s.messages is not None:
            ids = chatml_ids(tokenizer, s.messages)
        else:
            ids = tokenizer(s.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise BadInput(f"sample {i}: tokenizes to no tokens")
        out.append(torch.tensor(ids[:max_len], dtype=torch.long))
    return out


# --------------------------------------------------------------------------- batches


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T], or None when nothing is padded
    valid: torch.Tensor | None  # bool [B*T]: the real (unpadded) positions; None when nothing is padded

    @property
    def tokens(self) -> int:
        return self.input_ids.numel() if self.valid is None else int(self.valid.sum())


@dataclass
class Calibration:
    batches: list[TokenBatch]
    samples: int

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in self.batches)


AUTO_BATCH_TOKENS = 8192  # --batch-size auto: samples of one length together, up to this many tokens a pass ...
AUTO_BATCH_TOKENS_MOE = 65536  # ... for MoE models: every pass launches a few kernels per expert


def auto_batch_tokens(moe: bool) -> int:
    """--batch-size auto's tokens a pass. Fewer, larger passes cost less per token where
    the host's launches bound a pass: on an H200 a Qwen3-30B-A3B-shaped MoE layer (128
    experts) took 5.2-6.5 s one 2048-token sample a pass, 2.6-3.7 s four at a time and
    1.2-1.5 s sixteen; 32 at a time was faster again, in two sessions, on one GPU (1.17-1.62 s
    against 1.16-2.21 s) and on two (0.80-1.10 s against 0.93-1.41 s), for 3-4.5 GB more
    GPU memory (docs/benchmarks.md). A dense layer's passes are bound by the GPU: their
    Hessians are accumulated a sample at a time whatever the batch (the same bits as
    --batch-size 1)."""
    return AUTO_BATCH_TOKENS_MOE if moe else AUTO_BATCH_TOKENS


def make_batches(samples: list[torch.Tensor], batch_size: int | None, pad_id: int,
                 auto_tokens: int = AUTO_BATCH_TOKENS) -> list[TokenBatch]:
    """Group samples (longest first, to waste little padding) into right-padded batches of
    batch_size; None (auto): samples of the same length together (nothing padded), up to
    auto_tokens tokens a batch."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    chunks: list[list[int]] = []
    for i in order:
        last = chunks[-1] if chunks else None
        if batch_size is not None:
            fits = last is not None and len(last) < batch_size
        else:
            n = len(samples[i])
            fits = last is not None and len(samples[last[0]]) == n and (len(last) + 1) * n <= auto_tokens
        if fits:
            last.append(i)
        else:
            chunks.append([i])
    batches = []
    for members in chunks:
        chunk = [samples[i] for i in members]
        T = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
        padded = bool((mask == 0).any())
        batches.append(TokenBatch(ids, mask if padded else None, mask.bool().flatten() if padded else None))
    return batches


def calibration(samples: list[Sample], tokenizer: Tokenizer, max_len: int, batch_size: int | None,
                auto_tokens: int = AUTO_BATCH_TOKENS) -> Calibration:
    """The token batches of the selected samples."""
    ids = tokenize_samples(samples, tokenizer, max_len)
    return Calibration(make_batches(ids, batch_size, pad_token_id(tokenizer), auto_tokens), len(ids))
