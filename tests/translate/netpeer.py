#!/usr/bin/env python3
"""Tiny network peers for the traffic tests, run inside lab namespaces.

  netpeer.py serve PORT TAG [transparent]   answer each TCP connection with
        'TAG PEER_ADDR ORIGINAL_DST' and close; exits after 120 s at most.
  netpeer.py connect ADDR PORT [TIMEOUT]    print 'ok LINE', 'refused',
        'timeout' or 'error TEXT'.
  netpeer.py ping ADDR [TIMEOUT]            one ICMP echo: 'ok' or 'timeout'.
  netpeer.py udp ADDR PORT [TIMEOUT]        send one UDP datagram and report the
        ICMP error that comes back as the sender's kernel received it:
        'icmp TYPE CODE FROM', 'eperm' (the send itself was refused), 'ok'
        (an answer) or 'timeout'.
"""
import os
import select
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IP_RECVERR = 11            # linux/in.h; the error queue holds struct sock_extended_err
MSG_ERRQUEUE = 0x2000
LIFETIME = 120.0


def original_dst(conn):
    """Return 'addr:port' the client meant: SO_ORIGINAL_DST, else getsockname()."""
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack("!2xH4s8x", raw)
        return "%s:%d" % (socket.inet_ntoa(addr), port)
    except OSError:
        host, port = conn.getsockname()[:2]
        return "%s:%d" % (host, port)


def serve(port, tag, transparent=False):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:
        srv.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    srv.settimeout(0.5)
    deadline = time.monotonic() + LIFETIME
    while time.monotonic() < deadline:
        try:
            conn, peer = srv.accept()
        except socket.timeout:
            continue
        with conn:
            conn.sendall(("%s %s %s\n" % (tag, peer[0], original_dst(conn))).encode())


def connect(addr, port, timeout):
    try:
        with socket.create_connection((addr, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = s.recv(200).decode(errors="replace").strip()
            print("ok " + data)
    except ConnectionRefusedError:
        print("refused")
    except socket.timeout:
        print("timeout")
    except OSError as exc:
        print("error " + str(exc))


def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(addr, timeout):
    ident = os.getpid() & 0xFFFF
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"lab-ping"
    packet = header[:2] + struct.pack("!H", checksum(header)) + header[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(timeout)
        s.sendto(packet, (addr, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, src = s.recvfrom(2048)
            except socket.timeout:
                break
            icmp = data[(data[0] & 0x0F) * 4:]
            if src[0] == addr and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                print("ok")
                return
    print("timeout")


def udp_probe(addr, port, timeout):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
        s.connect((addr, port))
        try:
            s.send(b"probe")
        except PermissionError:
            print("eperm")
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, errors = select.select([s], [], [s], max(0.0, deadline - time.monotonic()))
            if not (ready or errors):
                break
            try:
                _, anc, _, _ = s.recvmsg(512, 512, MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                s.recv(512, socket.MSG_DONTWAIT)
                print("ok")
                return
            for level, kind, data in anc:
                if level == socket.SOL_IP and kind == IP_RECVERR:
                    # struct sock_extended_err: u32 errno, u8 origin, type, code, pad,
                    # u32 info, u32 data; then the offender's sockaddr_in.
                    _, origin, icmp_type, icmp_code = struct.unpack("=IBBB", data[:7])
                    offender = socket.inet_ntoa(data[16 + 4:16 + 8])
                    print("icmp %d %d %s" % (icmp_type, icmp_code, offender))
                    return
    print("timeout")


def main(argv):
    if argv[0] == "serve":
        serve(int(argv[1]), argv[2], len(argv) > 3 and argv[3] == "transparent")
    elif argv[0] == "connect":
        connect(argv[1], int(argv[2]), float(argv[3]) if len(argv) > 3 else 2.0)
    elif argv[0] == "ping":
        ping(argv[1], float(argv[2]) if len(argv) > 2 else 2.0)
    elif argv[0] == "udp":
        udp_probe(argv[1], int(argv[2]), float(argv[3]) if len(argv) > 3 else 2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
