"""Calibration data: formats, ChatML construction, validation messages."""

import json

import pytest
from transformers import AutoTokenizer

from qwen_gptq.calib import SYSTEM_PROMPT, chatml_ids, chatml_prompt_ids, read_samples, tokenize_samples
from qwen_gptq.errors import BadInput

from .conftest import TINY


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


def _write(tmp_path, obj, name="c.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return p


def test_qwen_format_becomes_chatml_with_default_system_prompt(tmp_path, tok):
    p = _write(tmp_path, [{"id": "a", "conversations": [{"from": "user", "value": "你好"},
                                                          {"from": "assistant", "value": "Hello!"}]}])
    (s,) = read_samples(p)
    assert s.messages == [("system", SYSTEM_PROMPT), ("user", "你好"), ("assistant", "Hello!")]
    ids = tokenize_samples([s], tok, 8192)[0].tolist()
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert tok.decode(ids) == expected
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_hand_built_chatml_matches_template(tmp_path, tok):
    """The no-template path (Qwen1 tokenizers) produces the same ids as the template path."""
    (s,) = read_samples(_write(tmp_path, [{"messages": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "What is a kernel?"},
                                                         {"role": "assistant", "content": "The core."}]}]))
    with_template = chatml_ids(tok, s.messages)

    class NoTemplate:
        chat_template = None

        def __init__(self, t):
            self.t = t

        def __call__(self, *a, **k):
            return self.t(*a, **k)

        def convert_tokens_to_ids(self, x):
            return self.t.convert_tokens_to_ids(x)

    assert chatml_ids(NoTemplate(tok), s.messages) == with_template
    assert chatml_prompt_ids(NoTemplate(tok), "你好") == chatml_prompt_ids(tok, "你好")
    assert tok.decode(chatml_prompt_ids(tok, "你好")).endswith("<|im_start|>assistant\n")
    assert tok.decode(with_template).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_jsonl_text_and_truncation(tmp_path, tok):
    lines = "\n".join(json.dumps(x) for x in [{"text": "one two three four five six seven"},
                                              {"messages": [{"role": "user", "content": "hi"}]}])
    samples = read_samples(_write(tmp_path, lines, "c.jsonl"))
    assert samples[0].text and samples[1].messages
    ids = tokenize_samples(samples, tok, 3)
    assert [len(x) for x in ids] == [3, 3]


def test_leading_assistant_turn_is_dropped_like_run_gptq(tmp_path):
    (s,) = read_samples(_write(tmp_path, [{"conversations": [{"from": "assistant", "value": "x"},
                                                             {"from": "user", "value": "y"}]}]))
    assert s.messages[1:] == [("user", "y")]


@pytest.mark.parametrize(
    "content,expected",
    [
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "sample 0: needs a 'conversations', 'messages' or 'text' field"),
        ("[]", "holds no samples"),
        ('"just a string"', "expected a JSON list"),
        ([{"conversations": [{"from": "user", "value": "ok"}]}, {"conversations": "no"}],
         "sample 1: field 'conversations' must be a non-empty list"),
        ([{"id": "x7", "conversations": [{"from": "robot", "value": "hi"}]}],
         "sample 0 (id 'x7'), conversations[0]: field 'from' is 'robot'"),
        ([{"conversations": [{"from": "user", "value": "ok"}, {"from": "assistant", "value": "  "}]}],
         "sample 0, conversations[1]: field 'value' must be a non-empty string"),
        ([{"conversations": [{"from": "user", "value": 3}]}], "field 'value' must be a non-empty string"),
        ([5], "sample 0: expected an object, got int"),
        ([{"text": ""}], "sample 0: field 'text' must be a non-empty string"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, content, expected):
    with pytest.raises(BadInput) as e:
        read_samples(_write(tmp_path, content))
    assert expected in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        read_samples(tmp_path / "nope.json")


def test_auto_batches_put_samples_of_one_length_together_unpadded():
    """--batch-size auto: equal lengths share a pass, up to a number of tokens (4× more for
    MoE models); nothing is padded (the passes compute what one sample at a time
    computes). A number pads."""
    import torch

    from qwen_gptq import calib

    samples = [torch.arange(n) for n in (4, 3, 4, 7, 4, 4, 3)]
    auto = calib.make_batches(samples, None, pad_id=0, auto_tokens=12)
    assert [tuple(b.input_ids.shape) for b in auto] == [(1, 7), (3, 4), (1, 4), (2, 3)]
    assert all(b.attention_mask is None and b.valid is None for b in auto)
    assert sum(b.tokens for b in auto) == sum(len(s) for s in samples)
    padded = calib.make_batches(samples, 4, pad_id=0)
    assert [tuple(b.input_ids.shape) for b in padded] == [(4, 7), (3, 4)]
    assert padded[0].valid is not None and sum(b.tokens for b in padded) == sum(len(s) for s in samples)
    long = [torch.arange(2048)] * 128
    dense, moe = (calib.make_batches(long, None, 0, calib.auto_batch_tokens(m)) for m in (False, True))
    assert [len(b.input_ids) for b in dense] == [4] * 32 and [len(b.input_ids) for b in moe] == [32] * 4
