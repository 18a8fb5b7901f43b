"""OpenAI `stop`: the streamed text ends before the first stop string, held-back text is released."""

import pytest

from lessserve.workers.reply import StopStrings


@pytest.mark.parametrize("pieces,stops,want,hit", [
    (["Hel", "lo E", "N", "D more"], ["END"], "Hello ", True),
    (["a\n", "\nb"], ["\n\n"], "a", True),
    (["ab", "c"], ["x", "bc"], "a", True),
    (["no ", "stop ", "here"], ["END"], "no stop here", False),
    (["E", "N"], ["END"], "EN", False),  # a prefix that never completes is released at the end
    (["plain"], [], "plain", False),
])
def test_stop_strings(pieces, stops, want, hit):
    s, out, got_hit = StopStrings(stops), "", False
    for p in pieces:
        o, h = s.push(p)
        out += o
        if h:
            got_hit = True
            break
    if not got_hit:
        out += s.flush()
    assert (out, got_hit) == (want, hit)
