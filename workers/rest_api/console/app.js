/* The LLM Auto Optimizer web console: plain JavaScript, no framework, no build step.
 *
 * Sections: helpers; the API client; the session (key in sessionStorage, role from
 * /v1/whoami); charts (Chart.js, with a small plugin that marks instants); live updates (the
 * SSE stream read with fetch(), since EventSource cannot send the Authorization header); the
 * router; then one function per view: overview, optimizations (list and detail), canary,
 * config, findings.
 */
"use strict";

/* ---------------------------------------------------------------- helpers */

const $ = (selector, root = document) => root.querySelector(selector);
const KEY_STORAGE = "llmo.console.key";
const MINUTE_MS = 60 * 1000;
const DAY_MS = 24 * 60 * MINUTE_MS;
const ROLES = ["viewer", "operator", "admin"];
const PALETTE = ["#0b57d0", "#b3261e", "#146c2e", "#8a4b00", "#6f2da8", "#00677f", "#a0136b",
                 "#4a5260", "#c2410c", "#1d4ed8"];

/** An element: el("td", {class: "num"}, "3") ; attributes starting with "on" are listeners. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(value) {
  return el("span", {class: `badge s-${String(value).replace(/[^a-z_]/gi, "")}`}, value);
}

function table(caption, headers, rows, attrs = {}) {
  const head = el("tr", {}, headers.map((h) => el("th", {scope: "col",
    class: h.startsWith("#") ? "num" : null}, h.replace(/^#/, ""))));
  const body = rows.length ? rows : [el("tr", {}, el("td", {colspan: headers.length,
    class: "muted"}, "Nothing yet."))];
  return el("table", attrs, el("caption", {}, caption), el("thead", {}, head),
            el("tbody", {}, body));
}

const fmt = {
  usd: (v) => v === null || v === undefined ? "–" : `$${Number(v).toLocaleString("en-US", {
    minimumFractionDigits: 2, maximumFractionDigits: 2})}`,
  num: (v, digits = 0) => v === null || v === undefined ? "–" : Number(v).toLocaleString(
    "en-US", {maximumFractionDigits: digits}),
  pct: (v, digits = 1) => v === null || v === undefined ? "–" : `${(v * 100).toFixed(digits)}%`,
  ms: (v) => v === null || v === undefined ? "–" : `${Math.round(v)} ms`,
  bytes: (v) => v === null || v === undefined ? "–" : `${(v / 1048576).toFixed(1)} MiB`,
  time: (ns) => ns ? new Date(ns / 1e6).toLocaleString("en-GB", {hour12: false}) : "–",
  clock: (ms) => new Date(ms).toLocaleTimeString("en-GB", {hour: "2-digit", minute: "2-digit"}),
  day: (ms) => new Date(ms).toLocaleDateString("en-GB", {weekday: "short", day: "numeric",
    month: "short"}),
  signed: (v, digits = 3) => v === null || v === undefined ? "–" :
    `${v > 0 ? "+" : ""}${Number(v).toFixed(digits)}`,
};

function toast(text) {
  const box = $("#toasts");
  const item = el("div", {class: "toast"}, text);
  box.append(item);
  setTimeout(() => item.remove(), 8000);
  while (box.children.length > 4) box.firstChild.remove();
}

function startOfDay(ms) {
  const d = new Date(ms);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

/* ---------------------------------------------------------------- the API client */

