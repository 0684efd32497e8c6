"""HTTP translate framing, driven through real socket pairs (no network lab needed)."""
import socket

import pytest

import tproxy

ORIG = ("198.51.100.10", 80)


def translate(data, rewrite=True, force_url=None, orig=ORIG, split=None):
    """Feed DATA (in pieces of SPLIT bytes) through an HttpRequestPump; return what it sent."""
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
    return out, seen


@pytest.mark.parametrize("split", [None, 1, 7])
def test_origin_form_becomes_absolute_and_headers_pass_byte_for_byte(split):
    head = b"GET /a?b=c HTTP/1.1\r\nHost: Example.COM:8080\r\nX-Odd:  spaced\t\r\nCookie: k=v\r\n\r\n"
    out, seen = translate(head, split=split)
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
            + b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            + b"%x;ext=1\r\n%s\r\n0\r\nTrailer: t\r\n\r\n" % (len(body), body)
            + b"GET /last HTTP/1.1\r\nHost: h\r\n\r\n")
    for split in (None, 3):
        out, seen = translate(data, split=split)
        assert [s[1] for s in seen] == [b"/p", b"/c", b"/last"]
        assert out.count(body) == 2 and b"http://h/last" in out


def test_connect_turns_into_a_tunnel():
    data = b"CONNECT example:443 HTTP/1.1\r\nHost: example:443\r\n\r\n\x16\x03\x01GET / HTTP/1.1\r\n\r\n"
    out, seen = translate(data)
    assert out == data and len(seen) == 1


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
    (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\"b\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\n", 400),                       # cut off at EOF
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 17000 + b"\r\n\r\n", 431),
    (b"GET /" + b"y" * 17000, 414),
])
def test_malformed_input_is_a_bad_request(data, status):
    with pytest.raises(tproxy.BadRequest) as bad:
        translate(data)
    assert bad.value.status == status


def test_log_escaping_keeps_hostile_bytes_out():
    assert tproxy.escape(b'evil\r\nhost"\\\x00') == 'evil\\x0d\\x0ahost\\x22\\x5c\\x00'
    assert tproxy.escape(b"a" * 300).endswith("...") and len(tproxy.escape(b"a" * 300)) == 203


def test_proxy_protocol_headers():
    v1 = tproxy.proxy_header("v1", ("::ffff:192.0.2.10", 4000, 0, 0), ("198.51.100.10", 80))
    assert v1 == b"PROXY TCP4 192.0.2.10 198.51.100.10 4000 80\r\n"
    v2 = tproxy.proxy_header("v2", ("2001:db8::1", 4000, 0, 0), ("2001:db8::2", 443))
    assert v2[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and v2[12:14] == b"\x21\x21"
    assert int.from_bytes(v2[14:16], "big") == 36 and len(v2) == 16 + 36
    assert tproxy.proxy_header("v1", ("192.0.2.1", 1), ("2001:db8::2", 2)) == b"PROXY UNKNOWN\r\n"
