"""The task functions of bench.py, in a module of their own that imports next to nothing.

Both executors pickle them by reference (``bench_tasks.noop``), so each worker imports this
module: what it imports counts towards the first result. bench.py itself imports
concurrent.futures' process pool, argparse, subprocess and more, which a distexec worker does not
otherwise load; sending its functions would time the import of the benchmark, not the executor.
"""

import os
import socket


def noop(*args):
    return None


def identity(x):
    return x


def blocker(host, port):
    """Occupy a worker until the benchmark releases it: report in, then wait on the socket."""
    with socket.create_connection((host, port)) as s:
        s.sendall(b"%d\n" % os.getpid())
        s.recv(1)  # returns when the client sends a byte or closes the connection
    return os.getpid()
