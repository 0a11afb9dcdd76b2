#!/usr/bin/env python3
"""Issue 17's hostile scenarios, rerun against real processes: does money leak, can a client starve the server?

Starts the fake upstream (`fake-openai`) behind a counting proxy (which sees every image the upstream
sends, so "images the upstream made" is measured outside imagegate) and `imagegate serve` on a fresh
database (SQLite; PostgreSQL too with --postgres), runs each scenario, reads the ledger, and prints one
line per check with its figures and PASS/FAIL against the issue's acceptance ("0 free images, 0 overspend,
input tokens billed once, bounded memory and a responsive /health"). Each scenario starts its own
processes and database and stops them when done; the whole run takes a few minutes.

    cargo build -p imagegate -p fake-openai --bins
    scripts/hostile.py [--bin-dir DIR] [--postgres postgres://postgres@127.0.0.1:5432/postgres] [--only 1,3,fuzz]

Scenarios (numbers as in issue 17): 1 abandoned n=10 streams, 2 abandoned slow requests, 3 holds under a
short TTL (stalled stream, long stream, bursts; two instances on PostgreSQL), 4 input billed once, 5
displayed = charged cost, 6 estimates vs /health, 7 image bombs, 8 slowloris (and slow readers), 9 kill -9
with an Idempotency-Key, 10 estimate overflow, 11 point 12's small items, 12 JSON bodies at the size
limit, fuzz (~200 malformed requests). --postgres (or IMAGEGATE_TEST_DATABASE_URL) names a PostgreSQL
whose user may CREATE DATABASE; each scenario that uses it makes a database of its own and drops it.
Exit status 1 when any check fails.

Only the Python standard library (and `psql` for PostgreSQL).
"""

import argparse
import base64
import csv
import http.client
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "hostile-upstream-key"
MODEL = "gpt-image-1-mini"
NANO = Decimal("0.000000001")

# ---------------------------------------------------------------------------------------------------
# Results


class Check:
    def __init__(self, scenario: str, name: str, verdict: str, figures: str):
        self.scenario, self.name, self.verdict, self.figures = scenario, name, verdict, figures


RESULTS: list[Check] = []


def record(scenario: str, name: str, ok, figures: str) -> None:
    """ok: True (PASS), False (FAIL), or a verdict string (SKIP, INFO, ERROR)."""
    verdict = ok if isinstance(ok, str) else ("PASS" if ok else "FAIL")
    RESULTS.append(Check(scenario, name, verdict, figures))
    print(f"  [{verdict}] {scenario} {name}: {figures}", flush=True)


def usd(d) -> str:
    return f"${Decimal(d).normalize():f}" if d is not None else "-"


def nanos_usd(n) -> Decimal:
    return Decimal(int(n or 0)) * NANO


# ---------------------------------------------------------------------------------------------------
# HTTP


class Resp:
    def __init__(self, status: int, headers: dict, body: bytes, elapsed: float):
        self.status, self.headers, self.body, self.elapsed = status, headers, body, elapsed

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def header(self, name: str):
        return self.headers.get(name.lower())

    def error(self) -> dict:
        j = self.json()
        return j.get("error", {}) if isinstance(j, dict) and isinstance(j.get("error"), dict) else {}

    def cost(self):
        c = self.header("x-imagegate-cost-usd")
        return Decimal(c) if c is not None else None


def split_url(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname, u.port


def request(base: str, method: str, path: str, body=None, key=None, headers=None, timeout=60.0) -> Resp:
    host, port = split_url(base)
    hdrs = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.monotonic() - started)
    finally:
        conn.close()


def gen(prompt: str, **fields) -> dict:
    return {"model": MODEL, "prompt": prompt, "quality": "low", "size": "1024x1024", **fields}


class Stream:
    """A streamed generation read event by event; `close` hangs up (unread data: the kernel resets)."""

    def __init__(self, base: str, key, body: dict, headers=None, rcvbuf=None, timeout=60.0):
        host, port = split_url(base)
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((host, port))
        self.conn.sock = sock
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if key:
            hdrs["Authorization"] = f"Bearer {key}"
        self.conn.request("POST", "/v1/images/generations", body=json.dumps(body).encode(), headers=hdrs)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.completed = []  # the `imagegate.cost_usd` of each completed event (None without one)
        self.events = 0
        self.error = None
        if self.status != 200:
            self.body = self.resp.read()

    def next_event(self):
        """(event name, data) or None at the end of the stream."""
        name, data = None, []
        while True:
            line = self.resp.readline()
            if not line:
                return None
            line = line.rstrip(b"\r\n")
            if not line:
                if name or data:
                    break
                continue
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
        payload = json.loads(b"\n".join(data)) if data else None
        self.events += 1
        if name and name.endswith(".completed"):
            cost = (payload or {}).get("imagegate", {}).get("cost_usd")
            self.completed.append(Decimal(cost) if cost is not None else None)
        elif name == "error":
            self.error = payload
        return name, payload

    def read_completed(self, count: int) -> int:
        while len(self.completed) < count:
            if self.next_event() is None:
                break
        return len(self.completed)

    def read_all(self) -> None:
        while self.next_event() is not None:
            pass

    def close(self) -> None:
        try:
            self.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.conn.close()
        self.resp.close()


def raw_exchange(base: str, data: bytes, timeout=10.0) -> tuple[int | None, bytes, bytes]:
    """Sends raw bytes and reads until the server closes: (status, headers, body)."""
    host, port = split_url(base)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except OSError:
            pass
    head, _, body = out.partition(b"\r\n\r\n")
    while re.match(rb"HTTP/1\.[01] 1\d\d", head):  # an interim answer (100 Continue): the real one follows
        head, _, body = body.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(m.group(1)) if m else None), head, body


