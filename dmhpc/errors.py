"""The one exception type for bad input: the command line prints its message as one line and exits 1."""

import re


class DmhpcError(Exception):
    """Bad input or state the user can fix. The message names the file or key and the problem."""


def reason_of(exc: BaseException, limit: int = 200) -> str:
    """A library's error as a clause of a one-line message: its first sentence, whitespace joined,
    at most `limit` characters. Cut at `limit` alone, torch's reasons ended mid-sentence ("... your
    checkpoint file is")."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    ends = (m.start() for m in re.finditer(r"(?<=[a-z0-9)\]'\"])\. (?=[A-Z])", text)
            if text.count("'", 0, m.start()) % 2 == 0 and text.count('"', 0, m.start()) % 2 == 0)
    sentence = text[:next(ends, len(text))].rstrip(".")  # (not inside a quoted path: '/data/v2. Final/x.pt')
    return sentence if len(sentence) <= limit else sentence[:limit - 3] + "..."
