"""The runner's snapshot side (python/flare/_runtime/snapshot.py), on this process: what
it refuses to take along, and the entropy it renews after a restore."""

from __future__ import annotations

import os
import random
import socket
import tempfile

from flare._runtime import snapshot


def test_open_sockets_are_named_as_blockers() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        found = snapshot.blockers()
        assert any(f"fd {s.fileno()}: a TCP socket" in f for f in found), found
    finally:
        s.close()
    assert not any(f"fd {s.fileno()}:" in f for f in snapshot.blockers())


def test_unix_socket_pairs_are_blockers_too() -> None:
    a, b = socket.socketpair()
    try:
        found = snapshot.blockers()
        assert any(f"fd {a.fileno()}: a unix socket" in f for f in found), found
    finally:
        a.close()
        b.close()


def test_files_open_for_writing_outside_tmp_are_blockers_but_reads_are_not() -> None:
    d = tempfile.mkdtemp(dir="/var/tmp")
    path = os.path.join(d, "out.txt")
    try:
        with open(path, "w") as w:
            found = snapshot.blockers()
            assert any(f"fd {w.fileno()}: {path} (open for writing outside /tmp)" in f for f in found), found
        with open(path) as r:
            assert not any(f"fd {r.fileno()}:" in f for f in snapshot.blockers())
        with tempfile.NamedTemporaryFile("w", dir="/tmp") as t:
            assert not any(f"fd {t.fileno()}:" in f for f in snapshot.blockers())
    finally:
        os.unlink(path)
        os.rmdir(d)


def test_reseed_renews_the_random_stream() -> None:
    random.seed(1234)
    state = random.getstate()
    expected = random.random()
    random.setstate(state)
    snapshot._reseed()
    assert random.random() != expected

