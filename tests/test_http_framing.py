"""HTTP translate framing, driven through real socket pairs (no network lab needed)."""
import socket

import pytest

import tproxy

ORIG = ("198.51.100.10", 80)


def translate(data, rewrite=True, force_url=None, orig=ORIG, split=None):
    """Feed DATA (in pieces of SPLIT bytes) through an HttpRequestPump.

    Return (what it sent on, [(method, target, host)] per request, the
    BadRequest that stopped it or None).
    """
    client, client_end = socket.socketpair()
    upstream_end, upstream = socket.socketpair()
    seen = []
    pump = tproxy.HttpRequestPump(client_end, upstream_end, rewrite, orig, force_url,
                                  lambda *request: seen.append(request))
    for sock in (client_end, upstream_end):
        sock.setblocking(False)
    pieces = [data[i:i + split] for i in range(0, len(data), split)] if split else [data]
    for piece in pieces:
        client.sendall(piece)
        pump.step()
    client.shutdown(socket.SHUT_WR)
    for _ in range(100):
        pump.step()
        if pump.done:
            break
    upstream.settimeout(2)
    out = b""
    while True:
        chunk = upstream.recv(65536)
        if not chunk:
            break
        out += chunk
    for sock in (client, client_end, upstream_end, upstream):
        sock.close()
    return out, seen, pump.failed


def frame(data, split=None):
    """Run DATA through a bare RequestFramer; return (bytes forwarded, heads, error)."""
    framer = tproxy.RequestFramer()
    pieces = [data[i:i + split] for i in range(0, len(data), split)] if split else [data]
    items = []
    for piece in pieces:
        items += framer.feed(piece)
    framer.eof()
    out = b"".join(tproxy.render_head(i, i.target) if isinstance(i, tproxy.Head) else i
                   for i in items)
    return out, [i for i in items if isinstance(i, tproxy.Head)], framer.error


@pytest.mark.parametrize("split", [None, 1, 7])
def test_origin_form_becomes_absolute_and_headers_pass_byte_for_byte(split):
    head = b"GET /a?b=c HTTP/1.1\r\nHost: Example.COM:8080\r\nX-Odd:  spaced\t\r\nCookie: k=v\r\n\r\n"
    out, seen, _ = translate(head, split=split)
    assert out == b"GET http://Example.COM:8080/a?b=c HTTP/1.1\r\n" + head.split(b"\r\n", 1)[1]
    assert seen == [(b"GET", b"/a?b=c", b"Example.COM:8080")]


def test_no_host_uses_original_destination_and_port():
    assert translate(b"GET / HTTP/1.0\r\n\r\n")[0] == b"GET http://198.51.100.10/ HTTP/1.0\r\n\r\n"
    out = translate(b"GET / HTTP/1.0\r\n\r\n", orig=("2001:db8::5", 8080))[0]
    assert out == b"GET http://[2001:db8::5]:8080/ HTTP/1.0\r\n\r\n"


def test_http09_and_absolute_and_asterisk_pass():
    assert translate(b"GET /old\r\n")[0] == b"GET http://198.51.100.10/old\r\n"
    absolute = b"GET http://other/x HTTP/1.1\r\nHost: other\r\n\r\n"
    assert translate(absolute)[0] == absolute
    options = b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"
    assert translate(options)[0] == options


def test_bodies_by_length_and_chunks_are_not_parsed_as_heads():
    body = b"GET /not-a-request HTTP/1.1\r\n\r\n"
    data = (b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            + b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x;ext=1\r\n%s\r\n0\r\nTrailer: t\r\n\r\n" % (len(body), body)
            + b"GET /last HTTP/1.1\r\nHost: h\r\n\r\n")
    for split in (None, 3):
        out, seen, _ = translate(data, split=split)
        assert [s[1] for s in seen] == [b"/p", b"/c", b"/last"]
        assert out.count(body) == 2 and b"http://h/last" in out


