"""The remote backend on real processes on 127.0.0.1, side by side in one run (LiteMedSAM, the default engine, on
Colin27):

1. a click's round trip — a 2D point prompt on a slice whose embedding is cached, and a 3D click correction on an
   object the backend holds — in this process (:class:`SegmentWithSAMLib.engine.Engine`), through a backend
   process of its own (pipes), a server over TCP, over TLS, and over TLS through a proxy that holds every chunk
   ``--delay-ms`` each way (a network path); the clicks interleaved, each kind in turn, after one warm-up, with
   ``--pause-ms`` before each;
2. the bytes of a click (the client's count of its frames; on the wire too through the proxy, TLS included) and of
   a session's first request (the volume goes once per session);
3. clicks per second with 1, 2 and 4 clients clicking at once on one server, each in a session of its own; and
   whether a click waits behind another client's propagation: 3 clients click while a 4th propagates through
   ``--slices`` slices that have to be encoded.

    python benchmarks/remote.py [--clicks 20] [--slices 30] [--delay-ms 20] [--pause-ms 100] [--device cpu] [--json]

Backends and servers run without prefetch, so nothing encodes in the background of what is timed. Writes
results/remote.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import SegmentWithSAMLib
from SegmentWithSAMLib.actions import Box3D, Click, Prompt, Propagate, UserEdit
from SegmentWithSAMLib.backend.client import BackendClient
from SegmentWithSAMLib.backend.protocol import KEY_ENV, LISTENING
from SegmentWithSAMLib.cache import EmbeddingCache
from SegmentWithSAMLib.engine import Engine
from SegmentWithSAMLib.errors import BackendError
from SegmentWithSAMLib.geometry import slice_axes
from SegmentWithSAMLib.loading import configure_process_threads, load_model
from SegmentWithSAMLib.propagation import StopRules
from SegmentWithSAMLib.session import Session

from common import load_colin27, print_table, structure_slices, tight_box, write_json

VIEW = "axial"
HALF = 3  # the 3D box of the click measure spans 7 slices
THROUGH = StopRules(None, None, None, None, 0)  # a propagation through every slice of its range
LIB_PARENT = str(Path(SegmentWithSAMLib.__file__).resolve().parents[1])
KINDS = ("in-process", "pipe", "tcp", "tls", "tls+delay")


class Server:
    """A `segmentwithsam serve` process on a free port of 127.0.0.1; ``address`` is what it printed."""

    def __init__(self, folder: Path, key: str, device: str | None, *args: str) -> None:
        # --watch-stdin: the server ends when this process does (its stdin closes), even if this one is killed
        command = [sys.executable, "-m", "SegmentWithSAMLib.backend.server", "--host", "127.0.0.1", "--port", "0",
                   "--prefetch", "0", "--watch-stdin", *(["--device", device] if device else []), *args]
        with open(folder / f"server-{time.monotonic_ns()}.log", "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            env={**os.environ, "PYTHONPATH": LIB_PARENT, KEY_ENV: key})
        found = LISTENING.match(self.process.stdout.readline().decode())
        if not found:
            self.close()
            raise RuntimeError(f"the server did not start: see {log.name}")
        self.port = int(found[3])
        self.address = f"{found[1]}://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


class DelayProxy:
    """A TCP relay on 127.0.0.1 to ``port`` that passes every chunk on ``delay_s`` after it arrived, each way (the
    latency of a network path, no bandwidth limit); ``bytes`` counts what went up (client → server) and down."""

    def __init__(self, port: int, delay_s: float) -> None:
        self.target, self.delay_s = port, delay_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.bytes = {"up": 0, "down": 0}
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target))
            for sock in (inbound, outbound):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for source, sink, way in ((inbound, outbound, "up"), (outbound, inbound, "down")):
                held: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=self._read, args=(source, held, way), daemon=True).start()
                threading.Thread(target=self._write, args=(held, sink), daemon=True).start()

    def _read(self, source: socket.socket, held: queue.SimpleQueue, way: str) -> None:
        try:
            while data := source.recv(1 << 16):
                self.bytes[way] += len(data)  # one reader thread per way and connection; one connection here
                held.put((time.monotonic() + self.delay_s, data))
        except OSError:
            pass
        held.put(None)

    @staticmethod
    def _write(held: queue.SimpleQueue, sink: socket.socket) -> None:
        while (item := held.get()) is not None:
            due, data = item
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                sink.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def _certificates(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (with its key) and the CA that signed it."""
    import trustme

    ca = trustme.CA()
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(folder / "server.pem")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    return folder / "server.pem", folder / "ca.pem"


