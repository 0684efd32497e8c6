"""--workers' collector runs seldom (Worker.GC_YOUNG): a connection that ends in an error leaves no cycle.

A cycle (an exception whose traceback holds a frame that holds the exception)
keeps the whole Session (record, dialer, pumps) alive until the next young
collection: with the 10,000 threshold, hundreds of sessions' worth per worker.
"""
import gc
import socket
import struct
import time

import tproxy


def serve(session_for, connect, rounds=20):
    """Drive ROUNDS sessions in one EventLoop; return what the collector then finds."""
    loop = tproxy.EventLoop()
    listener = socket.create_server(("127.0.0.1", 0))
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            client = socket.create_connection(listener.getsockname(), timeout=10)
            conn, peer = listener.accept()
            session = session_for(conn, peer)
            loop.add(session, time.monotonic())
            connect(client, loop, session)
            deadline = time.monotonic() + 10
            while not session.done and time.monotonic() < deadline:
                loop.poll(0.5)
            assert session.done
            client.close()
        loop = session = None   # its timer heap may still name ended sessions
        return gc.collect()
    finally:
        listener.close()
        if was:
            gc.enable()


def sessions_to(port):
    """Return a maker of worker sessions relaying to 127.0.0.1:PORT (-t)."""
    cfg = tproxy.parse_args(["-t", "-s", "12970", "127.0.0.1", str(port)])
    server = tproxy.Server(cfg, tproxy.QuietLog(), 12970)

    def session_for(conn, peer):
        session = tproxy.Session(conn, server, None, peer)
        session.close_sends_fin = True
        return session
    return session_for


def test_refused_target_leaves_no_cycle():
    """The target refuses (a bound port that does not listen): 'connection refused', no garbage."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        found = serve(sessions_to(closed.getsockname()[1]), lambda client, loop, session: None)
    finally:
        closed.close()
    assert found == 0, "%d objects in cycles after 20 refused connections" % found


def test_client_reset_while_relaying_leaves_no_cycle():
    """The client resets mid-relay (stepped alone, Session.lean_step): 'reset by client', no garbage."""
    target = socket.create_server(("127.0.0.1", 0))
    held = []

    def reset_while_relaying(client, loop, session):
        deadline = time.monotonic() + 10
        while session.stage is not tproxy.Session.relaying and time.monotonic() < deadline:
            loop.poll(0.1)
        held.append(target.accept()[0])
        held[-1].setblocking(False)
        client.sendall(b"x")
        while time.monotonic() < deadline:     # relayed: the session is reading the client
            loop.poll(0.1)
            try:
                if held[-1].recv(1):
                    break
            except BlockingIOError:
                pass
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    try:
        found = serve(sessions_to(target.getsockname()[1]), reset_while_relaying)
    finally:
        for sock in held + [target]:
            sock.close()
    assert found == 0, "%d objects in cycles after 20 client resets" % found


def test_refused_request_leaves_no_cycle():
    """HTTP mode, a request refused at its head (400): the BadRequest kept by the framer holds no frame."""
    cache = socket.create_server(("127.0.0.1", 0))
    cfg = tproxy.parse_args(["-s", "12970", "127.0.0.1", str(cache.getsockname()[1])])
    server = tproxy.Server(cfg, tproxy.QuietLog(), 12970)

    def session_for(conn, peer):
        session = tproxy.Session(conn, server, None, peer)
        session.close_sends_fin = True
        return session

    def bad_head(client, loop, session):
        client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
        client.shutdown(socket.SHUT_WR)     # the lingering close ends at this EOF

    try:
        serve(session_for, bad_head, rounds=1)     # the first also builds the Grammar's classes
        found = serve(session_for, bad_head)
    finally:
        cache.close()
    assert found == 0, "%d objects in cycles after 20 refused requests" % found
