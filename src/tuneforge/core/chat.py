"""Chat-template rendering with a loss mask: only the assistant's answers are trained on.

Each assistant turn is located by rendering the conversation up to that turn with
the generation prompt (exactly what the model sees at inference) and the turn
itself; the tokens in between are the answer. The answer's end-of-turn token is
trained too, so the model learns to stop; whatever the template adds after it
(ChatML's newline) is not.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

IGNORE = -100  # label value that torch's cross-entropy skips


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def prompt_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """The text the model is given at inference: every turn but the last answer, then the generation prompt."""
    return tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """The special token the chat template closes an assistant turn with.

    Often not the tokenizer's eos: Phi-3 keeps <|endoftext|> but ends turns with <|end|>, a Qwen2 base folder
    ends ChatML turns with <|im_end|>. Found by rendering a probe answer: the first special token after it.
    """
    return _end_of_turn(tokenizer, tokenizer.chat_template)


@functools.lru_cache(maxsize=8)  # render() asks once a record: the probe alone cost half of a render
def _end_of_turn(tokenizer, chat_template: str) -> str:
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    before = tokenizer.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True)
    after_answer = tokenizer.apply_chat_template(probe, tokenize=False)[len(before):].split("pong", 1)[-1]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token_id in tokenizer(after_answer, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return tokenizer.convert_ids_to_tokens(token_id)
    return tokenizer.eos_token


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at the end of the turn or at eos, whichever comes."""
    return list(dict.fromkeys([tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)), tokenizer.eos_token_id]))


def tokens_after(tokenizer, text: str, ids: list[int], piece: str) -> list[int]:
    """piece's tokens where it follows text (whose tokens are ids), as the whole conversation tokenizes.

    Tokenized alone, a SentencePiece tokenizer (Mistral, Phi-3) marks piece's first word as a word start ("▁ham")
    where the whole text has "ham": earlier answers would then differ from the prompt the model reads at
    inference. Tokenized apart only where the boundary merges tokens.
    """
    if not piece:
        return []
    if text:
        whole = tokenizer(text + piece, add_special_tokens=False)["input_ids"]
        if whole[: len(ids)] == ids:
            return whole[len(ids):]
    return tokenizer(piece, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages: list[dict[str, str]]) -> Rendered:
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""  # text already turned into tokens
    eot = end_of_turn(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError("the chat template does not render turns as a growing prefix; cannot mask the loss")
        answer_and_tail = through[len(before):]
        cut = answer_and_tail.find(eot, len(message["content"]))
        answer = answer_and_tail if cut < 0 else answer_and_tail[: cut + len(eot)]
        tail = answer_and_tail[len(answer):]
        for text, trained in ((before[len(done):], False), (answer, True), (tail, False)):
            ids = tokens_after(tokenizer, done, input_ids, text)
            input_ids += ids
            labels += ids if trained else [IGNORE] * len(ids)
            done += text
    return Rendered(input_ids, labels)


def special_tokens_in(text: str, specials) -> list[str]:
    """The special-token strings (a chat template's markers: <|im_start|>, <|im_end|>, …) that text holds.

    A message holding them would be rendered, and tokenized, as the markers themselves: a user turn could forge a
    system turn or an answer. Training data and served requests that hold one are refused, never escaped silently.
    """
    return sorted({s for s in specials if s and s in text})


def special_token_strings(tokenizer) -> list[str]:
    """Every special token's text of an HF tokenizer (its named special tokens and added special tokens)."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted(set(tokenizer.all_special_tokens) | set(added))
