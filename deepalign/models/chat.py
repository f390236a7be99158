"""Chat formatting with exact token spans.

:func:`render_chat` lays out one exchange with the model's own chat template and returns its token
ids together with the exact spans of each part::

    [ prompt (system, user turn, assistant header) | prefill | response | end of turn ]

and, inside the prompt, the span of the user's own words (``user``: the request without template
tokens, which the [CLS] safety signal reads). The template is rendered once with sentinels as the
user's and the assistant's content to find the template text around them; then each part is
tokenised *separately* (template text before the user content, the user content, template text up
to the assistant content, prefill, response, end-of-turn text) and the ids are concatenated. So a token never straddles the
prompt/prefill, prefill/response or response/end boundary, and the spans are exact by
construction. (The price: the ids can differ from tokenising the whole string at once, e.g. where a
tokenizer would merge the last prefill word with the first response word. That is what a prefill
attack feeds the model anyway: a fixed prefix of tokens, then the model's own tokens.)

Prefill and response may be given as text or as token ids (DA's "first k tokens of a harmful
response" is a token count).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import torch

_SENTINEL = "\u2063DEEPALIGN\u2063CONTENT\u2063"
_USER_SENTINEL = "\u2063DEEPALIGN\u2063USER\u2063"
PARTS = ("prompt", "prefill", "response", "end")


@dataclass(frozen=True)
class ChatSpans:
    """Token ids of one exchange and the spans of its parts (half-open ``[start, stop)`` slices).

    ``prompt``: everything before the assistant's content (template, system, user turn, assistant
    header); ``prefill``: forced assistant tokens (may be empty); ``response``: the tokens after the
    prefill; ``end``: the template's end-of-turn tokens (empty when ``close_turn=False``);
    ``user``: the user's own words inside ``prompt`` (``None`` for plain text, which has no turns).
    """

    input_ids: tuple[int, ...]
    prompt: slice
    prefill: slice
    response: slice
    end: slice
    user: slice | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def mask(self, *parts: str) -> torch.Tensor:
        """Bool ``[T]`` mask that is True on the named parts (``"prompt"``, ``"prefill"``,
        ``"response"``, ``"end"``, ``"user"``), e.g. ``mask("response", "end")`` for a refusal loss."""
        out = torch.zeros(len(self.input_ids), dtype=torch.bool)
        for part in parts:
            if part not in PARTS + ("user",):
                raise ValueError(f"unknown part {part!r}; expected prompt, prefill, response, end or user")
            where = getattr(self, part)
            if where is not None:
                out[where] = True
        return out

    def tokens(self, part: str) -> tuple[int, ...]:
        return self.input_ids[getattr(self, part)]


def template_parts(tokenizer, user: str, system: str | None = None) -> tuple[str, str]:
    """``(text before the assistant content, text after it)`` for one user turn, from the
    tokenizer's chat template. Raises ``ValueError`` if the tokenizer has no template or the
    template does not place the assistant content verbatim."""
    head, between, after = _template_pieces(tokenizer, system)
    return head + user + between, after


def _template_pieces(tokenizer, system: str | None) -> tuple[str, str, str]:
    """The template text before the user content, between it and the assistant content, and after."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": _USER_SENTINEL}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if text.count(_SENTINEL) != 1 or text.count(_USER_SENTINEL) != 1 or text.index(_USER_SENTINEL) > text.index(_SENTINEL):
        raise ValueError("the chat template does not reproduce the user's and the assistant's content verbatim; "
                         "cannot locate the prompt and response spans")
    head, rest = text.split(_USER_SENTINEL)
    between, after = rest.split(_SENTINEL)
    return head, between, after


# For base models (no chat template): the system prompt and the user's text each followed by a
# blank line / a newline, then the assistant's text, with nothing around it.
PLAIN_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
                  "{% elif message['role'] == 'user' %}{{ message['content'] }}\n"
                  "{% else %}{{ message['content'] }}{% endif %}{% endfor %}")


def set_chat_template(tokenizer, template: str) -> None:
    """Give ``tokenizer`` a chat template: ``"plain"`` (:data:`PLAIN_TEMPLATE`, for base models) or
    the Jinja text of one. The spans are then checked once, so a template that does not reproduce
    the contents verbatim is refused here, not in the middle of a run."""
    tokenizer.chat_template = PLAIN_TEMPLATE if template == "plain" else template
    _template_pieces(tokenizer, None)


def set_default_system(tokenizer, system: str) -> None:
    """Make ``system`` the system prompt of every rendering that gives none (for code paths that do
    not pass one, e.g. the analyses): the chat template is wrapped so that a conversation without a
    system message gets this one first. Checked at once, like :func:`set_chat_template`."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template")
    literal = json.dumps(system)  # a JSON string is a valid Jinja string literal
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}{% set messages = [{'role': 'system', "
                               f"'content': {literal}}}] + messages %}}{{% endif %}}" + tokenizer.chat_template)
    _template_pieces(tokenizer, None)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (special tokens written in the text,
    such as a template's BOS, are still recognised)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def render_chat(
    tokenizer,
    user: str,
    *,
    prefill: str | Sequence[int] = "",
    response: str | Sequence[int] = "",
    system: str | None = None,
    close_turn: bool = True,
) -> ChatSpans:
    """Render ``user`` → assistant ``prefill + response`` with the tokenizer's chat template.

    ``close_turn=False`` leaves the assistant turn open (for generation after a prefill).
    Returns :class:`ChatSpans`.
    """
    if not isinstance(user, str):
        raise TypeError(f"user must be a str, got {type(user).__name__}")
    head, between, after = _template_pieces(tokenizer, system)
    pieces = [encode_text(tokenizer, head), encode_text(tokenizer, user), encode_text(tokenizer, between),
              _ids(tokenizer, prefill, "prefill"), _ids(tokenizer, response, "response"),
              encode_text(tokenizer, after) if close_turn else []]
    bounds = [0]
    for piece in pieces:
        bounds.append(bounds[-1] + len(piece))
    ids = tuple(i for piece in pieces for i in piece)
    return ChatSpans(ids, slice(0, bounds[3]), *(slice(bounds[i], bounds[i + 1]) for i in range(3, 6)),
                     user=slice(bounds[1], bounds[2]))


def _ids(tokenizer, value: str | Sequence[int], name: str) -> list[int]:
    if isinstance(value, str):
        return encode_text(tokenizer, value)
    ids = [int(i) for i in value]
    vocab = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{name} has token ids outside [0, {vocab}): {bad[:5]}")
    return ids


def collate(examples: Sequence[ChatSpans], pad_id: int, *, left_pad: bool = True) -> dict[str, torch.Tensor]:
    """Pad a batch of :class:`ChatSpans` to ``[B, T]``: ``input_ids``, ``attention_mask`` (1 = real
    token) and, per part, a bool mask (``prompt_mask``, ``prefill_mask``, ``response_mask``,
    ``end_mask``, ``user_mask``). Left padding by default, as decoding from the end of each row needs."""
    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(len(e) for e in examples)
    batch = {"input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(examples), length, dtype=torch.long)}
    parts = PARTS + ("user",)
    for part in parts:
        batch[f"{part}_mask"] = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, example in enumerate(examples):
        offset = length - len(example) if left_pad else 0
        where = slice(offset, offset + len(example))
        batch["input_ids"][row, where] = torch.tensor(example.input_ids, dtype=torch.long)
        batch["attention_mask"][row, where] = 1
        for part in parts:
            batch[f"{part}_mask"][row, where] = example.mask(part)
    return batch
