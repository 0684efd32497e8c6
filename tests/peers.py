"""Test peers run inside lab namespaces: `python3 peers.py ROLE [options]`.

Roles:
  web PORT LOGFILE     HTTP/1.1 origin or cache: records each request as a JSON
                       line (peer, request line, headers, body sha256) and
                       answers 200 with the request target as body; keep-alive.
  who PORT             Sends "PEER_IP PEER_PORT LOCAL_IP LOCAL_PORT\\n" and closes.
  who-echo PORT        Sends the same line, then echoes what it reads until EOF.
  tap PORT LOGFILE     Reads each connection to EOF and records exactly what it
                       received as a JSON line {"peer", "data" (hex)}; answers nothing.
  udp-who PORT ADDR... Answers each UDP datagram to ADDR:PORT (one socket per
                       address) with "PEER_IP PEER_PORT LOCAL_IP LOCAL_PORT "
                       and the datagram itself, from the address it was sent to.
  sink PORT            Reads to EOF, replies with the sha256 hex of what it read,
                       then N bytes (N from the first line "SEND n\\n" if given).

Clients (print to stdout, exit 0 on success):
  send ADDR PORT       Sends standard input, half-closes, prints everything
                       received until EOF (30 s at most).
  ask ADDR PORT        Like send, without the half-close (for peers that
                       close a tunnel on a half-close, as tinyproxy does).
  bulk ADDR PORT N     Sends "SEND N" and N bytes, half-closes, reads the sink's
                       digest line and N bytes back; prints a JSON report.

Every server stops after --lifetime seconds (default 300) so nothing outlives a test.
"""
import hashlib
import json
import os
import socket
import sys
import threading
import time


def listen(port):
    """Return a dual-stack listening socket on PORT."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.listen(256)
    return sock


def plain(host):
    return host[7:] if host.startswith("::ffff:") else host


def serve_forever(sock, handler, lifetime):
    deadline = time.monotonic() + lifetime
    sock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            conn, peer = sock.accept()
        except socket.timeout:
            continue
        conn.settimeout(30)
        threading.Thread(target=guarded, args=(handler, conn), daemon=True).start()


def guarded(handler, conn):
    try:
        handler(conn)
    except OSError:
        pass
    finally:
        conn.close()


class Reader:
    """Buffered reads from a socket."""

    def __init__(self, conn):
        self.conn, self.buf = conn, b""

    def until(self, marker):
        while marker not in self.buf:
            data = self.conn.recv(65536)
            if not data:
                return None
            self.buf += data
        head, self.buf = self.buf.split(marker, 1)
        return head + marker

    def exactly(self, n):
        while len(self.buf) < n:
            data = self.conn.recv(65536)
            if not data:
                raise OSError("short body")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def web(port, logfile, lifetime):
    lock = threading.Lock()

    def handle(conn):
        peer, local = conn.getpeername(), conn.getsockname()
        reader = Reader(conn)
        while True:
            head = reader.until(b"\r\n\r\n")
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            body = b""
            if headers.get("transfer-encoding", "").lower().endswith("chunked"):
                while True:
                    size = int(reader.until(b"\r\n").split(b";")[0], 16)
                    if size == 0:
                        while reader.until(b"\r\n") not in (b"\r\n", None):
                            pass        # trailer fields
                        break
                    body += reader.exactly(size)
                    reader.exactly(2)
            elif "content-length" in headers:
                body = reader.exactly(int(headers["content-length"]))
            record = {"peer": plain(peer[0]), "peer_port": peer[1], "local": plain(local[0]),
                      "local_port": local[1], "request_line": lines[0], "head": head.decode("latin-1"),
                      "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
            with lock, open(logfile, "a") as f:
                f.write(json.dumps(record) + "\n")
            if lines[0].startswith("CONNECT refused."):     # a cache's policy says no
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                continue
            if lines[0].startswith("CONNECT "):
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                who_reply(conn)
                return
            if "upgrade" in headers:            # switch protocols, then echo every byte
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: %s\r\n\r\n" % headers["upgrade"].encode("latin-1"))
                data = reader.buf
                while True:
                    conn.sendall(data)
                    data = conn.recv(65536)
                    if not data:
                        return
            reply = lines[0].split(" ")[1].encode("latin-1") + b"\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(reply), reply))
            if headers.get("connection", "").lower() == "close":
                return

    serve_forever(listen(port), handle, lifetime)


def tap(port, logfile, lifetime):
    lock = threading.Lock()

    def handle(conn):
        peer = conn.getpeername()
        data = bytearray()
        while True:
            piece = conn.recv(65536)
            if not piece:
                break
            data += piece
        with lock, open(logfile, "a") as f:
            f.write(json.dumps({"peer": plain(peer[0]), "data": data.hex()}) + "\n")

    serve_forever(listen(port), handle, lifetime)


def who_reply(conn):
    peer, local = conn.getpeername(), conn.getsockname()
    conn.sendall(("%s %d %s %d\n" % (plain(peer[0]), peer[1], plain(local[0]), local[1])).encode())


def who(port, lifetime):
    serve_forever(listen(port), who_reply, lifetime)


def who_echo(port, lifetime):
    """Say who connected (as `who`), then echo everything back until the client's EOF."""
    def handle(conn):
        who_reply(conn)
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)

    serve_forever(listen(port), handle, lifetime)


