"""Text cut at stop strings as pieces of generated text arrive."""

from facli.models.tokenizer import StopText


def run(stops, pieces):
    stopper = StopText(stops)
    emitted = [stopper.push(piece) for piece in pieces]
    return stopper, "".join(emitted) + stopper.flush(), emitted


def test_without_stops_every_piece_passes_at_once():
    stopper, text, emitted = run((), ["ab", "", "c\n", "d"])
    assert emitted == ["ab", "", "c\n", "d"] and text == "abc\nd" and not stopper.stopped


def test_a_stop_split_over_pieces_is_never_emitted():
    stopper, text, emitted = run(("</answer>",), ["The answer is 4", "</ans", "wer>", " more"])
    assert stopper.stopped and text == "The answer is 4" and stopper.text == text
    assert all("<" not in piece for piece in emitted)


def test_the_earliest_stop_wins_and_later_pieces_are_ignored():
    stopper, text, _ = run(("\n\n", "User:"), ["one User: two", "\n\nthree"])
    assert stopper.stopped and text == "one "
    assert stopper.push("four") == ""


def test_held_back_text_comes_out_when_generation_ends_without_a_stop():
    stopper, text, emitted = run(("STOP",), ["abc", "ST", "O"])
    # Three characters (a stop's length minus one) wait until the end.
    assert emitted == ["", "ab", "c"] and not stopper.stopped and text == "abcSTO"


def test_a_stop_at_the_very_start_leaves_no_text():
    stopper, text, _ = run(("Hi",), ["Hi there"])
    assert stopper.stopped and text == ""
