#!/usr/bin/env python3
"""How much memory `imagegate serve` takes for concurrent edits with large input images, and gives back.

Starts the fake upstream (`fake-openai`) and `imagegate serve` pointed at it (as the conformance test
does), sends N concurrent edits (POST /v1/images/edits, multipart), each with one 16-bit RGBA PNG of
SIZExSIZE (all zeros: about 500 KB on the wire for 7999x7999, 512 MB decoded), and prints the server's
resident memory (VmRSS of /proc/PID/status) before, at its peak (VmHWM, and the highest sample) and
after the edits, plus the status each edit got. A measurement, not a test:

    cargo build -p imagegate -p fake-openai --bins
    scripts/decode-memory.py [--bin-dir DIR] [--concurrency 4] [--size 7999] [--serve-arg=--max-decode-bytes=...]

Only the Python standard library.
"""

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def png_16bit_rgba(size: int) -> bytes:
    """A SIZExSIZE 16-bit RGBA PNG of zeros, compressed row by row (never the whole raw image in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", size, size, 16, 6, 0, 0, 0)
    row = b"\x00" * (1 + size * 8)  # filter byte 0, then 8 bytes a pixel
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(size)]
    parts.append(z.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def multipart(fields: dict, file_field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "imagegate-decode-memory-boundary"
    out = []
    for k, v in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    out.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
    )
    out.append(data)
    out.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    parser.add_argument("--bin-dir", type=Path, default=target / "debug")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--size", type=int, default=7999)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after the edits")
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra argument for `serve`")
    args = parser.parse_args()

    cache = Path(tempfile.gettempdir()) / f"imagegate-bomb-{args.size}-16bit.png"
    if not cache.exists():
        cache.write_bytes(png_16bit_rgba(args.size))
    image = cache.read_bytes()
    print(f"input: {args.size}x{args.size} 16-bit RGBA PNG, {len(image)} bytes, "
          f"{args.size * args.size * 8 / 2**20:.0f} MiB decoded; {args.concurrency} concurrent edits")

    procs = []
    data_dir = tempfile.mkdtemp(prefix="imagegate-decode-memory-")
    try:
        fake = subprocess.Popen([str(args.bin_dir / "fake-openai"), "--listen", "127.0.0.1:0", "--api-key", "upstream-secret"],
                                stdout=subprocess.PIPE)
        procs.append(fake)
        line = fake.stdout.readline().decode().strip()
        if not line.startswith("listening on http://"):
            print(f"fake-openai did not start: {line!r}", file=sys.stderr)
            return 1
        fake_url = line.removeprefix("listening on ")

        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGATE_")}
        env.update(OPENAI_API_KEY="upstream-secret", OPENAI_BASE_URL=f"{fake_url}/v1", IMAGEGATE_DATA_DIR=data_dir)
        log = tempfile.TemporaryFile()
        gateway = subprocess.Popen(
            [str(args.bin_dir / "imagegate"), "serve", "--listen", f"127.0.0.1:{port}", *args.serve_arg],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(gateway)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if gateway.poll() is not None:
                log.seek(0)
                print(f"imagegate serve exited: {log.read().decode(errors='replace')}", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    print("imagegate serve did not answer /health", file=sys.stderr)
                    return 1
                time.sleep(0.1)

        pid = gateway.pid
        time.sleep(0.5)
        before = status_kib(pid, "VmRSS")
        body, content_type = multipart({"model": "gpt-image-1", "prompt": "a bomb"}, "image", "bomb.png", image)

        results = [None] * args.concurrency

        def edit(i: int) -> None:
            req = urllib.request.Request(f"{url}/v1/images/edits", data=body, method="POST",
                                         headers={"Content-Type": content_type})
            started = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=600) as resp:
                    results[i] = (resp.status, "", time.monotonic() - started)
            except urllib.error.HTTPError as e:
                results[i] = (e.code, e.read().decode(errors="replace")[:200], time.monotonic() - started)

        peak_sample = before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_sample
            while not done.is_set():
                peak_sample = max(peak_sample, status_kib(pid, "VmRSS"))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=edit, args=(i,)) for i in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        sampler.join()
        time.sleep(args.settle)
        after = status_kib(pid, "VmRSS")
        hwm = status_kib(pid, "VmHWM")

        for i, (status, text, secs) in enumerate(results):
            print(f"edit {i}: {status} in {secs:.1f} s {text}")
        mib = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
        print(f"VmRSS before: {mib(before)}; peak: {mib(hwm)} (VmHWM), {mib(peak_sample)} (highest sample); "
              f"after (+{args.settle:.0f} s): {mib(after)}")
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
