// The chat page at `/` in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; nothing is downloaded): two pages and a Node client chat, the server is
// restarted, and the pages come back by themselves with what they missed.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { chromium } from "playwright-core";
import { WebSocket } from "ws";
import { Client } from "../dist/index.js";
import { startHost, cleanup, waitFor, inbox, received, tempDir, secretFile, mintToken } from "../test/host.mjs";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** Deadline for what a page shows (reconnects back off up to a few seconds). */
const SHOWN_MS = 20_000;

async function login(page, id, name) {
  await page.fill("#uid", String(id));
  await page.fill("#name", name);
  await page.click("#login");
  await page.waitForSelector("#chat-view:not([hidden])");
}

/** The texts of the open conversation's messages. */
function texts(page) {
  return page.$$eval("#messages li:not(.note) .text", (els) => els.map((e) => e.textContent));
}

async function shows(page, text, ms = SHOWN_MS) {
  await waitFor(`${JSON.stringify(text)} on the page`, async () => (await texts(page)).includes(text), ms);
}

test("two pages and a Node client chat across a server restart", { timeout: 150_000 }, async (t) => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium chromium-driver`);
  let host = await startHost();
  const { dataDir, port } = host;
  // playwright-core starts Chromium on a fresh, empty profile of its own (--user-data-dir).
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS });
  const problems = [];
  const pages = [];
  async function newPage(label, viewport) {
    const context = await browser.newContext({ viewport });
    const page = await context.newPage();
    page.on("console", (m) => {
      if (m.type() === "error") problems.push(`${label} console: ${m.text()}`);
    });
    page.on("pageerror", (e) => problems.push(`${label} uncaught: ${e.message}`));
    await page.goto(host.url + "/");
    pages.push(page);
    return page;
  }
  const carol = new Client({ url: host.url, userId: 3, userName: "carol", WebSocket, reconnect: { initialDelayMs: 50, maxDelayMs: 300 } });
  try {
    const alice = await newPage("alice", { width: 1000, height: 700 });
    const bob = await newPage("bob", { width: 375, height: 700 }); // a phone
    await login(alice, 1, "alice");
    await login(bob, 2, "bob");
    await carol.connect();
    const toCarol = inbox(carol);

    // Presence: bob and carol appear in alice's online list without a click.
    await alice.waitForSelector('#online li[data-user="2"]', { timeout: SHOWN_MS });
    await alice.waitForSelector('#online li[data-user="3"]', { timeout: SHOWN_MS });

    // Group: alice → everyone; her own message is marked as hers.
    await alice.fill("#draft", "hello from alice");
    await alice.click("#send");
    await shows(alice, "hello from alice");
    assert.equal(await alice.$eval("#messages li.own .text", (e) => e.textContent), "hello from alice");
    await shows(bob, "hello from alice");
    assert.match(await bob.$eval("#messages li.other .from", (e) => e.textContent), /alice \(1\)/);
    assert.match(await bob.$eval("#messages li.other time", (e) => e.textContent), /\d/);
    await received(toCarol, "hello from alice");

    // Private: carol (Node) → bob; bob's page opens the conversation with carol and replies.
    await carol.sendPrivate(2, "psst bob");
    await bob.waitForSelector('#conversations li[data-conv="3"] .unread', { timeout: SHOWN_MS });
    await bob.click('#conversations li[data-conv="3"]');
    await shows(bob, "psst bob");
    assert.match(await bob.textContent("#title"), /carol \(3\)/);
    await bob.fill("#draft", "hi carol");
    await bob.press("#draft", "Enter");
    await received(toCarol, "hi carol");

    // A long unbroken word wraps: no sideways scrolling, also at phone width.
    const word = "x".repeat(3000);
    await carol.sendPrivate(2, word);
    await shows(bob, word);
    for (const page of [alice, bob]) {
      const wide = await page.evaluate(() => document.documentElement.scrollWidth > document.documentElement.clientWidth);
      assert.equal(wide, false, "the page scrolls sideways");
    }

    // XSS: markup in a message is shown as text.
    await carol.sendGroup("<img src=x onerror=window.pwned=1>");
    await shows(alice, "<img src=x onerror=window.pwned=1>");
    assert.equal(await alice.evaluate(() => window.pwned), undefined);

    // The server goes away: both pages say so. A page that tries to log in meanwhile is told why.
    const late = await newPage("late", { width: 800, height: 600 });
    await host.stop("SIGTERM");
    for (const page of [alice, bob]) {
      await page.waitForSelector("#banner:not([hidden])", { timeout: SHOWN_MS });
      assert.match(await page.textContent("#banner"), /[Rr]econnect/);
    }
    await late.fill("#uid", "4");
    await late.fill("#name", "dave");
    await late.click("#login");
    await waitFor("the login error", async () => /Cannot reach the server/.test(await late.textContent("#login-error")));

    // A send while disconnected keeps the draft.
    await alice.fill("#draft", "typed while down");
    await alice.click("#send");
    await waitFor("the send error", async () => /Not sent/.test(await alice.textContent("#send-error")));
    assert.equal(await alice.inputValue("#draft"), "typed while down");

    host = await startHost({ dataDir, port });
    // Carol is back first and writes while the pages may still be away.
    await waitFor("carol back", () => carol.state === "connected", SHOWN_MS);
    await carol.sendGroup("missed while restarting");
    await carol.sendPrivate(2, "missed private");
    for (const page of [alice, bob]) {
      await page.waitForSelector("#banner", { state: "hidden", timeout: SHOWN_MS });
    }
    await shows(alice, "missed while restarting");
    await shows(bob, "missed private"); // bob still has carol's conversation open
    await bob.click('#conversations li[data-conv="group"]');
    await shows(bob, "missed while restarting");

    // The kept draft goes out now; it is cleared once the server acknowledges it, which may
    // reach alice after bob already has the message.
    await alice.click("#send");
    await shows(bob, "typed while down");
    await waitFor("alice's draft cleared by the ACK", async () => (await alice.inputValue("#draft")) === "");

    // Log out closes the socket: alice leaves bob's online list, and logs in again from the
    // same tab without a ghost session in the way.
    await alice.click("#logout");
    await alice.waitForSelector("#login-view:not([hidden])");
    await waitFor("alice gone from bob's list", async () => !(await bob.$('#online li[data-user="1"]')), SHOWN_MS);
    await login(alice, 1, "alice");
    await shows(alice, "typed while down"); // history on load
    await bob.waitForSelector('#online li[data-user="1"]', { timeout: SHOWN_MS });

    if (process.env.SCREENSHOTS) {
      for (const [name, page] of [["alice", alice], ["bob", bob], ["late", late]]) {
        await page.screenshot({ path: `${process.env.SCREENSHOTS}/${name}.png` });
      }
    }
    for (const p of problems.filter(expected)) t.diagnostic(`expected while the server was down: ${p}`);
    assert.deepEqual(problems.filter((p) => !expected(p)), []);
  } finally {
    await carol.close();
    await browser.close();
    await host.stop();
    cleanup(dataDir);
  }
});

test("with tokens on, the page asks for one, refuses a bad one, and logs in as its subject", { timeout: 60_000 }, async () => {
  const dir = tempDir();
  const secret = secretFile(dir);
  const host = await startHost({ args: ["--auth-hmac-secret-file", secret] });
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS });
  const problems = [];
  try {
    const page = await browser.newPage();
    page.on("console", (m) => m.type() === "error" && problems.push(m.text()));
    page.on("pageerror", (e) => problems.push(e.message));
    await page.goto(host.url + "/");
    await page.waitForSelector("#token-label:not([hidden])");
    await page.fill("#token", "not-a-token");
    await page.click("#login");
    await waitFor("the refusal", async () => /token was refused/.test(await page.textContent("#login-error")));
    await page.fill("#token", mintToken(secret, 21, "tina"));
    await page.click("#login");
    await page.waitForSelector("#chat-view:not([hidden])");
    assert.equal(await page.textContent("#me"), "tina (21)");
    await page.fill("#draft", "signed in");
    await page.click("#send");
    await shows(page, "signed in");
    // The refused login's 401 is the one error Chromium logs (a failed resource load).
    assert.deepEqual(problems.filter((p) => !/status of 401/.test(p)), []);
  } finally {
    await browser.close();
    await host.stop();
    cleanup(host.dataDir);
    cleanup(dir);
  }
});

/** Chromium logs failed connections to a stopped server itself; the page's own code logs nothing. */
function expected(problem) {
  return /ERR_CONNECTION_REFUSED|WebSocket connection to .* failed/.test(problem);
}