class ApiError extends Error {
  constructor(status, problem) {
    super(problem && problem.detail ? problem.detail : `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(path, {method = "GET", body} = {}) {
  const key = session.key;
  const headers = {Authorization: `Bearer ${key}`, Accept: "application/json"};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const answer = await fetch(path, {method, headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body)});
  const text = await answer.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (!answer.ok) {
    // Only the signed-in key's refusal ends the session: not a candidate key being tried
    // by signIn, nor a late answer to a key already signed out.
    if (answer.status === 401 && session.identity && key === session.key) {
      signOut("Your key was refused (401).");
    }
    throw new ApiError(answer.status, data);
  }
  return data;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined)
    q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

/** Run async jobs with at most `limit` at once (the API rate-limits each key). */
async function pool(jobs, limit = 6) {
  const results = new Array(jobs.length);
  let next = 0;
  async function worker() {
    while (next < jobs.length) {
      const i = next++;
      results[i] = await jobs[i]();
    }
  }
  await Promise.all(Array.from({length: Math.min(limit, jobs.length)}, worker));
  return results;
}

/* ---------------------------------------------------------------- the session */

const session = {key: null, identity: null, role: "viewer"};

function may(role) {
  return ROLES.indexOf(session.role) >= ROLES.indexOf(role);
}

async function signIn(key) {
  session.key = key;
  try {
    session.identity = await api("/v1/whoami");
  } catch (exc) {
    session.key = null;
    throw exc;
  }
  session.role = session.identity.role;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("#who").textContent = `${session.identity.subject} · ${session.role}`;
  document.body.dataset.role = session.role;
  $("#login").hidden = true;
  $("#nav").hidden = false;
  $("#session").hidden = false;
  $("#view").hidden = false;
  live.start();
  if (!location.hash || location.hash === "#") location.hash = "#/overview";
  else route();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  session.key = null;
  session.identity = null;
  live.stop();
  clearTimeout(refreshTimer);  // no view may render (or call the API) after this
  for (const fn of current.cleanup) fn();
  current = {name: null, cleanup: []};
  charts.clear();
  $("#view").replaceChildren();
  $("#view").hidden = true;
  $("#nav").hidden = true;
  $("#session").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#key-input").value = "";
  $("#key-input").focus();
}

/* ---------------------------------------------------------------- charts */

const charts = {
  live: [],
  /** A Chart.js chart on a new canvas inside `box`; destroyed when the view changes. */
  make(box, config, label) {
    const canvas = el("canvas", {role: "img", "aria-label": label});
    box.replaceChildren(canvas);
    const chart = new Chart(canvas, config);
    this.live.push(chart);
    canvas.dataset.points = String(config.data.datasets.reduce(
      (n, d) => n + d.data.filter((p) => (typeof p === "number" ? p : p && p.y) ).length, 0));
    return chart;
  },
  clear() {
    for (const chart of this.live) chart.destroy();
    this.live = [];
  },
};

/** Vertical lines at x values (ms), each with a label: stage moves, detected findings. */
const markerPlugin = {
  id: "markers",
  afterDatasetsDraw(chart, _args, options) {
    const marks = (options && options.marks) || [];
    const {ctx, chartArea, scales} = chart;
    ctx.save();
    for (const mark of marks) {
      const x = scales.x.getPixelForValue(mark.x);
      if (x < chartArea.left - 1 || x > chartArea.right + 1) continue;
      if (mark.until !== undefined) {
        const x2 = scales.x.getPixelForValue(mark.until);
        ctx.fillStyle = "rgba(179, 38, 30, 0.10)";
        ctx.fillRect(Math.min(x, x2), chartArea.top, Math.abs(x2 - x), chartArea.bottom -
                     chartArea.top);
      }
      ctx.strokeStyle = mark.color || "#1b1f24";
      ctx.setLineDash([4, 3]);
      ctx.beginPath();
      ctx.moveTo(x, chartArea.top);
      ctx.lineTo(x, chartArea.bottom);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = mark.color || "#1b1f24";
      ctx.font = "12px system-ui, sans-serif";
      ctx.fillText(mark.label, Math.min(x + 3, chartArea.right - 60), chartArea.top + 12);
    }
    ctx.restore();
  },
};

function timeLineConfig(datasets, {yLabel, marks = [], yFormat} = {}) {
  return {
    type: "line",
    data: {datasets},
    options: {
      animation: false, maintainAspectRatio: false, parsing: false, normalized: true,
      interaction: {mode: "nearest", intersect: false},
      scales: {
        x: {type: "linear", ticks: {callback: (v) => fmt.clock(v), maxTicksLimit: 8}},
        y: {beginAtZero: false, title: {display: !!yLabel, text: yLabel},
            ticks: yFormat ? {callback: yFormat} : {}},
      },
      plugins: {markers: {marks}, legend: {position: "bottom"},
                tooltip: {callbacks: {title: (items) => items.length ?
                  fmt.clock(items[0].parsed.x) : ""}}},
    },
    plugins: [markerPlugin],
  };
}

function line(label, points, color, dashed = false) {
  return {label, data: points, borderColor: color, backgroundColor: color, pointRadius: 2,
          borderWidth: 2, borderDash: dashed ? [6, 4] : [], spanGaps: true};
}

/* ---------------------------------------------------------------- window figures */

/** Merge the windows of several series (models, operations) per window start. */
function mergeWindows(seriesList) {
  const byStart = new Map();
  for (const series of seriesList) {
    for (const w of series.windows) {
      const m = byStart.get(w.start_ns) || {start_ns: w.start_ns, end_ns: w.end_ns, count: 0,
        errors: 0, cost: 0, p95w: 0, p95n: 0, q: 0, qn: 0, repeatw: 0};
      const s = w.summary;
      const count = s.count || 0;
      m.count += count;
      m.errors += s.errors || 0;
      m.cost += s.cost_usd || 0;
      if (s.p95_ms !== null && s.p95_ms !== undefined && count) {
        m.p95w += s.p95_ms * count;
        m.p95n += count;
      }
      if (s.quality_mean !== null && s.quality_mean !== undefined && s.quality_n) {
        m.q += s.quality_mean * s.quality_n;
        m.qn += s.quality_n;
      }
      if (s.repeat_share !== null && s.repeat_share !== undefined) m.repeatw += s.repeat_share * count;
      byStart.set(w.start_ns, m);
    }
  }
  return [...byStart.values()].sort((a, b) => a.start_ns - b.start_ns);
}

const FIGURES = {
  p95_ms: {label: "Latency p95 (ms)", of: (m) => m.p95n ? m.p95w / m.p95n : null},
  error_rate: {label: "Error rate", of: (m) => m.count ? m.errors / m.count : null,
               format: (v) => fmt.pct(v)},
  quality: {label: "Quality (mean)", of: (m) => m.qn ? m.q / m.qn : null},
  cost_per_call: {label: "Cost per call (USD)", of: (m) => m.count ? m.cost / m.count : null},
  cost_usd: {label: "Spend per window (USD)", of: (m) => m.cost},
  count: {label: "Calls per window", of: (m) => m.count},
  repeat_share: {label: "Repeated prompts (share)", of: (m) => m.count ? m.repeatw / m.count : null,
                 format: (v) => fmt.pct(v)},
};

function points(merged, figure) {
  return merged.map((m) => ({x: m.start_ns / 1e6, y: FIGURES[figure].of(m)}))
    .filter((p) => p.y !== null && p.y !== undefined);
}

/* ---------------------------------------------------------------- live updates (SSE) */

const live = {
  controller: null,
  lastId: null,
  retryMs: 2000,
  handlers: [],
  setState(on, text) {
    const node = $("#live");
    node.className = `live ${on ? "on" : "off"}`;
    node.textContent = text;
  },
  start() {
    this.stop();
    this.controller = new AbortController();
    this.read(this.controller.signal);
  },
  stop() {
    if (this.controller) this.controller.abort();
    this.controller = null;
  },
  /** fetch() with the Authorization header; the body is parsed as text/event-stream. */
  async read(signal) {
    while (!signal.aborted) {
      try {
        const headers = {Authorization: `Bearer ${session.key}`, Accept: "text/event-stream"};
        if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
        const answer = await fetch("/v1/events/stream", {headers, signal, cache: "no-store"});
        if (answer.status === 401) { signOut("Your key was refused (401)."); return; }
        if (!answer.ok || !answer.body) throw new Error(`HTTP ${answer.status}`);
        this.setState(true, "Live updates: on");
        document.body.dataset.live = "on";
        const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const {value, done} = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
            this.dispatch(block);
          }
        }
      } catch (exc) {
        if (signal.aborted) return;
      }
      document.body.dataset.live = "off";
      this.setState(false, "Live updates: reconnecting");
      await new Promise((resolve) => setTimeout(resolve, this.retryMs));
    }
  },
  dispatch(block) {
    const event = {id: null, type: "message", data: ""};
    for (const row of block.split(/\r?\n/)) {
      if (!row || row.startsWith(":")) continue;
      const at = row.indexOf(":");
      const name = at < 0 ? row : row.slice(0, at);
      const value = at < 0 ? "" : row.slice(at + 1).replace(/^ /, "");
      if (name === "id") event.id = value;
      else if (name === "event") event.type = value;
      else if (name === "data") event.data += (event.data ? "\n" : "") + value;
      else if (name === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
    }
    if (!event.data) return;
    if (event.id !== null) this.lastId = event.id;
    let record;
    try { record = JSON.parse(event.data); } catch (_) { return; }
    feed.add(record);
    for (const handler of this.handlers) handler(record);
  },
};

/** The last records of the stream, shown on the overview; a toast for proposals. */
const feed = {
  items: [],
  add(record) {
    this.items.unshift(record);
    this.items.length = Math.min(this.items.length, 30);
    const body = record.body || {};
    if (record.type === "proposal") toast(`New optimization: ${body.title || body.id}`);
    if (record.type === "rollout" && ["promoted", "rolled_back"].includes(body.kind))
      toast(`Rollout of ${body.service} ${body.kind.replace("_", " ")}`);
    const list = $("#feed");
    if (list) list.replaceChildren(...this.render());
  },
  describe(record) {
    const b = record.body || {};
    switch (record.type) {
      case "proposal": return `proposal · ${b.service}: ${b.title || b.id}`;
      case "finding": return `finding · ${b.service}: ${b.title || b.kind}`;
      case "rollout": return `rollout · ${b.service}: ${b.kind} (stage ${b.stage}, ` +
        `${(b.weight_bp || 0) / 100}%)`;
      case "config": return `config · ${b.service}: version ${b.version}`;
      default: return record.type;
    }
  },
  render() {
    if (!this.items.length) return [el("li", {class: "muted"}, "No event since this page opened.")];
    return this.items.map((r) => el("li", {}, el("time", {}, fmt.time(r.time_ns)), " ",
                                    this.describe(r)));
  },
};

/* ---------------------------------------------------------------- the router */

const VIEWS = {};
let current = {name: null, cleanup: []};
let refreshTimer = null;

/** Re-render the current view after a live event, at most every 500 ms. */
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => route({keepFocus: true}), 500);
}

live.handlers.push((record) => {
  const reacts = {overview: ["proposal", "rollout", "finding"],
    optimizations: ["proposal", "rollout"], optimization: ["proposal", "rollout"],
    canary: ["rollout"], config: ["config", "rollout"], findings: ["finding"]};
  if ((reacts[current.name] || []).includes(record.type)) refreshSoon();
});

async function route({keepFocus = false} = {}) {
  if (!session.identity) return;  // signed out, or a key still being tried
  const parts = (location.hash.replace(/^#\/?/, "") || "overview").split("/")
    .map(decodeURIComponent);
  let name = parts[0];
  if (name === "optimizations" && parts[1]) name = "optimization";
  if (!VIEWS[name]) name = "overview";
  for (const fn of current.cleanup) fn();
  charts.clear();
  current = {name, cleanup: []};
  for (const link of document.querySelectorAll("#nav a")) {
    const on = link.dataset.view === (name === "optimization" ? "optimizations" : name);
    if (on) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  const view = $("#view");
  const scroll = window.scrollY;
  const next = el("div", {"data-view": name, "aria-busy": "true"});
  try {
    await VIEWS[name](next, parts.slice(1));
  } catch (exc) {
    next.replaceChildren(el("p", {class: "error", role: "alert"},
                            `Could not load this view: ${exc.message}`));
  }
  if (current.name !== name) return;  // another route started meanwhile
  next.removeAttribute("aria-busy");
  view.replaceChildren(next);
  document.title = `${next.dataset.title || name} · LLM Auto Optimizer`;
  if (keepFocus) window.scrollTo(0, scroll);
  else $("#main").focus({preventScroll: true});
}

/* ---------------------------------------------------------------- view: overview */

VIEWS.overview = async function overview(root) {
  root.dataset.title = "Overview";
  const now = Date.now();
  const today = startOfDay(now);
  const weekStart = today - 6 * DAY_MS;
  const [stats, recent, keys] = await Promise.all([
    may("admin") ? api("/v1/admin/stats").catch((e) => e) : Promise.resolve(null),
    api(`/v1/metrics/windows${query({start: now - 60 * MINUTE_MS, limit: 120})}`),
    api(`/v1/metrics/windows${query({start: weekStart, limit: 1})}`),
  ]);
  root.append(el("h1", {}, "Overview"));

  // The daemon's services (the supervisor's status: admin only).
  const services = el("section", {class: "card", "aria-labelledby": "svc-title"},
                      el("h2", {id: "svc-title"}, "Services"));
  if (!may("admin")) {
    services.append(el("p", {class: "note"}, "The daemon's services (state, restarts, " +
      "heartbeats, CPU and memory) come from the supervisor's status, which needs the admin role."));
  } else if (stats instanceof Error) {
    services.append(el("p", {class: "error"}, `Status unavailable: ${stats.message}`));
  } else {
    const sup = stats.supervisor || {};
    services.append(el("p", {}, `Supervisor ${sup.state || "?"}, `,
      sup.ready ? badge("ready") : badge("not ready"), ` · up ${fmt.num(sup.uptime_s)} s`));
    services.append(table("Services of the daemon",
      ["Service", "State", "Health", "#Restarts", "#Heartbeat age", "#CPU", "#Memory"],
      stats.services.map((s) => el("tr", {"data-service": s.name},
        el("th", {scope: "row"}, s.instance ? `${s.name} #${s.instance}` : s.name),
        el("td", {}, badge(s.state)), el("td", {}, s.health || "–"),
        el("td", {class: "num"}, fmt.num(s.restarts)),
        el("td", {class: "num"}, s.heartbeat_age_s === null ? "–" :
           `${Number(s.heartbeat_age_s).toFixed(1)} s`),
        el("td", {class: "num"}, s.cpu_percent === null ? "–" : `${s.cpu_percent}%`),
        el("td", {class: "num"}, fmt.bytes(s.rss_bytes)))),
      {id: "services-table"}));
  }

  // Events per second, from the last hour's closed tumbling windows (all keys).
  const merged = mergeWindows(recent.series);
  const rates = merged.map((m) => ({x: m.start_ns / 1e6,
    y: m.count / Math.max(1, (m.end_ns - m.start_ns) / 1e9)}));
  const last = rates.length ? rates[rates.length - 1].y : null;
  const rateBox = el("div", {class: "chart"});
  const ingest = el("section", {class: "card", "aria-labelledby": "ingest-title"},
    el("h2", {id: "ingest-title"}, "Events ingested"),
    el("p", {class: "stat", id: "events-rate"}, last === null ? "–" : `${fmt.num(last, 1)}/s`),
    el("p", {class: "muted"}, "Calls per second of event time in the last closed window; " +
       "the chart covers the last hour."), rateBox);

  // Spend: today, and the last 7 days by model or by service (stacked).
  const spend = await spendByDay(keys.series, weekStart);
  const spendBox = el("div", {class: "chart tall"});
  const byModelId = "spend-by-model";
  const group = el("fieldset", {class: "filters"}, el("legend", {}, "Stack the spend by"),
    el("label", {}, el("input", {type: "radio", name: "spend-by", value: "model", id: byModelId,
       checked: true}), " model"),
    el("label", {}, el("input", {type: "radio", name: "spend-by", value: "service"}),
       " service"));
  const todayTotal = spend.days.length ? spend.total[spend.days.length - 1] : 0;
  const spendCard = el("section", {class: "card", "aria-labelledby": "spend-title"},
    el("h2", {id: "spend-title"}, "Spend"),
    el("div", {class: "grid2"},
      el("div", {}, el("p", {class: "muted"}, "Today"),
         el("p", {class: "stat", id: "spend-today"}, fmt.usd(todayTotal))),
      el("div", {}, el("p", {class: "muted"}, "Last 7 days"),
         el("p", {class: "stat", id: "spend-week"}, fmt.usd(spend.total.reduce((a, b) => a + b, 0))))),
    group, spendBox, spendTables(spend));

  const feedCard = el("section", {class: "card", "aria-labelledby": "feed-title"},
    el("h2", {id: "feed-title"}, "Live events"),
    el("ul", {class: "feed", id: "feed"}, feed.render()));

  root.append(services, el("div", {class: "grid2"}, ingest, feedCard), spendCard);

  const draw = (by) => charts.make(spendBox, {
    type: "bar",
    data: {labels: spend.days.map(fmt.day), datasets: Object.entries(spend[by]).map(
      ([name, values], i) => ({label: name, data: values, backgroundColor: PALETTE[i % 10],
                               stack: "spend"}))},
    options: {animation: false, maintainAspectRatio: false,
      scales: {x: {stacked: true}, y: {stacked: true, title: {display: true, text: "USD"},
               ticks: {callback: (v) => fmt.usd(v)}}},
      plugins: {legend: {position: "bottom"}, tooltip: {callbacks: {label: (c) =>
        `${c.dataset.label}: ${fmt.usd(c.parsed.y)}`}}}},
  }, `Spend per day over the last 7 days, stacked by ${by}`);
  setTimeout(() => {
    charts.make(rateBox, timeLineConfig([line("events/s", rates, PALETTE[0])],
                {yLabel: "events/s"}), "Events per second over the last hour");
    const chart = draw("model");
    spendBox.firstChild.id = "spend-chart";
    group.addEventListener("change", (e) => {
      charts.live = charts.live.filter((c) => c !== chart);
      draw(e.target.value);
      spendBox.firstChild.id = "spend-chart";
    });
  });
  const timer = setInterval(() => current.name === "overview" && route({keepFocus: true}), 15000);
  current.cleanup.push(() => clearInterval(timer));
};

