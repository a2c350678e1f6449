"""Opens a live hub's dashboard in headless Chromium and checks what it renders
against the hub's own JSON (crates/tessera/tests/dashboard.rs runs it).

    python dashboard_check.py HUB_URL OUT_DIR READY_FILE

The page loads while the run waits for its nodes, and the script writes READY_FILE;
the test then starts the nodes, and the rounds closing show on the page without a
reload. Once the run is finished and paid: the loss chart has a point per closed
round, the node table a row per node with the tokens the hub reports, the ledger
panel the payouts and earnings the ledger holds; no request failed or returned an
error status and the console has no errors; on a narrow screen nothing overflows
the page. /metrics parses with prometheus_client. Screenshots go to OUT_DIR.
Exits 0 and prints a JSON summary when every check holds; otherwise exits 1 naming
the check that failed.
"""
import json
import os
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright
from prometheus_client.parser import text_string_to_metric_families

CHROMIUM = os.environ.get("TESSERA_CHROMIUM", "/usr/bin/chromium")


def fail(why):
    print("dashboard check failed: " + why, file=sys.stderr)
    sys.exit(1)


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=10) as r:
        return r.read().decode()


def get_json(url, path):
    return json.loads(get(url, path))


def wait(what, timeout, f):
    end = time.time() + timeout
    while time.time() < end:
        v = f()
        if v:
            return v
        time.sleep(0.25)
    fail("timed out waiting for " + what)