def _pixels(mask: np.ndarray, count: int, seed: int) -> list[tuple[float, float]]:
    """``count`` pixels (x, y) = (col, row) of ``mask``, spread over it."""
    rows, cols = np.nonzero(mask)
    picks = (np.arange(count) * 7919 + seed) % len(rows)
    return [(float(cols[p]), float(rows[p])) for p in picks]


def _summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90)),
            "max_ms": max(times), "count": len(times)}


def _same(a, b) -> bool:
    return sorted(a.masks) == sorted(b.masks) and a.kinds == b.kinds and all(
        np.array_equal(a.masks[i], b.masks[i]) for i in a.masks)


class Clicker:
    """One kind of client: ``step(key, action)`` applies the action to the state it holds of object ``key`` and
    returns the milliseconds from the request to the mask and those of the engine's step within them (timed
    where it ran), with the bytes of the request and its reply (and on the wire, through ``proxy``)."""

    def __init__(self, volume, view: str = VIEW, engine: Engine | None = None, client: BackendClient | None = None,
                 proxy: DelayProxy | None = None) -> None:
        self.volume, self.view, self.engine, self.client, self.proxy = volume, view, engine, client, proxy
        self.states: dict = {}

    def step(self, key: str, action, timeout: float = 600) -> dict:
        wire = dict(self.proxy.bytes) if self.proxy else None
        start = time.perf_counter()
        if self.client is None:
            self.states[key], update = self.engine.step(self.states.get(key), action)
            sent = received = 0
        else:
            handle = self.client.step(self.volume, self.view, key, self.states.get(key), action)
            self.states[key], update = self.client.wait(handle, timeout)
            sent, received = handle.sent, handle.received
        row = {"ms": (time.perf_counter() - start) * 1e3, "engine_ms": update.seconds * 1e3, "sent": sent,
               "received": received, "changed": len(update.changed)}
        if wire is not None:
            row.update({f"wire_{way}": self.proxy.bytes[way] - wire[way] for way in wire})
        return row


