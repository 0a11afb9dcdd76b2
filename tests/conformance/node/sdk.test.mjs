// imagegate against the official OpenAI Node SDK (pinned in package.json), as the Python suite next to
// it does with the Python SDK: the fake upstream (`fake-openai`) and `imagegate serve` pointed at it
// are started once, then each test uses the unmodified client the way a user would and checks what
// the user sees. Run by tests/conformance/run.sh; by hand:
//
//     cargo build -p imagegate -p fake-openai --bins
//     cd tests/conformance/node && npm ci && npm test
//
// IMAGEGATE_BIN_DIR overrides where the two binaries are looked up (default: the cargo target
// directory's debug/).

import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import OpenAI, { toFile } from "openai";

import { startFake, startGateway } from "../../support/servers.mjs";

const GATEWAY_KEY = "sk-conformance-node";
// Small enough that the refusal test's upload passes it quickly.
const MAX_BODY_BYTES = 4_000_000;

const procs = [];
let gateway;
let dataDir;

// The models OpenAI shut down (gpt-image-1-mini on 2026-12-01, DALL-E on 2026-05-12) come from a
// compatible gateway that still has them (the fake), named in the config; the zero-config `openai`
// upstream (OPENAI_API_KEY) serves the live ones (gpt-image-2).
const compatConfig = (fakeUrl) => `
[providers.compat]
base_url = "${fakeUrl}/v1"
api_key_env = "OPENAI_API_KEY"
models = ["gpt-image-1-mini", "gpt-image-1", "gpt-image-1.5", "dall-e-3", "dall-e-2"]
`;

before(async () => {
  const fakeUrl = await startFake(procs);
  dataDir = mkdtempSync(join(tmpdir(), "imagegate-conformance-node-"));
  const config = join(dataDir, "imagegate.toml");
  writeFileSync(config, compatConfig(fakeUrl));
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("IMAGEGATE_")));
  Object.assign(env, {
    OPENAI_API_KEY: "upstream-secret",
    OPENAI_BASE_URL: `${fakeUrl}/v1`,
    IMAGEGATE_API_KEYS: GATEWAY_KEY,
    IMAGEGATE_DATA_DIR: dataDir,
  });
  gateway = await startGateway(procs, ["--max-body-bytes", String(MAX_BODY_BYTES), "--config", config], env);
});

after(() => {
  for (const p of procs.reverse()) p.kill();
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

/** The unmodified client, as a user makes it; no retries, so that an error shows as it arrived. */
function client(options = {}) {
  return new OpenAI({ apiKey: GATEWAY_KEY, baseURL: `${gateway}/v1`, maxRetries: 0, timeout: 60_000, ...options });
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

function assertPng(bytes) {
  assert.ok(bytes.subarray(0, 8).equals(PNG_SIGNATURE), "expected a PNG");
}

/** A valid PNG of `side` x `side` pixels (stored, uncompressed deflate), plus `padding` bytes in a
 * private ancillary chunk, so that its size can be chosen. */
function png(side, padding = 0) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type, "ascii"), data]);
    const sum = Buffer.alloc(4);
    sum.writeUInt32BE(crc(body));
    return Buffer.concat([len, body, sum]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(side, 0);
  ihdr.writeUInt32BE(side, 4);
  ihdr.set([8, 2, 0, 0, 0], 8); // 8-bit RGB
  const row = Buffer.concat([Buffer.from([0]), Buffer.alloc(side * 3, 0x80)]);
  const raw = Buffer.concat(Array.from({ length: side }, () => row));
  // zlib stream of stored blocks (at most 65535 bytes each), then the Adler-32 of the data.
  const blocks = [];
  for (let i = 0; i < raw.length; i += 65535) {
    const part = raw.subarray(i, i + 65535);
    const head = Buffer.alloc(5);
    head[0] = i + 65535 >= raw.length ? 1 : 0;
    head.writeUInt16LE(part.length, 1);
    head.writeUInt16LE(~part.length & 0xffff, 3);
    blocks.push(head, part);
  }
  let a = 1;
  let b = 0;
  for (const v of raw) {
    a = (a + v) % 65521;
    b = (b + a) % 65521;
  }
  const adler = Buffer.alloc(4);
  adler.writeUInt32BE(((b << 16) | a) >>> 0);
  const idat = Buffer.concat([Buffer.from([0x78, 0x01]), ...blocks, adler]);
  const parts = [PNG_SIGNATURE, chunk("IHDR", ihdr)];
  if (padding > 0) parts.push(chunk("prVt", Buffer.alloc(padding, 7)));
  parts.push(chunk("IDAT", idat), chunk("IEND", Buffer.alloc(0)));
  return Buffer.concat(parts);
}

test("generate: a GPT image model answers base64 with usage", async () => {
  const r = await client().images.generate({ model: "gpt-image-1-mini", prompt: "an otter", size: "1024x1024" });
  assert.equal(r.data.length, 1);
  assertPng(Buffer.from(r.data[0].b64_json, "base64"));
  assert.ok(r.usage.total_tokens > 0);
  assert.equal(r.size, "1024x1024");
});

test("generate: response_format url works for a GPT image model and the URL serves the image", async () => {
  const r = await client().images.generate({
    model: "gpt-image-1-mini",
    prompt: "an otter",
    size: "1024x1024",
    n: 2,
    response_format: "url",
  });
  assert.equal(r.data.length, 2);
  for (const d of r.data) {
    assert.equal(d.b64_json, undefined);
    assert.ok(d.url.startsWith(`${gateway}/v1/images/img_`), d.url);
    const image = await fetch(d.url);
    assert.equal(image.status, 200);
    assert.equal(image.headers.get("content-type"), "image/png");
    assertPng(Buffer.from(await image.arrayBuffer()));
  }
  const missing = await fetch(`${gateway}/v1/images/img_nothing/content`);
  assert.equal(missing.status, 404);
  assert.equal((await missing.json()).error.code, "image_not_found");
});

