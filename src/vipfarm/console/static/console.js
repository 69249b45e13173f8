// vipfarm console: the page's whole script (no build step, no dependency).
//
// Every request goes to the node that served the page (relative URLs under /console/api);
// that node reaches the others. The farm view is pushed by server-sent events
// (/console/api/events); change requests carry the session's CSRF token from the page's
// <meta name="csrf-token">. Text from the farm is always set as text (never as HTML).

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const $ = (sel) => document.querySelector(sel);
let farm = null;
const colours = new Map();

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) e.append(c);
  return e;
}

async function call(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") init.headers["X-CSRF-Token"] = CSRF;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch("/console/api" + path, init);
  if (resp.status === 401) { location.href = "/console/login"; throw new Error("signed out"); }
  let data = null;
  try { data = await resp.json(); } catch { data = { detail: `HTTP ${resp.status}` }; }
  return { ok: resp.ok, status: resp.status, data };
}

// ---------------------------------------------------------------- views
const views = ["farm", "buckets", "logs", "config", "timeline", "charts", "support"];
const onShow = {};

function show() {
  const view = views.includes(location.hash.slice(1)) ? location.hash.slice(1) : "farm";
  for (const v of views) {
    $(`#view-${v}`).hidden = v !== view;
    const link = document.querySelector(`nav a[data-view="${v}"]`);
    if (v === view) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  document.title = `vipfarm console: ${view}`;
  if (onShow[view]) onShow[view]();
}
window.addEventListener("hashchange", show);

// ---------------------------------------------------------------- confirmation
function confirmDialog(text) {
  const dlg = $("#confirm");
  $("#confirm-text").textContent = text;
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
    dlg.returnValue = "";
    dlg.showModal();
    $("#confirm-ok").focus();
  });
}

// ---------------------------------------------------------------- farm view
function colourOf(name) {
  // By the node's place in the farm, so every view and every page gives a node one colour.
  const i = farm ? farm.nodes.findIndex((n) => n.name === name) : -1;
  if (i >= 0) return `c${i % 8}`;
  if (!colours.has(name)) colours.set(name, `c${colours.size % 8}`);
  return colours.get(name);
}

function nodeState(n) {
  if (!n.alive) return "DEAD";
  if (!n.reachable) return n.state + " (API unreachable)";
  return n.state;
}

function deliveryText(d) {
  if (!d || d.mode === "flood") return "";
  const entries = Object.entries(d.entries || {}).map(([vip, n]) => `${vip} → ${n || "-"}`);
  const auto = d.mode === "auto"
    ? ` (answers ${d.answers}; missing probes: ${(d.deaf_nodes || []).join(", ") || "none"})`
    : "";
  return `; delivery ${d.mode}${auto}, entries ${entries.join(", ") || "-"}`;
}

function renderFarm() {
  if (!farm) return;
  $("#farm-name").textContent = farm.farm;
  $("#me").textContent = farm.me;
  for (const e of document.querySelectorAll(".me-name")) e.textContent = farm.me;
  const live = farm.nodes.filter((n) => n.alive);
  const up = farm.nodes.filter((n) => n.alive && n.state === "UP").length;
  $("#farm-summary").textContent =
    `${up} of ${farm.nodes.length} nodes UP, ${farm.nodes.length - live.length} dead; ` +
    `shares add up to ${farm.share_total.toFixed(1)} %` +
    (farm.split_brain ? "; SPLIT BRAIN detected" : "") +
    deliveryText(farm.delivery) +
    (farm.pulse_answered ? "" : `; ${farm.me}'s pulse is not answering`);
  const body = $("#nodes tbody");
  body.replaceChildren(...farm.nodes.map((n) => {
    const st = nodeState(n);
    const hb = Object.entries(n.heartbeats).map(([net, age]) =>
      `${net}: ${age === null ? "never" : age + " ms"}`).join(", ") || "(this node)";
    const checkers = n.checkers.length
      ? n.checkers.map((c) => `${c.name.split(":")[0]} ${c.healthy ? "ok" : "failing"}`).join(", ")
      : "–";
    const drain = n.drain_s_left === null ? "" : ` (drain: ${n.drain_connections ?? "?"} connections, ${n.drain_s_left} s left)`;
    const actions = el("td", { class: "actions" });
    for (const [action, label] of [["start", "Start"], ["stop", "Stop (drain)"], ["force-stop", "Force stop"], ["restart-app", "Restart app"]]) {
      actions.append(el("button", {
        type: "button", "data-action": action, "data-node": n.name,
        "aria-label": `${label} ${n.name}`, disabled: !n.alive || !n.reachable ||
          (action === "start" && ["UP", "WAIT", "STARTING"].includes(n.state)) ||
          (action !== "start" && n.state === "STOP") ||
          (action === "restart-app" && !["UP", "WAIT"].includes(n.state)),
        text: label,
      }));
    }
    return el("tr", { class: n.alive ? "" : "dead-row", "data-node": n.name },
      el("th", { scope: "row", text: n.name + (n.self ? " (this node)" : "") }),
      el("td", { class: `state s-${st.split(" ")[0]}`, "data-field": "state", text: st + drain }),
      el("td", { "data-field": "share", text: `${n.share.toFixed(2)} %` }),
      el("td", { text: String(n.weight) }),
      el("td", { text: hb }),
      el("td", { "data-field": "app", text: n.app ?? "–" }),
      el("td", { text: checkers }),
      el("td", { "data-field": "config", text: n.config_version === null ? "–" : `v${n.config_version} ${n.config_digest}` }),
      actions);
  }));
  $("#rules tbody").replaceChildren(...farm.rules.map((r) =>
    el("tr", {}, el("td", { text: r.vip }), el("td", { text: r.proto }), el("td", { text: r.ports }), el("td", { text: r.affinity }))));
  renderBuckets();
  fillNodeSelect($("#log-node"));
  fillRuleSelect();
  renderSupport();
}