/** Cost per local day of the last 7 days, by model and by service, from metrics summaries. */
async function spendByDay(series, weekStart) {
  const services = [...new Set(series.map((s) => s.service))].sort();
  const days = Array.from({length: 7}, (_, i) => weekStart + i * DAY_MS);
  const jobs = [];
  for (const service of services) for (const [i, day] of days.entries())
    jobs.push(async () => ({service, i, summary: await api(`/v1/metrics/summary${query(
      {service, start: day, end: day + DAY_MS})}`)}));
  const results = await pool(jobs);
  const out = {days, total: days.map(() => 0), model: {}, service: {}};
  for (const {service, i, summary} of results) {
    for (const [model, totals] of Object.entries(summary.by_model)) {
      (out.model[model] ||= days.map(() => 0))[i] += totals.cost_usd;
    }
    (out.service[service] ||= days.map(() => 0))[i] += summary.totals.cost_usd;
    out.total[i] += summary.totals.cost_usd;
  }
  return out;
}

function spendTables(spend) {
  const last = spend.days.length - 1;
  const rows = (by) => Object.entries(spend[by]).sort((a, b) => b[1][last] - a[1][last])
    .map(([name, values]) => el("tr", {}, el("th", {scope: "row"}, name),
      el("td", {class: "num"}, fmt.usd(values[last])),
      el("td", {class: "num"}, fmt.usd(values.reduce((a, b) => a + b, 0)))));
  return el("div", {class: "grid2"},
    table("Spend by model", ["Model", "#Today", "#7 days"], rows("model")),
    table("Spend by service", ["Service", "#Today", "#7 days"], rows("service")));
}