class HealthProbe:
    """GET /health every `interval` s on a fresh connection, recording each latency (a timeout counts
    as its full wait)."""

    def __init__(self, base: str, interval=0.05, timeout=30.0):
        self.base, self.interval, self.timeout = base, interval, timeout
        self.latencies, self.failures = [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                r = request(self.base, "GET", "/health", timeout=self.timeout)
                ok = r.status == 200
            except OSError:
                ok = False
            self.latencies.append(time.monotonic() - started)
            if not ok:
                self.failures += 1
            self._stop.wait(self.interval)

    def summary(self) -> str:
        if not self.latencies:
            return "/health: no probe"
        lat = sorted(self.latencies)
        return (f"/health {len(lat)} probes, median {lat[len(lat) // 2] * 1000:.0f} ms, "
                f"max {lat[-1] * 1000:.0f} ms, {self.failures} failed")

    def max(self) -> float:
        return max(self.latencies, default=0.0)


# ---------------------------------------------------------------------------------------------------
# The counting proxy between imagegate and the fake upstream


class ResponseScanner:
    """Parses one HTTP/1.1 response as its bytes pass (status, headers, chunked or not) and counts the
    images in its body: completed events of an event stream, `b64_json` of a JSON answer."""

    def __init__(self):
        self.head = b""
        self.in_body = False
        self.status = None
        self.markers = []
        self.images = 0
        self.chunked = False
        self.state = "size"
        self.size_line = b""
        self.left = 0
        self.tail = b""

    def feed(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            self.in_body = True
            lines = head.split(b"\r\n")
            m = re.match(rb"HTTP/1\.[01] (\d{3})", lines[0])
            self.status = int(m.group(1)) if m else None
            hdrs = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                hdrs[k.strip().lower()] = v.strip().lower()
            self.chunked = b"chunked" in hdrs.get(b"transfer-encoding", b"")
            if self.status == 200:
                if b"event-stream" in hdrs.get(b"content-type", b""):
                    self.markers = [b"event: image_generation.completed", b"event: image_edit.completed"]
                else:
                    self.markers = [b'"b64_json"']
        if self.chunked:
            self._dechunk(data)
        else:
            self._body(data)

    def _dechunk(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self.state == "size":
                j = data.find(b"\n", i)
                if j < 0:
                    self.size_line += data[i:]
                    return
                line = (self.size_line + data[i:j]).strip()
                self.size_line = b""
                i = j + 1
                try:
                    self.left = int(line.split(b";")[0], 16)
                except ValueError:
                    self.state = "done"
                    return
                self.state = "data" if self.left else "done"
            elif self.state == "data":
                take = data[i:i + self.left]
                self._body(take)
                self.left -= len(take)
                i += len(take)
                if self.left == 0:
                    self.state = "crlf"
            elif self.state == "crlf":
                j = data.find(b"\n", i)
                if j < 0:
                    return
                i = j + 1
                self.state = "size"
            else:
                return

    def _body(self, data: bytes) -> None:
        if not self.markers:
            return
        text = self.tail + data
        keep = max(len(m) for m in self.markers) - 1
        for m in self.markers:
            self.images += text.count(m)
        # A marker could straddle two reads: keep the last bytes, counted only once.
        self.tail = text[-keep:] if len(text) > keep else text
        for m in self.markers:
            self.images -= self.tail.count(m)


class CountingProxy:
    """A TCP proxy in front of the fake upstream. Each request is sent with `Connection: close` (one
    response per connection, so each can be parsed alone); what crosses is forwarded unchanged.
    Counts the images the upstream sent and records what reached it (authorization, body fields)."""

    OPENAI_FIELDS = {"model", "prompt", "n", "quality", "size", "background", "moderation", "output_format",
                     "output_compression", "partial_images", "stream", "response_format", "style", "user",
                     "input_fidelity", "image", "image[]", "mask", "images"}

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.lock = threading.Lock()
        self.images = 0
        self.requests = 0
        self.bad_auth = []
        self.extra_fields = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket):
        up = None
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = client.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            hdrs = {}
            kept = [lines[0]]
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                hdrs[k.strip().lower()] = v.strip()
                if k.strip().lower() != b"connection":
                    kept.append(line)
            auth = hdrs.get(b"authorization", b"").decode(errors="replace")
            with self.lock:
                self.requests += 1
                if auth != f"Bearer {UPSTREAM_KEY}":
                    self.bad_auth.append(auth[:40])
            up = socket.create_connection(self.target)
            up.sendall(b"\r\n".join(kept) + b"\r\nConnection: close\r\n\r\n" + rest)
            body = bytearray(rest)
            ctype = hdrs.get(b"content-type", b"")
            length = int(hdrs.get(b"content-length", b"0") or 0)
            done = threading.Event()

            def downstream():
                scanner = ResponseScanner()
                counted = 0
                try:
                    while True:
                        data = up.recv(262144)
                        if not data:
                            break
                        scanner.feed(data)
                        with self.lock:  # counted as they arrive, not when the response ends
                            self.images += scanner.images - counted
                        counted = scanner.images
                        try:
                            client.sendall(data)
                        except OSError:
                            break
                finally:
                    with self.lock:
                        self.images += scanner.images - counted
                    done.set()
                    for s in (client, up):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass

            threading.Thread(target=downstream, daemon=True).start()
            while len(body) < length:
                data = client.recv(262144)
                if not data:
                    break
                if len(body) < (4 << 20):
                    body += data
                up.sendall(data)
            self._inspect(ctype, bytes(body))
            done.wait(900)
        except OSError:
            pass
        finally:
            for s in (client, up):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    def _inspect(self, ctype: bytes, body: bytes):
        fields = set()
        if b"json" in ctype:
            try:
                fields = set(json.loads(body))
            except ValueError:
                pass
        elif b"multipart" in ctype:
            fields = {m.decode(errors="replace") for m in re.findall(rb'; name="([^"]+)"', body[:1 << 20])}
        with self.lock:
            self.extra_fields |= fields - self.OPENAI_FIELDS

    def made(self) -> int:
        with self.lock:
            return self.images


# ---------------------------------------------------------------------------------------------------
# Processes, databases, keys


class Harness:
    """What one scenario started: processes, databases, files. `close` stops and removes them all."""

    def __init__(self, args, name: str):
        self.args = args
        self.bin = args.bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix=f"imagegate-hostile-{name}-", dir=args.work_dir))
        self.procs = []
        self.proxies = []
        self.dbs = []
        self.logs = []

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for proxy in self.proxies:
            proxy.close()
        for db in self.dbs:
            db.drop()
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def panics(self) -> list[str]:
        """Lines of the server logs that report a panic."""
        found = []
        for log in self.logs:
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            found += [line.strip()[:200] for line in text.splitlines() if "panicked" in line or "RUST_BACKTRACE" in line]
        return found

    # The upstream --------------------------------------------------------------------------------

    def upstream(self, proxied=True):
        """The fake upstream (behind a counting proxy): (base URL for imagegate, proxy or None)."""
        p = subprocess.Popen([str(self.bin / "fake-openai"), "--listen", "127.0.0.1:0", "--api-key", UPSTREAM_KEY],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        line = p.stdout.readline().decode().strip()
        if not line.startswith("listening on http://"):
            raise RuntimeError(f"fake-openai did not start: {line!r}")
        url = line.removeprefix("listening on ")
        if not proxied:
            return url, None
        proxy = CountingProxy(split_url(url))
        self.proxies.append(proxy)
        return proxy.url, proxy

    # Databases -----------------------------------------------------------------------------------

    def database(self, backend: str):
        db = Sqlite(self.dir / f"ledger-{len(self.dbs)}.db") if backend == "sqlite" else Postgres(self.args.postgres)
        self.dbs.append(db)
        return db

    # imagegate -----------------------------------------------------------------------------------

    def env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGATE_", "OPENAI_", "_RJEM"))}
        env.update(OPENAI_API_KEY=UPSTREAM_KEY, RUST_LOG="info", NO_COLOR="1")
        return env

    def cli(self, db, *args: str, check=True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / "imagegate"), *args, "--data-dir", str(self.dir), "--database-url", db.url]
        out = subprocess.run(cmd, capture_output=True, env=self.env(), timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {out.stderr.decode(errors='replace')[-400:]}")
        return out

    def key(self, db, name: str, budget=None, *extra: str) -> tuple[str, str]:
        """(secret, key id) of a new key; `budget` in USD, over the whole life of the key."""
        args = ["keys", "create", f"--name={name}"]
        if budget is not None:
            args += ["--budget-usd", f"{Decimal(budget):f}", "--period", "total"]
        out = self.cli(db, *args, *extra).stdout.decode().strip().splitlines()
        key_id = next(line.split()[1] for line in out if line.startswith("id:"))
        return out[-1].strip(), key_id

    def serve(self, db, upstream: str, *, timeout_secs=30, ttl=None, extra=(), port=None, wait=True):
        port = port or free_port()
        config = self.dir / f"imagegate-{port}.toml"
        config.write_text(
            f'[providers.openai]\nbase_url = "{upstream}/v1"\napi_key_env = "OPENAI_API_KEY"\n'
            f'models = ["{MODEL}"]\ntimeout_secs = {timeout_secs}\nmax_retries = 0\n')
        cmd = [str(self.bin / "imagegate"), "serve", "--listen", f"127.0.0.1:{port}", "--config", str(config),
               "--data-dir", str(self.dir), "--database-url", db.url]
        if ttl is not None:
            cmd += ["--reservation-ttl-secs", str(ttl)]
        cmd += list(extra)
        log = self.dir / f"serve-{port}-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env())
        self.procs.append(p)
        server = Server(p, f"http://127.0.0.1:{port}", log)
        if wait:
            server.wait_ready()
        return server


class Server:
    def __init__(self, proc, url, log):
        self.proc, self.url, self.log = proc, url, log

    @property
    def pid(self):
        return self.proc.pid

    def wait_ready(self, limit=60.0):
        deadline = time.monotonic() + limit
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"imagegate serve exited: {self.log.read_text(errors='replace')[-600:]}")
            try:
                if request(self.url, "GET", "/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("imagegate serve did not answer /health")
            time.sleep(0.1)

    def rss_mib(self, field="VmRSS") -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sqlite:
    kind = "sqlite"

    def __init__(self, path: Path):
        self.path = path
        self.url = f"sqlite://{path}?mode=rwc"

    def query(self, sql: str, params=()) -> list[tuple]:
        import sqlite3
        if not self.path.exists():
            return []
        for attempt in range(50):
            try:
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
                try:
                    return conn.execute(sql, params).fetchall()
                finally:
                    conn.close()
            except sqlite3.OperationalError as e:
                if "no such table" in str(e) or attempt == 49:
                    if "no such table" in str(e):
                        return []
                    raise
                time.sleep(0.05)
        return []

    def drop(self):
        pass


class Postgres:
    """A database of its own, created (and dropped) with psql on the server `admin_url` names."""

    kind = "postgres"

    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.name = f"hostile_{uuid.uuid4().hex[:16]}"
        self._psql(admin_url, f"CREATE DATABASE {self.name}")
        u = urlsplit(admin_url)
        self.url = urlunsplit((u.scheme, u.netloc, f"/{self.name}", u.query, ""))

    @staticmethod
    def _psql(url: str, sql: str) -> str:
        out = subprocess.run(["psql", "-X", "-q", "-At", "-F", "\x1f", "-d", url, "-c", sql],
                             capture_output=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"psql: {out.stderr.decode(errors='replace').strip()}")
        return out.stdout.decode()

    def query(self, sql: str, params=()) -> list[tuple]:
        # Parameters are ours (ids and names this script made): quoted as SQL literals.
        for p in params:
            sql = sql.replace("?", "'" + str(p).replace("'", "''") + "'", 1)
        try:
            text = self._psql(self.url, sql)
        except RuntimeError as e:
            if "does not exist" in str(e):
                return []
            raise
        rows = []
        for line in text.splitlines():
            rows.append(tuple(None if v == "" else (int(v) if re.fullmatch(r"-?\d+", v) else v)
                              for v in line.split("\x1f")))
        return rows

    def drop(self):
        try:
            self._psql(self.admin_url, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass


# Ledger readings -----------------------------------------------------------------------------------


def ledger_rows(db, key_id: str) -> list[dict]:
    cols = ["request_id", "status", "error_code", "cost_nanos", "n", "input_text_tokens", "cost_source",
            "output_tokens"]
    rows = db.query(f"SELECT {', '.join(cols)} FROM ledger WHERE key_id = ? ORDER BY id", (key_id,))
    return [dict(zip(cols, r)) for r in rows]


def budget(db, key_id: str) -> tuple[Decimal, Decimal]:
    """(spent, reserved) of a key's budget row."""
    rows = db.query("SELECT spent_nanos, reserved_nanos FROM budget_usage WHERE scope = 'key' AND scope_id = ?",
                    (key_id,))
    if not rows:
        return Decimal(0), Decimal(0)
    return nanos_usd(rows[0][0]), nanos_usd(rows[0][1])


def holds(db, key_id: str) -> int:
    return int(db.query("SELECT COUNT(*) FROM reservations WHERE key_id = ?", (key_id,))[0][0])


def wait_settled(db, key_id: str, rows: int, limit=60.0) -> bool:
    """Waits until the key has `rows` ledger rows and no hold left."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if len(ledger_rows(db, key_id)) >= rows and holds(db, key_id) == 0:
            return True
        time.sleep(0.1)
    return False


def charged(rows: list[dict]) -> tuple[int, Decimal]:
    """(images, cost) over rows that were not refused."""
    billed = [r for r in rows if r["status"] != "refused"]
    return sum(int(r["n"] or 0) for r in billed), sum((nanos_usd(r["cost_nanos"]) for r in billed), Decimal(0))


class BudgetSampler:
    """Samples a key's spent and reserved amounts until stopped: the highest (spent / limit) and
    ((spent + reserved) / limit) seen."""

    def __init__(self, db, key_id: str, limit: Decimal, interval=0.05):
        self.db, self.key_id, self.limit, self.interval = db, key_id, limit, interval
        self.max_spent = Decimal(0)
        self.max_committed = Decimal(0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self):
        try:
            spent, reserved = budget(self.db, self.key_id)
        except Exception:  # noqa: BLE001 - a failed sample is skipped, the next one counts
            return
        self.samples += 1
        self.max_spent = max(self.max_spent, spent)
        self.max_committed = max(self.max_committed, spent + reserved)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)


def worst_case(h: Harness, db, server: Server, body: dict, path="/v1/images/generations") -> Decimal:
    """What imagegate holds for `body`, read from the refusal of a key with a $0 budget."""
    broke, _ = h.key(db, f"broke-{uuid.uuid4().hex[:6]}", 0)
    r = request(server.url, "POST", path, body, key=broke)
    m = re.search(r"could cost up to \$([0-9.]+)", r.error().get("message", ""))
    if r.status != 429 or not m:
        raise RuntimeError(f"no worst case in the refusal: {r.status} {r.body[:300]!r}")
    return Decimal(m.group(1))


# ---------------------------------------------------------------------------------------------------
# Scenarios


def backends(args) -> list[str]:
    return ["sqlite"] + (["postgres"] if args.postgres else [])


def s1_abandoned_streams(h: Harness, backend: str):
    """A key that fits one worst case of an n=10 stream; read 9 completed events, hang up; 5 attempts."""
    sc = f"1 abandoned n=10 streams [{backend}]"
    db = h.database(backend)
    up, proxy = h.upstream()
    srv = h.serve(db, up)
    body = gen("abandoned stream", n=10, stream=True)
    worst = worst_case(h, db, srv, body)
    key, key_id = h.key(db, "stream-hanger", worst)
    delivered, refused, shown = 0, 0, Decimal(0)
    for _ in range(5):
        s = Stream(srv.url, key, body)
        if s.status == 429:
            refused += 1
            continue
        if s.status != 200:
            raise RuntimeError(f"stream answered {s.status}: {s.body[:200]!r}")
        got = s.read_completed(9)
        delivered += got
        shown += sum((c for c in s.completed if c is not None), Decimal(0))
        s.close()
    admitted = 5 - refused
    settled = wait_settled(db, key_id, 5)
    rows = ledger_rows(db, key_id)
    images, cost = charged(rows)
    spent, reserved = budget(db, key_id)
    made = proxy.made()
    codes = sorted({str(r["error_code"]) for r in rows if r["status"] != "refused"})
    figures = (f"attempts 5: {admitted} admitted, {refused} refused; images delivered {delivered}, charged {images}, "
               f"upstream made {made}; free {max(0, delivered - images)}; spent {usd(spent)} of budget {usd(worst)} "
               f"(ledger sum {usd(cost)}, shown in events {usd(shown)}); rows {codes}"
               + ("" if settled else "; NOT SETTLED (holds left)"))
    ok = (settled and delivered <= images and images == made and spent <= worst and spent == cost
          and reserved == 0 and refused == 4)
    record(sc, "0 free images, 0 overspend", ok, figures)


def s2_abandoned_requests(h: Harness, backend: str):
    """Ten slow non-stream requests abandoned after 0.5 s, then the same ten read to the end."""
    sc = f"2 abandoned requests [{backend}]"
    db = h.database(backend)
    up, proxy = h.upstream()
    srv = h.serve(db, up)
    key, key_id = h.key(db, "hanger", 10)
    body = gen("[fault:slow=1500] abandoned request")

    def hang_up():
        try:
            request(srv.url, "POST", "/v1/images/generations", body, key=key, timeout=0.5)
        except OSError:
            pass

    threads = [threading.Thread(target=hang_up) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    settled = wait_settled(db, key_id, 10)
    abandoned = ledger_rows(db, key_id)
    made_abandoned = proxy.made()
    read = []

    def read_one():
        r = request(srv.url, "POST", "/v1/images/generations", body, key=key)
        read.append(r)

    threads = [threading.Thread(target=read_one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read_costs = {r.cost() for r in read}
    abandoned_costs = sorted({nanos_usd(r["cost_nanos"]) for r in abandoned})
    codes = sorted({f"{r['status']}/{r['error_code']}/{r['cost_source']}" for r in abandoned})
    images, cost = charged(abandoned)
    figures = (f"abandoned: {len(abandoned)} rows {codes}, costs {[usd(c) for c in abandoned_costs]}, "
               f"{images} images charged, upstream made {made_abandoned}; the same read: "
               f"{[usd(c) for c in read_costs]} ({sum(r.status == 200 for r in read)}/10 ok)"
               + ("" if settled else "; NOT SETTLED"))
    ok = (settled and len(abandoned) == 10 and len(read_costs) == 1 and abandoned_costs == sorted(read_costs)
          and all(r["error_code"] == "client_disconnected" for r in abandoned) and images == made_abandoned)
    record(sc, "charged what the upstream billed", ok, figures)


def s3_short_ttl(h: Harness, backend: str):
    """A stream longer than the hold TTL and a client that stalls longer than it, with bursts on the same
    budget: spent never passes the budget. On PostgreSQL: two instances, the bursts on the second."""
    two = backend == "postgres"
    sc = f"3 holds under a short TTL [{backend}{', 2 instances' if two else ''}]"
    db = h.database(backend)
    up, proxy = h.upstream()
    # The TTL must be at least the upstream timeout + 10 s: 10 s with a 1 s timeout is refused.
    bad = h.serve(db, up, timeout_secs=1, ttl=10, wait=False)
    try:
        bad.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    refused_msg = bad.log.read_text(errors="replace") if bad.proc.poll() is not None else ""
    refused = bad.proc.poll() not in (None, 0) and "--reservation-ttl-secs" in refused_msg and "timeout" in refused_msg
    record(sc, "TTL < timeout + 10 s refused at start", refused,
           f"exit {bad.proc.poll()}: {refused_msg.strip().splitlines()[-1][:160] if refused_msg.strip() else '(still running)'}")

    ttl = 11
    a = h.serve(db, up, timeout_secs=1, ttl=ttl)
    b = h.serve(db, up, timeout_secs=1, ttl=ttl) if two else a
    long_body = gen("[fault:gap=700] a long stream", n=10, stream=True, partial_images=2)
    stall_body = gen("[fault:gap=300] a stalled stream", n=4, stream=True, partial_images=1)
    burst_body = gen("[fault:slow=400] burst")
    w_long, w_stall = worst_case(h, db, a, long_body), worst_case(h, db, a, stall_body)
    w_burst = worst_case(h, db, b, burst_body)
    limit = w_long + w_stall + 2 * w_burst
    key, key_id = h.key(db, "ttl", limit)
    out = {}

    def long_stream():
        s = Stream(a.url, key, long_body, timeout=120)
        if s.status == 200:
            s.read_all()
        out["long"] = (s.status, len(s.completed), s.headers.get("x-request-id"))

    def stalled_stream():
        s = Stream(a.url, key, stall_body, rcvbuf=16384, timeout=120)
        if s.status == 200:
            s.next_event()
            time.sleep(ttl + 5)  # stop reading for longer than the TTL
            s.read_all()
        out["stall"] = (s.status, len(s.completed), s.headers.get("x-request-id"))

    statuses = []
    with BudgetSampler(db, key_id, limit) as sampler:
        t_long = threading.Thread(target=long_stream)
        t_stall = threading.Thread(target=stalled_stream)
        t_long.start()
        time.sleep(0.5)
        t_stall.start()
        time.sleep(0.5)
        lock = threading.Lock()

        def one():
            try:
                r = request(b.url, "POST", "/v1/images/generations", burst_body, key=key, timeout=30)
                with lock:
                    statuses.append(r.status)
            except OSError:
                with lock:
                    statuses.append("error")

        while t_long.is_alive() or t_stall.is_alive():
            burst = [threading.Thread(target=one) for _ in range(6)]
            for t in burst:
                t.start()
            for t in burst:
                t.join()
            time.sleep(0.3)
        t_long.join()
        t_stall.join()
        settled = wait_settled(db, key_id, 0, limit=30)
    rows = ledger_rows(db, key_id)
    spent, reserved = budget(db, key_id)
    images, cost = charged(rows)
    died = [r for r in rows if r["error_code"] == "instance_died"]
    served = statuses.count(200)
    # How long each stream held its hold (the ledger's latency): both must outlive the TTL.
    lasted = {}
    for name in ("long", "stall"):
        rid = out.get(name, (None, None, None))[2]
        found = db.query("SELECT latency_ms FROM ledger WHERE request_id = ?", (rid,)) if rid else []
        lasted[name] = int(found[0][0]) / 1000 if found else 0.0
    figures = (f"budget {usd(limit)}; long stream {out.get('long', ('-',))[:2]} (status, images) lasted "
               f"{lasted['long']:.1f} s, stalled {out.get('stall', ('-',))[:2]} lasted {lasted['stall']:.1f} s "
               f"(TTL {ttl} s); bursts {len(statuses)} sent, {served} served, "
               f"{statuses.count(429)} refused; max spent/budget {sampler.max_spent / limit:.3f}, "
               f"max (spent+held)/budget {sampler.max_committed / limit:.3f} over {sampler.samples} samples; "
               f"final spent {usd(spent)} = ledger {usd(cost)}; instance_died rows {len(died)}"
               + ("" if settled else "; NOT SETTLED"))
    ok = (sampler.max_spent <= limit and sampler.max_committed <= limit and spent <= limit and spent == cost
          and not died and out.get("long", (0, 0))[:2] == (200, 10) and out.get("stall", (0, 0))[:2] == (200, 4)
          and settled and min(lasted.values()) > ttl)
    record(sc, "0 overspend", ok, figures)


def s4_input_once(h: Harness):
    sc = "4 input billed once"
    db = h.database("sqlite")
    up, _ = h.upstream()
    srv = h.serve(db, up)
    key, key_id = h.key(db, "words", 10)
    prompt = " ".join(f"word{i}" for i in range(400))
    r = request(srv.url, "POST", "/v1/images/generations", gen(prompt, n=3), key=key)
    s = Stream(srv.url, key, gen(prompt, n=3, stream=True, partial_images=1))
    s.read_all()
    wait_settled(db, key_id, 2)
    rows = ledger_rows(db, key_id)
    tokens = [r_["input_text_tokens"] for r_ in rows]
    costs = [nanos_usd(r_["cost_nanos"]) for r_ in rows]
    events = sum((c or 0 for c in s.completed), Decimal(0))
    figures = (f"input tokens: not streamed {tokens[0] if tokens else '-'}, streamed {tokens[1] if len(tokens) > 1 else '-'}; "
               f"cost: not streamed {usd(r.cost())} (ledger {usd(costs[0]) if costs else '-'}), streamed events sum "
               f"{usd(events)} (ledger {usd(costs[1]) if len(costs) > 1 else '-'})")
    ok = tokens == [403, 403] and len(costs) == 2 and costs[0] == costs[1] == r.cost() == events
    record(sc, "403 tokens each, equal costs", ok, figures)


def s5_usage_x(h: Harness):
    sc = "5 displayed = charged"
    db = h.database("sqlite")
    up, _ = h.upstream()
    srv = h.serve(db, up)
    key, key_id = h.key(db, "greedy", 10)
    body = gen("[fault:usage-x=50] overbilling")
    worst = worst_case(h, db, srv, body)
    r = request(srv.url, "POST", "/v1/images/generations", body, key=key)
    sbody = gen("[fault:usage-x=50] overbilling stream", n=3, stream=True)
    wstream = worst_case(h, db, srv, sbody)
    s = Stream(srv.url, key, sbody)
    s.read_all()
    wait_settled(db, key_id, 2)
    rows = ledger_rows(db, key_id)
    led = [nanos_usd(x["cost_nanos"]) for x in rows]
    body_cost = Decimal(r.json()["imagegate"]["cost_usd"]) if r.status == 200 else None
    events = sum((c or 0 for c in s.completed), Decimal(0))
    figures = (f"JSON: header {usd(r.cost())}, body {usd(body_cost)}, ledger {usd(led[0]) if led else '-'} "
               f"({rows[0]['cost_source'] if rows else '-'}), worst case {usd(worst)}; stream n=3: event costs "
               f"{[str(c) for c in s.completed]} sum {usd(events)}, ledger {usd(led[1]) if len(led) > 1 else '-'} "
               f"({rows[1]['cost_source'] if len(rows) > 1 else '-'}), "
               f"worst case {usd(wstream)}")
    ok = (len(led) == 2 and r.cost() == body_cost == led[0] <= worst and events == led[1] <= wstream)
    record(sc, "header = body = ledger <= worst case", ok, figures)


def s6_estimates(h: Harness):
    sc = "6 estimates vs /health"
    db = h.database("sqlite")
    up, _ = h.upstream()
    srv = h.serve(db, up)
    key, _ = h.key(db, "estimator", 1)
    rng = random.Random(6)

    def words(chars: int) -> str:
        out, n = [], 0
        while n < chars:
            w = "".join(rng.choice(string.ascii_letters + string.digits + "éß漢") for _ in range(rng.randint(2, 11)))
            out.append(w)
            n += len(w) + 1
        return " ".join(out)[:chars]

    big = {"requests": [{"model": MODEL, "prompt": "a " * 1_000_000}]}
    items = {"requests": [{"model": MODEL, "prompt": words(32000)} for _ in range(100)]}
    results = {}

    def post(name, body):
        started = time.monotonic()
        try:
            r = request(srv.url, "POST", "/v1/images/estimates", body, key=key, timeout=300)
            results[name] = (r.status, r.error().get("param"), time.monotonic() - started)
        except OSError as e:
            results[name] = (f"error {e}", None, time.monotonic() - started)

    with HealthProbe(srv.url, interval=0.05) as probe:
        time.sleep(0.3)
        threads = [threading.Thread(target=post, args=(f"2MB-{i}", big)) for i in range(2)]
        threads += [threading.Thread(target=post, args=(f"100x32k-{i}", items)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.2)
    fmt = {k: (v[0], v[1], f"{v[2]:.1f} s") for k, v in sorted(results.items())}
    figures = f"{fmt}; {probe.summary()}"
    ok = (all(results[f"2MB-{i}"][0] == 400 and "prompt" in str(results[f"2MB-{i}"][1]) for i in range(2))
          and all(results[f"100x32k-{i}"][0] == 200 for i in range(2)) and probe.max() < 1.0 and probe.failures == 0)
    record(sc, "2 MB refused 400, /health under 1 s", ok, figures)


def png_16bit_rgba(size: int) -> bytes:
    """A SIZExSIZE 16-bit RGBA PNG of zeros (as scripts/decode-memory.py makes it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", size, size, 16, 6, 0, 0, 0)
    row = b"\x00" * (1 + size * 8)
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(size)]
    parts.append(z.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def multipart(fields: dict, files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = "hostile-" + uuid.uuid4().hex
    out = []
    for k, v in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for name, filename, data in files:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def tiny_png(w=16, h=16) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\x80\x40\x20\xff" * w for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def s7_image_bombs(h: Harness):
    sc = "7 image bombs"
    db = h.database("sqlite")
    up, _ = h.upstream()
    srv = h.serve(db, up)
    key, _ = h.key(db, "bomber", 10)
    size = 7999
    cache = Path(tempfile.gettempdir()) / f"imagegate-bomb-{size}-16bit.png"
    if not cache.exists():
        cache.write_bytes(png_16bit_rgba(size))
    image = cache.read_bytes()
    body, ctype = multipart({"model": MODEL, "prompt": "a bomb", "quality": "low"}, [("image", "bomb.png", image)])
    time.sleep(0.5)
    before = srv.rss_mib()
    statuses = []
    lock = threading.Lock()

    def edit():
        try:
            r = request(srv.url, "POST", "/v1/images/edits", body, key=key, headers={"Content-Type": ctype},
                        timeout=600)
            with lock:
                statuses.append(r.status)
        except OSError as e:
            with lock:
                statuses.append(f"error {e}")

    peak = before
    with HealthProbe(srv.url, interval=0.1) as probe:
        threads = [threading.Thread(target=edit) for _ in range(4)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, srv.rss_mib())
            time.sleep(0.01)
        for t in threads:
            t.join()
    time.sleep(3)
    after, hwm = srv.rss_mib(), srv.rss_mib("VmHWM")
    figures = (f"{len(image)} B PNG x4 ({size * size * 8 / 2**20:.0f} MiB decoded each): statuses {sorted(map(str, statuses))}; "
               f"RSS before {before:.0f} MiB, peak {max(peak, hwm):.0f} MiB, after (+3 s) {after:.0f} MiB; "
               f"{probe.summary()}")
    # Bounded: at most --max-decode-bytes (1 GiB) of decodes at once, plus slack; given back afterwards.
    ok = max(peak, hwm) - before <= 1024 + 512 and after - before <= 256 and probe.max() < 2.0
    record(sc, "peak bounded, memory given back", ok, figures)


def s8_slowloris(h: Harness):
    sc = "8 slowloris"
    db = h.database("sqlite")
    up, _ = h.upstream()
    srv = h.serve(db, up, extra=["--header-timeout-secs", "2", "--body-timeout-secs", "2", "--write-timeout-secs", "2",
                                 "--max-connections", "20"])
    host, port = split_url(srv.url)

    def closed_after(send: bytes, drip=None, limit=30.0):
        """Seconds until the server closed the connection (None: still open at `limit`), and what it sent."""
        s = socket.create_connection((host, port))
        started = time.monotonic()
        got = b""
        try:
            if drip is None:
                s.sendall(send)
            s.settimeout(0.2)
            i = 0
            while time.monotonic() - started < limit:
                if drip is not None and i < len(send):
                    try:
                        s.sendall(send[i:i + 1])
                    except OSError:
                        return time.monotonic() - started, got
                    i += 1
                try:
                    chunk = s.recv(65536)
                    if not chunk:
                        return time.monotonic() - started, got
                    got += chunk
                except socket.timeout:
                    pass
                except OSError:
                    return time.monotonic() - started, got
                if drip:
                    time.sleep(drip)
            return None, got
        finally:
            s.close()

    t_half, _ = closed_after(b"GET /hea")
    record(sc, "half a request line closed", t_half is not None and t_half < 5,
           f"closed after {t_half if t_half is None else round(t_half, 1)} s (--header-timeout-secs 2)")
    t_drip, _ = closed_after(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n", drip=0.3)
    record(sc, "headers dripped a byte / 0.3 s closed", t_drip is not None and t_drip < 5,
           f"closed after {t_drip if t_drip is None else round(t_drip, 1)} s")
    t_body, got = closed_after(b"POST /v1/images/estimates HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 1000\r\n\r\n{\"requests\":")
    status = re.match(rb"HTTP/1\.1 (\d+)", got)
    envelope = b'"error"' in got
    record(sc, "stalled body answered 408 envelope", bool(status and status.group(1) == b"408" and envelope),
           f"{status.group(1).decode() if status else 'no answer'} after {t_body if t_body is None else round(t_body, 1)} s, "
           f"envelope {envelope}")

    # 50 idle connections against a cap of 20: each is closed after the header timeout.
    idle = []
    for _ in range(50):
        try:
            idle.append(socket.create_connection((host, port), timeout=5))
        except OSError:
            break
    with HealthProbe(srv.url, interval=0.2, timeout=20) as probe:
        time.sleep(8)
    for s in idle:
        s.close()
    # Accepted 20 at a time, each closed after 2 s: a new client waits behind the others, at most
    # ceil(50 / 20) header timeouts.
    record(sc, "50 idle conns vs --max-connections 20", probe.max() < 3 * 2 + 1 and probe.failures == 0,
           f"{len(idle)} opened; {probe.summary()} (header timeout 2 s: waits behind them up to 3 x 2 s by design)")

    # Slow readers: 20 connections that pipeline GET /health and never read the answers, until the
    # answers fill the socket buffers both ways (the server's writes then wait on the client).
    sockets_before = open_sockets(srv.pid)
    readers = []
    request_bytes = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 200
    for _ in range(20):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, port))
        s.setblocking(False)
        readers.append(s)
    sent = 0
    stop = time.monotonic() + 5
    while time.monotonic() < stop:
        for s in readers:
            try:
                sent += s.send(request_bytes)
            except OSError:
                pass
        time.sleep(0.001)
    with HealthProbe(srv.url, interval=0.5, timeout=5) as probe:
        time.sleep(20)
    held = open_sockets(srv.pid) - sockets_before
    for s in readers:
        s.close()
    record(sc, "20 slow readers (pipelined, never read) vs cap 20", probe.failures == 0 and probe.max() < 4,
           f"{sent / 2**20:.0f} MiB of requests sent; {probe.summary()}; the server still held {held} more sockets "
           f"than before them after 25 s (--header-timeout-secs 2, --body-timeout-secs 2, --write-timeout-secs 2)")


def open_sockets(pid: int) -> int:
    """How many sockets a process has open."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def s9_kill(h: Harness, backend: str):
    """kill -9 mid-stream with an Idempotency-Key, restart: 409 until the hold's TTL passes, then the retry
    runs; the sweep writes an instance_died row with what was charged."""
    two = backend == "postgres"
    sc = f"9 kill -9 mid-stream [{backend}{', 2 instances' if two else ''}]"
    db = h.database(backend)
    up, proxy = h.upstream()
    ttl = 11
    a = h.serve(db, up, timeout_secs=1, ttl=ttl)
    b = h.serve(db, up, timeout_secs=1, ttl=ttl) if two else None
    key, key_id = h.key(db, "crash", 1)
    body = gen("[fault:gap=600] killed", n=5, stream=True)
    idem = {"Idempotency-Key": f"crash-{uuid.uuid4().hex[:8]}"}
    s = Stream(a.url, key, body, headers=idem)
    s.read_completed(2)
    delivered = list(s.completed)
    a.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    a.proc.wait()
    s.close()
    a2 = h.serve(db, up, timeout_secs=1, ttl=ttl, port=split_url(a.url)[1])
    first = request(a2.url, "POST", "/v1/images/generations", body, key=key, headers=idem)
    statuses = [first.status]
    after = None
    while time.monotonic() - killed_at < 3 * ttl:
        r = request(a2.url, "POST", "/v1/images/generations", body, key=key, headers=idem, timeout=120)
        if r.status != 409:
            statuses.append(r.status)
            after = time.monotonic() - killed_at
            retry = r
            break
        time.sleep(0.5)
    retry_images = retry.body.count(b"event: image_generation.completed") if after is not None else 0
    wait_settled(db, key_id, 2, limit=30)
    rows = ledger_rows(db, key_id)
    died = [r for r in rows if r["error_code"] == "instance_died"]
    spent, reserved = budget(db, key_id)
    images, cost = charged(rows)
    shown = sum((c or 0 for c in delivered), Decimal(0))
    died_cost = sum((nanos_usd(r["cost_nanos"]) for r in died), Decimal(0))
    died_images = sum(int(r["n"] or 0) for r in died)
    figures = (f"delivered before the kill {len(delivered)} images ({usd(shown)}); retry right after restart: "
               f"{first.status} {first.error().get('code')}; retry ran ({statuses[-1]}, {retry_images} images) "
               f"{'after %.1f s' % after if after else 'never'} (TTL {ttl} s); instance_died rows {len(died)} "
               f"({died_images} images, {usd(died_cost)}); spent {usd(spent)} = ledger {usd(cost)}, held {usd(reserved)}; "
               f"upstream made {proxy.made()} images in all ({proxy.made() - retry_images} for the killed request, "
               f"the last of them after the kill), charged {images}")
    ok = (first.status == 409 and after is not None and ttl - 4 <= after <= ttl + 8 and statuses[-1] == 200
          and len(died) == 1 and died_images >= len(delivered) and died_cost >= shown and spent == cost
          and reserved == 0)
    record(sc, "409, then runs after the TTL; instance_died row", ok, figures)
    del b


def s10_overflow(h: Harness):
    sc = "10 estimate overflow"
    db = h.database("sqlite")
    up, _ = h.upstream()
    srv = h.serve(db, up)
    key, _ = h.key(db, "overflow", 1)
    big = 2**63 - 1
    cases = [
        ({"prompt_tokens": big, "count": 1_000_000}, ("prompt_tokens", "count")),
        ({"prompt_words": big}, ("prompt_words",)),
        ({"prompt_words": big, "count": 1_000_000}, ("prompt_words", "count")),
        ({"count": 2**64}, ("count",)),
        ({"count": -1}, ("count",)),
        ({"n": big}, ("n",)),
        ({"n": 1e308}, ("n",)),
        ({"prompt_tokens": -big - 1}, ("prompt_tokens",)),
        ({"prompt_tokens": 1.5}, ("prompt_tokens",)),
        ({"input_images": ["99999999999x99999999999"]}, ("input_images",)),
        # So many values that the body is refused before it is parsed (at most 20,000 JSON values).
        ({"input_images": ["1024x1024"] * 100000}, ("input_images", "requests", "JSON values")),
        ({"size": "4294967297x4294967297"}, ("size",)),
        ({"partial_images": big}, ("partial_images",)),
    ]
    bad = []
    for fields, names in cases:
        item = {"model": MODEL, **({} if any(f.startswith("prompt") for f in fields) else {"prompt_tokens": 10}),
                **fields}
        r = request(srv.url, "POST", "/v1/images/estimates", {"requests": [item]}, key=key)
        param = str(r.error().get("param"))
        said = param + " " + str(r.error().get("message"))
        if r.status != 400 or not any(n in said for n in names):
            bad.append(f"{json.dumps(fields)[:60]} -> {r.status} param={param}")
    # Many items at every maximum: exact or refused, never wrapped.
    r = request(srv.url, "POST", "/v1/images/estimates", key=key, body={"requests": [
        {"model": MODEL, "quality": "high", "size": "1536x1024", "n": 10, "count": 1_000_000, "prompt_tokens": 128000}
    ] * 100})
    total = r.json().get("total_usd") if r.status == 200 and isinstance(r.json(), dict) else None
    maxed = f"100 items at the maxima: {r.status} total_usd={total} {r.error().get('param') or ''}"
    if r.status == 200 and (total is None or Decimal(str(total)) <= 0):
        bad.append(maxed)
    gen_r = request(srv.url, "POST", "/v1/images/generations", gen("x", n=big), key=key)
    if gen_r.status != 400 or gen_r.error().get("param") != "n":
        bad.append(f"generation n=2^63-1 -> {gen_r.status} {gen_r.error().get('param')}")
    cli = h.cli(db, "estimate", "--model", MODEL, "--count", str(big), "--prompt-words", str(big), check=False)
    err = cli.stderr.decode(errors="replace")
    if cli.returncode == 0 or "panicked" in err or not err.strip():
        bad.append(f"CLI estimate huge -> exit {cli.returncode} {err.strip()[:80]}")
    figures = (f"{len(cases)} bad inputs over HTTP, a generation n=2^63-1, the CLI; {maxed}; CLI: exit {cli.returncode} "
               f"'{err.strip().splitlines()[-1][:100] if err.strip() else ''}'"
               + (f"; WRONG: {bad}" if bad else "; all 400 naming the field"))
    record(sc, "400 naming the field", not bad, figures)


def s11_small_items(h: Harness):
    sc = "11 point 12 items"
    db = h.database("sqlite")
    up, _ = h.upstream()
    srv = h.serve(db, up)
    key, key_id = h.key(db, "plain", 10)
    admin, _ = h.key(db, "admin", None, "--scope", "admin")
    host, _ = split_url(srv.url)

    # a. A header with a control byte: served (the line dropped) or an envelope, never hyper's empty 400.
    body = json.dumps({"requests": [{"model": MODEL, "prompt_tokens": 10}]}).encode()
    outcomes = []
    for label, line in [("\\x01 in a value", b"X-Evil: a\x01b"), ("\\x7f in a value", b"X-Evil: a\x7fb"),
                        ("\\x01 in Authorization", f"Authorization: Bearer {key}\x01".encode()),
                        ("NUL in a value", b"X-Evil: a\x00b")]:
        status, _, rbody = raw_exchange(srv.url, b"POST /v1/images/estimates HTTP/1.1\r\nHost: x\r\n"
                                        + f"Authorization: Bearer {key}\r\n".encode() * (b"Authorization" not in line)
                                        + line + b"\r\nContent-Type: application/json\r\nContent-Length: "
                                        + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        has_json = rbody.strip().startswith(b"{")
        outcomes.append((label, status, has_json))
    figures = "; ".join(f"{lab}: {st} {'JSON' if js else 'empty body'}" for lab, st, js in outcomes)
    ok = all(js for lab, st, js in outcomes if not lab.startswith("NUL"))
    record(sc, "a. control byte in a header", ok, figures + " (NUL: hyper's 400, documented in run_with)")

    # b. Formula-looking key names escaped in usage --csv.
    formulas = ['=HYPERLINK("http://x","y")', "@SUM(1+1)", "+1+1", "-1+1"]
    for name in formulas:
        k, _ = h.key(db, name, 1)
        request(srv.url, "POST", "/v1/images/generations", gen("csv"), key=k)
    out = h.cli(db, "usage", "--csv", "--by", "key").stdout.decode()
    cells = [c for row in csv.reader(io.StringIO(out)) for c in row]
    raw = [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r") and not re.fullmatch(r"-?[0-9.]+", c)]
    escaped = [c for c in cells if any(f in c for f in formulas)]
    record(sc, "b. formula key names in usage --csv", not raw and len(escaped) == len(formulas),
           f"cells starting a formula: {raw or 'none'}; the names as written: {escaped}")

    # c. ANSI escapes in a key name: refused (CLI and admin API) or escaped in keys list.
    ansi = "\x1b[31mred\x1b[0m\x07"
    created = h.cli(db, "keys", "create", f"--name={ansi}", check=False)
    listing = h.cli(db, "keys", "list").stdout
    api = request(srv.url, "POST", "/v1/admin/keys", {"name": ansi}, key=admin)
    raw_esc = b"\x1b" in listing or b"\x07" in listing
    ok = not raw_esc and (created.returncode != 0 or b"\\u{1b}" in listing
                                                                 or b"\\x1b" in listing or b"\\e" in listing)
    ok = ok and api.status == 400 and api.error().get("param") == "name"
    record(sc, "c. ANSI escapes in a key name", ok,
           f"keys create: exit {created.returncode} ({created.stderr.decode(errors='replace').strip().splitlines()[-1][:90] if created.stderr.strip() else ''}); "
           f"raw ESC/BEL in keys list: {raw_esc}; admin API: {api.status} param={api.error().get('param')}")

    # d. Two keys send the same x-request-id: distinct server ids and ledger rows.
    key2, key2_id = h.key(db, "second", 10)
    ids = []
    for k in (key, key2):
        r = request(srv.url, "POST", "/v1/images/generations", gen("same id"), key=k, headers={"x-request-id": "dup-1"})
        ids.append(r.header("x-request-id"))
    wait_settled(db, key_id, 1)
    rows = db.query("SELECT request_id FROM ledger WHERE request_id IN (?, ?)", tuple(ids))
    shared = db.query("SELECT COUNT(*) FROM ledger WHERE request_id = 'dup-1'")[0][0]
    record(sc, "d. same x-request-id from two keys", len(set(ids)) == 2 and "dup-1" not in ids and len(rows) == 2
           and shared == 0, f"server ids {ids}, ledger rows with them {len(rows)}, rows named 'dup-1' {shared}")

    # e. An idempotent replay carries the cost header.
    idem = {"Idempotency-Key": "replay-1"}
    r1 = request(srv.url, "POST", "/v1/images/generations", gen("replay"), key=key, headers=idem)
    r2 = request(srv.url, "POST", "/v1/images/generations", gen("replay"), key=key, headers=idem)
    record(sc, "e. idempotent replay's cost header", r2.header("idempotent-replayed") == "true"
           and r1.cost() is not None and r1.cost() == r2.cost(),
           f"first {r1.status} {usd(r1.cost())}, replay {r2.status} replayed={r2.header('idempotent-replayed')} "
           f"{usd(r2.cost())}")

    # f. An idempotent retry of a finished stream: what does a client get back?
    sbody = gen("replay stream", n=2, stream=True)
    s = Stream(srv.url, key, sbody, headers={"Idempotency-Key": "replay-2"})
    s.read_all()
    r3 = request(srv.url, "POST", "/v1/images/generations", sbody, key=key, headers={"Idempotency-Key": "replay-2"})
    err = (r3.json() or {}).get("error", {}) if isinstance(r3.json(), dict) else {}
    record(sc, "f. idempotent retry of a finished stream", r3.status == 409
           and err.get("code") == "idempotent_response_not_stored" and "$" in err.get("message", ""),
           f"{r3.status} {err.get('code')}: {err.get('message', '')[:160]}")


def concurrent_uploads(srv, count: int, body: bytes, ctype: str, key) -> tuple[list, float, float, float]:
    """Sends `count` edits of `body` at once: their statuses, and the server's RSS (MiB) before, at its
    peak while they ran, and 3 s after."""
    before = srv.rss_mib()
    codes = []
    peak = before
    threads = [threading.Thread(target=lambda: codes.append(request(
        srv.url, "POST", "/v1/images/edits", body, key=key, headers={"Content-Type": ctype}, timeout=300).status))
        for _ in range(count)]
    peak = max(peak, run_sampling_rss(srv, threads))
    time.sleep(3)
    return codes, before, peak, srv.rss_mib()


def run_sampling_rss(srv, threads: list) -> float:
    """Runs `threads` to their end; the server's highest RSS (MiB) seen meanwhile."""
    peak = 0.0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, srv.rss_mib())
        time.sleep(0.01)
    return peak


def s12_json_bomb(h: Harness):
    """JSON bodies under the body limit whose parsed form is many times their size."""
    sc = "12 JSON bodies at the size limit"
    db = h.database("sqlite")
    up, _ = h.upstream()
    srv = h.serve(db, up)
    broke, _ = h.key(db, "nothing-to-spend", 0)
    time.sleep(0.5)
    # Bodies that are only large: four 60 MiB multipart edits at once (refused: not an image). Each is
    # under the body limit; together they fit the default 512 MiB of bodies in flight. Bodies this
    # large live in memory of their own, so what they took goes back to the OS when they end.
    upload, ctype = multipart({"model": MODEL, "prompt": "x"}, [("image", "a.png", b"\x89PNG\r\n\x1a\n" + bytes(60 << 20))])
    codes, before, peak, after = concurrent_uploads(srv, 4, upload, ctype, broke)
    record(sc, "4 x 60 MiB multipart uploads returned", after - before <= 64 and all(c == 400 for c in codes),
           f"statuses {codes}; RSS before {before:.0f} MiB, peak {peak:.0f} MiB, after (+3 s) {after:.0f} MiB "
           f"(bodies counted in --max-body-bytes-in-flight, large ones mapped and unmapped)")

    # Twelve at once: 720 MiB of bodies against 512 MiB in flight. Those that find no room within
    # --decode-wait-ms get 503 server_busy; memory stays within the budget.
    codes, before, peak, after = concurrent_uploads(srv, 12, upload, ctype, broke)
    record(sc, "12 x 60 MiB uploads vs 512 MiB in flight", peak - before <= 600 and after - before <= 64
           and all(c in (400, 503) for c in codes),
           f"statuses {sorted(codes)}; RSS before {before:.0f} MiB, peak {peak:.0f} MiB, after (+3 s) {after:.0f} MiB")

    body = b'{"prompt":"x","junk":[' + b"0," * (30 * 2**20 - 1) + b"0]}"
    before = srv.rss_mib()
    statuses = []

    def send(key):
        try:
            r = request(srv.url, "POST", "/v1/images/generations", body, key=key,
                        headers={"Content-Type": "application/json"}, timeout=300)
            statuses.append((r.status, r.error().get("param")))
        except OSError as e:
            statuses.append((f"error {type(e).__name__}", None))

    # Without a key first: refused before the body is read (the server answers 401 and closes, so the
    # client's upload breaks off).
    send(None)
    unauth_rss = srv.rss_mib()
    peak = before
    with HealthProbe(srv.url, interval=0.1) as probe:
        threads = [threading.Thread(target=send, args=(broke,)) for _ in range(2)]
        peak = max(peak, run_sampling_rss(srv, threads))
    time.sleep(3)
    after = srv.rss_mib()
    figures = (f"{len(body) / 2**20:.0f} MiB body (limit 64 MiB): no key -> {statuses[0]} (RSS {unauth_rss:.0f} MiB); "
               f"2 at once with a $0 key -> {statuses[1:]}; RSS before {before:.0f} MiB, peak "
               f"{max(peak, srv.rss_mib('VmHWM')):.0f} MiB, after (+3 s) {after:.0f} MiB; {probe.summary()}")
    ok = max(peak, srv.rss_mib("VmHWM")) - before <= 512 and after - before <= 256 and probe.max() < 1.0
    record(sc, "bounded memory, /health under 1 s", ok, figures)


# Fuzz ------------------------------------------------------------------------------------------------

LEAKS = re.compile(r"(/home/|/work/|/root/|\.rs:\d|src/|panicked|backtrace|RUST_BACKTRACE|sqlx|reqwest::|hyper::"
                   r"|tokio::|serde_json::|at line \d+ column \d+ of)", re.I)
# Rust's Debug form of a library's struct (`ChunkType { type: IHDR, critical: true, .. }`): an internal.
DEBUG_STRUCT = re.compile(r"\b[A-Z][A-Za-z]+ \{ [a-z_]+: ")


def fuzz_cases(rng: random.Random, key: str):
    """(method, path, headers, body bytes, label) for ~200 hostile requests."""
    weird_values = [None, True, False, 0, -1, 1.5, -0.0, 2**63, -(2**63) - 1, 10**400, 1e308, "", " ", "auto",
                    "1024x1024", "0x0", "99999x99999", "-1x-1", "NaN", "Infinity", "\u0000", "\u202e\u200b",
                    "😀" * 50, "a" * 40000, [], [1, 2], {}, {"a": {"b": [None]}}, "low", "high", "png", "webp",
                    "true", "10", "1e3", "dall-e-3", "../../etc/passwd", "<script>", "%s%n%x"]
    fields = ["model", "prompt", "n", "quality", "size", "background", "moderation", "output_format",
              "output_compression", "partial_images", "stream", "response_format", "style", "user", "seed",
              "service_tier", "steps", "decoder", "input_fidelity", "images", "mask", "extra"]
    auth = {"Authorization": f"Bearer {key}"}
    cases = []
    # Generations: a valid body with one to three fields set to odd values.
    for _ in range(70):
        body = gen("fuzz " + "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 30))))
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(fields)] = rng.choice(weird_values)
        if rng.random() < 0.2:
            del body[rng.choice(list(body))]
        cases.append(("POST", "/v1/images/generations", {**auth, "Content-Type": "application/json"},
                      json.dumps(body).encode(), "generation fields"))
    # Malformed JSON and odd bodies.
    raw_bodies = [b"", b"{", b"}", b"null", b"[]", b"[1,2]", b'"str"', b"123", b"\xff\xfe{}", b"\xef\xbb\xbf{}",
                  b'{"prompt":"a","prompt":"b","model":"' + MODEL.encode() + b'"}', b'{"prompt":"\\ud800"}',
                  b'{"n":1e99999}', b'{"n":-0}', b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
                  b'{"prompt":"x"} trailing', b'{"prompt":"x",}', b"{'prompt':'x'}", b'{"prompt":"a\x00b"}',
                  b'{"prompt":"' + b"\\u0000" * 1000 + b'"}', json.dumps({"prompt": "x" * 33000}).encode()]
    for path in ("/v1/images/generations", "/v1/images/estimates", "/v1/images/edits"):
        for b in raw_bodies:
            cases.append(("POST", path, {**auth, "Content-Type": "application/json"}, b, "malformed JSON"))
    # Odd headers.
    good = json.dumps(gen("headers")).encode()
    header_sets = [
        {"Content-Type": "text/plain"}, {"Content-Type": "application/json; charset=latin1"},
        {"Content-Type": "multipart/form-data"}, {"Content-Type": "multipart/form-data; boundary="},
        {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "application/json" + "a" * 8000},
        {"Idempotency-Key": "k" * 300}, {"Idempotency-Key": "   "}, {"Idempotency-Key": "é"},
        {"X-Request-Id": "../../etc"}, {"X-Request-Id": "x" * 10000}, {"X-Big": "b" * 60000},
        {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": f"Bearer  {key} "},
        {"Authorization": f"bearer {key}"}, {"Authorization": "Bearer " + "x" * 5000},
        {"Authorization": f"Bearer {key}, Bearer {key}"}, {"Accept": "text/event-stream"},
        {"Accept-Encoding": "gzip, br, zstd"}, {"Content-Encoding": "gzip"}, {"Expect": "100-continue"},
        {"Transfer-Encoding": "chunked"}, {"Content-Length": "5"}, {"Range": "bytes=0-10"},
    ]
    for hs in header_sets:
        hdrs = {**auth, "Content-Type": "application/json", **hs}
        cases.append(("POST", "/v1/images/generations", hdrs, good, f"header {list(hs)[0]}"))
    # Estimates with odd items.
    for _ in range(30):
        item = {"model": MODEL}
        for _ in range(rng.randint(1, 3)):
            item[rng.choice(["model", "quality", "size", "n", "count", "prompt", "prompt_tokens", "prompt_words",
                             "input_images", "service_tier", "provider", "partial_images", "extra"])] = rng.choice(
                weird_values)
        reqs = rng.choice([[item], item, [item] * rng.randint(0, 120), None, "x"])
        cases.append(("POST", "/v1/images/estimates", {**auth, "Content-Type": "application/json"},
                      json.dumps({"requests": reqs}).encode(), "estimate items"))
    # Edits: multipart oddities.
    png = tiny_png()
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 100000, 100000, 8, 6, 0, 0, 0)  # claims 10^10 pixels
    header_bomb = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
                   + tiny_png(1, 1)[33:])
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # the IHDR chunk's CRC
    edit_files = [[], [("image", "a.png", b"")], [("image", "a.png", bytes(bad_crc))], [("image", "a.png", b"not a png")], [("image", "a.png", png[:40])],
                  [("image", "a.png", bytes(header_bomb))], [("image", "a.png", png), ("mask", "m.png", tiny_png(8, 8))],
                  [("image[]", f"{i}.png", png) for i in range(20)], [("image", "a.gif", b"GIF89a" + b"\x00" * 20)],
                  [("image", "a.png", png)], [("mask", "m.png", png)]]
    for files in edit_files:
        for fields in ({"model": MODEL, "prompt": "edit"}, {"prompt": "edit", "n": "abc"},
                       {"model": MODEL, "prompt": "edit", "size": "-5x7", "quality": "low"}):
            body, ctype = multipart(fields, files)
            cases.append(("POST", "/v1/images/edits", {**auth, "Content-Type": ctype}, body, "edit multipart"))
    for b in (b"--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi",
              b"--x\r\n\r\n--x--", b"garbage", b"--x--\r\n"):
        cases.append(("POST", "/v1/images/edits", {**auth, "Content-Type": "multipart/form-data; boundary=x"}, b,
                      "edit broken multipart"))
    for images in ([{"image_url": "data:image/png;base64,!!!"}], [{"image_url": "http://169.254.169.254/"}],
                   [{"image_url": "data:image/png;base64," + base64.b64encode(png).decode()}], "x", [None], [{}]):
        cases.append(("POST", "/v1/images/edits", {**auth, "Content-Type": "application/json"},
                      json.dumps({"model": MODEL, "prompt": "e", "images": images}).encode(), "edit JSON"))
    # Methods and paths.
    for method, path in (("GET", "/v1/images/generations"), ("DELETE", "/v1/images/edits"), ("PUT", "/health"),
                         ("GET", "/v1/models/" + "x" * 3000), ("GET", "/v1/../../etc/passwd"),
                         ("GET", "/v1/organization/usage/images?start_time=-1"), ("GET", "/v1/admin/keys"),
                         ("POST", "/v1/admin/keys/%00"), ("OPTIONS", "/v1/images/generations")):
        cases.append((method, path, dict(auth), b"", "method/path"))
    return cases


def fuzz(h: Harness, args):
    sc = "fuzz"
    db = h.database("sqlite")
    up, proxy = h.upstream()
    srv = h.serve(db, up)
    key, key_id = h.key(db, "fuzzer", 5)
    rng = random.Random(args.seed)
    cases = fuzz_cases(rng, key)
    server_errors, not_envelope, leaks, free, statuses = [], [], [], [], {}
    for method, path, hdrs, body, label in cases:
        try:
            if hdrs.get("Transfer-Encoding") == "chunked":
                host, port = split_url(srv.url)
                conn = http.client.HTTPConnection(host, port, timeout=60)
                conn.request(method, path, body=iter([body]), headers={k: v for k, v in hdrs.items()
                                                                        if k != "Transfer-Encoding"},
                             encode_chunked=True)
                resp = conn.getresponse()
                r = Resp(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read(), 0)
                conn.close()
            elif hdrs.get("Content-Length") or hdrs.get("Expect"):
                extra = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items() if k.lower() != "content-length")
                length = hdrs.get("Content-Length", str(len(body)))
                st, head, rbody = raw_exchange(srv.url, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}"
                                               f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode() + body,
                                               timeout=15)
                hdr_lines = head.decode(errors="replace").split("\r\n")[1:]
                r = Resp(st or 0, {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in hdr_lines)},
                         rbody, 0)
            else:
                r = request(srv.url, method, path, body or None, headers=hdrs, timeout=60)
        except OSError as e:
            r = Resp(0, {}, str(e).encode(), 0)
        statuses[r.status] = statuses.get(r.status, 0) + 1
        what = f"{label}: {method} {path} {body[:50]!r}"
        if r.status >= 500 or r.status == 0:
            server_errors.append(f"{r.status} {what} -> {r.body[:120]!r}")
        elif r.status >= 400:
            err = r.error()
            if not err or not {"message", "type", "param", "code"} <= set(err):
                not_envelope.append(f"{r.status} {what} -> {r.body[:80]!r}")
        elif r.status == 200 and path.startswith("/v1/images/") and "estimates" not in path and r.cost() is None \
                and b"event: image_" not in r.body:
            free.append(f"{what}")
        text = r.error().get("message") or r.body.decode(errors="replace")
        leak = LEAKS.search(text) or DEBUG_STRUCT.search(text)
        if leak:
            leaks.append(f"{r.status} {what} -> {leak.group(0)!r} in {text[:220]!r}")
    alive = srv.proc.poll() is None and request(srv.url, "GET", "/health").status == 200
    panics = h.panics()
    figures = (f"{len(cases)} requests, statuses {dict(sorted(statuses.items()))}; 5xx/no answer {len(server_errors)} "
               f"{server_errors[:3]}; error bodies not in the envelope {len(not_envelope)} {not_envelope[:3]}; "
               f"internals in a response {len(leaks)} {leaks[:3]}; 200 without a cost {len(free)} {free[:2]}; "
               f"panics in the log {len(panics)} {panics[:2]}; server alive {alive}; upstream saw "
               f"{proxy.requests} requests, foreign keys {len(proxy.bad_auth)}, non-OpenAI fields "
               f"{sorted(proxy.extra_fields) or 'none'}")
    ok = (not server_errors and not not_envelope and not leaks and not free and not panics and alive
          and not proxy.bad_auth and not proxy.extra_fields)
    record(sc, "no 5xx, envelopes, no internals, no panic", ok, figures)


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    parser.add_argument("--bin-dir", type=Path, default=target / "debug",
                        help="where the imagegate and fake-openai binaries are (default: $CARGO_TARGET_DIR/debug)")
    parser.add_argument("--postgres", default=os.environ.get("IMAGEGATE_TEST_DATABASE_URL"),
                        help="a PostgreSQL URL whose user may create databases (default: $IMAGEGATE_TEST_DATABASE_URL)")
    parser.add_argument("--only", default="", help="comma-separated scenarios: 1-12, fuzz (default: all)")
    parser.add_argument("--seed", type=int, default=17, help="the fuzz cases' random seed")
    parser.add_argument("--keep", action="store_true", help="keep each scenario's directory (logs, SQLite files)")
    parser.add_argument("--work-dir", default=None, help="where scenario directories go (default: the temp dir)")
    args = parser.parse_args()
    for b in ("imagegate", "fake-openai"):
        if not (args.bin_dir / b).exists():
            print(f"{args.bin_dir / b} is missing: cargo build -p imagegate -p fake-openai --bins", file=sys.stderr)
            return 2
    if args.postgres and not shutil.which("psql"):
        print("--postgres needs psql on PATH; running SQLite only", file=sys.stderr)
        args.postgres = None

    # (name, backend, run): scenarios with a backend run once per database kind, each on its own.
    with_db = {"1": s1_abandoned_streams, "2": s2_abandoned_requests, "3": s3_short_ttl, "9": s9_kill}
    plain = {"4": s4_input_once, "5": s5_usage_x, "6": s6_estimates, "7": s7_image_bombs, "8": s8_slowloris,
             "10": s10_overflow, "11": s11_small_items, "12": s12_json_bomb, "fuzz": lambda h: fuzz(h, args)}
    names = [str(i) for i in range(1, 13)] + ["fuzz"]
    only = [s.strip() for s in args.only.split(",") if s.strip()] or names
    unknown = [s for s in only if s not in names]
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(unknown)}; they are {', '.join(names)}")
    runs = []
    for name in names:
        if name not in only:
            continue
        if name in with_db:
            runs += [(name, b, lambda h, f=with_db[name], b=b: f(h, b)) for b in backends(args)]
        else:
            runs.append((name, None, plain[name]))

    # A SIGTERM ends the run like Ctrl-C: every scenario's processes and databases are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    print(f"binaries: {args.bin_dir}; databases: SQLite{' and PostgreSQL' if args.postgres else ' (no --postgres)'}")
    for name, backend, run in runs:
        label = name + (f" [{backend}]" if backend else "")
        print(f"scenario {label}", flush=True)
        h = Harness(args, name)
        t0 = time.monotonic()
        try:
            run(h)
            panics = h.panics()
            if panics:
                record(label, "server log", False, f"panics: {panics[:3]}")
        except Exception as e:  # noqa: BLE001 - one scenario's failure must not stop the others
            traceback.print_exc()
            record(label, "scenario", "ERROR", f"{type(e).__name__}: {e}"[:300])
        finally:
            h.close()
        print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    skipped = [n for n in only if n in with_db]
    if skipped and not args.postgres:
        record(",".join(skipped), "PostgreSQL variants", "SKIP", "no --postgres (or IMAGEGATE_TEST_DATABASE_URL)")

    print(f"\nResults ({time.monotonic() - started:.0f} s)\n")
    width = max((len(f"{c.scenario} {c.name}") for c in RESULTS), default=10)
    for c in RESULTS:
        print(f"{c.verdict:<5}  {(c.scenario + ' ' + c.name):<{width}}  {c.figures}")
    failed = [c for c in RESULTS if c.verdict in ("FAIL", "ERROR")]
    print(f"\n{len(RESULTS)} checks: {sum(c.verdict == 'PASS' for c in RESULTS)} passed, {len(failed)} failed or errored, "
          f"{sum(c.verdict == 'SKIP' for c in RESULTS)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