test("gpt-image-2 takes any size within its rule; models carry their shutdown dates", async () => {
  const r = await client().images.generate({ model: "gpt-image-2", prompt: "a wide harbour", size: "2048x1152", quality: "low" });
  assertPng(Buffer.from(r.data[0].b64_json, "base64"));
  assert.equal(r.usage.output_tokens, 157);
  await assert.rejects(
    async () => client().images.generate({ model: "gpt-image-2", prompt: "p", size: "1000x1000" }),
    (e) => e instanceof OpenAI.BadRequestError && e.param === "size",
  );
  assert.equal((await client().models.retrieve("gpt-image-1-mini")).shutdown_date, "2026-12-01");
  assert.equal((await client().models.retrieve("gpt-image-2")).shutdown_date, null);
});

test("generate: DALL-E answers with a URL by default", async () => {
  const r = await client().images.generate({ model: "dall-e-3", prompt: "an otter" });
  assert.ok(r.data[0].url.startsWith(gateway), r.data[0].url);
  assert.equal((await fetch(r.data[0].url)).status, 200);
});

test("variations: dall-e-2 answers with URLs by default, and base64 when asked", async () => {
  const image = async () => toFile(png(64), "otter.png", { type: "image/png" });
  const r = await client().images.createVariation({ image: await image(), n: 2, size: "256x256" });
  assert.equal(r.data.length, 2);
  for (const d of r.data) {
    const fetched = await fetch(d.url);
    assert.equal(fetched.status, 200);
    assertPng(Buffer.from(await fetched.arrayBuffer()));
  }
  const b64 = await client().images.createVariation({ image: await image(), response_format: "b64_json" });
  assertPng(Buffer.from(b64.data[0].b64_json, "base64"));
});

test("edit: multipart with an image and a mask", async () => {
  const r = await client().images.edit({
    model: "gpt-image-1-mini",
    prompt: "add a hat",
    image: await toFile(png(64), "otter.png", { type: "image/png" }),
    size: "1024x1024",
  });
  assertPng(Buffer.from(r.data[0].b64_json, "base64"));
  assert.ok(r.usage.input_tokens_details.image_tokens > 0);
});

test("edit: JSON with a data URL", async () => {
  const url = `data:image/png;base64,${png(64).toString("base64")}`;
  const r = await client().post("/images/edits", {
    body: { model: "gpt-image-1-mini", prompt: "add a hat", images: [{ image_url: url }] },
  });
  assertPng(Buffer.from(r.data[0].b64_json, "base64"));
});

test("generate: a stream of partial images, then the completed image with usage", async () => {
  const stream = await client().images.generate({
    model: "gpt-image-1-mini",
    prompt: "an otter",
    stream: true,
    partial_images: 2,
  });
  const types = [];
  let completed;
  for await (const event of stream) {
    types.push(event.type);
    if (event.type === "image_generation.completed") completed = event;
  }
  assert.deepEqual(types, [
    "image_generation.partial_image",
    "image_generation.partial_image",
    "image_generation.completed",
  ]);
  assertPng(Buffer.from(completed.b64_json, "base64"));
  assert.ok(completed.usage.total_tokens > 0);
});

/** Calls `run` and returns the error it throws, which must be the SDK's error for `status`. */
async function refused(run, status, ErrorClass) {
  const e = await run().then(
    () => assert.fail(`expected a ${status}`),
    (err) => err,
  );
  assert.ok(!(e instanceof OpenAI.APIConnectionError), `a connection error instead of ${status}: ${e}`);
  assert.ok(e instanceof ErrorClass, `${e.constructor.name}: ${e.message}`);
  assert.equal(e.status, status);
  assert.ok(e.error && typeof e.error.message === "string", JSON.stringify(e.error));
  return e;
}

// A multipart upload of ~3 MB: larger than the socket buffers, so a server that answered without
// reading it would break the upload (Node saw "Connection error." and retried).
const upload = async () => toFile(png(64, 3_000_000), "big.png", { type: "image/png" });

test("errors on multipart uploads arrive as their status: 401", async () => {
  const bad = client({ apiKey: "sk-wrong" });
  await refused(
    async () => bad.images.edit({ model: "gpt-image-1-mini", prompt: "x", image: await upload() }),
    401,
    OpenAI.AuthenticationError,
  );
});

test("errors on multipart uploads arrive as their status: 404", async () => {
  const elsewhere = client({ baseURL: `${gateway}/v1/nothing` });
  await refused(
    async () => elsewhere.images.edit({ model: "gpt-image-1-mini", prompt: "x", image: await upload() }),
    404,
    OpenAI.NotFoundError,
  );
});

test("errors on multipart uploads arrive as their status: 413", async () => {
  const big = await toFile(png(64, MAX_BODY_BYTES + 1_000_000), "huge.png", { type: "image/png" });
  const e = await refused(
    async () => client().images.edit({ model: "gpt-image-1-mini", prompt: "x", image: big }),
    413,
    OpenAI.APIError,
  );
  assert.equal(e.code, "payload_too_large");
});

test("errors on uploads arrive as their status: 415", async () => {
  const e = await refused(
    () =>
      client().post("/images/edits", {
        body: Buffer.alloc(3_000_000, 65),
        headers: { "Content-Type": "text/plain" },
      }),
    415,
    OpenAI.APIError,
  );
  assert.equal(e.code, "unsupported_media_type");
});
