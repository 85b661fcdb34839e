"""chat: multi-turn assistant conversations, answered and scored as text.

Every assistant turn is trained on, so each must be a valid text answer. Evaluation asks for the final assistant
turn given every earlier one and scores it with the text metrics; what the answer is about is the whole
conversation before it, which is what the retrieval baseline matches on.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tuneforge.core.kinds.text import TextOutput


class ChatOutput(TextOutput):
    kind: Literal["chat"]
    # The first sentence of a conversation is no answer to its last turn: retrieval is the one baseline here.
    baseline_method: Literal["retrieval"] = Field(
        "retrieval", alias="baseline", description="retrieval: the final answer of the training conversation most "
        "similar to this one before its final answer (TF-IDF cosine)")

    plain_sentence: ClassVar[str] = ("writes final replies with a chrF of {share} against the reference replies of "
                                     "{n} test conversations (character n-gram F-score: 1 is the reference text "
                                     "itself)")
    answer_noun: ClassVar[str] = "reply"
    multi_turn: ClassVar[bool] = True
    answers_are: ClassVar[str] = "free-text replies, each assistant turn given the conversation before it"

    @property
    def baseline_name(self) -> str:
        return "TF-IDF nearest training conversation: its final reply"

    def input_text(self, record: dict) -> str:
        """The conversation before the final assistant turn, one "role: content" line a turn (system prompt left
        out: it is the same for every record)."""
        messages = record["messages"]
        final = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages[:final] if m["role"] != "system")
