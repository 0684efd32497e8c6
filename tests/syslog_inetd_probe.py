"""Run inside a private mount namespace (see test_syslog.py): serve one inetd-style
connection with tproxy while a datagram socket at /dev/log collects its syslog lines.

Usage: syslog_inetd_probe.py PYTHON TPROXY  -> prints the collected lines, one per datagram
"""
import os
import socket
import subprocess
import sys
import time


def main(python, tproxy):
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind("/dev/log")
    sink.settimeout(10)
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(1)
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(1)
    client = socket.create_connection(front.getsockname(), timeout=10)
    conn, _ = front.accept()
    # inetd gives the client as fd 0, 1 and 2: errors must not reach it.
    proc = subprocess.Popen([python, tproxy, "-t", "127.0.0.1", str(target.getsockname()[1])],
                            stdin=conn, stdout=conn, stderr=conn)
    conn.close()
    served, _ = target.accept()
    sent = b'hello "world"\n'
    client.sendall(sent)
    received = b""
    served.settimeout(10)
    while len(received) < len(sent):    # closing with unread bytes would send a reset
        received += served.recv(100)
    served.sendall(b"back")
    served.close()
    client.shutdown(socket.SHUT_WR)
    got = client.recv(100)
    proc.wait(10)
    lines = [sink.recv(4096).decode("utf-8", "replace")]
    # A usage error under inetd goes to syslog too, never to the client.
    conn2 = socket.create_connection(front.getsockname(), timeout=10)
    peer, _ = front.accept()
    bad = subprocess.run([python, tproxy, "--bogus"], stdin=peer, stdout=peer, stderr=peer,
                         timeout=10)
    peer.close()
    conn2.settimeout(5)
    leaked = conn2.recv(100)
    lines.append(sink.recv(4096).decode("utf-8", "replace"))
    print("client got %r, tproxy status %d, error status %d, leaked %r" % (
        got, proc.returncode, bad.returncode, leaked))
    for line in lines:
        print(line)


if __name__ == "__main__":
    main(*sys.argv[1:3])
