"""Stress: concurrent QMP clients on one source's QMP socket while migrations run.

Not part of the test suite. Run it as

    PYTHONPATH=src python tests/stress/stress_qmp.py --seconds 60 [--seed N]

Several clients loop on query-migrate (checking each answer is well formed and
matches its id), some of them disconnecting mid-command or mid-message; one
controller issues migrate, migrate-set-parameters, migrate-set-capabilities
(refused while running) and migrate_cancel at random moments, waiting for a
final status each time. Every wait is bounded: a deadlock shows as a failure.
At the end the server closes and nothing (thread, descriptor) is left.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from leakcheck import leaks, open_fds  # noqa: E402
from multifd.control import QMPServer  # noqa: E402
from multifd.control.commands import MigrationCommands  # noqa: E402
from multifd.demo.workload import Workload, fill  # noqa: E402
from multifd.memory import RAMBlock  # noqa: E402
from multifd.migration.destination import MigrationDestination  # noqa: E402
from multifd.migration.source import MigrationSource  # noqa: E402

MiB = 1 << 20
TIMEOUT = 20.0
FINAL = ("completed", "failed", "cancelled")
STATUSES = ("setup", "active", "cancelling", *FINAL)


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buf = b""
        self.next_id = 0
        greeting = self.read()
        assert "QMP" in greeting, greeting
        assert self.cmd("qmp_capabilities") == {}

    def read(self) -> dict:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, name: str, **args: object) -> int:
        self.next_id += 1
        msg = {"execute": name, "id": self.next_id}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        return self.next_id

    def cmd(self, name: str, **args: object) -> object:
        ident = self.send(name, **args)
        while True:
            m = self.read()
            if "event" in m:
                continue
            assert m.get("id") == ident, f"answer to {name} #{ident} has id {m.get('id')}: {m}"
            if "error" in m:
                return m
            return m["return"]

    def close(self) -> None:
        self.sock.close()


def query_loop(
    path: str, stop: threading.Event, rng: random.Random, stats: collections.Counter, errors: list
) -> None:
    try:
        while not stop.is_set():
            c = Client(path)
            for _ in range(rng.randint(1, 200)):
                if stop.is_set():
                    break
                r = c.cmd("query-migrate")
                assert isinstance(r, dict), r
                if r:
                    assert r["status"] in STATUSES, r
                    if r["status"] == "failed":
                        assert r.get("error-desc"), r
                stats[f"query:{r.get('status', 'none')}"] += 1
            how = rng.random()
            if how < 0.3:
                c.send("query-migrate")  # and go without reading the answer
                stats["gone-mid-command"] += 1
            elif how < 0.5:
                c.sock.sendall(b'{"execute": "query-mig')  # half a message
                stats["gone-mid-message"] += 1
            c.close()
    except Exception as exc:  # reported by the main thread
        errors.append(f"query client: {type(exc).__name__}: {exc}")


def wait_final(c: Client) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        r = c.cmd("query-migrate")
        if r and r["status"] in FINAL:
            return r
        assert time.monotonic() < deadline, f"not final after {TIMEOUT}s: {r}"
        time.sleep(0.002)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--clients", type=int, default=5)
    args = ap.parse_args()
    print(f"seed {args.seed}", flush=True)
    rng = random.Random(args.seed)
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    stats: collections.Counter = collections.Counter()
    errors: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        src_block = RAMBlock.anonymous("pc.ram", 4 * MiB)
        dst_block = RAMBlock.anonymous("pc.ram", 4 * MiB)
        fill(src_block.array)
        workload = Workload(src_block.array, 20 * MiB)
        workload.start()
        source = MigrationSource(
            [src_block],
            capabilities={"multifd": True, "events": True},
            parameters={"x-io-timeout": 5, "multifd-channels": 2},
            on_stop=workload.pause,
            on_resume=workload.resume,
        )
        destination = MigrationDestination(
            [dst_block],
            capabilities={"multifd": True},
            parameters={"x-io-timeout": 5, "multifd-channels": 2},
        )
        server = QMPServer(f"unix:{tmp}/qmp.sock", MigrationCommands(source))
        path = server.start().removeprefix("unix:")
        stop = threading.Event()
        clients = [
            threading.Thread(
                target=query_loop,
                args=(path, stop, random.Random(rng.random()), stats, errors),
                name=f"query-client-{i}",
            )
            for i in range(args.clients)
        ]
        for t in clients:
            t.start()
        ctl = Client(path)
        start = time.monotonic()
        n = 0
        try:
            while time.monotonic() - start < args.seconds and not errors:
                n += 1
                uri = destination.incoming(f"unix:{tmp}/mig.sock")
                assert ctl.cmd("migrate", uri=uri) == {}
                action = rng.choice(("complete", "cancel", "params", "caps"))
                time.sleep(rng.uniform(0, 0.04))
                if action == "cancel":
                    assert ctl.cmd("migrate_cancel") == {}
                    r = ctl.cmd("query-migrate")
                    assert r["status"] in FINAL, f"after migrate_cancel: {r}"
                elif action == "params":
                    r = ctl.cmd(
                        "migrate-set-parameters",
                        **{
                            "downtime-limit": rng.randint(10, 500),
                            "max-bandwidth": rng.choice((0, 64 * MiB)),
                        },
                    )
                    assert r == {}, r
                elif action == "caps":
                    r = ctl.cmd(
                        "migrate-set-capabilities",
                        capabilities=[{"capability": "xbzrle", "state": False}],
                    )
                    if r != {}:
                        assert "in progress" in r["error"]["desc"], r
                r = wait_final(ctl)
                stats[f"{action}:{r['status']}"] += 1
                if r["status"] == "completed":
                    assert destination.wait(TIMEOUT)["status"] in FINAL
                    ctl.cmd("cont")
                else:
                    if destination.state.status.live:
                        destination.cancel()
                    destination.wait(TIMEOUT)
                    assert not workload.paused, r
                    assert r["status"] != "failed" or r.get("error-desc"), r
                ctl.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        finally:
            stop.set()
            for t in clients:
                t.join(TIMEOUT)
                assert not t.is_alive(), f"{t.name} hangs"
            ctl.close()
            server.close()
            source.cancel()
            destination.cancel()
            workload.stop()
            src_block.close()
            dst_block.close()
        print(f"{n} migrations in {time.monotonic() - start:.0f}s")
        for k, v in sorted(stats.items()):
            print(f"  {v:6d} {k}")
        assert not errors, errors
    threads, fds = leaks(threads_before, fds_before)
    assert not threads, threads
    assert not fds, fds
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
