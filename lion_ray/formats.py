"""The student's prompt format, one rule for every path: training, hf and vLLM inference, serving.

    fmt = PromptFormat(tokenizer, "chat", system="You are concise.")
    fmt.prompt_ids("Reverse 'kato'.", "")          # the tokens the model sees before answering
    fmt.example("Reverse 'kato'.", "", "otak", 256)  # training: ids and labels (loss on the answer)
    fmt.conversation_ids(messages)                  # serving: a whole conversation

* ``alpaca`` / ``compact``: the text templates of :mod:`lion_ray.logic.prompts`, tokenized
  with the tokenizer's own special-token rule (a BOS where the tokenizer adds one), the
  answer followed by EOS.
* ``chat``: the tokenizer's own chat template (``apply_chat_template``), with an optional
  system message. The template writes its special tokens into the text, so the text is
  tokenized without adding any; the answer is the assistant turn the template renders, up
  to and including its end-of-turn token.

Because every path asks this class for token ids, the prompt the student trained on is the
prompt it answers, token for token.
"""

from __future__ import annotations

from lion_ray.errors import LionError
from lion_ray.logic.examples import Encoded, fit_example
from lion_ray.logic.prompts import build_prompt

FORMATS = ("alpaca", "compact", "chat")


def content_text(content) -> str:
    """A message's text: a string, or OpenAI content parts ``[{"type": "text", ...}]``."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        else:
            raise LionError("only text content parts are supported by this student")
    return "".join(parts)


class PromptFormat:
    def __init__(self, tokenizer, name: str, system: str = ""):
        if name not in FORMATS:
            raise LionError(f"unknown prompt format {name!r}; use one of {', '.join(FORMATS)}")
        if name == "chat" and not getattr(tokenizer, "chat_template", None):
            raise LionError(
                "student.prompt_format is 'chat' but the tokenizer has no chat template; use "
                "'alpaca' or 'compact', or a model whose tokenizer_config.json has one"
            )
        self.tokenizer = tokenizer
        self.name = name
        self.system = system
        self.eos_id = tokenizer.eos_token_id

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id]

    # --- one instruction ------------------------------------------------------------------

    def messages(self, instruction: str, input_text: str = "") -> list[dict]:
        user = instruction.strip() + (f"\n\n{input_text.strip()}" if input_text else "")
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": user}]

    def prompt_text(self, instruction: str, input_text: str = "") -> str:
        if self.name == "chat":
            return self.tokenizer.apply_chat_template(
                self.messages(instruction, input_text), add_generation_prompt=True, tokenize=False
            )
        return build_prompt(instruction, input_text, self.name)

    def _ids(self, text: str) -> list[int]:
        # a chat template writes its own special tokens; a text template gets the tokenizer's
        return self.tokenizer(text, add_special_tokens=self.name != "chat").input_ids

    def prompt_ids(self, instruction: str, input_text: str = "") -> list[int]:
        return self._ids(self.prompt_text(instruction, input_text))

    def target_ids(self, instruction: str, input_text: str, answer: str) -> list[int]:
        """The answer's tokens and its end: EOS, or the chat template's end of turn."""
        if self.name != "chat":
            return self.tokenizer(answer, add_special_tokens=False).input_ids + [self.eos_id]
        return self._assistant_turn(self.messages(instruction, input_text), answer)

    def _assistant_turn(self, messages: list[dict], answer: str) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prompt):
            raise LionError(
                "the chat template renders the conversation differently once the assistant "
                "turn is added, so the answer cannot be told from the prompt; use "
                "prompt_format 'alpaca' for this model"
            )
        target = self.tokenizer(full[len(prompt) :], add_special_tokens=False).input_ids
        if self.eos_id in target:  # the turn ends there; what follows is the next turn's
            return target[: target.index(self.eos_id) + 1]
        return target + [self.eos_id]

    def example(self, instruction: str, input_text: str, answer: str, max_length: int) -> Encoded:
        """Training ids and labels: the loss covers only the answer and its end token."""
        return fit_example(
            self.prompt_ids(instruction, input_text),
            self.target_ids(instruction, input_text, answer),
            max_length,
        )

    # --- a conversation (serving) ---------------------------------------------------------

    def conversation_ids(self, messages: list[dict]) -> list[int]:
        """The prompt for the next assistant turn of a conversation. The chat format renders
        every turn through the template; a text format answers the last user message, with
        the earlier turns as its input block (what it was trained on)."""
        turns = [{"role": m["role"], "content": content_text(m.get("content"))} for m in messages]
        if self.name == "chat":
            if self.system and not any(t["role"] == "system" for t in turns):
                turns = [{"role": "system", "content": self.system}] + turns
            return self._ids(
                self.tokenizer.apply_chat_template(
                    turns, add_generation_prompt=True, tokenize=False
                )
            )
        last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
        if last_user is None:
            raise LionError("messages must contain a user message")
        history = [
            f"{t['role']}: {t['content']}"
            for t in turns[:last_user]
            if t["role"] in ("user", "assistant")
        ]
        return self.prompt_ids(turns[last_user]["content"], "\n".join(history))

    def conversation_example(self, messages: list[dict], answer: str, max_length: int) -> Encoded:
        """Training ids and labels for the next assistant turn of a conversation (chat)."""
        if self.name != "chat":
            raise LionError("conversations train only with prompt_format 'chat'")
        turns = [{"role": m["role"], "content": content_text(m.get("content"))} for m in messages]
        if self.system and not any(t["role"] == "system" for t in turns):
            turns = [{"role": "system", "content": self.system}] + turns
        return fit_example(
            self.conversation_ids(messages), self._assistant_turn(turns, answer), max_length
        )
