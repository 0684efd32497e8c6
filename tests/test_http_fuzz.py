"""Differential fuzz of tproxy's request framer against h11, in process.

For each generated input (valid heads and bodies, pipelined, then mutated
with the bytes that smuggling and injection rely on) three parses are
compared: h11 on what the client sent, tproxy's RequestFramer on the same
bytes, and h11 on what the framer passes on (as the cache would read it).
Each input is also fed in random pieces, which must change nothing.
What matters, and must never happen:
  - the framer passes a request that h11 refuses (outside ALLOWED_LENIENCY);
  - the cache would read other requests than the client sent (smuggling);
  - the framer refuses what h11 accepts, outside the documented
    ALLOWED_STRICTNESS (where RFC 9112 lets or makes a server refuse);
  - any exception other than the framer's BadRequest.
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


def compare(data):
    """Return None if tproxy and h11 agree on DATA where it matters, else a description."""
    out, heads, framer = framer_pass(data)
    error = framer.error
    sent, h11_refused = h11_requests(data)
    if heads and heads[0].version is None:
        return None                                     # HTTP/0.9: allowed leniency
    if data[:1] in (b"\r", b"\n"):
        return None                                     # empty lines first: h11 refuses any
    if h11_refused and BWS_CHUNK_EXT.search(data):
        return None                                     # h11 refuses BWS the RFC allows
    if h11_refused and framer.dropped_lines:
        return None                                     # empty lines between requests
    seen, _ = h11_requests(out)
    if seen != sent[:len(seen)]:
        return "the cache would read %r, the client sent %r" % (seen, sent)
    if len(heads) > len(sent) and not (len(heads) == len(sent) + 1 and len(seen) == len(sent)):
        if h11_refused:
            return "tproxy passed a request h11 refuses: %r" % heads[len(sent)].target
    if error is not None and len(sent) > len(heads) - (1 if len(seen) < len(heads) else 0):
        if not any(phrase in str(error) for phrase in ALLOWED_STRICTNESS):
            return "tproxy refused (%s) what h11 accepts" % error
    return None


def test_framer_agrees_with_h11_on_generated_and_mutated_heads():
    rnd = random.Random(SEED)
    problems, refused, passed = [], 0, 0
    for case in range(CASES):
        data = b"".join(gen_request(rnd) for _ in range(rnd.choice([1, 1, 2, 3])))
        if case % 4:
            data = mutate(rnd, data)
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