def test_connect_turns_into_a_tunnel():
    data = b"CONNECT example:443 HTTP/1.1\r\nHost: example:443\r\n\r\n\x16\x03\x01GET / HTTP/1.1\r\n\r\n"
    out, heads, error = frame(data)
    assert out == data[:data.index(b"\x16")] and len(heads) == 1 and error is None  # the rest waits


def test_direct_fallback_keeps_origin_form():
    head = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
    assert translate(head, rewrite=False)[0] == head


def test_force_url_unless_referer_matches():
    forced = translate(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n", force_url=b"http://portal/login")[0]
    assert forced.startswith(b"GET http://portal/login HTTP/1.1\r\n")
    passed = translate(b"GET /x HTTP/1.1\r\nHost: h\r\nReferer: http://portal/login?next=1\r\n\r\n",
                       force_url=b"http://portal/login")[0]
    assert passed.startswith(b"GET http://h/x HTTP/1.1\r\n")


@pytest.mark.parametrize("data, status", [
    (b"GET / HTTP/2.0\r\n\r\n", 400),
    (b"G@T / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\"b\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\n", 400),                       # cut off at EOF
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 17000 + b"\r\n\r\n", 431),
    (b"GET /" + b"y" * 17000, 414),
])
def test_malformed_input_is_a_bad_request(data, status):
    for split in (None, 1):
        out, heads, error = frame(data, split)
        assert error is not None and error.status == status, error
        assert data.startswith(out) and len(heads) <= 1     # a bad body stops after its head


