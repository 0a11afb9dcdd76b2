// The usage console in a real browser: Debian's Chromium (headless) driven by Playwright. The fake
// upstream (`fake-openai`) and `imagegate serve` in front of it are started once, with an admin key and
// a user key made by `imagegate keys create`; requests go through the gateway, then the tests use the
// console as a person would. Run by tests/console/run.sh; by hand:
//
//     cargo build -p imagegate -p fake-openai --bins
//     cd tests/console && npm ci && npm test
//
// IMAGEGATE_BIN_DIR overrides where the binaries are looked up (default: the cargo target directory's
// debug/); CHROMIUM the browser (default /usr/bin/chromium); CONSOLE_SCREENSHOT, when set, is where the
// console's screenshot is written (README.md shows one).

import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

import { binDir, startFake, startGateway } from "../support/servers.mjs";

const procs = [];
let gateway;
let dataDir;
let browser;
let adminKey;
let cliEnv;
let userKey;
const costs = { "gpt-image-1-mini": [], "dall-e-2": [] };

/** `imagegate keys create` on the data dir's ledger: the secret is its output's last line. */
function createKey(env, name, scope, ...options) {
  const args = ["keys", "create", "--name", name, "--scope", scope, ...options];
  const out = execFileSync(join(binDir(), "imagegate"), args, { env, encoding: "utf8" });
  return out.trim().split("\n").pop().trim();
}

