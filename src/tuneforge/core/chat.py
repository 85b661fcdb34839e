"""Chat-template rendering with a loss mask: only the assistant's answers are trained on.

Each assistant turn is located by rendering the conversation up to that turn with
the generation prompt (exactly what the model sees at inference) and the turn
itself; the tokens in between are the answer. The answer's end-of-turn token is
trained too, so the model learns to stop; whatever the template adds after it
(ChatML's newline) is not.

An assistant turn may be a tool call (OpenAI's `tool_calls`, content empty): the template writes the call in its
own wire format (Qwen2.5's <tool_call> tags, Llama 3.1's bare JSON), and that whole span is the answer. Extra
template arguments (`tools=`) go to every render of one conversation alike.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

IGNORE = -100  # label value that torch's cross-entropy skips


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def prompt_text(tokenizer, messages: list[dict], **template_kwargs) -> str:
    """The text the model is given at inference: every turn but the last answer, then the generation prompt."""
    return tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, **template_kwargs)


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


def assistant_turn(tokenizer, messages: list[dict], eot: str, **template_kwargs) -> tuple[str, str, str]:
    """(the conversation before messages[-1] with the generation prompt, the answer through its end-of-turn token,
    what the template adds after that), for messages[-1] an assistant turn.

    The answer is found after the answer's own content, so a plain answer that quotes the end-of-turn text is not
    cut short; a tool-call turn has no content, and its whole span up to the end of the turn is the answer.
    """
    before = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True,
                                           **template_kwargs)
    through = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    if not through.startswith(before):
        raise ValueError("the chat template does not render turns as a growing prefix; cannot mask the loss")
    answer_and_tail = through[len(before):]
    cut = answer_and_tail.find(eot, len(messages[-1].get("content") or ""))
    answer = answer_and_tail if cut < 0 else answer_and_tail[: cut + len(eot)]
    return before, answer, answer_and_tail[len(answer):]


def render(tokenizer, messages: list[dict], **template_kwargs) -> Rendered:
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""  # text already turned into tokens
    eot = end_of_turn(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, answer, tail = assistant_turn(tokenizer, messages[: i + 1], eot, **template_kwargs)
        if not before.startswith(done):
            raise ValueError("the chat template does not render turns as a growing prefix; cannot mask the loss")
        for text, trained in ((before[len(done):], False), (answer, True), (tail, False)):
            ids = tokens_after(tokenizer, done, input_ids, text)
            input_ids += ids
            labels += ids if trained else [IGNORE] * len(ids)
            done += text
    return Rendered(input_ids, labels)


# A tool and a call to it that no real task declares: what the template makes of them shows how it writes tools.
PROBE_TOOL = {"type": "function", "function": {
    "name": "__probe__", "description": "A probe.",
    "parameters": {"type": "object", "properties": {"__arg__": {"type": "string"}}, "required": ["__arg__"]}}}
PROBE_ARGUMENTS = {"__arg__": "__value__"}


def probe_call(arguments: dict = PROBE_ARGUMENTS) -> dict:
    return {"type": "function", "function": {"name": "__probe__", "arguments": arguments}}


def decoded_arguments(arguments: object) -> object:
    """A tool call's arguments as an object where they came as JSON text (OpenAI's wire format, some models' too);
    text that is not JSON stays text, for the output kind to name."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            pass
    return arguments


def function_call(call: object) -> dict | None:
    """An OpenAI tool call's function as {"name", "arguments"}, the arguments decoded; None when the call holds no
    function object. The call's id is left out: it is a label that differs between two runs of one conversation."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return None
    return {"name": function.get("name"), "arguments": decoded_arguments(function.get("arguments"))}


def template_renders_tools(tokenizer) -> str:
    """Why the tokenizer's chat template cannot serve a tool_call task, or "": it must put `tools=` in the prompt
    and write an assistant turn's tool_calls. A template that ignores them (SmolLM2's) would train on prompts
    without the tools and answers without the calls."""
    messages = [{"role": "user", "content": "ping"},
                {"role": "assistant", "content": "", "tool_calls": [probe_call()]}]
    advice = ("; choose a base whose template does, e.g. Qwen2.5-Instruct or Llama-3.1-Instruct, or set a "
              "chat_template that does")
    try:
        before, answer, _ = assistant_turn(tokenizer, messages, end_of_turn(tokenizer), tools=[PROBE_TOOL])
    except Exception as err:  # jinja raises whatever the template's author chose (TemplateError, TypeError, ...)
        return f"the base model's chat template fails on a tool call ({type(err).__name__}: {err}){advice}"
    if "__probe__" not in before:
        return ("the base model's chat template does not render tools= (the tool definitions never reach the "
                f"prompt){advice}")
    if "__value__" not in answer:
        return f"the base model's chat template does not write an assistant turn's tool_calls{advice}"
    return ""


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
