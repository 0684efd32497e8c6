"""Differential fuzz of tproxy's request framer against h11, in process.

For each generated input (valid heads and bodies, pipelined, then mutated
with the bytes that smuggling and injection rely on) three parses are
compared: h11 on what the client sent, tproxy's RequestFramer on the same
bytes, and h11 on what the framer passes on (as the cache would read it).
Each input is also fed in random pieces, which must change nothing.
What matters, and must never happen:
  - the framer passes a head, or bytes, that h11 refuses (outside
    ALLOWED_LENIENCY);
  - the cache would read other requests than the framer passed, or than
    the client sent (smuggling);
  - the framer refuses what h11 accepts, outside the documented
    ALLOWED_STRICTNESS (where RFC 9112 lets or makes a server refuse);
  - any exception other than the framer's BadRequest.
The last tests plant two framing bugs of old and check that the fuzz finds them.
"""
import random
import re

import pytest

import tproxy

h11 = pytest.importorskip("h11")

CASES = 6000
SEED = 9112

# tproxy refuses where h11 accepts: each entry is a phrase of the refusal and why it is right.
ALLOWED_STRICTNESS = {
    "both Transfer-Encoding and Content-Length": "RFC 9112 6.1: may be rejected; fail closed",
    "Transfer-Encoding in an HTTP/1.0": "RFC 9112 6.1: framing is faulty; h11 accepts",
    "bad Host header": "h11 does not check the Host value; tproxy builds a URL from it",
    "bad request line": "HTTP/2.0 and other versions than 1.x on an HTTP/1 connection",
    "obsolete line folding": "RFC 9112 5.2: a server may reject obs-fold with 400; h11 unfolds",
    "bad Content-Length": "more than 18 digits (h11 takes 20)",
    "bad chunk-size line": "CR inside a chunk extension, or more than 16 hex digits",
    "CONNECT with content": "RFC 9110 9.3.6: CONNECT has no content",
    "only chunked is supported": "h11 refuses these too, with a different phrase",
    "after earlier requests": "tproxy follows CONNECT/Upgrade on a connection's first request only",
    "in the trailer": "a framing field (Content-Length, Transfer-Encoding, Host) in a trailer",
}
# tproxy passes where h11 refuses.
ALLOWED_LENIENCY = {
    "HTTP/0.9": "a request line without a version: passed, then the connection ends",
    "empty lines": "before a request line (RFC 9112 2.2: a server should ignore them)",
    "BWS before ;": "in a chunk-size line (RFC 9112 7.1.1 allows it; h11 refuses)",
}
BWS_CHUNK_EXT = re.compile(rb"\n[0-9A-Fa-f]+[ \t]+;")

METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT"]
TARGETS = [b"/", b"/a/b?c=d", b"http://h/x", b"*", b"h:443", b"/%41~x"]
TRICKY = [b"\r", b"\n", b"\x00", b"\t", b" ", b"_", b"+", b"-", b"0x", b",", b";", b":",
          b"\x0b", b"\x0c", b"\x7f", b"\xff", b"\r\n", b"\n\n", b" chunked", b"1_0", b"\r\n\r\n"]


