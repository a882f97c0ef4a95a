"""StopText, the stop-string filter shared by Model.generate and EAD, against a direct
definition: the text is cut where the first stop string completes, at the earliest start
of a stop string in the decoded text up to that piece."""

from hypothesis import given, settings, strategies as st

from edgekv.stop import StopText, check_stop

import pytest


class Pieces:
    """A stand-in for Tokenizer.stream_decoder(): token i decodes to pieces[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def push(self, i):
        return self.pieces[i]

    def reset(self):
        pass

    def flush(self):
        return ""


def expected(pieces, stop):
    text = ""
    for p in pieces:
        text += p
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[:min(hits)], True
    return text, False


def run(pieces, stop):
    f = StopText(Pieces(pieces), stop)
    out = []
    for i in range(len(pieces)):
        out.append(f.push(i))
        # never emits text that could still turn into a stop string
        assert not any(s in "".join(out) for s in stop)
        if f.stopped:
            break
    return "".join(out) + f.flush(), f.stopped


alphabet = st.sampled_from("ab c\n")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet, max_size=4), max_size=12),
       st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3))
def test_stop_text_matches_definition(pieces, stop):
    assert run(pieces, stop) == expected(pieces, stop)


def test_stop_text_holds_back_a_possible_start():
    f = StopText(Pieces(["Hello ", "wor", "ld"]), ["world"])
    assert f.push(0) == "He"       # "llo " could still begin "world": 4 characters held
    assert f.push(1) == "llo"
    assert f.push(2) == " " and f.stopped
    assert f.flush() == ""


def test_check_stop_rejects_bad_values():
    assert check_stop(None) == [] and check_stop(("x",)) == ["x"]
    for bad in ("x", [""], [1], ["a", None]):
        with pytest.raises(ValueError, match="stop must be"):
            check_stop(bad)