def main():
    url, out, ready = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
    os.makedirs(out, exist_ok=True)
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: m.type == "error" and problems.append("console error: " + m.text))
        page.on("pageerror", lambda e: problems.append("page error: " + str(e)))
        page.on("requestfailed", lambda r: problems.append("request failed: %s %s" % (r.url, r.failure)))
        page.on("response", lambda r: r.status >= 400 and problems.append("HTTP %d for %s" % (r.status, r.url)))

        page.goto(url + "/")
        page.wait_for_function("Number(document.body.dataset.loads || 0) >= 1", timeout=15000)
        # A marker a reload would lose.
        page.evaluate("window.__loaded_once = 'yes'")
        points = lambda: int(page.get_attribute("#chart-loss", "data-points"))
        first = points()
        if get_json(url, "/summary")["rounds_closed"] != 0 or first != 0:
            fail("a round closed before the nodes were started")
        with open(ready, "w") as f:
            f.write("loaded")
        # Rounds close: the page shows them without a reload.
        page.wait_for_function(
            "Number(document.getElementById('chart-loss').dataset.points) > %d" % first, timeout=60000
        )
        if page.evaluate("window.__loaded_once") != "yes":
            fail("the page reloaded to show a new round")
        live = points()

        # The run finishes and the ledger pays every round (pay waits for audits).
        def done():
            s = get_json(url, "/summary")
            l = get_json(url, "/api/ledger")
            ok = s["finished"] and s["final_eval"] and s["audits_open"] == 0 and len(l["paid"]) == s["rounds_closed"]
            return (s, l) if ok else None

        summary, ledger = wait("the run to finish and be paid", 180, done)
        history = get_json(url, "/api/history")
        # Two more polls, so the page has seen the final state.
        loads = int(page.get_attribute("body", "data-loads"))
        page.wait_for_function("Number(document.body.dataset.loads) >= %d" % (loads + 2), timeout=15000)
        if page.evaluate("window.__loaded_once") != "yes":
            fail("the page reloaded")

        # The chart: a point per closed round, in the DOM and in the chart's data.
        closed = summary["rounds_closed"]
        if len(history) != closed:
            fail("/api/history has %d rows for %d closed rounds" % (len(history), closed))
        if points() != closed:
            fail("the loss chart shows %d points for %d closed rounds" % (points(), closed))
        xs = page.evaluate("window.tessera.charts['chart-loss'].data[0]")
        if xs != [r["round"] for r in history]:
            fail("the chart's rounds %s differ from the hub's %s" % (xs, [r["round"] for r in history]))
        bpb = page.evaluate("window.tessera.charts['chart-loss'].data[1]")
        if bpb != [r["val_bpb"] for r in history]:
            fail("the chart's bpb %s differ from the hub's" % bpb)
        if page.inner_text("#rounds-closed").strip() != str(closed):
            fail("rounds closed shows %r, the hub %d" % (page.inner_text("#rounds-closed"), closed))

        # The node table: a row per node, with the hub's tokens and the ledger's pay.
        rows = page.query_selector_all("#nodes tbody tr")
        ejected_rows = 0
        work = summary["work"]
        if len(rows) != len(work):
            fail("the node table has %d rows for %d nodes" % (len(rows), len(work)))
        for row in rows:
            node = row.get_attribute("data-node")
            if node not in work:
                fail("the node table shows %s, which the hub does not know" % node)
            tokens = row.query_selector("td[data-tokens]").get_attribute("data-tokens")
            if int(tokens) != work[node]["tokens"]:
                fail("node %s shows %s tokens, the hub %d" % (node[:12], tokens, work[node]["tokens"]))
            status = row.query_selector_all("td")[1].inner_text()
            flags = row.query_selector_all("td")[9].inner_text()
            ejected = summary["verification"].get(node, {}).get("ejected", False)
            if ejected:
                ejected_rows += 1
                if status != "ejected":
                    fail("node %s was ejected but shows %r" % (node[:12], status))
                slashed = ledger["slashed_nodes"].get(node)
                want = "%s staked tokens slashed" % slashed if slashed is not None else "pay forfeited"
                if want not in flags:
                    fail("ejected node %s shows %r, not %r" % (node[:12], flags, want))
            elif status != "finished":
                fail("node %s shows %r in a finished run" % (node[:12], status))
            earned = row.query_selector("td[data-earned]").get_attribute("data-earned")
            if earned != ledger["earned"].get(node, ""):
                fail("node %s shows %r earned, the ledger %r" % (node[:12], earned, ledger["earned"].get(node)))

        # The ledger panel: the payouts the ledger holds.
        paid_rounds = int(page.get_attribute("#ledger", "data-paid-rounds"))
        if paid_rounds != len(ledger["paid"]):
            fail("the ledger panel shows %d paid rounds, the ledger %d" % (paid_rounds, len(ledger["paid"])))
        payout_rows = page.query_selector_all("#payouts tbody tr")
        if len(payout_rows) != min(10, len(ledger["paid"])):
            fail("%d payout rows for %d paid rounds" % (len(payout_rows), len(ledger["paid"])))
        latest = ledger["paid"][-1]
        cells = [c.inner_text() for c in payout_rows[0].query_selector_all("td")]
        if cells[0] != str(latest["round"]) or float(cells[1].replace(",", "")) != float(latest["amount"]):
            fail("the latest payout shows %s, the ledger %s" % (cells, latest))
        if float(page.inner_text("#paid").replace(",", "")) != float(ledger["paid_total"]):
            fail("paid out shows %s, the ledger %s" % (page.inner_text("#paid"), ledger["paid_total"]))
        if "finished" not in page.inner_text("#phase"):
            fail("the phase shows %r for a finished run" % page.inner_text("#phase"))

        page.screenshot(path=os.path.join(out, "dashboard.png"), full_page=True)
        # A narrow screen: nothing wider than the page.
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        if overflow > 0:
            fail("on a 390 px screen the page is %d px wider than the screen" % overflow)
        page.screenshot(path=os.path.join(out, "dashboard-narrow.png"), full_page=True)
        browser.close()

    if problems:
        fail("; ".join(problems))

    # /metrics parses as the Prometheus text format and agrees with /summary.
    families = {f.name: f for f in text_string_to_metric_families(get(url, "/metrics"))}
    rounds = families.get("tessera_rounds_closed")
    if rounds is None or rounds.type != "counter":
        fail("/metrics has no counter tessera_rounds_closed_total")
    if rounds.samples[0].value != closed:
        fail("tessera_rounds_closed_total is %s, /summary %d" % (rounds.samples[0].value, closed))
    print(json.dumps({"rounds": closed, "live_points": live, "first_points": first,
                      "nodes": len(work), "ejected": ejected_rows, "paid_rounds": len(ledger["paid"]),
                      "metrics": len(families)}))


if __name__ == "__main__":
    main()