document.addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-action]");
  if (!b) return;
  const { action, node } = b.dataset;
  const what = { start: "Start", stop: "Stop (drain)", "force-stop": "Force stop (no waiting for connections)",
    "restart-app": "Restart the application of" }[action];
  const target = node === "all" ? "every node" : node;
  if (!(await confirmDialog(`${what} ${target}?`))) return;
  const out = $("#action-outcome");
  out.textContent = `${what} ${target}: sent…`;
  const r = await call("POST", `/nodes/${encodeURIComponent(node)}/actions/${action}`);
  if (!r.ok) { out.textContent = `${what} ${target}: ${r.data.detail}`; out.className = "error"; return; }
  out.className = "";
  out.textContent = `${what} ${target}: ` + Object.entries(r.data.nodes).map(([n, o]) =>
    o.ok ? `${n} is ${o.state}` : `${n} refused: ${o.message}`).join("; ");
});

function connectEvents() {
  const conn = $("#conn");
  const es = new EventSource("/console/api/events");
  es.addEventListener("farm", (ev) => {
    farm = JSON.parse(ev.data);
    conn.textContent = "live";
    conn.classList.remove("bad");
    renderFarm();
  });
  es.onerror = () => {
    conn.textContent = `connection to ${farm ? farm.me : "the node"} lost: reconnecting…`;
    conn.classList.add("bad");
  };
}

// ---------------------------------------------------------------- buckets
function renderBuckets() {
  if (!farm || $("#view-buckets").hidden) return;
  const owners = new Array(farm.buckets).fill(null).map(() => []);
  for (const n of farm.nodes) for (const b of n.owned) if (b < farm.buckets) owners[b].push(n.name);
  const grid = $("#bucket-grid");
  if (grid.childElementCount !== farm.buckets) {
    grid.replaceChildren(...owners.map(() => el("span")));
  }
  owners.forEach((o, i) => {
    const cell = grid.children[i];
    cell.className = o.length === 1 ? colourOf(o[0]) : "moving";
    cell.title = `bucket ${i}: ${o.length ? o.join(" and ") : "no owner (moving)"}`;
  });
  const moving = owners.filter((o) => o.length !== 1).length;
  grid.setAttribute("aria-label", `Bucket owners: ${farm.nodes.map((n) =>
    `${n.name} ${owners.filter((o) => o.length === 1 && o[0] === n.name).length}`).join(", ")}; moving ${moving}`);
  $("#legend").replaceChildren(...farm.nodes.map((n) => el("span", { class: colourOf(n.name), text: n.name })),
    el("span", { class: "moving", text: `moving (${moving})` }));
}
onShow.buckets = renderBuckets;

function fillRuleSelect() {
  const sel = $("#who-rule");
  if (sel.childElementCount === farm.rules.length) return;
  sel.replaceChildren(...farm.rules.map((r, i) => el("option", { value: String(i), text: `${r.proto} ${r.vip}:${r.ports} (${r.affinity})` })));
}