def gen_request(rnd, pipelined_ok=True):
    """Return the bytes of one plausible request."""
    method = rnd.choice(METHODS)
    target = rnd.choice(TARGETS)
    version = rnd.choice([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"])
    fields = []
    if version == b"HTTP/1.1" or rnd.random() < 0.5:
        fields.append(b"Host: " + rnd.choice([b"h", b"example.com:8080", b"[2001:db8::1]", b""]))
    for _ in range(rnd.randrange(3)):
        fields.append(rnd.choice([b"Accept: */*", b"X-A:  spaced\t", b"Cookie: a=b; c=d",
                                  b"Referer: http://r/", b"Connection: keep-alive", b"X-Empty:"]))
    body = b""
    kind = rnd.choice(["none", "none", "length", "chunked"])
    if method == b"CONNECT":
        kind = "none"
    if kind == "length":
        body = bytes(rnd.randrange(32, 127) for _ in range(rnd.randrange(0, 40)))
        fields.append(b"Content-Length: %d" % len(body))
    elif kind == "chunked":
        fields.append(b"Transfer-Encoding: chunked")
        for _ in range(rnd.randrange(0, 3)):
            piece = bytes(rnd.randrange(32, 127) for _ in range(rnd.randrange(1, 20)))
            ext = rnd.choice([b"", b";x=1", b";y"])
            body += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
        body += b"0\r\n" + rnd.choice([b"", b"T: v\r\n"]) + b"\r\n"
    if rnd.random() < 0.05:
        fields.append(b"Upgrade: websocket")
    rnd.shuffle(fields)
    return b"%s %s %s\r\n%s\r\n%s" % (method, target, version,
                                      b"".join(f + b"\r\n" for f in fields), body)


def mutate(rnd, data):
    """Return DATA with a few tricky edits: inserted, replaced or duplicated bytes."""
    data = bytearray(data)
    for _ in range(rnd.randrange(1, 4)):
        at = rnd.randrange(len(data) + 1)
        choice = rnd.random()
        if choice < 0.45:
            data[at:at] = rnd.choice(TRICKY)
        elif choice < 0.7 and at < len(data):
            data[at:at + 1] = rnd.choice(TRICKY)
        elif choice < 0.85:
            line_end = data.find(b"\r\n", at)
            line_start = data.rfind(b"\r\n", 0, at) + 2
            if line_end > line_start:
                data[line_end:line_end] = b"\r\n" + data[line_start:line_end]   # duplicate a line
        else:
            data[at:at] = rnd.choice([b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
                                      b"Host: other\r\n", b"Transfer-Encoding: gzip, chunked\r\n"])
    return bytes(data)


def h11_requests(data):
    """Return ([(method, target, version, headers, body)], refused) as h11 reads DATA."""
    conn = h11.Connection(h11.SERVER)
    if data:                    # (no data would mean the peer's EOF to h11)
        conn.receive_data(data)
    requests, current = [], None
    try:
        for _ in range(len(data) + 10):
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return requests, False
            if isinstance(event, h11.Request):
                current = [event.method, event.target, event.http_version,
                           [(n.lower(), v) for n, v in event.headers.raw_items()], b""]
            elif isinstance(event, h11.Data):
                current[4] += event.data
            elif isinstance(event, h11.EndOfMessage):
                requests.append(tuple(current))
                if conn.our_state is not h11.SEND_RESPONSE:
                    return requests, False
                conn.send(h11.Response(status_code=404, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return requests, False
                conn.start_next_cycle()
    except h11.RemoteProtocolError:
        return requests, True
    raise AssertionError("h11 made no progress on %r" % data)


def framer_pass(data):
    """Return (bytes the framer passes on, heads passed, the framer) for DATA in one feed."""
    framer = tproxy.RequestFramer()
    items = framer.feed(data)
    out = b"".join(tproxy.render_head(i, i.target) if isinstance(i, tproxy.Head) else i
                   for i in items)
    return out, [i for i in items if isinstance(i, tproxy.Head)], framer


def framer_pass_in_pieces(data, rnd):
    """Like framer_pass, with DATA fed in random pieces (1 to 40 bytes) as a network delivers it."""
    framer = tproxy.RequestFramer()
    items, at = [], 0
    while at < len(data):
        step = rnd.randrange(1, 41)
        items += framer.feed(data[at:at + step])
        at += step
    out = b"".join(tproxy.render_head(i, i.target) if isinstance(i, tproxy.Head) else i
                   for i in items)
    return out, [i for i in items if isinstance(i, tproxy.Head)], framer


def h11_refuses_head(head):
    """Return h11's complaint about one rendered request HEAD on its own, or None."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(tproxy.render_head(head, head.target))
    try:
        conn.next_event()
    except h11.RemoteProtocolError as exc:
        return str(exc)
    return None


def leniency(data, framer, h11_refused):
    """Return the ALLOWED_LENIENCY entry that explains h11 refusing DATA, or None."""
    if not h11_refused:
        return None
    if framer.dropped_lines:
        return "empty lines"
    if BWS_CHUNK_EXT.search(data):
        return "BWS before ;"
    return None


def compare(data):
    """Return None if tproxy and h11 agree on DATA where it matters, else a description."""
    out, heads, framer = framer_pass(data)
    sent, h11_refused = h11_requests(data)
    for head in heads:
        complaint = h11_refuses_head(head) if head.version is not None else None
        if complaint:                   # (HTTP/0.9 is an ALLOWED_LENIENCY)
            return "tproxy passed a head h11 refuses (%s): %r" % (complaint, head.target)
    old = heads[-1].version is None if heads else False
    seen, cache_refuses = h11_requests(out) if not old else (sent, False)
    if cache_refuses and not BWS_CHUNK_EXT.search(out):
        return "tproxy passed bytes h11 refuses: %r" % out
    # What the cache reads is exactly what the framer passed: no smuggled request.
    if len(seen) > len(heads) or [r[:3] for r in seen] != \
            [(h.method, h.target, h.version[5:]) for h in heads[:len(seen)]]:
        return "the cache would read %r, the framer passed %r" % (
            [r[:2] for r in seen], [(h.method, h.target) for h in heads])
    if old or leniency(data, framer, h11_refused):
        return None
    # ... and what the client sent, as h11 reads it.
    if seen != sent[:len(seen)]:
        return "the cache would read %r, the client sent %r" % (seen, sent)
    if framer.error is not None and len(sent) > len(seen):
        if not any(phrase in str(framer.error) for phrase in ALLOWED_STRICTNESS):
            return "tproxy refused (%s) what h11 accepts" % framer.error
    return None


def generated_inputs(rnd):
    """Yield CASES inputs: one to three requests, three in four of them mutated."""
    for case in range(CASES):
        data = b"".join(gen_request(rnd) for _ in range(rnd.choice([1, 1, 2, 3])))
        yield mutate(rnd, data) if case % 4 else data


def test_framer_agrees_with_h11_on_generated_and_mutated_heads():
    rnd = random.Random(SEED)
    problems, refused, passed = [], 0, 0
    for data in generated_inputs(rnd):
        try:
            problem = compare(data)
        except Exception as exc:            # a traceback is a failure of its own
            problem = "%s: %s" % (type(exc).__name__, exc)
        whole, pieces = framer_pass(data), framer_pass_in_pieces(data, rnd)
        if not problem and (whole[0] != pieces[0] or str(whole[2].error) != str(pieces[2].error)):
            problem = "fed in pieces, the framer passed %r (%s), not %r (%s)" % (
                pieces[0], pieces[2].error, whole[0], whole[2].error)
        if problem:
            problems.append("%r: %s" % (data, problem))
        failed = whole[2].error is not None
        refused += failed
        passed += not failed
    assert not problems, "%d disagreement(s), first ones:\n%s" % (len(problems), "\n".join(problems[:5]))
    assert refused > CASES // 10 and passed > CASES // 3      # the mutations reach both outcomes


def content_length_first(real):
    """A framer bug of old: Content-Length frames the body though Transfer-Encoding is there."""
    def parse_head(raw):
        lines = raw.split(b"\r\n")
        if not any(line.lower().startswith(b"content-length") for line in lines):
            return real(raw)
        head, body, switch = real(b"\r\n".join(
            line for line in lines if not line.lower().startswith(b"transfer-encoding")))
        head.fields = [line for line in lines[1:] if line]
        return head, body, switch
    return parse_head


def any_two_bytes_after_chunk_data(self, out):
    """A framer bug of old: whatever two bytes follow chunk data are taken for its CRLF."""
    if len(self.buf) < 2:
        return False
    del self.buf[:2]
    out.append(b"\r\n")
    self.state = "chunk-size"
    return True


@pytest.mark.parametrize("where, name, bug", [
    (tproxy, "parse_head", content_length_first(tproxy.parse_head)),
    (tproxy.RequestFramer, "take_chunk_end", any_two_bytes_after_chunk_data),
], ids=["content-length-first", "any-bytes-after-chunk"])
def test_the_oracle_catches_smuggling_framers(monkeypatch, where, name, bug):
    monkeypatch.setattr(where, name, bug)
    assert any(compare(data) for data in generated_inputs(random.Random(SEED)))
