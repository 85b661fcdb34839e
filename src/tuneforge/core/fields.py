"""Pydantic building blocks shared by params.yaml's sections and the output kinds' settings."""

from __future__ import annotations

import unicodedata
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Strict(BaseModel):
    # allow_inf_nan: YAML's .inf and .nan are floats, and no setting here means anything at infinity
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Characters a reader cannot see: control and format characters (zero-width space, joiners, BOM), unassigned and
# private-use code points, line and paragraph separators.
HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _exact_name(name: str) -> str:
    """A label or JSON key must be what the model can write and a reader can see: the answer is compared with it
    character for character, so `" spam"` or a fullwidth `ｓｐａｍ` is a class no prediction ever matches."""
    if name != name.strip():
        raise ValueError(f"{name!r} has leading or trailing whitespace")
    hidden = [f"U+{ord(c):04X}" for c in name if unicodedata.category(c) in HIDDEN_CATEGORIES]
    if hidden:
        raise ValueError(f"{name!r} holds invisible or control characters ({', '.join(hidden)})")
    if unicodedata.normalize("NFKC", name) != name:
        raise ValueError(f"{name!r} is not NFKC-normalised (NFKC gives {unicodedata.normalize('NFKC', name)!r}): "
                         "fullwidth letters, ligatures and odd spaces look like plain text but are other characters")
    return name


ExactName = Annotated[str, AfterValidator(_exact_name)]


def distinct_names(setting: str, items: list[str]) -> None:
    """A list of labels or keys names each once, none empty, and no two a reader would take for one."""
    repeated = sorted({x for x in items if items.count(x) > 1})
    if repeated:
        raise ValueError(f"{setting} lists {repeated} more than once")
    if any(not x.strip() for x in items):
        raise ValueError(f"{setting} holds an empty name")
    # Unicode's caseless match (NFKC, then casefold): two names it equates are one name to a reader.
    seen: dict[str, str] = {}
    for item in items:
        other = seen.setdefault(unicodedata.normalize("NFKC", item).casefold(), item)
        if other != item:
            raise ValueError(f"{setting}: {other!r} and {item!r} differ only in case or look-alike characters")