def round_trips(clickers: dict[str, Clicker], index: int, truth: np.ndarray, clicks: int, pause_s: float) -> dict:
    """2D point prompts on the cached slice ``index`` and 3D clicks inside the 7-slice object, the kinds of client
    in turn (the order rotated each round), after one warm-up of each, ``pause_s`` before each click (a user's
    pause, short; without it a click started while the process before still had the cores). The 3D clicks are
    chosen on the in-process object and given to every kind alike, so each does the same work as long as their
    masks agree."""
    box = tuple(float(v) for v in tight_box(truth))
    order = list(clickers)
    local = clickers["in-process"]
    prompts = [Prompt(index, box, ((x, y, True),)) for x, y in _pixels(truth, clicks + 1, seed=11)]
    results: dict = {"2d": {kind: [] for kind in order}, "3d": {kind: [] for kind in order}}
    same = {"2d": dict.fromkeys(order, True), "3d": dict.fromkeys(order, True)}
    around = [i for i in range(index - HALF, index + HALF + 1) if i != index]
    for n in range(clicks + 1):
        turn = order[n % len(order):] + order[: n % len(order)]
        for kind in turn:  # the 2D prompt: the object "2d" of each client
            time.sleep(pause_s)
            row = clickers[kind].step("2d", prompts[n])
            if n:
                results["2d"][kind].append(row)
        for kind in order:
            same["2d"][kind] &= _same(clickers[kind].states["2d"], local.states["2d"])
        masks = local.states["3d"].masks
        target = [i for i in around if masks.get(i) is not None and masks[i].any()]
        slice_index = target[n % len(target)]
        click = Click(slice_index, _pixels(masks[slice_index], 1, seed=n * 104729)[0], positive=True)
        for kind in turn:
            time.sleep(pause_s)
            row = clickers[kind].step("3d", click)
            if n:
                results["3d"][kind].append(row)
        for kind in order:
            same["3d"][kind] &= _same(clickers[kind].states["3d"], local.states["3d"])
    summary = {}
    for what, per_kind in results.items():
        base = [r["ms"] for r in per_kind["in-process"]]
        summary[what] = {}
        for kind, rows in per_kind.items():
            times = [r["ms"] for r in rows]
            entry = {**_summary(times), "overhead_ms": statistics.median(np.subtract(times, base)),
                     "outside_engine_ms": statistics.median(r["ms"] - r["engine_ms"] for r in rows),
                     "engine_ms": statistics.median(r["engine_ms"] for r in rows),
                     "ratio": statistics.median(times) / statistics.median(base),
                     "sent": statistics.median(r["sent"] for r in rows),
                     "received": statistics.median(r["received"] for r in rows),
                     "changed_slices": statistics.median(r["changed"] for r in rows),
                     "same_masks_as_in_process": same[what][kind], "times_ms": times}
            if "wire_up" in rows[0]:
                entry.update(wire_up=statistics.median(r["wire_up"] for r in rows),
                             wire_down=statistics.median(r["wire_down"] for r in rows))
            summary[what][kind] = entry
    return summary


def start_session(clicker: Clicker, box3d: Box3D, prompt: Prompt, connect=None, tries: int = 3) -> dict:
    """The volume and the 3D box, then a first 2D prompt: the bytes of each request (and, through the proxy, on
    the wire). A connection that fails meanwhile is noted and made again by ``connect()``, up to ``tries`` times."""
    failures = []
    while True:
        wire = dict(clicker.proxy.bytes) if clicker.proxy else None
        load = clicker.client.load_volume(clicker.volume) if clicker.client else None
        try:
            first = clicker.step("3d", box3d, timeout=900)
            second = clicker.step("2d", prompt)
            break
        except BackendError as error:
            failures.append(str(error))
            print(f"  failed ({len(failures)}): {error}", flush=True)
            if len(failures) >= tries:
                raise
            clicker.client.close()
            clicker.client, clicker.states = connect(), {}
    if load is None:
        return {}
    clicker.client.wait(load, 60)
    row = {"volume_sent": load.sent, "first_step_sent": first["sent"], "first_step_received": first["received"],
           "second_step_sent": second["sent"], "failed_starts": failures}
    if wire is not None:  # in TLS records: the volume and the first step, then the second step
        row["wire_up_first"] = clicker.proxy.bytes["up"] - wire["up"] - second["wire_up"]
        row["wire_up_second"] = second["wire_up"]
    return row


def clicking(clients: list[Clicker], prompts: list[Prompt], until: threading.Event | None = None) -> dict:
    """Every client clicks ``prompts`` one after the other, all at once from threads (with ``until``, each stops
    early once it is set): each click's (start, milliseconds) per client, and the wall time in seconds."""
    start_line = threading.Barrier(len(clients) + 1)
    log: list[list[tuple[float, float]]] = [[] for _ in clients]

    def run(n: int) -> None:
        start_line.wait()
        for prompt in prompts:
            if until is not None and until.is_set():
                return
            began = time.perf_counter()
            log[n].append((began, clients[n].step("2d", prompt)["ms"]))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(clients))]
    for thread in threads:
        thread.start()
    start_line.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return {"log": log, "wall_s": time.perf_counter() - began}


def throughput(clients: list[Clicker], prompts: list[Prompt]) -> dict:
    """Clicks per second with the first 1, 2 and 4 ``clients`` clicking at once, and each one's median latency."""
    results = {}
    for count in (1, 2, 4):
        run = clicking(clients[:count], prompts)
        clicks = sum(len(per) for per in run["log"])
        results[count] = {"clicks_per_s": clicks / run["wall_s"],
                          "client_median_ms": [statistics.median(ms for _, ms in per) for per in run["log"]],
                          "client_p90_ms": [float(np.percentile([ms for _, ms in per], 90)) for per in run["log"]]}
    return results


