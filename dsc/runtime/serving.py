"""Token streaming for serving: the KV-cache loop of `OrtCausalLM.generate`, one step at a time.

`stream_tokens` yields after every step, so a server can send each request its new text as it
is made (the Triton model in `dsc.runtime.triton` does). `TextStream` turns a row's token ids into
text pieces without splitting a multi-byte character.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dsc.errors import BadInput


def stream_tokens(
    runner,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    *,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> Iterator[list[tuple[int, int, bool]]]:
    """Greedy generation for a batch of prompts (left-padded, as `OrtCausalLM.generate`).

    Yields, per step, [(row, token, finished)] for the rows still running; a row finishes at
    its own `max_new_tokens` or at `eos_token_id` (the EOS token is yielded, finished=True).
    `runner` is an `OrtCausalLM` or `EngineCausalLM`. Raises `BadInput` for an empty prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BadInput("generation needs at least one token per prompt")
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = np.full((batch, width), pad_token_id, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    out = runner.step(ids, mask, pos, runner.empty_past(batch))
    next_pos = pos[:, -1:] + 1
    made = [0] * batch
    done = [m <= 0 for m in max_new_tokens]
    while not all(done):
        tok = out.logits[:, -1, :].astype(np.float32).argmax(axis=-1)
        step = []
        for row in range(batch):
            if done[row]:
                continue
            made[row] += 1
            t = int(tok[row])
            done[row] = made[row] >= max_new_tokens[row] or t == eos_token_id
            step.append((row, t, done[row]))
        yield step
        if all(done):
            return
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        out = runner.step(tok[:, None], mask, next_pos, out.present)
        next_pos = next_pos + 1


class TextStream:
    """Incremental detokenization of one row: `push(token)` returns the new text (maybe "")."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece
