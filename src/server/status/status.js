// The status page: polls /debug/status every second and /debug/rules every ten, and draws them.
// Keys, rule names and descriptor values come from callers: they are only ever set as text.
"use strict";

const $ = (id) => document.getElementById(id);

function fmt(n) {
  if (n === null || n === undefined) return "-";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return Math.round(n).toString();
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const [text, cls] of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }
  return tr;
}

function fill(tableId, rows, emptyId) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
  $(emptyId).hidden = rows.length > 0;
}

function badge(el, text, up) {
  el.textContent = text;
  el.className = "badge " + (up ? "up" : "down");
}

// The scale's top: 1, 2, 2.5 or 5 times a power of ten, so the grid reads in round numbers.
function niceCeiling(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function drawChart(seconds) {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 40;
  ctx.clearRect(0, 0, w, h);
  const max = niceCeiling(Math.max(1, ...seconds.map((s) => Math.max(s.allowed, s.denied, s.errors))));
  // Grid and scale.
  ctx.strokeStyle = "#eee";
  ctx.fillStyle = "#777";
  ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = h - pad + ((pad * 2 - h) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w - 10, y); ctx.stroke();
    ctx.fillText(fmt((max * i) / 4), 4, y + 4);
  }
  const n = Math.max(seconds.length - 1, 1);
  const x = (i) => pad + ((w - pad - 10) * i) / n;
  const y = (v) => h - pad - ((h - pad * 2) * v) / max;
  for (const [field, color] of [["allowed", "#2e7d32"], ["denied", "#c62828"], ["errors", "#757575"]]) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    seconds.forEach((s, i) => (i ? ctx.lineTo(x(i), y(s[field])) : ctx.moveTo(x(i), y(s[field]))));
    ctx.stroke();
  }
  ctx.fillStyle = "#777";
  ctx.fillText("-" + seconds.length + " s", pad, h - 12);
  ctx.fillText("now", w - 34, h - 12);
  // How many seconds had any decision: what a test (or a person) can check for "it moves".
  canvas.dataset.points = seconds.filter((s) => s.allowed + s.denied + s.errors > 0).length;
  canvas.dataset.max = max;
}

function render(s) {
  $("version").textContent = "v" + s.version + ", up " + fmt(s.uptime_s) + " s";
  badge($("backend"), s.backend + (s.backend_up ? " up" : " down"), s.backend_up);
  badge($("ready"), s.ready ? "ready" : "not ready", s.ready);
  const circuits = s.circuits.map((c) => c.node + (c.open ? ": circuit open" : ": circuit closed"));
  $("circuits").textContent = circuits.join(", ");
  $("circuits").className = s.circuits.some((c) => c.open) ? "bad" : "muted";

  const secs = s.seconds;
  const last = secs[secs.length - 1] || { allowed: 0, denied: 0, errors: 0, near_limit: 0, p99_ms: null };
  $("rate").textContent = fmt(last.allowed + last.denied + last.errors);
  $("allowed-rate").textContent = fmt(last.allowed);
  $("denied-rate").textContent = fmt(last.denied);
  $("near-rate").textContent = fmt(last.near_limit);
  const recent = secs.slice(-10);
  const sum = (f) => recent.reduce((a, r) => a + r[f], 0);
  const decided = sum("allowed") + sum("denied");
  $("deny-ratio").textContent = decided ? ((100 * sum("denied")) / decided).toFixed(1) + "%" : "-";
  const p99s = recent.map((r) => r.p99_ms).filter((v) => v !== null);
  $("p99").textContent = p99s.length ? Math.max(...p99s).toFixed(2) + " ms" : "-";
  const t = s.totals;
  const total = (f) => t.should_allow[f] + t.envoy[f] + t.concurrency[f] + t.rlqs[f];
  $("allowed-total").textContent = fmt(total("allowed"));
  $("denied-total").textContent = fmt(total("denied"));
  $("errors-total").textContent = fmt(total("errors"));
  drawChart(secs);

  fill("top-rules", s.rules.slice(0, 15).filter((r) => r.allowed + r.denied + r.shadow_denied > 0 || r.in_flight).map((r) =>
    row([[r.domain], [r.rule], [fmt(r.allowed), "num"], [fmt(r.denied), "num"], [fmt(r.shadow_denied), "num"], [fmt(r.near_limit), "num"],
      [r.in_flight === null ? "" : fmt(r.in_flight), "num"]])), "top-rules-empty");
  fill("top-keys", s.top_denied.filter((k) => k.count >= 0.5).map((k) =>
    row([[k.key, "key"], [(100 * k.share).toFixed(1) + "%", "num"], [fmt(k.count), "num"]])), "top-keys-empty");
  fill("rlqs", s.rlqs.flatMap((e) => (e.buckets.length ? e.buckets : [null]).map((b) => b === null
    ? row([[e.peer, "key"], [e.domain], ["(no bucket yet)"], [""], ["", "num"], [""], ["", "num"], ["", "num"]])
    : row([[e.peer, "key"], [e.domain], [b.pairs.map((p) => p[0] + "=" + p[1]).join(", "), "key"], [b.rule === null ? "(none)" : b.rule],
      [b.demand.toFixed(1), "num"], [b.assignment === null ? "-" : b.assignment],
      [b.rate === null ? "" : b.rate.toFixed(1), "num"], [b.max_tokens === null ? "" : fmt(b.max_tokens), "num"]]))), "rlqs-empty");
  const l = s.leases;
  $("leases").textContent = l === null
    ? "Off (QUOTA_LEASES=false, or no Redis)."
    : fmt(l.held) + " leases held (" + fmt(l.unspent) + " tokens unspent); since start " + fmt(l.granted) + " granted ("
      + fmt(l.leased_tokens) + " tokens), " + fmt(l.returned_tokens) + " tokens returned unspent, "
      + fmt(l.answers) + " takes answered from leases";
  $("top-keys-empty").textContent = s.top_keys_enabled ? "Nothing denied lately." : "Off (TOP_KEYS=0).";
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function renderRules(r) {
  fill("rules", r.rules.map((x) => {
    const l = x.limit;
    const limit = l.kind === "bucket"
      ? l.requests_per_unit + "/" + (l.unit_multiplier > 1 ? l.unit_multiplier + " " + l.unit + "s" : l.unit)
      : l.kind === "blocked" ? "0/" + l.unit + " (always over)"
      : l.kind === "concurrency" ? "at most " + l.max + " in flight (lease " + l.lease_ms / 1000 + " s)" : "unlimited";
    const bucket = x.bucket ? "capacity " + x.bucket.capacity + ", " + x.bucket.rate_per_second.toPrecision(4) + "/s" : "";
    const flags = [x.shadow_mode && "shadow", x.debt && "debt", x.replaces.length && "replaces " + x.replaces.join(",")].filter(Boolean).join(" ");
    return row([[x.domain], [x.descriptor], [x.rule], [limit], [bucket], [flags], [x.source]]);
  }), "rules-empty");
}

async function poll(url, then) {
  try {
    const r = await fetch(url, { cache: "no-store" });
    if (r.ok) then(await r.json());
  } catch (e) {
    $("updated").textContent = "no answer from sluicegate";
  }
}

function tick() { poll("/debug/status", render); }
function rules() { poll("/debug/rules", renderRules); }
tick(); rules();
setInterval(tick, 1000);
setInterval(rules, 10000);