def followed(clicker: Clicker, key: str, state, action, progress: list) -> object:
    """Run the long ``action`` on ``clicker``'s backend, noting (when, slices done) in ``progress`` at its start,
    as its slices arrive and at its end; returns its update."""
    client = clicker.client
    handle = client.step(clicker.volume, clicker.view, key, state, action)
    progress.append((time.perf_counter(), 0))
    while not handle.done:
        client.poll()
        if handle.progress and handle.progress[0] != progress[-1][1]:
            progress.append((time.perf_counter(), handle.progress[0]))
        time.sleep(0.005)
    progress.append((time.perf_counter(), progress[-1][1]))
    return client.wait(handle, 0)[1]


def fairness(propagator: Clicker, clickers: list[Clicker], prompts: list[Prompt], seed: dict[int, np.ndarray],
             middle: int, slices: int) -> dict:
    """The clickers' latency alone; ``propagator``'s propagation through ``slices`` slices never encoded before,
    alone (up from ``middle``), then again (down, as many slices) while the clickers click ``prompts`` back to back
    from its start: their latency, and how many slices it made meanwhile."""
    alone = clicking(clickers, prompts)
    propagator.step("brain", UserEdit(seed))
    seeded = propagator.states["brain"]
    solo: list = []
    up = followed(propagator, "brain", seeded, Propagate(middle, "up", (middle, middle + slices), THROUGH), solo)
    slice_ms = np.diff([when for when, _ in solo[1:-1]]) * 1e3  # between two slices' arrivals
    progress: list = []
    result: dict = {}
    done = threading.Event()

    def propagate() -> None:
        try:
            result["update"] = followed(propagator, "brain", seeded,
                                        Propagate(middle, "down", (middle - slices, middle), THROUGH), progress)
        except Exception as error:  # raised again below, once the clickers stopped
            result["error"] = error
        done.set()

    thread = threading.Thread(target=propagate)
    thread.start()
    while not progress and not done.is_set():  # the propagation is asked for first
        time.sleep(0.001)
    during = clicking(clickers, prompts, until=done)
    clicked = time.perf_counter()
    thread.join()
    if "error" in result:
        raise result["error"]
    began, ended = progress[0][0], progress[-1][0]
    times = [(start - began, ms) for per in during["log"] for start, ms in per if start < ended]
    longest = max(times, key=lambda t: t[1])
    return {"clicks_alone": _summary([ms for per in alone["log"] for _, ms in per]),
            "clicks_during": {**_summary([ms for _, ms in times]), "longest_started_s": longest[0]},
            "propagation_alone": {"ms": (solo[-1][0] - solo[0][0]) * 1e3, "slices": len(up.changed),
                                  "ms_per_slice": (solo[-1][0] - solo[0][0]) * 1e3 / len(up.changed),
                                  "slice_ms_median": float(np.median(slice_ms)), "slice_ms_max": float(slice_ms.max())},
            "propagation_with_clicks": {"ms": (ended - began) * 1e3, "slices": len(result["update"].changed),
                                        "ms_per_slice": (ended - began) * 1e3 / len(result["update"].changed),
                                        "clicking_ms": (min(clicked, ended) - began) * 1e3,
                                        "slices_while_clicking": max(n for when, n in progress if when <= clicked)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=20, help="clicks timed per kind of client and per measure")
    parser.add_argument("--slices", type=int, default=30, help="slices of the long propagation (fairness)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="the proxy's delay, one way, each direction")
    parser.add_argument("--pause-ms", type=float, default=100.0, help="pause before each timed round-trip click")
    parser.add_argument("--device", default=None, help="the model's device everywhere (default: auto)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    volume, atlas = load_colin27()
    model = load_model("litemedsam", args.device)
    configure_process_threads(model)  # this script is the process's entry point, as a server's is its own
    engine = Engine(Session(volume, model, cache=EmbeddingCache()), VIEW)
    _, index, truth = next(structure_slices(atlas, engine.axes, {"Putamen_L": 73}))
    box = tuple(float(v) for v in tight_box(truth))
    box3d = Box3D(index, box, (index - HALF, index + HALF))
    first_prompt = Prompt(index, box, (_pixels(truth, 1, seed=3)[0] + (True,),))
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        cafile = str(_certificates(Path(folder))[1])
        plain = Server(Path(folder), key, args.device)
        stack.callback(plain.close)
        tls = Server(Path(folder), key, args.device, "--certfile", str(Path(folder) / "server.pem"))
        stack.callback(tls.close)
        proxy = DelayProxy(tls.port, args.delay_ms / 1e3)
        stack.callback(proxy.close)
        connect = {"pipe": lambda: BackendClient(device=args.device, prefetch=0),
                   "tcp": lambda: BackendClient(server=plain.address, key=key),
                   "tls": lambda: BackendClient(server=tls.address, key=key, cafile=cafile),
                   "tls+delay": lambda: BackendClient(server=f"tls://127.0.0.1:{proxy.port}", key=key, cafile=cafile)}
        clickers = {"in-process": Clicker(volume, engine=engine)}
        for kind, make in connect.items():
            clickers[kind] = Clicker(volume, client=make(), proxy=proxy if kind == "tls+delay" else None)
            stack.callback(lambda c=clickers[kind]: c.client.close())  # the client it holds at the end
        print("each client's first requests (the volume; a 3D box over 7 slices, encoded once per process)",
              flush=True)
        sessions = {kind: start_session(c, box3d, first_prompt, connect.get(kind)) for kind, c in clickers.items()}
        print(f"round trips: {args.clicks} clicks of each kind, {len(clickers)} kinds of client", flush=True)
        clicks = round_trips(clickers, index, truth, args.clicks, args.pause_ms / 1e3)
        for kind in ("pipe", "tls", "tls+delay"):
            clickers[kind].client.close()
        tls.close()  # what follows runs on the TCP server alone

        print("throughput and fairness on the TCP server", flush=True)
        many = [Clicker(volume, client=BackendClient(server=plain.address, key=key)) for _ in range(4)]
        for clicker in many:
            stack.callback(clicker.client.close)
            clicker.step("2d", first_prompt, timeout=900)  # the volume, and the slice's first click, before timing
        prompts = [Prompt(index, box, ((x, y, True),)) for x, y in _pixels(truth, args.clicks, seed=5)]
        rates = throughput(many, prompts)
        print(f"fairness: 3 clients clicking while a 4th propagates through {args.slices} slices", flush=True)
        coronal = slice_axes(volume, "coronal")
        middle = coronal.num_slices // 2
        many[0].view = "coronal"  # slices no one encoded yet
        fair = fairness(many[0], many[1:], prompts, {middle: coronal.oriented(atlas.array > 0)[middle]}, middle,
                        args.slices)

    report(clicks, sessions, rates, fair, args)


def report(clicks: dict, sessions: dict, rates: dict, fair: dict, args) -> None:
    names = {"2d": "2D point prompt (cached slice)", "3d": "3D click correction"}
    rows = []
    for what, per_kind in clicks.items():
        for kind, r in per_kind.items():
            rows.append([names[what], kind, f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}",
                         f"{r['engine_ms']:.1f}", f"{r['outside_engine_ms']:.1f}",
                         "" if kind == "in-process" else f"{r['overhead_ms']:+.1f}",
                         "" if kind == "in-process" else f"×{r['ratio']:.2f}",
                         "" if kind == "in-process" else f"{r['sent']:.0f} / {r['received']:.0f}",
                         "yes" if r["same_masks_as_in_process"] else "NO"])
    print(f"\nClick round trip, LiteMedSAM on Colin27 ({args.clicks} clicks each, after one warm-up, "
          f"{args.pause_ms:g} ms pause before each; proxy delay {args.delay_ms:g} ms each way):\n")
    print_table(["click", "client", "median ms", "p90 ms", "engine step ms", "outside the engine ms",
                 "vs in-process (median of pairs) ms", "ratio", "bytes sent / received", "same masks"], rows)
    print("\n(outside the engine: each click's round trip less its engine step as the process that ran it timed "
          "it: framing, transport, the server's queue and the client's own work; medians)")
    rows = []
    for kind, s in sessions.items():
        if s:
            rows.append([kind, s["volume_sent"], f"{s['first_step_sent']} / {s['first_step_received']}",
                         s["second_step_sent"], s.get("wire_up_first", ""), s.get("wire_up_second", "")])
    print("\nA session's first requests (the volume, once per session, and a 3D box over 7 slices; then a 2D point "
          "prompt), in bytes:\n")
    print_table(["client", "volume sent", "3D box sent / received", "then 2D prompt sent",
                 "on the wire up (TLS, proxy): volume + 3D box", "then 2D prompt"], rows)
    for kind, s in sessions.items():
        for failure in s.get("failed_starts", []):
            print(f"{kind}: a first request failed and was made again on a new connection: {failure}")
    wire = {what: per_kind["tls+delay"] for what, per_kind in clicks.items()}
    print("\nThrough the proxy, on the wire (TLS records; down includes the server's heartbeats, 4 per second): "
          + "; ".join(f"{names[w]} {r['wire_up']:.0f} up / {r['wire_down']:.0f} down per click against "
                      f"{r['sent']:.0f} / {r['received']:.0f} in frames" for w, r in wire.items()))
    one = rates[1]["clicks_per_s"]
    rows = [[count, f"{r['clicks_per_s']:.1f}", f"×{r['clicks_per_s'] / one:.2f}",
             " / ".join(f"{ms:.0f}" for ms in r["client_median_ms"]),
             " / ".join(f"{ms:.0f}" for ms in r["client_p90_ms"])] for count, r in rates.items()]
    print("\nClients clicking at once on one TCP server (2D point prompts, each client its own session):\n")
    print_table(["clients", "clicks/s (all)", "vs 1 client", "median ms per client", "p90 ms per client"], rows)
    a, d = fair["clicks_alone"], fair["clicks_during"]
    pa, pw = fair["propagation_alone"], fair["propagation_with_clicks"]
    rows = [["3 clients clicking, nothing else", f"{a['median_ms']:.0f}", f"{a['p90_ms']:.0f}", f"{a['max_ms']:.0f}",
             a["count"]],
            [f"… while a 4th propagates through {pw['slices']} slices", f"{d['median_ms']:.0f}",
             f"{d['p90_ms']:.0f}", f"{d['max_ms']:.0f}", d["count"]]]
    print("\nFairness: the other clients' clicks during a long propagation:\n")
    print_table(["clients' 2D clicks", "median ms", "p90 ms", "max ms", "clicks"], rows)
    expected = pw["clicking_ms"] / pa["ms_per_slice"]
    print(f"\npropagation alone: {pa['slices']} slices in {pa['ms'] / 1e3:.1f} s (between two slices: median "
          f"{pa['slice_ms_median']:.0f} ms, longest {pa['slice_ms_max']:.0f} ms); with the 3 clients clicking from "
          f"its start: {pw['slices']} slices in {pw['ms'] / 1e3:.1f} s, {pw['slices_while_clicking']} of them in the "
          f"{pw['clicking_ms'] / 1e3:.1f} s they clicked (alone: {expected:.1f}). Longest click meanwhile: "
          f"{d['max_ms'] / pa['slice_ms_median']:.2f} median slice-times, started {d['longest_started_s']:.1f} s "
          f"after the propagation; {d['max_ms'] / pw['ms']:.3f} of the propagation.")
    write_json("remote", {"device": args.device or "auto", "delay_ms_each_way": args.delay_ms,
                          "pause_ms": args.pause_ms, "clicks": clicks,
                          "session_start": sessions, "throughput": rates, "fairness": fair}, one_line=args.json)


if __name__ == "__main__":
    main()
