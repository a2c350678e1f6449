// The Tessera run dashboard: polls the hub's public JSON (/run, /summary,
// /api/history, /api/ledger) every POLL_MS and redraws, without reloading the page.
"use strict";
(function () {
  const POLL_MS = 2000;
  // Rounds are whole: the x axis ticks only on whole steps.
  const ROUND_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
  const state = { run: null, summary: null, ledger: null, rows: [], loads: 0, charts: {} };
  window.tessera = state;

  const $ = (id) => document.getElementById(id);
  function text(id, value) { const el = $(id); if (el) el.textContent = value; }
  function el(tag, cls, value) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (value !== undefined) e.textContent = value;
    return e;
  }
  function bytes(n) {
    if (!isFinite(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
  }
  function count(n) {
    if (!isFinite(n)) return "–";
    if (n >= 1e9) return (n / 1e9).toFixed(2) + " G";
    if (n >= 1e6) return (n / 1e6).toFixed(2) + " M";
    if (n >= 1e4) return (n / 1e3).toFixed(1) + " k";
    return String(n);
  }
  // Ledger amounts are exact decimal strings; shown to 4 places.
  function amount(s) {
    if (s === undefined || s === null) return "–";
    const x = Number(s);
    return isFinite(x) ? x.toLocaleString("en-US", { maximumFractionDigits: 4 }) : s;
  }
  function short(hex) { return hex.slice(0, 12); }
  function kv(id, pairs) {
    const dl = $(id);
    dl.replaceChildren();
    for (const [k, v, cls] of pairs) {
      dl.appendChild(el("dt", null, k));
      dl.appendChild(el("dd", cls || null, v));
    }
  }
  async function json(path) {
    const r = await fetch(path, { cache: "no-store" });
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }

  function chart(id, series, axes) {
    const div = $(id);
    const opts = {
      width: Math.max(div.clientWidth, 280),
      height: 240,
      series: [{ label: "round" }].concat(series),
      axes: [{ label: "round", incrs: ROUND_STEPS, values: (u, v) => v.map(String) }].concat(axes),
      scales: { x: { time: false } },
      legend: { live: true },
    };
    const data = [[]].concat(series.map(() => []));
    const u = new uPlot(opts, data, div);
    state.charts[id] = u;
    return u;
  }
  function makeCharts() {
    chart("chart-loss", [
      { label: "validation bpb", stroke: "#2563eb", width: 2, scale: "bpb", spanGaps: true, points: { show: true, size: 4 } },
      { label: "node loss (mean)", stroke: "#f59e0b", width: 1.5, scale: "loss", spanGaps: true },
    ], [{ scale: "bpb", label: "bits per byte" }, { scale: "loss", side: 1, label: "nats per token", grid: { show: false } }]);
    chart("chart-rounds", [
      { label: "duration s", stroke: "#6366f1", width: 2, scale: "s" },
      { label: "accepted", stroke: "#16a34a", scale: "n" },
      { label: "late", stroke: "#d97706", scale: "n" },
      { label: "refused", stroke: "#dc2626", scale: "n" },
      { label: "dropped", stroke: "#6b7280", scale: "n" },
    ], [{ scale: "s", label: "seconds" }, { scale: "n", side: 1, label: "updates", grid: { show: false } }]);
    window.addEventListener("resize", () => {
      for (const [id, u] of Object.entries(state.charts)) {
        u.setSize({ width: Math.max($(id).clientWidth, 280), height: 240 });
      }
    });
  }

  function drawCharts() {
    const rows = state.rows;
    const x = rows.map((r) => r.round);
    const n = (v) => (v === null || v === undefined ? null : v);
    state.charts["chart-loss"].setData([x, rows.map((r) => n(r.val_bpb)), rows.map((r) => n(r.loss_mean))]);
    const prevClose = {};
    rows.forEach((r, i) => { if (i > 0) prevClose[r.round] = rows[i - 1].closed_ms; });
    const dur = rows.map((r) => {
      const start = r.started_ms !== null && r.started_ms !== undefined ? r.started_ms : prevClose[r.round];
      return start ? (r.closed_ms - start) / 1000 : null;
    });
    state.charts["chart-rounds"].setData([x, dur, rows.map((r) => r.accepted), rows.map((r) => r.late),
      rows.map((r) => r.refused), rows.map((r) => r.dropped)]);
    $("chart-loss").dataset.points = String(rows.length);
    $("chart-rounds").dataset.points = String(rows.length);
  }

  function drawHeader() {
    const s = state.summary, run = state.run;
    text("run-id", s.run_id);
    const badge = $("phase");
    badge.className = "badge";
    if (s.finished) { badge.textContent = "finished"; badge.classList.add("finished"); }
    else if (s.open_round !== null && s.open_round !== undefined) badge.textContent = "training round " + s.open_round;
    else badge.textContent = "forming (waiting for nodes)";
    if (s.read_only) { badge.textContent += " · read-only: " + s.read_only; badge.classList.add("error"); }
    text("updated", "updated " + new Date().toLocaleTimeString());
    text("rounds-closed", String(s.rounds_closed));
    text("rounds-total", run ? "of " + run.spec.rounds : "");
    text("members", String(s.members));
    text("members-sub", run ? "min " + run.spec.min_nodes + ", max " + run.spec.max_nodes : "");
    const last = [...state.rows].reverse().find((r) => r.val_bpb !== null && r.val_bpb !== undefined);
    if (s.final_eval) { text("val-bpb", s.final_eval.bpb.toFixed(4)); text("val-bpb-sub", "final, whole validation set"); }
    else if (last) { text("val-bpb", last.val_bpb.toFixed(4)); text("val-bpb-sub", "after round " + last.round); }
    const tokens = Object.values(s.work || {}).reduce((a, w) => a + w.tokens, 0);
    text("tokens", count(tokens));
    text("tokens-sub", run ? count(Number(s.params)) + " parameters" : "");
    const stats = Object.values(s.nodes || {});
    const moved = stats.length ? stats.reduce((a, n) => a + n.bytes_sent + n.bytes_received, 0) / stats.length : NaN;
    text("moved", bytes(moved));
    text("moved-sub", s.ddp_bytes_per_node > 0 && moved > 0
      ? "DDP: " + bytes(s.ddp_bytes_per_node) + " (" + Math.round(s.ddp_bytes_per_node / moved).toLocaleString("en-US") + "× more)"
      : "DDP: " + bytes(s.ddp_bytes_per_node));
  }

  function drawNodes() {
    const s = state.summary;
    const earned = (state.ledger && state.ledger.earned) || {};
    const ids = new Set([...Object.keys(s.work || {}), ...Object.keys(s.nodes || {}), ...Object.keys(s.verification || {})]);
    const rows = [...ids].map((id) => ({
      id, work: (s.work || {})[id] || { member: false, tokens: 0, rounds_accepted: 0, rounds_late: 0 },
      stats: (s.nodes || {})[id], ver: (s.verification || {})[id],
    }));
    rows.sort((a, b) => (b.work.member - a.work.member) || (b.work.tokens - a.work.tokens) || a.id.localeCompare(b.id));
    const body = $("nodes").tBodies[0];
    body.replaceChildren();
    for (const r of rows) {
      const tr = el("tr");
      tr.dataset.node = r.id;
      const idCell = el("td", "id", short(r.id)); idCell.title = r.id; tr.appendChild(idCell);
      const ejected = r.ver && r.ver.ejected;
      const status = ejected ? "ejected" : r.work.member ? (s.finished ? "finished" : "training") : "left";
      tr.appendChild(el("td", ejected ? "bad" : r.work.member ? "ok" : "muted", status));
      const tok = el("td", "num", count(r.work.tokens)); tok.dataset.tokens = String(r.work.tokens); tr.appendChild(tok);
      tr.appendChild(el("td", "num", String(r.work.rounds_accepted)));
      tr.appendChild(el("td", r.work.rounds_late ? "num warn" : "num", String(r.work.rounds_late)));
      const st = r.stats;
      tr.appendChild(el("td", "num", st && st.wall_seconds > 0 ? (100 * st.train_seconds / st.wall_seconds).toFixed(1) + "%" : "–"));
      tr.appendChild(el("td", "num", st ? bytes(st.bytes_sent) : "–"));
      tr.appendChild(el("td", "num", st ? bytes(st.bytes_received) : "–"));
      tr.appendChild(el("td", "num", r.ver ? (r.ver.score_ppm_mean / 1e6).toFixed(3) : "–"));
      const flags = [];
      if (r.ver) {
        if (r.ver.refused) flags.push(r.ver.refused + " refused");
        if (r.ver.audits_passed) flags.push(r.ver.audits_passed + " audit(s) passed");
        if (r.ver.audits_failed) flags.push(r.ver.audits_failed + " audit(s) failed");
        if (ejected) {
          const slashed = state.ledger && state.ledger.slashed_nodes ? state.ledger.slashed_nodes[r.id] : undefined;
          flags.push(slashed !== undefined ? "ejected, pay forfeited, " + amount(slashed) + " staked tokens slashed" : "ejected, pay forfeited");
        }
      }
      tr.appendChild(el("td", r.ver && (r.ver.refused || r.ver.audits_failed || ejected) ? "bad" : "", flags.join(", ") || (r.ver ? "clean" : "–")));
      const e = earned[r.id];
      const earnedCell = el("td", "num", e === undefined ? "–" : amount(e));
      earnedCell.dataset.earned = e === undefined ? "" : e;
      tr.appendChild(earnedCell);
      body.appendChild(tr);
    }
  }

  function drawLedger() {
    const l = state.ledger;
    if (!l) return;
    if (!l.enabled) {
      kv("ledger", [["ledger", "none: this run pays nobody"]]);
      text("paid", "–"); text("paid-sub", "no ledger");
      return;
    }
    kv("ledger", [
      ["pool", amount(l.pool) + " tokens"],
      ["paid out", amount(l.paid_total) + " tokens over " + l.paid.length + " round(s)"],
      ["reward per round", amount(l.reward_per_round) + " tokens"],
      ["slashed", amount(l.slashed) + " tokens"],
      ["treasury", amount(l.treasury) + " tokens"],
      ["supply", amount(l.supply) + " tokens"],
      ["balances root", l.root, "hash"],
      ["epoch root", l.epoch_root ? "epoch " + l.epoch_root[0] + ": " + l.epoch_root[1] : "no epoch closed yet", "hash"],
    ]);
    $("ledger").dataset.paidRounds = String(l.paid.length);
    text("paid", amount(l.paid_total));
    text("paid-sub", l.paid.length + " round(s) paid, pool " + amount(l.pool));
    const body = $("payouts").tBodies[0];
    body.replaceChildren();
    for (const p of l.paid.slice(-10).reverse()) {
      const tr = el("tr");
      tr.appendChild(el("td", "num", String(p.round)));
      tr.appendChild(el("td", "num", amount(p.amount)));
      tr.appendChild(el("td", "num", String(p.nodes)));
      body.appendChild(tr);
    }
  }

  function drawSettings() {
    const run = state.run;
    if (!run) return;
    const sp = run.spec;
    kv("settings", [
      ["preset", sp.preset + " (" + count(Number(state.summary ? state.summary.params : 0)) + " parameters)"],
      ["rounds", String(sp.rounds)],
      ["inner steps per round", String(sp.inner_steps)],
      ["batch × sequence", sp.batch_size + " × " + sp.seq_len],
      ["codec", String(sp.codec) + (String(sp.codec).startsWith("top") ? " (k " + sp.topk + "/4096, " + sp.topk_bits + " bits)" : "")],
      ["aggregator", String(sp.aggregator)],
      ["aggregation", String(sp.aggregation || "all-to-all")],
      ["overlap", sp.overlap ? "on" : "off"],
      ["round deadline", (sp.round_deadline_ms / 1000) + " s"],
      ["nodes", sp.min_nodes + " to " + sp.max_nodes],
      ["seed", String(sp.seed)],
    ]);
  }

  async function poll() {
    try {
      if (!state.run) state.run = await json("/run");
      const next = state.rows.length ? state.rows[state.rows.length - 1].round + 1 : 0;
      const [summary, page, ledger] = await Promise.all([
        json("/summary"), json("/api/history?from=" + next), json("/api/ledger"),
      ]);
      state.summary = summary; state.ledger = ledger;
      state.rows = state.rows.concat(page);
      state.loads += 1;
      drawHeader(); drawCharts(); drawNodes(); drawLedger(); drawSettings();
      document.body.dataset.loads = String(state.loads);
      // A full page means more may wait: ask again at once.
      setTimeout(poll, page.length >= 1000 ? 0 : POLL_MS);
    } catch (e) {
      const badge = $("phase");
      badge.className = "badge error";
      badge.textContent = "hub unreachable, retrying";
      setTimeout(poll, POLL_MS);
    }
  }

  makeCharts();
  poll();
})();