$("#who-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const q = new URLSearchParams({ client: $("#who-client").value, port: $("#who-port").value || "0", rule: $("#who-rule").value || "0" });
  const r = await call("GET", `/buckets/who?${q}`);
  const out = $("#who-answer");
  out.className = r.ok ? "" : "error";
  out.textContent = r.ok
    ? `${r.data.client} port ${r.data.port} → bucket ${r.data.bucket} of ${r.data.rule.proto} ${r.data.rule.vip}:${r.data.rule.ports}: served by ${r.data.owners.length ? r.data.owners.join(" and ") : "nobody right now (moving)"}`
    : r.data.detail;
});

// ---------------------------------------------------------------- logs
let logSource = null;
const logLines = [];
const MAX_LOG_LINES = 5000;

function fillNodeSelect(sel) {
  if (!farm || sel.childElementCount === farm.nodes.length) return;
  sel.replaceChildren(...farm.nodes.map((n) => el("option", { value: n.name, text: n.name, selected: n.self })));
}

function levelOf(line) {
  const m = / (DEBUG|INFO|WARNING|ERROR|CRITICAL) /.exec(line);
  return m ? m[1] : "";
}

function lineShown(line) {
  const level = $("#log-level").value;
  const lv = levelOf(line);
  if (level === "WARNING" && !["WARNING", "ERROR", "CRITICAL"].includes(lv)) return false;
  if (level === "ERROR" && !["ERROR", "CRITICAL"].includes(lv)) return false;
  const text = $("#log-filter").value.toLowerCase();
  return !text || line.toLowerCase().includes(text);
}

function renderLog() {
  const pre = $("#log-lines");
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
  pre.replaceChildren(...logLines.filter(lineShown).map((l) => el("span", { class: levelOf(l), text: l + "\n" })));
  if (atEnd) pre.scrollTop = pre.scrollHeight;
}

function followLog() {
  fillNodeSelect($("#log-node"));
  const node = $("#log-node").value || (farm && farm.me);
  if (!node) return;
  const which = $("#log-name").value;
  if (logSource) logSource.close();
  logLines.length = 0;
  renderLog();
  const what = which === "both" ? "module and application logs" : `${which} log`;
  $("#log-status").textContent = `following ${node}'s ${what}`;
  logSource = new EventSource(`/console/api/nodes/${encodeURIComponent(node)}/logs/stream?log=${which}`);
  logSource.addEventListener("lines", (ev) => {
    const d = JSON.parse(ev.data);
    logLines.push(...d.lines);
    if (logLines.length > MAX_LOG_LINES) logLines.splice(0, logLines.length - MAX_LOG_LINES);
    renderLog();
  });
  logSource.addEventListener("problem", (ev) => {
    $("#log-status").textContent = `${node}: ${JSON.parse(ev.data).detail}`;
  });
}
onShow.logs = () => { if (!logSource) followLog(); };
$("#log-node").addEventListener("change", followLog);
$("#log-name").addEventListener("change", followLog);
$("#log-level").addEventListener("change", renderLog);
$("#log-filter").addEventListener("input", renderLog);

// ---------------------------------------------------------------- configuration
let configLoaded = false;
let checkTimer = null;
let configValid = true;

async function loadConfig(force) {
  if (configLoaded && !force) return;
  const r = await call("GET", "/config");
  if (!r.ok) { $("#config-result").textContent = r.data.detail; return; }
  const c = r.data;
  configLoaded = true;
  $("#config-path").textContent = `${c.path} on ${c.node}, version ${c.version}, digest ${c.digest}`;
  if (force || !$("#config-text").value) $("#config-text").value = c.text;
  $("#config-nodes tbody").replaceChildren(...c.nodes.map((n) => el("tr", {},
    el("th", { scope: "row", text: n.node }),
    el("td", { "data-field": "version", text: n.ok ? String(n.version) : `unreachable: ${n.detail}` }),
    el("td", { text: n.ok ? n.digest : "–" }))));
  $("#config-history tbody").replaceChildren(...[...c.history].reverse().map((h) => el("tr", {},
    el("td", { text: String(h.version) }), el("td", { text: h.digest }),
    el("td", { text: new Date(h.at * 1000).toLocaleString() }),
    el("td", {}, el("button", {
      type: "button", "data-rollback": String(h.index), "aria-label": `Roll back to version ${h.version}`,
      disabled: h.digest === c.digest, text: "Roll back",
    })))));
  checkConfig();
}
onShow.config = () => loadConfig(false);

