"""Chat formatting: one function turns instructions into token ids, for every architecture.

Rules:

* the tokenizer's own chat template is used (``add_generation_prompt=True``); a model without one
  is refused unless the caller explicitly opts into :data:`PLAIN_TEMPLATE`;
* the formatted text is tokenised with ``add_special_tokens=False`` and exactly one BOS is ensured
  at the start (templates that already write BOS are not given a second one);
* batches are LEFT padded, so position ``-1`` is the last prompt token of every row;
* the *post-instruction* tokens are everything the template writes after the user's text
  (end-of-turn marker, assistant header); they are the candidate positions for directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from transformers import PreTrainedTokenizerBase

from lens_safety.errors import LensSafetyError

PLAIN_TEMPLATE = "{system}User: {instruction}\nAssistant:"
_PROBE_INSTRUCTION = "Describe the weather today."


@dataclass
class EncodedBatch:
    """Left-padded token ids with their attention mask and position ids."""

    input_ids: Int[torch.Tensor, "batch seq"]
    attention_mask: Int[torch.Tensor, "batch seq"]

    @property
    def position_ids(self) -> Int[torch.Tensor, "batch seq"]:
        """Positions counted from each row's first real token (what HF ``generate`` uses)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device))


def common_prefix_length(rows: list[list[int]]) -> int:
    """Number of leading token ids every row shares (the whole length of identical rows)."""
    if not rows:
        return 0
    length = min(len(row) for row in rows)
    for i in range(length):
        if any(row[i] != rows[0][i] for row in rows[1:]):
            return i
    return length


@dataclass
class ChatFormatter:
    """Formats user instructions with a model's chat template and tokenises them.

    Args:
        tokenizer: the model's tokenizer.
        system_prompt: default system prompt (``None``: the template's own default, if any).
        use_chat_template: ``False`` uses :data:`PLAIN_TEMPLATE` instead of the tokenizer's template
            (only for base models without one; say so explicitly).
        max_length: the model's context in tokens; a longer formatted prompt is refused with a
            one-line error instead of failing (or silently degrading) inside the model.
    """

    tokenizer: PreTrainedTokenizerBase
    system_prompt: str | None = None
    use_chat_template: bool = True
    max_length: int | None = None
    _n_post: dict[str | None, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.use_chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise LensSafetyError(
                f"tokenizer '{getattr(self.tokenizer, 'name_or_path', '?')}' has no chat template",
                "use an instruction-tuned model, or pass chat_template=False (CLI: --no-chat-template) "
                "to use a plain 'User: ... Assistant:' format",
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # ---------------------------------------------------------------- text
    def format(self, instruction: str, system_prompt: str | None = None) -> str:
        """The full prompt text for one instruction, ending with the assistant header."""
        system = system_prompt if system_prompt is not None else self.system_prompt
        if not self.use_chat_template:
            prefix = f"{system}\n\n" if system else ""
            return PLAIN_TEMPLATE.format(system=prefix, instruction=instruction)
        messages = [{"role": "user", "content": instruction}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # e.g. templates that reject a system role
            if not system:
                raise
            raise LensSafetyError(
                f"this model's chat template rejects a system prompt ({exc})",
                "drop --system-prompt or prepend it to the instruction yourself",
            ) from None
        return str(text)

    # ---------------------------------------------------------------- tokens
    def _adds_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return False
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return len(probe) > 0 and probe[0] == bos

    def token_ids(self, text: str) -> list[int]:
        """Token ids of already-formatted text with exactly one leading BOS when the model uses one."""
        ids: list[int] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if bos is not None and self._adds_bos():
            while len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
                ids.pop(0)
            if not ids or ids[0] != bos:
                ids.insert(0, bos)
        return ids

    def encode(self, instructions: list[str], system_prompt: str | None = None) -> EncodedBatch:
        """Format and tokenise instructions into one left-padded batch."""
        rows = [self.token_ids(self.format(x, system_prompt)) for x in instructions]
        return self.pad(rows)

    def check_fit(self, rows: list[list[int]], *, extra_tokens: int = 0, name: str = "") -> None:
        """Raise when a token row plus ``extra_tokens`` (new tokens to generate) does not fit in the
        model's context (:attr:`max_length`; no check when it is unknown)."""
        if self.max_length is None:
            return
        for i, row in enumerate(rows):
            if len(row) + extra_tokens > self.max_length:
                plus = f" + {extra_tokens} new tokens" if extra_tokens else ""
                raise LensSafetyError(
                    f"prompt {i + 1}{f' of {name}' if name else ''} has {len(row)} tokens{plus}, more than "
                    f"the model's context of {self.max_length}",
                    "shorten it, remove it from the prompt file, or generate fewer new tokens",
                )

    def pad(self, rows: list[list[int]]) -> EncodedBatch:
        """Left-pad token id lists into a batch."""
        if not rows:
            raise LensSafetyError("no prompts to encode", "pass at least one prompt")
        self.check_fit(rows, name="this batch")
        width = max(len(r) for r in rows)
        pad_id = int(self.tokenizer.pad_token_id)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return EncodedBatch(ids, mask)

    # ---------------------------------------------------------------- positions
    def n_post_instruction(self, system_prompt: str | None = None) -> int:
        """Number of tokens the template writes after the user's text (>= 1)."""
        key = system_prompt if system_prompt is not None else self.system_prompt
        if key not in self._n_post:
            text = self.format(_PROBE_INSTRUCTION, system_prompt)
            end_char = text.rfind(_PROBE_INSTRUCTION) + len(_PROBE_INSTRUCTION)
            full = self.token_ids(text)
            head = self.token_ids(text[:end_char])
            n_post = len(full) - len(head)
            self._n_post[key] = max(n_post, 1)
        return self._n_post[key]

    def post_instruction_positions(self, system_prompt: str | None = None) -> tuple[int, ...]:
        """Negative positions of the post-instruction tokens, e.g. ``(-5, -4, -3, -2, -1)``."""
        n = self.n_post_instruction(system_prompt)
        return tuple(range(-n, 0))

    def post_instruction_tokens(self, system_prompt: str | None = None) -> list[str]:
        """The post-instruction tokens as strings (what positions ``-n..-1`` hold)."""
        ids = self.token_ids(self.format(_PROBE_INSTRUCTION, system_prompt))
        n = self.n_post_instruction(system_prompt)
        return [str(self.tokenizer.decode([i])) for i in ids[-n:]]

    def template_tail(self, system_prompt: str | None = None) -> str:
        """The template text after the user's instruction."""
        text = self.format(_PROBE_INSTRUCTION, system_prompt)
        return text[text.rfind(_PROBE_INSTRUCTION) + len(_PROBE_INSTRUCTION) :]