def udp_who(port, addrs, lifetime):
    """Answer every datagram with who sent it, where it arrived, and the datagram itself."""
    import select
    socks = []
    for addr in addrs:
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((addr, port))
        socks.append(sock)
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        for sock in select.select(socks, [], [], 1.0)[0]:
            data, peer = sock.recvfrom(65536)
            local = sock.getsockname()
            sock.sendto(("%s %d %s %d " % (plain(peer[0]), peer[1], plain(local[0]), local[1]))
                        .encode() + data, peer)


def sink(port, lifetime):
    def handle(conn):
        digest = hashlib.sha256()
        first = b""
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            if not first:
                first = data[:64]
            digest.update(data)
        reply = digest.hexdigest().encode() + b"\n"
        conn.sendall(reply)
        if first.startswith(b"SEND "):
            n = int(first.split(b"\n", 1)[0].split()[1])
            block = bytes(range(256)) * 4096
            while n > 0:
                piece = block[:min(n, len(block))]
                conn.sendall(piece)
                n -= len(piece)
        conn.shutdown(socket.SHUT_WR)

    serve_forever(listen(port), handle, lifetime)


def connect(addr, port):
    sock = socket.create_connection((addr, int(port)), timeout=30)
    return sock


def send(addr, port, half_close=True):
    sock = connect(addr, port)
    sock.sendall(sys.stdin.buffer.read())
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    out = bytearray()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            out += data
    except ConnectionResetError:
        sys.stderr.write("reset\n")
        sys.stdout.buffer.write(out)
        sys.exit(3)
    sys.stdout.buffer.write(out)


def bulk(addr, port, n):
    n = int(n)
    sock = connect(addr, port)
    header = b"SEND %d\n" % n
    digest = hashlib.sha256(header)
    block = os.urandom(1 << 20)
    sock.sendall(header)
    left = n
    while left > 0:
        piece = block[:min(left, len(block))]
        sock.sendall(piece)
        digest.update(piece)
        left -= len(piece)
    sock.shutdown(socket.SHUT_WR)
    reader = Reader(sock)
    line = reader.until(b"\n")
    back = hashlib.sha256(reader.buf)
    got = len(reader.buf)
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        back.update(data)
        got += len(data)
    expect = hashlib.sha256()
    block = bytes(range(256)) * 4096
    left = n
    while left > 0:
        expect.update(block[:min(left, len(block))])
        left -= min(left, len(block))
    print(json.dumps({"sent_sha256": digest.hexdigest(),
                      "sink_sha256": line.strip().decode() if line else None,
                      "received": got, "received_ok": back.hexdigest() == expect.hexdigest()}))


def main(argv):
    lifetime = 300.0
    if "--lifetime" in argv:
        i = argv.index("--lifetime")
        lifetime = float(argv[i + 1])
        del argv[i:i + 2]
    role, args = argv[0], argv[1:]
    if role == "web":
        web(int(args[0]), args[1], lifetime)
    elif role == "tap":
        tap(int(args[0]), args[1], lifetime)
    elif role == "who":
        who(int(args[0]), lifetime)
    elif role == "who-echo":
        who_echo(int(args[0]), lifetime)
    elif role == "udp-who":
        udp_who(int(args[0]), args[1:], lifetime)
    elif role == "sink":
        sink(int(args[0]), lifetime)
    elif role == "send":
        send(*args)
    elif role == "ask":
        send(*args, half_close=False)
    elif role == "bulk":
        bulk(*args)
    else:
        sys.exit("peers.py: unknown role %s" % role)


if __name__ == "__main__":
    main(sys.argv[1:])
