// Drives the admin page in headless Chromium, as an operator would:
//
//   node check.mjs <base-url> <admin-token> <screenshot-path>
//
// Environment (set by tests/admin_page.rs):
//   CHECK_ROOM           the room whose members sit on two instances
//   CHECK_WAITING_ROOM   a room with a member and nothing stored (optional)
//   CHECK_INSTANCES      the instances holding the room's members (comma list)
//   CHECK_DISCONNECT_ON  the instance whose member the page disconnects
//   CHECK_METRICS        "1" if /metrics is reachable, so rates must show
//   CHECK_USER_DATA_DIR  a fresh, empty browser profile directory
//   CHECK_REQUEST_LOG    where to write every request URL the browser made
//
// Prints `disconnected <connection id>` and exits 0 on success; any failed
// step throws, and the browser is closed either way.

import { writeFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [base, token, screenshot] = process.argv.slice(2);
if (!base || !token || !screenshot) {
  console.error("usage: node check.mjs <base-url> <admin-token> <screenshot-path>");
  process.exit(64);
}
const room = process.env.CHECK_ROOM || "table-7";
const waitingRoom = process.env.CHECK_WAITING_ROOM || "";
const expectedInstances = (process.env.CHECK_INSTANCES || "node-1,node-2").split(",");
const disconnectOn = process.env.CHECK_DISCONNECT_ON || "node-2";
const expectMetrics = process.env.CHECK_METRICS === "1";
const userDataDir = process.env.CHECK_USER_DATA_DIR;
const requestLog = process.env.CHECK_REQUEST_LOG;
if (!userDataDir) {
  console.error("CHECK_USER_DATA_DIR must name a fresh directory");
  process.exit(64);
}

// Only the page's own origin is ever contacted; anything else is an error.
const requests = [];
const problems = [];

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1400, height: 1000 },
  timeout: 30_000,
});

// Whatever happens below, the browser goes away before this process does.
const watchdog = setTimeout(async () => {
  console.error("check.mjs: gave up after 120 s");
  await context.close().catch(() => {});
  process.exit(3);
}, 120_000);

context.on("request", (request) => requests.push(request.url()));

// `expected`: statuses the browser may log as failed loads on this page.
function watch(page, name, expected) {
  page.setDefaultTimeout(15_000);
  page.on("console", (message) => {
    if (message.type() === "error" && !expected.test(message.text())) {
      problems.push(`${name} console: ${message.text()}`);
    }
  });
  page.on("pageerror", (error) => problems.push(`${name} error: ${error.message}`));
  return page;
}

function step(text) {
  console.log(`step: ${text}`);
}

let failed = false;
try {
  // 1. Sign in through the fragment.
  // /metrics is not exposed through the load balancer: its 404 is expected.
  const page = watch(await context.newPage(), "fragment page", /status of 404/);
  step("sign in via #token=");
  await page.goto(`${base}/admin/#token=${encodeURIComponent(token)}`);
  await page.locator("#dashboard").waitFor({ state: "visible" });
  if (page.url().includes(token) || page.url().includes("#")) {
    throw new Error(`the token stayed in the address bar: ${page.url()}`);
  }
  const stored = await page.evaluate(() => sessionStorage.getItem("croupier.adminToken"));
  if (stored !== token) throw new Error("the token was not kept in sessionStorage");

  // 2. The room and its members on every instance that holds one.
  step(`room ${room} with members on ${expectedInstances}`);
  const roomRow = page.locator(`#rooms tr[data-room="${room}"]`);
  await roomRow.waitFor();
  await page.waitForFunction(
    ([key, names]) => {
      const row = document.querySelector(`#rooms tr[data-room="${key}"]`);
      const perInstance = row ? row.cells[2].textContent : "";
      return Number(row?.cells[1].textContent) >= 2 && names.every((n) => perInstance.includes(`${n}:`));
    },
    [room, expectedInstances],
  );
  const members = page.locator("#connections tbody tr[data-connection]").filter({ hasText: room });
  if ((await members.count()) < 2) throw new Error("fewer than two connections listed for the room");
  const instances = await page.locator("#instances tbody tr").evaluateAll((rows) =>
    rows.map((row) => row.dataset.instance),
  );
  for (const name of expectedInstances) {
    if (!instances.includes(name)) throw new Error(`instance ${name} not listed: ${instances}`);
  }
  if (expectMetrics) {
    step("rates from /metrics");
    await page.locator("#counters dt").filter({ hasText: "(this instance)" }).first().waitFor();
  }
  if (waitingRoom) {
    step(`room ${waitingRoom} with a member and nothing stored`);
    await page.locator(`#rooms tr[data-room="${waitingRoom}"]`).waitFor();
  }

  // 3. A room's history, on click.
  step("history of the room");
  await roomRow.click();
  await page.locator("#room-history li").first().waitFor();

  // 4. Disconnect the member held by the chosen instance; it leaves the list.
  step(`disconnect the member on ${disconnectOn}`);
  const target = members.filter({ has: page.locator("td:nth-child(3)", { hasText: disconnectOn }) });
  const id = await target.first().getAttribute("data-connection");
  await target.first().getByRole("button", { name: "Disconnect" }).click();
  await page.locator(`#connections tr[data-connection="${id}"]`).waitFor({ state: "detached" });
  console.log(`disconnected ${id}`);

  // 5. A fresh page has no token: the form asks for it, refuses a wrong one.
  step("sign in via the form");
  // The wrong token below is answered 401, as it should be.
  const fresh = watch(await context.newPage(), "form page", /status of (401|404)/);
  await fresh.goto(`${base}/admin/`);
  await fresh.locator("#sign-in").waitFor({ state: "visible" });
  await fresh.fill("#token", "not-the-admin-token");
  await fresh.click("#sign-in button[type=submit]");
  await fresh.locator("#sign-in-error").filter({ hasText: "refused" }).waitFor();
  await fresh.fill("#token", token);
  await fresh.click("#sign-in button[type=submit]");
  await fresh.locator("#dashboard").waitFor({ state: "visible" });
  await fresh.locator(`#rooms tr[data-room="${room}"]`).click();
  await fresh.locator("#room-history li").first().waitFor();
  // Two refreshes, so that /health has had a chance to reach both instances.
  await fresh.waitForTimeout(6_500);
  await fresh.screenshot({ path: screenshot, fullPage: true });

  const leaked = requests.filter((url) => url.includes(token));
  if (leaked.length > 0) throw new Error(`the token appeared in request URLs: ${leaked}`);
  const foreign = requests.filter((url) => !url.startsWith(base));
  if (foreign.length > 0) throw new Error(`requests left the server's origin: ${foreign}`);
  if (problems.length > 0) throw new Error(`the page reported errors:\n${problems.join("\n")}`);
  console.log(`requests: ${requests.length}`);
} catch (error) {
  failed = true;
  console.error(`check.mjs failed: ${error.stack || error}`);
} finally {
  if (requestLog) writeFileSync(requestLog, JSON.stringify(requests, null, 1));
  clearTimeout(watchdog);
  await context.close().catch(() => {});
}
process.exit(failed ? 1 : 0);