/* ---------------------------------------------------------------- view: optimizations */

VIEWS.optimizations = async function optimizations(root) {
  root.dataset.title = "Optimizations";
  const params = new URLSearchParams(sessionStorage.getItem("llmo.console.optfilters") || "");
  const filters = {service: params.get("service") || "", strategy: params.get("strategy") || "",
                   status: params.get("status") || ""};
  const page = await api(`/v1/optimizations${query({...filters, limit: 200})}`);
  const select = (name, label, options) => el("div", {},
    el("label", {for: `f-${name}`}, label),
    el("select", {id: `f-${name}`, name}, el("option", {value: ""}, "any"),
       options.map((o) => el("option", {value: o, selected: filters[name] === o}, o))));
  const form = el("form", {class: "filters", "aria-label": "Filter optimizations"},
    el("div", {}, el("label", {for: "f-service"}, "Service"),
       el("input", {id: "f-service", name: "service", value: filters.service,
                    placeholder: "any"})),
    select("strategy", "Strategy", ["model_selection", "caching", "rate_limiting", "batching",
                                     "prompt_optimization"]),
    select("status", "Status", ["open", "deploying", "promoted", "rolled_back", "dismissed",
                                 "failed"]),
    el("button", {type: "submit"}, "Apply filters"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const data = new URLSearchParams(new FormData(form));
    sessionStorage.setItem("llmo.console.optfilters", data.toString());
    route();
  });
  const rows = page.items.map((o) => el("tr", {"data-id": o.id, "data-service": o.service},
    el("th", {scope: "row"}, el("a", {href: `#/optimizations/${encodeURIComponent(o.id)}`},
                                 o.title)),
    el("td", {}, o.service), el("td", {}, o.strategy), el("td", {}, badge(o.status)),
    el("td", {class: "num"}, fmt.usd(o.expected_impact.savings_usd_per_day)),
    el("td", {}, fmt.time(o.updated_ns))));
  root.append(el("h1", {}, "Optimizations"), el("section", {class: "card"}, form,
    table(`${page.items.length} optimization(s)`, ["Optimization", "Service", "Strategy",
          "Status", "#Savings per day", "Updated"], rows, {id: "optimizations-table"})));
};

