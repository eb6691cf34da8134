"""Stress: many migrations in one process, with cancels and faults at random moments.

Not part of the test suite (it runs for minutes). Run it as

    PYTHONPATH=src python tests/stress/stress_migrations.py --seconds 120 [--seed N]

Each iteration picks a transport (tcp or unix), 1-4 multifd channels,
return-path on or off, TLS sometimes, and one of: complete; cancel the source
or the destination after 0-50 ms; sever one connection through a relay (tcp);
close the destination's listener early. It then checks that both ends reach a
final status within a bound, that a failure says what happened, that a source
that did not complete has its memory untouched by the migration and its
workload running, that a completed one left the destination equal to the
source, and that a clean migration completes right after. At the end: no
thread, descriptor, listener or port left, and RSS not growing without bound.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
# The fault relay (tests/faults) and what it imports (tests/e2e).
sys.path[1:1] = [str(HERE.parent / "faults"), str(HERE.parent / "e2e")]

import numpy as np  # noqa: E402
from relay import Relay  # noqa: E402

from leakcheck import leaks, open_fds  # noqa: E402
from multifd.demo.workload import Workload, fill  # noqa: E402
from multifd.memory import RAMBlock  # noqa: E402
from multifd.migration.destination import MigrationDestination  # noqa: E402
from multifd.migration.source import MigrationSource  # noqa: E402

MiB = 1 << 20
BOUND = float(os.environ.get("STRESS_BOUND", 15))  # seconds for both ends to reach a final status
FINAL = ("completed", "failed", "cancelled")
ACTIONS = ("complete", "cancel-src", "cancel-dst", "sever", "close-listener")


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Harness:
    def __init__(self, scratch: Path, creds: str | None) -> None:
        self.scratch = scratch
        self.creds = creds
        self.port = 0
        self.label = ""
        self.actions = ACTIONS
        self.src_blocks = [RAMBlock.anonymous("pc.ram", 4 * MiB), RAMBlock.anonymous("rom", MiB)]
        self.dst_blocks = [RAMBlock.anonymous("pc.ram", 4 * MiB), RAMBlock.anonymous("rom", MiB)]
        for seed, b in enumerate(self.src_blocks, 1):
            fill(b.array, seed=seed)
        # The workload writes pc.ram only: "rom" must never change at the source.
        self.rom_digest = hashlib.sha256(self.src_blocks[1].array).hexdigest()
        self.workload = Workload(self.src_blocks[0].array, 20 * MiB)
        self.workload.start()
        self.stops = 0
        self.src_resumes = 0
        self.dst_resumes: list[bytes | None] = []
        self.snapshot_at_stop: list[bytes] | None = None
        self.source = MigrationSource(
            self.src_blocks,
            capabilities={"multifd": True, "events": True},
            parameters={"x-io-timeout": 5},
            on_stop=self._on_stop,
            on_resume=self._on_resume,
            save_state=lambda: b"state",
        )
        self.destination = MigrationDestination(
            self.dst_blocks,
            capabilities={"multifd": True, "events": True},
            parameters={"x-io-timeout": 5},
            on_resume=self.dst_resumes.append,
        )

    def _on_stop(self) -> None:
        self.stops += 1
        self.workload.pause()

    def _on_resume(self) -> None:
        self.src_resumes += 1
        self.workload.resume()

    def configure(self, channels: int, return_path: bool, tls: bool) -> None:
        caps = {"multifd": True, "return-path": return_path}
        params = {
            "multifd-channels": channels,
            "tls-creds": self.creds if tls else "",
            "tls-hostname": "localhost" if tls else "",
        }
        for end in (self.source, self.destination):
            end.set_capabilities(caps)
            end.set_parameters(params)

    def listen_uri(self, transport: str) -> str:
        if transport == "unix":
            return f"unix:{self.scratch / 'm.sock'}"
        # The same port every time: a migration that ended must have freed it.
        return f"tcp:127.0.0.1:{self.port}"

    def incoming(self, transport: str) -> str:
        uri = self.destination.incoming(self.listen_uri(transport))
        if transport == "tcp" and not self.port:
            self.port = int(uri.rsplit(":", 1)[1])
        return uri

    def close(self) -> None:
        self.source.cancel()
        self.destination.cancel()
        self.workload.stop()
        for b in (*self.src_blocks, *self.dst_blocks):
            b.close()


def dump(what: str) -> None:
    import faulthandler

    print(f"--- {what}: all threads", flush=True)
    faulthandler.dump_traceback(all_threads=True)


def wait_final(h: Harness) -> tuple[dict, dict]:
    started = time.monotonic()
    src = h.source.wait(float(os.environ.get("STRESS_DUMP_AFTER", BOUND)))
    if src.get("status") not in FINAL:
        dump(f"source slow ({h.label})")
        src = h.source.wait(BOUND)
    took = time.monotonic() - started
    if took > 2:
        print(
            f"slow: source final after {took:.1f}s ({h.label}): {src.get('error-desc')}", flush=True
        )
    if src.get("status") not in FINAL:
        dump("source hangs")
    assert src.get("status") in FINAL, f"source not final after {BOUND}s: {src}"
    deadline = time.monotonic() + BOUND
    while h.destination.state.status.value not in FINAL and time.monotonic() < deadline:
        if h.destination.state.status.value == "setup" and src["status"] != "completed":
            # The source gave up before all its channels were in: the destination
            # rightly waits for a source (as QEMU's); the application cancels.
            time.sleep(0.05)
            if h.destination.state.status.value == "setup":
                h.destination.cancel()
                break
        time.sleep(0.005)
    dst = h.destination.wait(BOUND)
    if dst.get("status") not in FINAL:
        dump("destination hangs")
    assert dst.get("status") in FINAL, f"destination not final after {BOUND}s: {dst}"
    return src, dst


def check_after(
    h: Harness, src: dict, dst: dict, notes: collections.Counter, return_path: bool
) -> None:
    for side, info in (("source", src), ("destination", dst)):
        if info["status"] == "failed":
            err = info.get("error-desc", "")
            assert err, f"{side} failed without error-desc: {info}"
            assert "internal error" not in err, f"{side}: {err}"
            assert "without an error message" not in err, f"{side}: {err}"
            notes[f"{side}-err:{classify(err)}"] += 1
    assert hashlib.sha256(h.src_blocks[1].array).hexdigest() == h.rom_digest, "source rom changed"
    if src["status"] == "completed":
        assert h.workload.paused, "completed but workload runs"
        if dst["status"] != "completed":
            # Without a return path the source cannot hear that the destination
            # failed (or was cancelled) after reading everything, as with QEMU.
            assert not return_path, f"source completed, destination {dst}"
            notes["src-completed-dst-not"] += 1
            h.workload.resume()
            return
        for s, d in zip(h.src_blocks, h.dst_blocks, strict=True):
            assert np.array_equal(s.array, d.array), f"block {s.name} differs after completion"
        h.workload.resume()  # the application runs on at the source, for the next round
    else:
        assert not h.workload.paused, f"source {src['status']} but its workload is paused"
        assert not h.source.stopped, "source stopped after a failed migration"
        before = h.workload.pages_written
        deadline = time.monotonic() + 2
        while h.workload.pages_written == before and time.monotonic() < deadline:
            time.sleep(0.005)
        assert h.workload.pages_written > before, f"workload does not run: {src}"


def classify(err: str) -> str:
    for key in (
        "channel 0",
        "channel 1",
        "channel 2",
        "channel 3",
        "main channel",
        "cancelled at the destination",
        "listener",
        "return path",
        "set up differently",
    ):
        if key in err:
            return key
    return err[:60]


def iteration(h: Harness, rng: random.Random, notes: collections.Counter) -> str:
    transport = rng.choice(("tcp", "unix"))
    channels = rng.randint(1, 4)
    return_path = rng.random() < 0.5
    tls = h.creds is not None and rng.random() < 0.15
    action = rng.choice(h.actions)
    if action == "sever" and transport != "tcp":
        transport = "tcp"
    delay = rng.uniform(0, 0.05)
    label = (
        f"{transport} ch={channels} rp={int(return_path)} tls={int(tls)} "
        f"{action} {delay * 1000:.0f}ms"
    )
    h.label = label
    h.configure(channels, return_path, tls)
    uri = h.incoming(transport)
    # A relay that corrupts nothing: it only forwards, until `sever` cuts one connection.
    relay = Relay(uri, lambda header, payload: None) if action == "sever" else None
    try:
        h.source.migrate(relay.uri if relay else uri)
        time.sleep(delay)
        if action == "cancel-src":
            h.source.cancel()
        elif action == "cancel-dst":
            h.destination.cancel()
        elif action == "sever":
            if not relay.sever(lambda pairs: rng.randrange(len(pairs))):
                notes["sever-too-early"] += 1
        elif action == "close-listener":
            listener = h.destination._listener
            if listener is not None:
                listener.close()
        src, dst = wait_final(h)
    finally:
        if relay is not None:
            h.source.cancel()
            if h.destination.state.status.value not in FINAL:
                h.destination.cancel()
            relay.close()
    notes[f"{action}:{src['status']}/{dst['status']} rp={int(return_path)}"] += 1
    if src["status"] != "completed" and dst["status"] == "completed":
        # Both ends run the workload now: say why the source gave up.
        print(f"split: {label}: source {src.get('error-desc')}", flush=True)
    check_after(h, src, dst, notes, return_path)
    if src["status"] != "completed":
        # A new migration at once, and it completes.
        h.configure(channels, return_path, tls)
        uri = h.incoming(transport)
        h.source.migrate(uri)
        src2, dst2 = wait_final(h)
        assert src2["status"] == dst2["status"] == "completed", (
            f"retry after {label}: {src2} {dst2}"
        )
        check_after(h, src2, dst2, notes, return_path)
    return label


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--iterations", type=int, default=0)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--no-tls", action="store_true")
    ap.add_argument("--actions", default=",".join(ACTIONS))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"seed {args.seed}", flush=True)
    thread_errors: list[str] = []

    def hook(a: threading.ExceptHookArgs) -> None:
        thread_errors.append(
            f"{a.thread.name if a.thread else '?'}: "
            + "".join(traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback))
        )

    threading.excepthook = hook
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        creds = None
        if not args.no_tls:
            import trustme

            from tls_creds import make_creds

            ca = trustme.CA()
            creds = str(make_creds(scratch / "tls", trust=ca, server=ca, client=ca))
        threads_before = set(threading.enumerate())
        fds_before = open_fds()
        h = Harness(scratch, creds)
        h.actions = tuple(args.actions.split(","))
        notes: collections.Counter = collections.Counter()
        # Warm up before the RSS baseline.
        for _ in range(5):
            iteration(h, rng, notes)
        rss0 = rss_kib()
        start = time.monotonic()
        n = 0

        try:
            while True:
                if args.iterations and n >= args.iterations:
                    break
                if not args.iterations and time.monotonic() - start > args.seconds:
                    break
                iteration(h, rng, notes)
                n += 1
                if n % 50 == 0:
                    print(f"{n} iterations, rss {rss_kib()} KiB", flush=True)
                assert not thread_errors, thread_errors
        except BaseException:
            print(f"FAILED at iteration {n + 1}: {h.label}", flush=True)
            for t in threading.enumerate():
                print("thread", t.name, flush=True)
            import faulthandler

            faulthandler.dump_traceback(all_threads=True)
            raise
        rss1 = rss_kib()
        h.close()
        threads, fds = leaks(threads_before, fds_before)
        threads = [t for t in threads if t != "workload"]
        print(f"{n} iterations in {time.monotonic() - start:.0f}s; rss {rss0} -> {rss1} KiB")
        for k, v in sorted(notes.items()):
            print(f"  {v:5d} {k}")
        assert not thread_errors, thread_errors
        assert not threads, f"threads left: {threads}"
        assert not fds, f"fds left: {fds}"
        assert rss1 - rss0 < 64 * 1024, f"RSS grew {rss0} -> {rss1} KiB"
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
