"""Constrained decoding: one grammar a request, from the task's output kind (core/kinds), used everywhere.

The grammar is GBNF (llama.cpp's format). `tuneforge serve` hands it to llama.cpp's own grammar sampler; the
evaluation stage (HF generation) and the export stage's GGUF runs feed the same text to llguidance
(`grammar_from("gbnf", ...)`), which masks the logits token by token. So the answers that are evaluated, exported
and served are drawn from one language. Each kind's module says what its grammar allows.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tuneforge.core.kinds import OutputKind


def grammars_for(output: OutputKind, records: list[dict]) -> list[str] | None:
    """Each record's grammar, or None when the task decodes freely (output.constrained false, or a kind without a
    grammar)."""
    if not output.constrained:
        return None
    grammars = [output.grammar(output.input_text(record)) for record in records]
    return None if any(g is None for g in grammars) else grammars


def _byte_level(component: dict | None) -> bool:
    """Whether a tokenizer.json pre-tokenizer (or a sequence of them) maps bytes to GPT-2's printable characters."""
    if not component:
        return False
    return component.get("type") == "ByteLevel" or any(_byte_level(c) for c in component.get("pretokenizers", []))


# A probe with the pieces answers are made of (braces, quotes, keys, words after spaces, digits, punctuation).
_PROBE = '{"AddressNumber": "9265", "StreetName": "Huer Huero", "PlaceName": "Los Osos, CA"} spam ham'


@lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer, n_vocab: int):
    """llguidance's view of the tokenizer: each token's bytes (~1 s for a 49k vocabulary: built once a tokenizer).
    The tokenizer's eos ends every grammar.

    llguidance reads a token's bytes from tokenizer.json; it takes GPT-2-style byte-level BPE for what it is only
    when the decoder is plain ByteLevel. transformers 5.17 turns a GGUF's byte-level vocabulary (the embedded
    SmolLM2) into a tokenizer whose decoder is a SentencePiece-style sequence ending in ByteLevel; llguidance then
    read "Ġ" as a character rather than a space, so every token that starts with a space was masked out (measured
    on an H200: constrained exact match 27% against 55% free). Such a tokenizer is handed over with its plain
    ByteLevel decoder, which decodes the same; the probe below fails loudly if llguidance still reads it wrong.
    """
    from llguidance import LLTokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["padding"] = spec["truncation"] = None
    if _byte_level(spec.get("pre_tokenizer")) and (spec.get("decoder") or {}).get("type") != "ByteLevel":
        spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        spec["model"]["byte_fallback"] = False
    ll = LLTokenizer(json.dumps(spec), n_vocab=n_vocab, eos_token=tokenizer.eos_token_id)
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    # (stripped: SentencePiece vocabularies put a space before the first word, which decode() drops)
    if ll.decode_bytes(ids).strip() != tokenizer.decode(ids).encode().strip():
        raise RuntimeError(f"llguidance reads this tokenizer's tokens as {ll.decode_bytes(ids)[:60]!r}, but they decode to "
                           f"{tokenizer.decode(ids)[:60]!r}: constrained decoding would mask the wrong tokens. Set the "
                           "task's output.constrained: false, or use a tokenizer llguidance understands.")
    return ll


def _llguidance_grammar(gbnf: str) -> str:
    """The GBNF grammar for llguidance, with llama.cpp's token semantics.

    By default llguidance lets only the canonical tokenization of forced text through ('{"' as one token where
    the grammar forces '{' then '"'); llama.cpp's grammar sampler allows every token that fits ('{' too). With
    forcing off both engines allow the same tokens, so greedy answers agree between evaluation and serving.
    """
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    lark = gbnf_to_lark(gbnf)
    header = "%llguidance {}"
    if not lark.startswith(header):
        raise RuntimeError(f"llguidance's GBNF converter no longer starts its output with {header!r}: {lark[:60]!r}")
    return LLMatcher.grammar_from_lark('%llguidance {"no_forcing": true}' + lark[len(header):])


class GrammarMatcher:
    """One request's llguidance matcher: which tokens may come next, fed the tokens actually chosen.

    Once the grammar is complete (llguidance then stops the matcher by itself) only the end-of-sequence token may
    follow, so the answer ends there.
    """

    def __init__(self, tokenizer, n_vocab: int, grammar: str):
        import llguidance

        self.n_vocab, self.eos = n_vocab, tokenizer.eos_token_id
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, n_vocab), _llguidance_grammar(grammar), log_level=0)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"constrained decoding failed: {self.matcher.get_error()}")

    def allowed(self) -> np.ndarray:
        """A bool mask over the vocabulary: the tokens that keep the answer inside the grammar."""
        if self.matcher.is_stopped():
            mask = np.zeros(self.n_vocab, dtype=bool)
            mask[self.eos] = True
            return mask
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        self._check()
        return np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)

    def consume(self, token: int) -> None:
        """Advance by the chosen token (tokens after the grammar's end, eos and batch padding, are not its)."""
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)
            self._check()


def mask_logits(logits, allowed):
    """Logits with disallowed tokens at -inf, in place: numpy (vocabulary,) with a bool mask, or torch
    (rows, vocabulary) with a (rows, mask length) bool tensor. Masks may be shorter than the logits (padded
    vocabularies): the extra tokens are left alone."""
    if isinstance(logits, np.ndarray):
        logits[: len(allowed)][~allowed] = -np.inf
    else:  # one masked_fill_ for the whole batch: indexing row by row cost ~30x more on this CPU
        # The grammar's mask is built on the CPU; the logits of a model on a GPU are there.
        logits[..., : allowed.shape[-1]].masked_fill_(~allowed.to(logits.device), -float("inf"))
    return logits


def hf_logits_processor(tokenizer, n_vocab: int, grammars: list[str]):
    """A transformers LogitsProcessor constraining row i of a batched generate() call to grammars[i]."""
    import torch
    from transformers import LogitsProcessor

    class GrammarLogitsProcessor(LogitsProcessor):
        def __init__(self):
            self.matchers = [GrammarMatcher(tokenizer, n_vocab, g) for g in grammars]
            self.prompt_length: int | None = None

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if self.prompt_length is None:
                self.prompt_length = input_ids.shape[1]
            else:  # the tokens chosen at the previous step
                for row, matcher in enumerate(self.matchers):
                    matcher.consume(int(input_ids[row, -1]))
            return mask_logits(scores, torch.from_numpy(np.stack([m.allowed() for m in self.matchers])))

    return GrammarLogitsProcessor()


def constrain_request(payload: dict, output: OutputKind) -> dict:
    """An OpenAI-style chat request given the task's grammar for its last user message (llama-cpp-python's server
    reads `grammar`); left alone when the task decodes freely. A grammar the payload held is replaced: no client
    grammar is used (`tuneforge serve` refuses them: one llama.cpp cannot parse crashes it)."""
    if output.constrained:
        user = [m["content"] for m in payload.get("messages", []) if m.get("role") == "user"]
        grammar = output.grammar(user[-1] if user else "")
        if grammar is not None:
            payload["grammar"] = grammar
    return payload
