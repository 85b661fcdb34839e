"""GBNF pieces (llama.cpp's grammar format) the kinds build their grammars from."""

from __future__ import annotations

# A JSON string's characters, as in llama.cpp's json.gbnf: no raw quote, backslash or control character.
JSON_STRING = r'"\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] ) )* "\""'


def gbnf_literal(text: str) -> str:
    """text as a GBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
