"""SSEDecoder from raw bytes: line endings, arbitrary network splits, comments, multi-line data, EOF flush."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from therouter.sse import DONE, KEEPALIVE, EventTooLarge, SSEDecoder, encode, encode_raw

ENDINGS = (b"\n", b"\r\n", b"\r")


def decode(pieces: list[bytes], limit: int | None = None, as_list: bool = False) -> list[bytes]:
    """Every payload of ``pieces`` fed in order then flushed (``as_list``: through ``feed_list``)."""
    d = SSEDecoder(limit)
    out: list[bytes] = []
    for p in pieces:
        out.extend(d.feed_list(p) if as_list else d.feed(p))
    out.extend(d.flush())
    return out


def split_at(raw: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted(min(max(p, 0), len(raw)) for p in points)
    pieces, prev = [], 0
    for c in cuts:
        pieces.append(raw[prev:c])  # duplicate cut points give empty pieces on purpose
        prev = c
    pieces.append(raw[prev:])
    return pieces


# ---- one event per generated item: data lines, interleaved comments / other fields, extra blank lines ----------------

_value = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12)
_line = st.one_of(
    st.tuples(st.just("data"), _value, st.booleans()),  # (kind, value, space after colon)
    st.tuples(st.just("comment"), _value, st.just(True)),
    st.tuples(st.sampled_from(["event", "id", "retry"]), _value, st.just(True)),
)
_event = st.tuples(st.lists(_line, min_size=1, max_size=5), st.integers(0, 2))  # lines, extra blank lines after


def serialize(events: list[tuple[list[tuple[str, str, bool]], int]], eol: bytes, terminate_last: bool) -> bytes:
    out = b""
    for i, (lines, extra_blank) in enumerate(events):
        for kind, value, space in lines:
            v = value.encode()
            if kind == "data":
                if not space and v.startswith(b" "):
                    v = b"x" + v  # without the space separator a leading space would be part of the value
                out += b"data:" + (b" " if space else b"") + v + eol
            elif kind == "comment":
                out += b":" + v + eol
            else:
                out += kind.encode() + b": " + v + eol
        last = i == len(events) - 1
        if not last or terminate_last:
            out += eol * (1 + extra_blank)
    return out


def expected(events: list[tuple[list[tuple[str, str, bool]], int]]) -> list[bytes]:
    res = []
    for lines, _ in events:
        data = []
        for kind, value, space in lines:
            if kind == "data":
                v = value.encode()
                if not space and v.startswith(b" "):
                    v = b"x" + v
                data.append(v)
        if data:
            res.append(b"\n".join(data))
    return res


@settings(max_examples=300, deadline=None, database=None)
@given(
    events=st.lists(_event, max_size=6),
    eol=st.sampled_from(ENDINGS),
    terminate_last=st.booleans(),
    data=st.data(),
)
def test_any_split_and_line_ending_gives_the_same_events(events, eol, terminate_last, data) -> None:
    raw = serialize(events, eol, terminate_last)
    want = expected(events)
    # cut anywhere, with extra weight right after a CR (the awkward spot for CRLF) and repeated cuts (empty reads)
    after_cr = [i + 1 for i, b in enumerate(raw) if b == 0x0D] or [0]
    point = st.one_of(st.integers(0, len(raw)), st.sampled_from(after_cr))
    points = data.draw(st.lists(point, max_size=12).flatmap(lambda ps: st.just(ps + ps[:1])), label="cuts")
    assert decode([raw]) == want
    assert decode(split_at(raw, points)) == want


@settings(max_examples=50, deadline=None, database=None)
@given(events=st.lists(_event, min_size=1, max_size=4), eol=st.sampled_from(ENDINGS))
def test_byte_by_byte_feed(events, eol) -> None:
    raw = serialize(events, eol, True)
    assert decode([raw[i:i + 1] for i in range(len(raw))]) == expected(events)


def test_every_split_position_of_a_realistic_deepseek_stream() -> None:
    chunk1 = {"id": "a", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}
    chunk2 = {"id": "a", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}
    for eol in ENDINGS:
        raw = (b": keep-alive" + eol + eol + b"data: " + orjson.dumps(chunk1) + eol + eol + eol
               + b": keep-alive" + eol + eol + b"data: " + orjson.dumps(chunk2) + eol + eol
               + b"data: [DONE]" + eol + eol)
        want = [orjson.dumps(chunk1), orjson.dumps(chunk2), b"[DONE]"]
        for i in range(len(raw) + 1):
            for j in range(i, len(raw) + 1, 7):
                assert decode([raw[:i], raw[i:j], raw[j:]]) == want, (eol, i, j)


def test_crlf_split_between_cr_and_lf_does_not_end_the_event() -> None:
    # "data: x\r" | "\n" is ONE line ending; a blank line only follows later
    assert decode([b"data: x\r", b"\n", b"data: y\r\n\r\n"]) == [b"x\ny"]
    assert decode([b"data: x\r", b"", b"\n", b"data: y\r\n\r\n"]) == [b"x\ny"]  # an empty read in between


def test_comments_and_blank_keepalives_are_skipped_and_counted() -> None:
    d = SSEDecoder()
    out = list(d.feed(b": keep-alive\n\n\n\n:\n: another\n\n"))
    assert out == []
    assert d.comments == 3
    assert list(d.flush()) == []
    assert decode([KEEPALIVE * 5]) == []


def test_comment_inside_an_event_does_not_split_it() -> None:
    assert decode([b"data: a\n: keep-alive\ndata: b\n\n"]) == [b"a\nb"]


def test_multi_line_data_is_joined_with_lf() -> None:
    assert decode([b"data: {\"a\":\ndata:  1}\n\n"]) == [b"{\"a\":\n 1}"]
    assert decode([b"data: line1\r\ndata: line2\r\ndata: line3\r\n\r\n"]) == [b"line1\nline2\nline3"]


def test_data_with_and_without_the_space() -> None:
    assert decode([b"data:{\"x\":1}\n\n", b"data: {\"x\":2}\n\n"]) == [b'{"x":1}', b'{"x":2}']
    # only ONE space is stripped
    assert decode([b"data:  two\n\n"]) == [b" two"]


def test_other_fields_are_ignored() -> None:
    assert decode([b"event: message\nid: 7\nretry: 100\ndata: x\n\n"]) == [b"x"]
    assert decode([b"event: ping\n\n"]) == []  # no data: no event


def test_flush_at_eof_without_trailing_blank_line() -> None:
    assert decode([b"data: a\n\ndata: last"]) == [b"a", b"last"]
    assert decode([b"data: a\n\ndata: last\n"]) == [b"a", b"last"]
    assert decode([b"data: a\r\n\r\ndata: last\r"]) == [b"a", b"last"]
    d = SSEDecoder()
    assert list(d.feed(b"data: pending")) == []
    assert list(d.flush()) == [b"pending"]
    assert list(d.flush()) == []  # flushing twice does not repeat it


def test_done_marker_is_a_plain_payload() -> None:
    assert decode([b"data: {}\n\ndata: [DONE]\n\n"]) == [b"{}", b"[DONE]"]
    assert decode([DONE]) == [b"[DONE]"]


def test_encode_round_trips_through_the_decoder() -> None:
    obj = {"choices": [{"delta": {"content": "a\nb\r\nc"}}], "usage": None}
    raw = encode(obj)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2  # one line: \n is escaped
    assert [orjson.loads(x) for x in decode([raw])] == [obj]
    assert encode_raw(b"[DONE]") == DONE


# ---- bounded memory: max_event_bytes --------------------------------------------------------------------------------

LIMIT = 1000


def decode_limited(pieces: list[bytes], limit: int = LIMIT) -> list[bytes]:
    return decode(pieces, limit)


def fed_until_refused(raw: bytes, piece: int, limit: int = LIMIT) -> int:
    """Feed ``raw`` in pieces of ``piece`` bytes; how many bytes went in before the decoder refused."""
    d = SSEDecoder(limit)
    fed = 0
    with pytest.raises(EventTooLarge):
        for i in range(0, len(raw), piece):
            fed += len(raw[i:i + piece])
            list(d.feed(raw[i:i + piece]))
        list(d.flush())
    return fed


@pytest.mark.parametrize("piece", [1, 3, 7, 64, 999, 1000, 1001, 4096, 100_000])
@pytest.mark.parametrize("eol", ENDINGS)
def test_a_line_that_never_ends_is_refused_once_it_passes_the_limit(piece: int, eol: bytes) -> None:
    raw = b"data: {\"choices\": [{\"delta\": {\"content\": \"" + b"A" * 50_000  # no line break, ever
    first = b"data: ok" + eol + eol
    fed = fed_until_refused(first + raw, piece)
    assert fed <= len(first) + LIMIT + piece  # refused as soon as it could tell: never held past limit + one read


@pytest.mark.parametrize("piece", [1, 5, 333, 5000])
def test_a_long_comment_line_is_refused_too(piece: int) -> None:
    assert fed_until_refused(b": " + b"k" * 5000 + b"\n\n", piece) <= LIMIT + piece + 2


@pytest.mark.parametrize("piece", [1, 7, 100, 10_000])
def test_an_event_made_of_many_short_data_lines_is_refused(piece: int) -> None:
    raw = b"".join(b"data: " + b"x" * 90 + b"\n" for _ in range(50)) + b"\n"  # 50 lines of 96 bytes, 4.5 KB of data
    assert fed_until_refused(raw, piece) <= LIMIT + 2 * 96 + piece


def test_at_the_limit_is_fine_and_one_more_is_not() -> None:
    payload = b"y" * (LIMIT - len(b"data: "))
    assert decode_limited([b"data: " + payload + b"\n\n"]) == [payload]
    with pytest.raises(EventTooLarge):
        decode_limited([b"data: " + payload + b"y\n\n"])
    # an event of several lines: their data joined with LF counts
    half = b"z" * (LIMIT // 2 - 1)
    assert decode_limited([b"data: " + half + b"\ndata: " + half + b"\n\n"]) == [half + b"\n" + half]
    with pytest.raises(EventTooLarge):
        decode_limited([b"data: " + half + b"z\ndata: " + half + b"zz\n\n"])


def test_a_line_over_the_limit_at_eof_is_refused() -> None:
    d = SSEDecoder(LIMIT)
    with pytest.raises(EventTooLarge):
        list(d.feed(b"data: " + b"q" * (LIMIT + 5)))


@settings(max_examples=100, deadline=None, database=None)
@given(events=st.lists(_event, max_size=6), eol=st.sampled_from(ENDINGS), terminate_last=st.booleans(),
       data=st.data())
def test_a_limit_above_every_line_changes_nothing(events, eol, terminate_last, data) -> None:
    raw = serialize(events, eol, terminate_last)
    points = data.draw(st.lists(st.integers(0, len(raw)), max_size=12), label="cuts")
    assert decode_limited(split_at(raw, points), limit=max(len(raw), 1)) == expected(events)


def test_a_long_line_in_small_reads_is_not_rejoined_on_every_read() -> None:
    """Pieces of an open line are set aside, not concatenated per read: a 1 MB line in 1-byte-ish reads is linear."""
    line = b"data: " + b"w" * 200_000 + b"\n\n"
    d = SSEDecoder(1024 * 1024)
    out: list[bytes] = []
    for i in range(0, len(line), 3):
        out.extend(d.feed(line[i:i + 3]))
    assert out == [b"w" * 200_000]


def decode_list(pieces: list[bytes], limit: int | None = None) -> list[bytes]:
    return decode(pieces, limit, as_list=True)


@given(events=st.lists(_event, max_size=6), eol=st.sampled_from(ENDINGS), terminate_last=st.booleans(),
       data=st.data())
def test_feed_list_gives_what_feed_gives(events, eol, terminate_last, data) -> None:
    raw = serialize(events, eol, terminate_last)
    points = data.draw(st.lists(st.integers(0, len(raw)), max_size=12), label="cuts")
    want = expected(events)
    assert decode_list([raw]) == want
    assert decode_list(split_at(raw, points)) == want
    assert decode_list(split_at(raw, points), limit=max(len(raw), 1)) == want


def test_feed_list_of_whole_data_events_and_a_partial_one() -> None:
    d = SSEDecoder(64)
    assert d.feed_list(b"data: a\n\ndata: b\n\ndata: c") == [b"a", b"b"]
    assert d.feed_list(b"d\n\n") == [b"cd"]
    with pytest.raises(EventTooLarge):
        SSEDecoder(8).feed_list(b"data: 0123456789\n\n")


# ---- feed_list's one-cut path: LF streams that are mostly single data lines, with the odd one that is not ----------
# (the strategies above seldom make a read of single data lines only, which is what the cut takes at once)

_tricky = st.lists(st.sampled_from(["data: ", "data:", ":", " ", "x", "{}", "\\n", "[DONE]", "\u00e9", "\t"]),
                   max_size=4).map("".join)
_plain = st.tuples(st.lists(st.tuples(st.just("data"), _tricky, st.just(True)), min_size=1, max_size=1), st.just(0))
_odd = st.one_of(
    st.tuples(st.lists(st.tuples(st.just("data"), _tricky, st.booleans()), min_size=1, max_size=3), st.integers(0, 2)),
    st.tuples(st.just([("comment", " keep-alive", True)]), st.just(0)),
    st.tuples(st.just([("event", "delta", True), ("data", "x", True)]), st.integers(0, 1)),
)

def outcome(pieces: list[bytes], limit: int | None, as_list: bool) -> tuple[list[bytes], str | None]:
    """The events of the reads before a refusal, and the refusal (a refused read gives none of its events)."""
    d = SSEDecoder(limit)
    out: list[bytes] = []
    try:
        for p in pieces:
            out.extend(d.feed_list(p) if as_list else list(d.feed(p)))
        out.extend(list(d.flush()))
    except EventTooLarge as e:
        return out, str(e)
    return out, None


@settings(max_examples=300, deadline=None, database=None)
@given(events=st.lists(st.one_of(_plain, _plain, _plain, _odd), max_size=10), terminate_last=st.booleans(),
       data=st.data())
def test_feed_list_of_mostly_single_data_lines(events, terminate_last, data) -> None:
    raw = serialize(events, b"\n", terminate_last)
    points = data.draw(st.lists(st.integers(0, len(raw)), max_size=4), label="cuts")
    want = expected(events)
    assert decode_list([raw]) == want
    assert decode_list(split_at(raw, points)) == want
    # with a limit near the events' sizes, the same events or the same refusal as the line-by-line decoder
    limit = data.draw(st.integers(1, max(len(raw), 1)), label="limit")
    for pieces in ([raw], split_at(raw, points)):
        assert outcome(pieces, limit, as_list=True) == outcome(pieces, limit, as_list=False)


def test_feed_list_at_every_split_of_an_lf_stream() -> None:
    events = [b"data: " + orjson.dumps({"c": t}) + b"\n\n" for t in ("a", "data: b", "\n", "", ":c")]
    raw = (b"".join(events[:2]) + b": keep-alive\n\n" + events[2] + b"data: x\ndata: y\n\n\n" + events[3]
           + b"event: e\ndata: z\n\n" + events[4] + b"data:w\n\ndata: [DONE]\n\n")
    want = [e[6:-2] for e in events[:3]] + [b"x\ny", events[3][6:-2], b"z", events[4][6:-2], b"w", b"[DONE]"]
    for i in range(len(raw) + 1):
        assert decode_list([raw[:i], raw[i:]]) == want, i
        for j in range(i, len(raw) + 1, 11):
            assert decode_list([raw[:i], raw[i:j], raw[j:]]) == want, (i, j)


def test_feed_list_limits_each_event_not_the_read() -> None:
    read = b"data: 0123456789\n\n" * 10 + b"data: 01"
    d = SSEDecoder(16)  # each event is 16 bytes ("data: " + 10), the read far more
    assert d.feed_list(read) == [b"0123456789"] * 10
    assert d.feed_list(b"23456789\n\n") == [b"0123456789"]
    with pytest.raises(EventTooLarge):
        SSEDecoder(16).feed_list(b"data: 0123456789\n\n" * 3 + b"data: 0123456789A\n\n")