/** Expected impact against what the canary judge measured (the last judged stage). */
function impactTable(opt) {
  const expected = opt.expected_impact || {};
  const judged = opt.rollouts.flatMap((r) => r.transitions).filter((t) => t.judge).pop();
  const metric = (name) => judged ? judged.judge.metrics.find((m) => m.name === name) : null;
  const measured = (name, scale = 1) => {
    const m = metric(name);
    return m && m.shift !== null ? m.shift * scale : null;
  };
  const costBase = metric("cost_usd");
  const costPct = costBase && costBase.baseline_median ?
    (costBase.canary_median / costBase.baseline_median - 1) * 100 : null;
  const rows = [
    ["Cost", `${fmt.signed(expected.cost_pct, 1)} %`, costPct === null ? "–" :
     `${fmt.signed(costPct, 1)} % (median cost per call)`],
    ["Savings per day", fmt.usd(expected.savings_usd_per_day), "–"],
    ["Quality", fmt.signed(expected.quality_delta), fmt.signed(measured("quality"))],
    ["Latency", expected.latency_delta_ms === null || expected.latency_delta_ms === undefined ?
     "–" : `${fmt.signed(expected.latency_delta_ms, 0)} ms (p95)`,
     measured("latency_ms") === null ? "–" : `${fmt.signed(measured("latency_ms"), 0)} ms (median)`],
    ["Error rate", fmt.signed(expected.error_rate_delta, 4), fmt.signed(measured("errors"), 4)],
    ["Confidence", fmt.pct(expected.confidence, 0),
     judged ? `score ${fmt.num(judged.judge.score, 1)}, ${judged.judge.verdict}` : "–"],
  ];
  return table(judged ? `Expected vs measured (canary judge at stage ${judged.stage})` :
    "Expected impact (not measured yet: no judged canary stage)",
    ["Figure", "Expected", "Measured"],
    rows.map(([a, b, c]) => el("tr", {}, el("th", {scope: "row"}, a), el("td", {}, b),
                                el("td", {}, c))), {id: "impact-table"});
}