// The line of a TOML text that a problem's key path (rule[1].ports, farm.buckets) names: the
// key's own line, else the header of the deepest table on its path, else none.
function lineOfKey(text, path) {
  const counts = new Map();
  let table = "";
  let best = null;
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    let m = /^\[\[\s*([^\]]+?)\s*\]\]/.exec(line);
    if (m) {
      const n = counts.get(m[1]) ?? 0;
      counts.set(m[1], n + 1);
      table = `${m[1]}[${n}]`;
    } else if ((m = /^\[\s*([^\]]+?)\s*\]/.exec(line))) {
      table = m[1];
    } else if ((m = /^([A-Za-z0-9_.-]+)\s*=/.exec(line))) {
      const full = table ? `${table}.${m[1]}` : m[1];
      if (full === path || path.startsWith(full + ".") || path.startsWith(full + "[")) return i + 1;
      continue;
    } else continue;
    if (path === table || path.startsWith(table + ".")) best = i + 1;
  }
  return best;
}

function selectLine(n) {
  const area = $("#config-text");
  const lines = area.value.split("\n");
  const start = lines.slice(0, n - 1).reduce((a, l) => a + l.length + 1, 0);
  area.focus();
  area.setSelectionRange(start, start + lines[n - 1].length);
  const lh = parseFloat(getComputedStyle(area).lineHeight) || 16;
  area.scrollTop = Math.max(0, (n - 4) * lh);
}

function showProblems(problems) {
  const box = $("#config-problems");
  configValid = problems.length === 0;
  $("#config-text").setAttribute("aria-invalid", configValid ? "false" : "true");
  $("#config-deploy").disabled = !configValid;
  $("#config-dry-run").disabled = !configValid;
  if (configValid) { box.replaceChildren(el("p", { class: "ok", text: "valid" })); return; }
  const text = $("#config-text").value;
  box.replaceChildren(el("ul", { class: "problems" }, ...problems.map((p) => {
    const m = /^line (\d+)/.exec(p.path);
    const line = m ? Number(m[1]) : lineOfKey(text, p.path);
    const item = el("li", { "data-key": p.path }, el("code", { text: p.path || "file" }), `: ${p.message}`);
    if (line) {
      item.append(" ", el("button", { type: "button", class: "link", "data-line": String(line),
        "aria-label": `Go to line ${line} (${p.path})`, text: `line ${line}`,
        onclick: () => selectLine(line) }));
    }
    return item;
  })));
}

async function checkConfig() {
  const r = await call("POST", "/config/check", { text: $("#config-text").value });
  if (r.ok) showProblems(r.data.problems);
}

$("#config-text").addEventListener("input", () => {
  clearTimeout(checkTimer);
  checkTimer = setTimeout(checkConfig, 300);
});

function showDeploy(r, what) {
  const out = $("#config-result");
  const d = r.data;
  if (r.ok) {
    out.className = d.ok ? "ok" : "error";
    out.replaceChildren(el("p", { text: `${what}: version ${d.version}, changed ${d.changes.join(", ") || "nothing"}` }),
      el("ul", {}, ...d.nodes.map((v) => el("li", { text: `${v.node}: ${v.outcome}${v.message ? " – " + v.message : ""}` }))));
  } else {
    out.className = "error";
    out.replaceChildren(el("p", { text: `${what}: ${d.detail}` }),
      el("ul", {}, ...(d.problems || []).map((p) => el("li", { text: `${p.path}: ${p.message}` })),
        ...(d.nodes || []).map((v) => el("li", { text: `${v.node}: ${v.outcome} ${v.message}` }))));
    if (d.problems && d.problems.length) showProblems(d.problems);
  }
}

$("#config-dry-run").addEventListener("click", async () => {
  $("#config-result").textContent = "dry run: every node validates…";
  showDeploy(await call("POST", "/config/deploy", { text: $("#config-text").value, dry_run: true }), "dry run");
});
$("#config-deploy").addEventListener("click", async () => {
  if (!configValid) return;
  if (!(await confirmDialog("Deploy this configuration to every node?"))) return;
  $("#config-result").textContent = "deploying…";
  const r = await call("POST", "/config/deploy", { text: $("#config-text").value });
  showDeploy(r, "deployment");
  if (r.ok) loadConfig(true);
});
$("#config-reload").addEventListener("click", () => loadConfig(true));
document.addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-rollback]");
  if (!b) return;
  if (!(await confirmDialog(`${b.getAttribute("aria-label")}: deploy it to every node as a new version?`))) return;
  $("#config-result").textContent = "rolling back…";
  const r = await call("POST", "/config/deploy", { rollback: Number(b.dataset.rollback) });
  showDeploy(r, "rollback");
  if (r.ok) loadConfig(true);
});