CHUNKED = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("data, why", [
    # issue 10, item 3: each of these passed before the RFC 9112 framer
    (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 42\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n", "both Transfer-Encoding and Content-Length"),
    (CHUNKED + b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", "bad chunk-size line"),
    (CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n", "bad chunk-size line"),
    (CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", "bad chunk-size line"),
    (CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", "bad chunk-size line"),
    (CHUNKED + b"5\nhello\r\n0\r\n\r\n", "bad chunk-size line"),
    (CHUNKED + b"1" * 17 + b"\r\n", "bad chunk-size line"),
    (CHUNKED + b"5\r\nhelloXY0\r\n\r\n", "not followed by CRLF"),
    (CHUNKED + b"5\r\nhello\n0\r\n\r\n", "not followed by CRLF"),
    (b"GET http://h/a\rInjected:1 HTTP/1.1\r\nHost: h\r\n\r\n", "bare CR"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", "bare CR"),
    (b"GET /a\x00b HTTP/1.1\r\nHost: h\r\n\r\n", "bad request line"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX\x00Y: v\r\n\r\n", "bad header line"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", "bad header line"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "HTTP/1.0"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n", "obsolete line folding"),
    (b"GET / HTTP/1.1\r\n\r\n", "no Host header"),
    (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\nContent-Length: 5\r\n\r\nhello", "CONNECT with"),
])
def test_rfc9112_violations_are_refused(data, why):
    out, heads, error = frame(data)
    assert error is not None and error.status == 400 and why in str(error), error
    if data.startswith(CHUNKED):        # the head passed, the body never ends for the cache
        assert data.startswith(out) and b"0\r\n\r\n" not in out[len(CHUNKED):]
    else:
        assert heads == [] and out == b""


def test_http09_is_one_request_then_nothing():
    out, heads, error = frame(b"GET /old\r\nGET /second HTTP/1.1\r\nHost: h\r\n\r\n")
    assert out == b"GET /old\r\n" and len(heads) == 1 and error is None


def test_refused_connect_means_requests_again():
    framer = tproxy.RequestFramer()
    items = framer.feed(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [i.method for i in items] == [b"CONNECT"] and framer.holding
    items = framer.switch(403)
    assert [(i.method, i.target) for i in items] == [(b"GET", b"/next")] and not framer.holding


def test_accepted_connect_and_upgrade_become_tunnels():
    framer = tproxy.RequestFramer()
    framer.feed(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n\x16\x03\x01")
    assert framer.switch(200) == [b"\x16\x03\x01"] and framer.feed(b"GET x\r\n\r\n") == [b"GET x\r\n\r\n"]
    framer = tproxy.RequestFramer()
    framer.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert framer.feed(b"\x81\x85GET /") == [] and framer.switch(101) == [b"\x81\x85GET /"]
    framer = tproxy.RequestFramer()
    framer.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [i.target for i in framer.switch(200)] == [b"/2"]       # upgrade declined


def test_switch_after_earlier_requests_ends_the_pipeline():
    out, heads, error = frame(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
                              b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n")
    assert [h.target for h in heads] == [b"/a"] and "Upgrade after earlier requests" in str(error)


def test_pipelined_bad_request_stops_after_the_good_ones():
    good = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
    out, seen, failed = translate(good + b"GET /b HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n")
    assert out == b"GET http://h/a HTTP/1.1\r\nHost: h\r\n\r\n" and len(seen) == 1
    assert failed.status == 400


def test_status_sniffer_skips_interim_responses():
    sniff = tproxy.StatusSniffer()
    assert sniff.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 10") is None
    assert sniff.feed(b"1 Switching Protocols\r\nUpgrade: ws\r\n\r\n\x81") == 101
    assert tproxy.StatusSniffer().feed(b"SSH-2.0-x\r\n\r\n") == 0
    assert tproxy.StatusSniffer().feed(b"HTTP/1.0 403 Forbidden\r\n\r\n") == 403


def test_keep_alive_connection_frames_in_linear_work():
    one = b"GET /x HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\n\r\n"
    framer = tproxy.RequestFramer()
    heads = 0
    for _ in range(100):
        for i in range(0, len(one), 7):         # trickled in pieces across head boundaries
            heads += sum(isinstance(x, tproxy.Head) for x in framer.feed(one[i:i + 7]))
            assert len(framer.buf) < len(one)   # never more than the head in progress is kept
    assert heads == 100 and framer.error is None


def test_log_escaping_keeps_hostile_bytes_out():
    assert tproxy.escape(b'evil\r\nhost"\\\x00') == 'evil\\x0d\\x0ahost\\x22\\x5c\\x00'
    assert tproxy.escape(b"a" * 300).endswith("...") and len(tproxy.escape(b"a" * 300)) == 203


def test_proxy_protocol_headers():
    v1 = tproxy.proxy_header("v1", ("::ffff:192.0.2.10", 4000, 0, 0), ("198.51.100.10", 80))
    assert v1 == b"PROXY TCP4 192.0.2.10 198.51.100.10 4000 80\r\n"
    assert proxy_v2_fields(tproxy.proxy_header("v2", ("2001:db8::1", 4000, 0, 0),
                                               ("2001:db8::2", 443))) == \
        (0x21, 0x21, "2001:db8::1", "2001:db8::2", 4000, 443)
    assert proxy_v2_fields(tproxy.proxy_header("v2", ("::ffff:192.0.2.10", 4000, 0, 0),
                                               ("198.51.100.10", 80))) == \
        (0x21, 0x11, "192.0.2.10", "198.51.100.10", 4000, 80)
    assert tproxy.proxy_header("v1", ("192.0.2.1", 1), ("2001:db8::2", 2)) == b"PROXY UNKNOWN\r\n"


def proxy_v2_fields(header):
    """Decode a PROXY v2 header as haproxy's proxy-protocol.txt (section 2.2) lays it out.

    Return (version/command, family/protocol, source, destination, source
    port, destination port): after the 12-byte signature, one byte each for
    version/command and family/protocol, a 16-bit length, then for TCP over
    IPv4 (0x11) source and destination addresses of 4 bytes and for TCP over
    IPv6 (0x21) of 16 bytes, then the two 16-bit ports, all in network order.
    """
    import struct
    assert header[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    command, family, length = header[12], header[13], struct.unpack("!H", header[14:16])[0]
    body = header[16:]
    assert len(body) == length
    size, af = {0x11: (4, socket.AF_INET), 0x21: (16, socket.AF_INET6)}[family]
    assert length == 2 * size + 4
    src, dst = socket.inet_ntop(af, body[:size]), socket.inet_ntop(af, body[size:2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
    return command, family, src, dst, sport, dport