VIEWS.optimization = async function optimization(root, [id]) {
  const opt = await api(`/v1/optimizations/${encodeURIComponent(id)}`);
  root.dataset.title = opt.title;
  const message = el("p", {class: "error", role: "alert", id: "action-result"});
  const act = (action, label) => el("button", {type: "button", id: `action-${action}`,
    class: action === "deploy" ? null : "danger", onclick: async () => {
      if (!window.confirm(`${label}: ${opt.title}?`)) return;
      message.textContent = "";
      try {
        await api(`/v1/optimizations/${encodeURIComponent(opt.id)}/${action}`, {method: "POST"});
        toast(`${label}: done`);
        route({keepFocus: true});
      } catch (exc) {
        message.textContent = `${label} refused: ${exc.message}`;
      }
    }}, label);
  const actions = el("div", {class: "actions"});
  if (may("operator")) {
    if (opt.status === "open") actions.append(act("deploy", "Deploy"));
    if (["open", "deploying"].includes(opt.status)) actions.append(act("cancel", "Cancel"));
    if (["deploying", "promoted"].includes(opt.status)) actions.append(act("rollback", "Roll back"));
  } else {
    actions.append(el("p", {class: "muted"}, "Deploying, cancelling and rolling back need " +
                       "the operator role."));
  }
  const evidence = Object.entries(opt.evidence || {}).map(([k, v]) => el("tr", {},
    el("th", {scope: "row"}, k), el("td", {class: "num"}, fmt.num(v, 6))));
  const rollouts = opt.rollouts.map((r) => el("li", {},
    el("a", {href: `#/canary/${encodeURIComponent(r.id)}`}, `Canary ${r.id}`), " ",
    badge(r.phase), ` · ${r.transitions.length} transition(s)`));
  root.append(
    el("p", {}, el("a", {href: "#/optimizations"}, "← All optimizations")),
    el("h1", {}, opt.title),
    el("section", {class: "card"},
      el("dl", {class: "kv"},
        el("dt", {}, "Status"), el("dd", {id: "opt-status"}, badge(opt.status),
                                   opt.status_detail ? ` ${opt.status_detail}` : ""),
        el("dt", {}, "Service"), el("dd", {}, opt.service),
        el("dt", {}, "Strategy"), el("dd", {}, opt.strategy),
        el("dt", {}, "Model, operation"), el("dd", {}, `${opt.model}, ${opt.operation}`),
        el("dt", {}, "Proposed"), el("dd", {}, fmt.time(opt.first_ns)),
        el("dt", {}, "Change"), el("dd", {}, el("pre", {}, JSON.stringify(opt.change, null, 2)))),
      actions, message),
    el("section", {class: "card", "aria-labelledby": "rationale-title"},
      el("h2", {id: "rationale-title"}, "Rationale"), el("p", {}, opt.rationale || "–")),
    el("section", {class: "card", "aria-labelledby": "impact-title"},
      el("h2", {id: "impact-title"}, "Impact"), impactTable(opt)),
    el("div", {class: "grid2"},
      el("section", {class: "card", "aria-labelledby": "evidence-title"},
        el("h2", {id: "evidence-title"}, "Evidence"),
        table("What the proposal is based on", ["Figure", "#Value"], evidence)),
      el("section", {class: "card", "aria-labelledby": "rollouts-title"},
        el("h2", {id: "rollouts-title"}, "Rollouts"),
        rollouts.length ? el("ul", {}, rollouts) : el("p", {class: "muted"}, "Not deployed."))));
};

/* ---------------------------------------------------------------- view: canary */

VIEWS.canary = async function canary(root, [id]) {
  root.dataset.title = "Canary";
  const page = await api("/v1/rollouts?limit=200");
  const items = page.items.sort((a, b) => b.started_ns - a.started_ns);
  const chosen = id ? items.find((r) => r.id === id) || await api(
    `/v1/rollouts/${encodeURIComponent(id)}`) : items.find((r) => r.phase === "running") || items[0];
  const picker = el("div", {class: "filters"}, el("div", {},
    el("label", {for: "rollout-select"}, "Rollout"),
    el("select", {id: "rollout-select", onchange: (e) => {
      location.hash = `#/canary/${encodeURIComponent(e.target.value)}`;
    }}, items.map((r) => el("option", {value: r.id, selected: chosen && r.id === chosen.id},
      `${r.service} · ${r.phase} · ${fmt.time(r.started_ns)}`)))));
  root.append(el("h1", {}, "Canary"), el("section", {class: "card"}, picker));
  if (!chosen) {
    root.append(el("p", {class: "muted"}, "No rollout yet."));
    return;
  }
  const tr = chosen.transitions;
  const last = tr[tr.length - 1];
  // The timeline: one step per stage the rollout reached, then its end.
  const steps = tr.map((t, i) => {
    const state = t.kind === "rolled_back" ? "failed" : i === tr.length - 1 &&
      chosen.phase === "running" ? "current" : "done";
    const what = t.kind === "started" ? `Stage ${t.stage + 1} started` :
      t.kind === "stage_advanced" ? `Stage ${t.stage + 1}` : t.kind === "promoted" ?
      "Promoted" : "Rolled back";
    return el("li", {class: state, "aria-current": state === "current" ? "step" : null},
      `${what} · ${(t.weight_bp / 100).toFixed(t.weight_bp % 100 ? 1 : 0)}%`,
      el("span", {class: "when"}, fmt.time(t.time_ns)));
  });
  const verdicts = tr.filter((t) => t.kind !== "started").map((t) => el("tr", {},
    el("th", {scope: "row"}, `Stage ${t.stage + 1}`), el("td", {}, badge(t.kind)),
    el("td", {}, t.judge ? badge(t.judge.verdict) : "–"),
    el("td", {class: "num"}, t.judge ? fmt.num(t.judge.score, 1) : "–"),
    el("td", {class: "num"}, `${fmt.num(t.canary_samples)} / ${fmt.num(t.baseline_samples)}`),
    el("td", {}, t.reason)));
  const judged = tr.filter((t) => t.judge).pop();
  const metricRows = judged ? judged.judge.metrics.map((m) => el("tr", {},
    el("th", {scope: "row"}, m.name), el("td", {}, badge(m.classification)),
    el("td", {class: "num"}, fmt.num(m.baseline_median, 6)),
    el("td", {class: "num"}, fmt.num(m.canary_median, 6)),
    el("td", {class: "num"}, fmt.num(m.shift, 6)),
    el("td", {class: "num"}, m.p_value === null ? "–" : Number(m.p_value).toExponential(2)))) : [];
  root.append(el("section", {class: "card", "aria-labelledby": "timeline-title"},
    el("h2", {id: "timeline-title"}, `${chosen.service}: `, badge(chosen.phase),
       ` · current weight ${(last.weight_bp / 100)}%`),
    el("p", {}, "Change: ", el("code", {}, JSON.stringify(chosen.change))),
    el("ol", {class: "timeline", id: "canary-timeline", "aria-label": "Stages"}, steps),
    table("The judge's verdict per stage", ["Stage", "Decision", "Verdict", "#Score",
      "#Canary / baseline calls", "Reason"], verdicts, {id: "verdicts-table"}),
    judged ? table(`Evidence of the last judged stage (stage ${judged.stage + 1})`,
      ["Metric", "Classification", "#Baseline median", "#Canary median", "#Shift", "#p-value"],
      metricRows) : null));

  // Baseline vs canary, from the service's windows around the rollout.
  const start = chosen.started_ns / 1e6 - 10 * MINUTE_MS;
  const end = last.time_ns / 1e6 + 5 * MINUTE_MS;
  const windows = await api(`/v1/metrics/windows${query({service: chosen.service,
    start: Math.max(0, Math.floor(start)), end: Math.ceil(end)})}`);
  const side = (variant) => mergeWindows(windows.series.filter((s) => s.variant === variant));
  const baseline = side("baseline");
  const canaryWindows = side("canary");
  const marks = tr.map((t) => ({x: t.time_ns / 1e6, label: t.kind === "stage_advanced" ?
    `stage ${t.stage + 1}` : t.kind.replace("_", " "), color: t.kind === "rolled_back" ?
    "#b3261e" : "#1b1f24"}));
  const grid = el("div", {class: "grid2", id: "canary-charts"});
  root.append(el("section", {class: "card", "aria-labelledby": "cmp-title"},
    el("h2", {id: "cmp-title"}, "Baseline vs canary"), grid));
  const boxes = ["p95_ms", "error_rate", "quality", "cost_per_call"].map((figure) => {
    const box = el("div", {class: "chart"});
    grid.append(el("figure", {}, el("figcaption", {}, FIGURES[figure].label), box));
    return [figure, box];
  });
  setTimeout(() => {
    for (const [figure, box] of boxes) {
      const format = FIGURES[figure].format;
      charts.make(box, timeLineConfig([
        line("baseline", points(baseline, figure), PALETTE[0]),
        line("canary", points(canaryWindows, figure), PALETTE[1], true)],
        {marks, yFormat: format}), `${FIGURES[figure].label}: baseline and canary per window`);
    }
  });
};