before(async () => {
  const fakeUrl = await startFake(procs);
  dataDir = mkdtempSync(join(tmpdir(), "imagegate-console-"));
  const config = join(dataDir, "imagegate.toml");
  writeFileSync(
    config,
    `[providers.compat]\nbase_url = "${fakeUrl}/v1"\napi_key_env = "UPSTREAM_KEY"\nmodels = ["gpt-image-1-mini", "dall-e-2"]\n`,
  );
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith("IMAGEGATE_") && !k.startsWith("OPENAI_")),
  );
  Object.assign(env, { UPSTREAM_KEY: "upstream-secret", IMAGEGATE_DATA_DIR: dataDir });
  cliEnv = env;
  adminKey = createKey(env, "ops", "admin");
  execFileSync(join(binDir(), "imagegate"), ["keys", "project", "create", "--name", "design", "--budget-usd", "50", "--period", "month"], { env });
  // A budget whose soft limit the requests below pass: the keys table highlights it.
  userKey = createKey(env, "app <frontend>", "user", "--project", "design", "--budget-usd", "5", "--period", "month",
    "--soft-budget-usd", "0.02", "--image-quota", "500", "--rpm", "60");
  gateway = await startGateway(procs, ["--config", config], env);
  // Spending through the fake upstream, as an application would.
  for (const [model, prompts] of [
    ["gpt-image-1-mini", ["an otter", "two otters", "a lighthouse at dusk"]],
    ["dall-e-2", ["a fox"]],
  ]) {
    for (const prompt of prompts) {
      const body = model === "dall-e-2" ? { model, prompt, response_format: "b64_json" } : { model, prompt, quality: "low" };
      const r = await fetch(`${gateway}/v1/images/generations`, {
        method: "POST",
        headers: { authorization: `Bearer ${userKey}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      assert.equal(r.status, 200, await r.text());
      costs[model].push(r.headers.get("x-imagegate-cost-usd"));
    }
  }
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
});

after(async () => {
  if (browser) await browser.close();
  for (const p of procs.reverse()) p.kill();
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

/** A decimal amount of USD as integer nano-dollars (the ledger's unit; never a float). */
function nanos(decimal) {
  const [whole, fraction = ""] = decimal.split(".");
  return BigInt(whole) * 1_000_000_000n + BigInt((fraction + "000000000").slice(0, 9));
}

/** Logs in through the form, as a person types the key. */
async function logIn(page, key) {
  await page.goto(`${gateway}/console`);
  assert.match(page.url(), /\/console\/login$/, "without a session the console sends to the login form");
  await page.fill("#key", key);
  await page.click("button");
}

test("an admin logs in and sees the spend chart, the keys and the requests", async () => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  await logIn(page, adminKey);
  assert.match(page.url(), /\/console$/);
  assert.equal(await page.locator("h2", { hasText: "Spend" }).count(), 1);
  assert.ok((await page.locator("svg rect").count()) >= 1, "the chart has today's bar");
  // The keys table: both keys, the user key's name shown as text, not markup.
  const keys = page.locator("#keys table");
  assert.ok((await keys.innerText()).includes("app <frontend>"));
  assert.ok((await keys.innerText()).includes("ops"));
  // Every request, and no secret anywhere on the page.
  const html = await page.content();
  assert.ok(!html.includes(adminKey) && !html.includes(userKey), "a key reached the page");
  const rows = page.locator("#requests table tbody tr");
  assert.equal(await rows.count(), 4);

  // The session cookie: HttpOnly, SameSite, scoped to the console, and not the key.
  const [cookie] = (await context.cookies()).filter((c) => c.name === "imagegate_console");
  assert.ok(cookie, "no session cookie");
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, "Strict");
  assert.equal(cookie.path, "/console");
  assert.notEqual(cookie.value, adminKey);
  assert.equal(await page.evaluate(() => document.cookie), "", "scripts cannot read the session");
  assert.equal(await page.evaluate(() => JSON.stringify(localStorage)), "{}", "nothing in local storage");

  // Filtering by model.
  await page.selectOption("#model", "dall-e-2");
  await page.click("#requests form button");
  assert.equal(new URL(page.url()).searchParams.get("model"), "dall-e-2");
  assert.equal(await rows.count(), 1);
  assert.ok((await rows.first().innerText()).includes("dall-e-2"));

  if (process.env.CONSOLE_SCREENSHOT) {
    await page.goto(`${gateway}/console`);
    await page.screenshot({ path: process.env.CONSOLE_SCREENSHOT, fullPage: true });
  }
  // Logging out: back to the form, and the console is closed again.
  await page.click("form[action='/console/logout'] button");
  assert.match(page.url(), /\/console\/login$/);
  await page.goto(`${gateway}/console`);
  assert.match(page.url(), /\/console\/login$/);
  await context.close();
});

test("the model totals are the costs the responses reported, to the last digit", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await logIn(page, adminKey);
  const totals = await page.locator("#spend table tbody tr").allInnerTexts();
  for (const [model, reported] of Object.entries(costs)) {
    // Exact decimal sum of the reported costs, in integer nano-dollars (never a float).
    const sum = reported.map(nanos).reduce((a, b) => a + b);
    const row = totals.find((t) => t.startsWith(model));
    assert.ok(row, `${model} missing from ${totals}`);
    const shown = row.split("\t").pop().replace("$", "");
    assert.equal(nanos(shown), sum, `${model}: ${shown} against ${reported}`);
  }
  await context.close();
});

test("a user key cannot log in, and the form says why", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await logIn(page, userKey);
  assert.match(page.url(), /\/console\/login$/);
  assert.ok((await page.locator("[role=alert]").innerText()).includes("admin key"));
  assert.equal((await context.cookies()).length, 0, "no session for a user key");
  await context.close();
});

test("split by key, the CSV download is `imagegate usage --csv`, row for row", async () => {
  const context = await browser.newContext({ acceptDownloads: true });
  const page = await context.newPage();
  await logIn(page, adminKey);
  await page.selectOption("select[name=by]", "key");
  await page.click("form.view button");
  assert.equal(new URL(page.url()).searchParams.get("by"), "key");
  const totals = await page.locator("#spend table tbody tr").allInnerTexts();
  assert.equal(totals.length, 1, `only the user key spent: ${totals}`);
  assert.ok(totals[0].startsWith("app <frontend> (ig-"), totals[0]);

  const link = page.locator("a", { hasText: "Download CSV" });
  const href = new URL(await link.getAttribute("href"), gateway);
  assert.equal(href.searchParams.get("by"), "key,day");
  const [download] = await Promise.all([page.waitForEvent("download"), link.click()]);
  const csv = readFileSync(await download.path(), "utf8");
  const cli = execFileSync(
    join(binDir(), "imagegate"),
    ["usage", "--csv", "--by", "key,day", "--since", href.searchParams.get("from"), "--until", href.searchParams.get("to")],
    { env: cliEnv, encoding: "utf8" },
  );
  assert.equal(csv, cli);
  assert.match(csv, /^key_id,key_prefix,key_name,day,requests,/);
  assert.equal(csv.trim().split("\n").length, 2, csv);
  assert.ok(csv.includes("app <frontend>"), csv);
  await context.close();
});

test("the estimate form prices a job as the estimates endpoint does", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await logIn(page, adminKey);
  await page.fill("#est-model", "gpt-image-1-mini");
  await page.selectOption("#est-quality", "high");
  await page.fill("#est-count", "250");
  await page.click("form.estimate button");
  const r = await fetch(`${gateway}/v1/images/estimates`, {
    method: "POST",
    headers: { authorization: `Bearer ${userKey}`, "content-type": "application/json" },
    body: JSON.stringify({
      requests: [{ model: "gpt-image-1-mini", quality: "high", size: "1024x1024", count: 250, prompt_words: 30 }],
    }),
  });
  const expected = await r.json();
  assert.equal(r.status, 200, JSON.stringify(expected));
  assert.equal(await page.locator("h2").first().innerText(), `Estimated total: $${expected.total_usd}`);
  // A bad field is named on the page, with the form kept.
  await page.fill("#est-count", "2000000");
  await page.click("form.estimate button");
  assert.match(await page.locator("[role=alert]").innerText(), /^count: /);
  assert.equal(await page.inputValue("#est-count"), "2000000");
  assert.equal(await page.inputValue("#est-model"), "gpt-image-1-mini");
  await context.close();
});

test("at phone width the page fits, the wide tables scroll in their own boxes", async () => {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true });
  const page = await context.newPage();
  await logIn(page, adminKey);
  assert.match(page.url(), /\/console$/);
  // The document's own width, against the screen's (not the layout viewport's, which a phone widens to
  // fit what overflows).
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(width <= 390, `the page is ${width}px wide on a 390px screen`);
  assert.ok(await page.locator("#keys .scroll").isVisible());
  await context.close();
});

test("keys and projects: budget, spent, quota, limits, last use; past the soft limit highlighted", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await logIn(page, adminKey);
  const app = page.locator("#keys tbody tr", { hasText: "app <frontend>" });
  const cells = await app.locator("td").allInnerTexts();
  assert.equal(cells[3], "design");
  assert.equal(cells[4], "$5 per month, soft $0.02");
  const spent = Object.values(costs).flat().map(nanos).reduce((a, b) => a + b);
  assert.equal(nanos(cells[5].replace("$", "")), spent);
  assert.equal(cells[8], "4 of 500");
  assert.equal(cells[9], "60 requests/min");
  assert.match(cells[10], /^\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC$/);
  assert.equal(await app.getAttribute("class"), "near", "past its soft limit");
  assert.equal(await page.locator("#keys tbody tr", { hasText: "ops" }).getAttribute("class"), null);
  const design = await page.locator("#projects tbody tr", { hasText: "design" }).locator("td").allInnerTexts();
  assert.equal(design[1], "$50 per month");
  assert.equal(nanos(design[2].replace("$", "")), spent);
  assert.equal(design[6], "1", "one key");
  await context.close();
});
