// What the Node suites (tests/conformance/node, tests/console) share: finding the binaries, and
// starting the fake upstream and `imagegate serve` as child processes that the caller stops.

import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

/** Where the binaries are: IMAGEGATE_BIN_DIR, else the cargo target directory's debug/. */
export function binDir() {
  if (process.env.IMAGEGATE_BIN_DIR) return process.env.IMAGEGATE_BIN_DIR;
  const target = process.env.CARGO_TARGET_DIR || join(REPO, "target");
  return join(isAbsolute(target) ? target : join(REPO, target), "debug");
}

/** A TCP port free on 127.0.0.1 right now. */
export function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** The fake upstream, accepting `upstream-secret`; pushed onto `procs`. Resolves to its base URL (it
 * prints `listening on http://ADDR` once bound). */
export function startFake(procs) {
  const fake = spawn(join(binDir(), "fake-openai"), ["--listen", "127.0.0.1:0", "--api-key", "upstream-secret"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  procs.push(fake);
  return new Promise((ok, fail) => {
    let out = "";
    const timer = setTimeout(() => fail(new Error(`fake-openai did not announce its address: ${out}`)), 10_000);
    fake.stdout.on("data", (chunk) => {
      out += chunk;
      const line = out.split("\n")[0];
      if (out.includes("\n") && line.startsWith("listening on http://")) {
        clearTimeout(timer);
        ok(line.slice("listening on ".length).trim());
      }
    });
    fake.once("exit", (code) => fail(new Error(`fake-openai exited with ${code}`)));
  });
}

/** `imagegate serve --listen 127.0.0.1:PORT ...args` with `env`; pushed onto `procs`. Resolves to its
 * URL once GET /health answers 200 (within 30 s). */
export async function startGateway(procs, args, env) {
  const port = await freePort();
  const serve = spawn(join(binDir(), "imagegate"), ["serve", "--listen", `127.0.0.1:${port}`, ...args], {
    env,
    cwd: tmpdir(),
    stdio: ["ignore", "ignore", "inherit"],
  });
  procs.push(serve);
  const gateway = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (serve.exitCode !== null) throw new Error(`imagegate serve exited with ${serve.exitCode}`);
    try {
      if ((await fetch(`${gateway}/health`)).status === 200) return gateway;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`imagegate did not answer ${gateway}/health in 30 s`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