/* ---------------------------------------------------------------- view: config */

VIEWS.config = async function config(root, [service]) {
  root.dataset.title = "Config";
  const exported = await api("/v1/config/export");
  const names = exported.configs.map((c) => c.service).sort();
  const chosen = service && names.includes(service) ? service : names[0];
  root.append(el("h1", {}, "Config"));
  const picker = el("div", {class: "filters"}, el("div", {},
    el("label", {for: "config-service"}, "Service"),
    el("select", {id: "config-service", onchange: (e) => {
      location.hash = `#/config/${encodeURIComponent(e.target.value)}`;
    }}, names.map((n) => el("option", {value: n, selected: n === chosen}, n)))));
  root.append(el("section", {class: "card"}, picker));
  if (!chosen) {
    root.append(el("p", {class: "muted"}, "No service has a config yet."));
    return;
  }
  const versions = (await api(`/v1/config/${encodeURIComponent(chosen)}/versions?limit=100`)).items;
  const message = el("p", {class: "error", role: "alert", id: "config-result"});
  const rows = versions.map((v, i) => el("tr", {"data-version": v.version},
    el("th", {scope: "row"}, `v${v.version}`, i === 0 ? " (current)" : ""),
    el("td", {}, v.model), el("td", {}, v.variants && v.variants.length ?
      v.variants.map((x) => `${x.name} ${x.weight_bp / 100}%`).join(", ") : "–"),
    el("td", {}, fmt.time(v.updated_ns)), el("td", {}, v.reason || "–"),
    el("td", {}, i > 0 && may("operator") ? el("button", {type: "button", class: "danger",
      "aria-label": `Roll back ${chosen} to version ${v.version}`, onclick: async () => {
        if (!window.confirm(`Write version ${v.version}'s content of ${chosen} as a new version?`))
          return;
        message.textContent = "";
        try {
          const made = await api(`/v1/config/${encodeURIComponent(chosen)}/rollback`, {
            method: "POST", body: {version: v.version, reason: "rolled back in the console"}});
          toast(`${chosen}: version ${made.version} written`);
          route({keepFocus: true});
        } catch (exc) {
          message.textContent = `Roll back refused: ${exc.message}`;
        }
      }}, "Roll back to this") : "")));
  const pick = (id, label, value) => el("div", {}, el("label", {for: id}, label),
    el("select", {id}, versions.map((v) => el("option", {value: v.version,
      selected: v.version === value}, `v${v.version}`))));
  const newest = versions.length ? versions[0].version : 0;
  const older = versions.length > 1 ? versions[1].version : newest;
  const diffBox = el("div", {id: "diff-result", "aria-live": "polite"});
  const diffForm = el("form", {class: "filters", "aria-label": "Compare two versions"},
    pick("diff-from", "From version", older), pick("diff-to", "To version", newest),
    el("button", {type: "submit"}, "Show the diff"));
  const showDiff = async () => {
    const from = $("#diff-from", diffForm).value;
    const to = $("#diff-to", diffForm).value;
    const diff = await api(`/v1/config/${encodeURIComponent(chosen)}/diff${query({from, to})}`);
    diffBox.replaceChildren(table(`Differences from v${from} to v${to}`, ["Path", "Old", "New"],
      diff.map((d) => el("tr", {}, el("th", {scope: "row"}, el("code", {}, d.path)),
        el("td", {}, el("code", {}, JSON.stringify(d.old))),
        el("td", {}, el("code", {}, JSON.stringify(d.new)))))));
  };
  diffForm.addEventListener("submit", (e) => { e.preventDefault(); showDiff(); });
  root.append(el("section", {class: "card", "aria-labelledby": "versions-title"},
    el("h2", {id: "versions-title"}, `Versions of ${chosen}`), message,
    may("operator") ? null : el("p", {class: "muted"}, "Rolling back needs the operator role."),
    table("Newest first", ["Version", "Model", "Variants", "Written", "Reason", "Action"], rows,
          {id: "versions-table"})),
    el("section", {class: "card", "aria-labelledby": "diff-title"},
      el("h2", {id: "diff-title"}, "Diff"), diffForm, diffBox),
    el("section", {class: "card", "aria-labelledby": "current-title"},
      el("h2", {id: "current-title"}, "Current config"),
      el("pre", {}, JSON.stringify(versions[0], null, 2))));
  if (versions.length > 1) await showDiff();
};

