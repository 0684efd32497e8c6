"""--workers leaves the last FIN to close() (Session.close_sends_fin): each peer still sees a FIN, never a reset."""
import json
import os

import pytest

from support import PYTHON, wait_for

# The server speaks first and half-closes, then takes everything the client sends until
# the client's FIN (or a reset), and writes what it got: the relay's client->server pump
# is the one that finishes last, long after the other.
SERVER = """
import hashlib, json, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 7100)); s.listen(1); s.settimeout(60)
c, _ = s.accept(); c.settimeout(60)
c.sendall(b'greeting ' * 1000); c.shutdown(socket.SHUT_WR)
h, n, end = hashlib.sha256(), 0, 'eof'
try:
    while True:
        d = c.recv(65536)
        if not d:
            break
        h.update(d); n += len(d)
except ConnectionResetError:
    end = 'reset'
open(sys.argv[1], 'w').write(json.dumps({'received': n, 'sha256': h.hexdigest(), 'end': end}))
c.close()
"""

# The client reads the greeting to its FIN, then sends N bytes, half-closes and waits for
# the relay's end: a FIN (recv gives b'') or a reset.
CLIENT = """
import hashlib, json, os, socket, sys
n = int(sys.argv[1])
s = socket.create_connection(('198.51.100.10', 7100), timeout=60)
got = b''
while True:
    d = s.recv(65536)
    if not d:
        break
    got += d
h, sent, block = hashlib.sha256(), 0, os.urandom(1 << 16)
while sent < n:
    s.sendall(block); h.update(block); sent += len(block)
s.shutdown(socket.SHUT_WR)
try:
    end = 'eof' if s.recv(10) == b'' else 'data'
except ConnectionResetError:
    end = 'reset'
print(json.dumps({'greeting': len(got), 'sent': sent, 'sha256': h.hexdigest(), 'end': end}))
"""


@pytest.mark.every_mode
def test_server_half_closes_first_and_client_sends_long_after(book):
    """The pump that ends last (client->server, 32 MiB after the server's FIN) still passes a FIN."""
    report_path = str(book.tmp / "server-report.json")
    book.cow.popen(PYTHON, "-c", SERVER, report_path)
    book.cow.wait_listening(7100)
    book.redirect(7100, 12970)
    book.tproxy("-t", "-r", "nobody", book.COW, 7100)
    n = 32 << 20
    client = json.loads(book.client.run(PYTHON, "-c", CLIENT, n, timeout=120).stdout)
    assert client["greeting"] == len(b"greeting " * 1000)
    assert client["end"] == "eof", client
    wait_for(lambda: os.path.exists(report_path) and os.path.getsize(report_path),
             what="the server's report")
    server = json.loads(open(report_path).read())
    assert server == {"received": n, "sha256": client["sha256"], "end": "eof"}