// ---------------------------------------------------------------- timeline
async function loadTimeline() {
  const r = await call("GET", "/timeline");
  if (!r.ok) return;
  $("#timeline").replaceChildren(...r.data.entries.slice(0, 1000).map((e) => el("li", { class: `k-${e.kind}`, "data-kind": e.kind },
    el("time", { datetime: new Date(e.t * 1000).toISOString(), text: new Date(e.t * 1000).toLocaleTimeString() }), e.text)));
}
onShow.timeline = loadTimeline;
$("#timeline-refresh").addEventListener("click", loadTimeline);

// ---------------------------------------------------------------- charts
const SVG = "http://www.w3.org/2000/svg";
// The same colours as the .c0 to .c7 classes of console.css.
const PALETTE = ["#1f77b4", "#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#a6761d", "#444"];
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function chart(box, series, key, labelledby, unit) {
  const W = 900, H = 220, L = 44, B = 20;
  const now = Date.now() / 1000;
  // The last hour, or less while there is less history: the data fills the width.
  let first = now;
  for (const pts of Object.values(series)) if (pts.length) first = Math.min(first, pts[0].t);
  const t0 = Math.max(now - 3600, Math.min(first, now - 60));
  const span = now - t0;
  let max = 1;
  for (const pts of Object.values(series)) for (const p of pts) if (p[key] !== null) max = Math.max(max, p[key]);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": labelledby });
  const x = (t) => L + ((t - t0) / span) * (W - L - 10);
  const y = (v) => H - B - (v / max) * (H - B - 10);
  root.append(svg("line", { x1: L, y1: H - B, x2: W - 10, y2: H - B, stroke: "#888" }));
  for (const f of [0, 0.5, 1]) {
    const t = svg("text", { x: 2, y: y(max * f) + 4 });
    t.textContent = `${(max * f).toFixed(max < 10 ? 1 : 0)}${unit}`;
    root.append(t);
  }
  const ago = (t) => { const m = (now - t) / 60; return m >= 1 ? `-${m.toFixed(0)} min` : `-${(now - t).toFixed(0)} s`; };
  for (const [label, xt, anchor] of [[ago(t0), t0, "start"], [ago(t0 + span / 2), t0 + span / 2, "middle"], ["now", now, "end"]]) {
    const t = svg("text", { x: x(xt), y: H - 4, "text-anchor": anchor }); t.textContent = label; root.append(t);
  }
  for (const [name, pts] of Object.entries(series)) {
    const d = pts.filter((p) => p[key] !== null && p.t >= t0).map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`).join("");
    if (!d) continue;
    const path = svg("path", { d, fill: "none", "stroke-width": 2, stroke: PALETTE[Number(colourOf(name).slice(1))] });
    const title = svg("title", {}); title.textContent = name; path.append(title);
    root.append(path);
  }
  const legend = el("p", { class: "legend" }, ...Object.keys(series).map((n) => el("span", { class: colourOf(n), text: n })));
  box.replaceChildren(root, legend);
}

async function loadCharts() {
  const r = await call("GET", "/charts");
  if (!r.ok) return;
  const nodes = r.data.nodes;
  const n = Math.max(0, ...Object.values(nodes).map((p) => p.length));
  $("#charts-note").textContent = `${n} samples per node, one every ${r.data.sample_s} s since this node's console started (at most an hour).`;
  chart($("#chart-share"), nodes, "share", "c-share", "%");
  chart($("#chart-conn"), nodes, "accepted_per_s", "c-conn", "/s");
}
onShow.charts = loadCharts;
setInterval(() => { if (!$("#view-charts").hidden) loadCharts(); }, 5000);

// ---------------------------------------------------------------- support
function renderSupport() {
  const ul = $("#support-links");
  if (!farm || ul.childElementCount === farm.nodes.length + 1) return;
  ul.replaceChildren(
    el("li", {}, el("a", { href: "/console/api/snapshot", download: "", text: "Every node's snapshot (one .tar)" })),
    ...farm.nodes.map((n) => el("li", {}, el("a", {
      href: `/console/api/nodes/${encodeURIComponent(n.name)}/snapshot`, download: "", text: `${n.name}'s snapshot (.tar.gz)`,
    }))));
}

// ---------------------------------------------------------------- sign-out
$("#sign-out").addEventListener("click", async () => {
  await fetch("/console/logout", { method: "POST", headers: { "X-CSRF-Token": CSRF }, credentials: "same-origin" }).catch(() => {});
  location.href = "/console/login";
});

show();
connectEvents();