/* ---------------------------------------------------------------- view: findings */

function figureOfKind(kind) {
  if (/latency|p95/.test(kind)) return "p95_ms";
  if (/quality/.test(kind)) return "quality";
  if (/error/.test(kind)) return "error_rate";
  if (/cost_per_call|drift/.test(kind)) return "cost_per_call";
  if (/spend|cost/.test(kind)) return "cost_usd";
  if (/repeat/.test(kind)) return "repeat_share";
  return "count";
}

VIEWS.findings = async function findings(root, [id]) {
  root.dataset.title = "Findings";
  const params = new URLSearchParams(sessionStorage.getItem("llmo.console.findfilters") || "");
  const filters = {service: params.get("service") || "", severity: params.get("severity") || ""};
  const page = await api(`/v1/findings${query({...filters, limit: 200})}`);
  const items = page.items.sort((a, b) => b.window_end_ns - a.window_end_ns);
  const chosen = items.find((f) => f.id === id) || items[0];
  const form = el("form", {class: "filters", "aria-label": "Filter findings"},
    el("div", {}, el("label", {for: "ff-service"}, "Service"),
       el("input", {id: "ff-service", name: "service", value: filters.service, placeholder: "any"})),
    el("div", {}, el("label", {for: "ff-severity"}, "Severity"),
       el("select", {id: "ff-severity", name: "severity"}, el("option", {value: ""}, "any"),
          ["info", "warning", "critical"].map((s) => el("option", {value: s,
            selected: filters.severity === s}, s)))),
    el("button", {type: "submit"}, "Apply filters"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("llmo.console.findfilters",
                           new URLSearchParams(new FormData(form)).toString());
    route();
  });
  const rows = items.map((f) => el("tr", {class: chosen && f.id === chosen.id ? "selected" : null},
    el("th", {scope: "row"}, el("a", {href: `#/findings/${encodeURIComponent(f.id)}`,
      "aria-current": chosen && f.id === chosen.id ? "true" : null}, f.title)),
    el("td", {}, f.service), el("td", {}, f.kind), el("td", {}, badge(f.severity)),
    el("td", {}, fmt.time(f.window_end_ns))));
  root.append(el("h1", {}, "Findings"), el("section", {class: "card"}, form,
    table(`${items.length} finding(s): anomalies and regressions`, ["Finding", "Service", "Kind",
          "Severity", "Detected (window end)"], rows, {id: "findings-table"})));
  if (!chosen) return;
  const figure = figureOfKind(chosen.kind);
  const start = chosen.window_start_ns / 1e6 - 60 * MINUTE_MS;
  const end = chosen.window_end_ns / 1e6 + 15 * MINUTE_MS;
  const windows = await api(`/v1/metrics/windows${query({service: chosen.service,
    model: chosen.model, operation: chosen.operation, variant: chosen.variant || "baseline",
    start: Math.max(0, Math.floor(start)), end: Math.ceil(end)})}`);
  const merged = mergeWindows(windows.series);
  const sameKey = items.filter((f) => f.service === chosen.service && f.model === chosen.model &&
    f.operation === chosen.operation);
  const marks = sameKey.map((f) => ({x: f.window_end_ns / 1e6, until: f.window_start_ns / 1e6,
    label: f.id === chosen.id ? "detected" : f.kind, color: "#b3261e"}));
  const box = el("div", {class: "chart tall", id: "finding-chart-box"});
  const evidence = Object.entries(chosen.evidence).map(([k, v]) => el("tr", {},
    el("th", {scope: "row"}, k), el("td", {class: "num"}, fmt.num(v, 6))));
  root.append(el("section", {class: "card", "aria-labelledby": "finding-title"},
    el("h2", {id: "finding-title"}, chosen.title),
    el("p", {}, `${chosen.service} · ${chosen.model} · ${chosen.operation} · `,
       badge(chosen.severity), ` · ${chosen.detail}`),
    el("figure", {}, el("figcaption", {}, `${FIGURES[figure].label}, with the window where ` +
       "each finding of this key was detected (shaded, line at its end)"), box),
    table("Evidence", ["Figure", "#Value"], evidence)));
  setTimeout(() => {
    charts.make(box, timeLineConfig([line(FIGURES[figure].label, points(merged, figure),
      PALETTE[0])], {marks, yFormat: FIGURES[figure].format}),
      `${FIGURES[figure].label} of ${chosen.service} ${chosen.model}, detection marked`);
    box.firstChild.id = "finding-chart";
  });
};

/* ---------------------------------------------------------------- start */

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("#login-error").textContent = "";
    const key = $("#key-input").value.trim();
    try {
      await signIn(key);
    } catch (exc) {
      $("#login-error").textContent = exc.status === 401 ?
        "This key or token was refused." : `Could not sign in: ${exc.message}`;
    }
  });
  $("#signout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", () => route());
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) signIn(saved).catch(() => signOut("Your saved key was refused; sign in again."));
  else signOut();
});
