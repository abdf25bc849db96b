// bootd status page: makes the server-rendered overview live. No library, no build.
//
// It reads /api/v1/status (the document `bootd status -o json` prints), then follows
// /api/v1/status/stream: Server-Sent Events carrying only the nodes that changed. A node's
// text only ever goes into textContent or an attribute; the one innerHTML is the node
// panel, which the server renders and escapes.
"use strict";
(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const state = $("#state");
  if (!state) return; // a node or explain page: nothing to keep live

  const grid = $("#grid");
  const tbody = $("#nodes tbody");
  const form = $("#filters");
  const live = $("#live");
  const panel = $("#panel");
  const stages = new Set(state.dataset.stages.split(" "));
  const order = ["never-seen", ...state.dataset.stages.split(" "), "stalled"];
  const FILTERS = ["pool", "network", "stage", "image"];
  const nodes = new Map(); // key -> row of the status document
  const cells = new Map(); // key -> <a> in the grid
  const rows = new Map(); // key -> <tr> in the table
  let version = Number(state.dataset.version);
  let at = Number(state.dataset.now);
  let skew = 0; // server time - browser time
  let panelKey = null;

  const keyOf = (r) => r.node || r.mac || "?";
  const stageClass = (r) =>
    "s-" + (stages.has(r.stage) || r.stage === "never-seen" ? r.stage : "other") +
    (r.stalled ? " stalled" : "");
  const stageText = (r) => r.stage + (r.stalled ? " (stalled)" : "");
  const serverNow = () => Date.now() / 1000 + skew;

  // the same short forms as `bootd status` (bootd/ops/text.py)
  function duration(s) {
    if (s === null || s === undefined) return "-";
    if (s < 60) return s.toFixed(1) + "s";
    let m = Math.floor(s / 60);
    const sec = Math.floor(s) % 60;
    if (m < 60) return `${m}m${String(sec).padStart(2, "0")}s`;
    const h = Math.floor(m / 60);
    m %= 60;
    if (h < 48) return `${h}h${String(m).padStart(2, "0")}m`;
    return `${Math.floor(h / 24)}d${String(h % 24).padStart(2, "0")}h`;
  }
  const ago = (ts) => (ts ? duration(Math.max(0, serverNow() - ts)) + " ago" : "-");
  // C0/C1 controls shown as \xNN, as bootd.ops.text.printable does
  const printable = (v) =>
    String(v ?? "").replace(/[\x00-\x1f\x7f-\x9f]/g,
      (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));

  function wanted() {
    const w = {};
    for (const name of FILTERS) w[name] = form.elements[name].value;
    return w;
  }
  function matches(r, w) {
    for (const name of FILTERS) {
      const v = w[name];
      if (!v) continue;
      if (name === "stage" && v === "stalled") { if (!r.stalled) return false; }
      else if (String(r[name] ?? "") !== v) return false;
    }
    return true;
  }

  function link(key) {
    const a = document.createElement("a");
    a.href = "/nodes/" + encodeURIComponent(key);
    a.dataset.k = key;
    return a;
  }

  function groupBox(name) {
    for (const box of grid.querySelectorAll(".group")) {
      if (box.dataset.g === name) return box;
    }
    const box = document.createElement("div");
    box.className = "group";
    box.dataset.g = name;
    const h = document.createElement("h3");
    h.append(printable(name), " ");
    h.append(document.createElement("small"));
    const cellsBox = document.createElement("div");
    cellsBox.className = "cells";
    box.append(h, cellsBox);
    grid.append(box);
    return box;
  }

  function paintCell(r) {
    const key = keyOf(r);
    let a = cells.get(key);
    const group = r[grid.dataset.group] || `(no ${grid.dataset.group})`;
    if (!a || a.closest(".group").dataset.g !== group) {
      if (a) a.remove();
      a = link(key);
      groupBox(group).querySelector(".cells").append(a);
      cells.set(key, a);
    }
    const cls = "c " + stageClass(r) + (key === panelKey ? " sel" : "");
    if (a.className !== cls) a.className = cls; // unchanged: no style work for the browser
    const title = `${printable(key)}: ${stageText(r)}`;
    if (a.title !== title) a.title = title;
  }

  // the table: troubled nodes first, as `bootd status` sorts, at most `limit` rows
  const limit = Number(tbody.dataset.limit);
  const rank = (r) =>
    r.stalled || r.stage === "failed" || r.stage === "refused" ? 0
      : r.stage === "joined" || r.stage === "never-seen" ? 2 : 1;
  const byOrder = (a, b) =>
    rank(a) - rank(b) || (a.pool || "~").localeCompare(b.pool || "~") ||
    keyOf(a).localeCompare(keyOf(b));

  function rebuildTable() {
    const w = wanted();
    const shown = [...nodes.values()].filter((r) => matches(r, w)).sort(byOrder);
    tbody.replaceChildren();
    rows.clear();
    for (const r of shown.slice(0, limit)) paintRow(r);
    $("#more").textContent = shown.length > limit
      ? `; the first ${limit} of ${shown.length}: the filters narrow it` : "";
  }

  function paintRow(r) {
    const key = keyOf(r);
    let tr = rows.get(key);
    if (!tr) {
      if (rows.size >= limit) return;
      tr = document.createElement("tr");
      tr.dataset.k = key;
      for (let i = 0; i < 11; i++) tr.append(document.createElement("td"));
      tr.cells[0].append(link(key));
      tr.cells[10].className = "msg";
      tbody.append(tr);
      rows.set(key, tr);
    }
    tr.className = stageClass(r);
    const td = tr.cells;
    td[0].firstChild.textContent = printable(r.node || "(unknown)");
    td[1].textContent = printable(r.mac || "-");
    td[2].textContent = printable(r.ip || "-");
    td[3].textContent = printable(r.pool || "-");
    td[4].textContent = printable(r.network || "-");
    td[5].textContent = printable(r.image || "-");
    const sw = document.createElement("i");
    sw.className = "swatch " + stageClass(r);
    td[6].replaceChildren(sw, stageText(r));
    td[7].dataset.ts = r.since ?? "";
    td[7].textContent = ago(r.since);
    td[8].textContent = duration(r.last_boot_time);
    td[9].textContent = String(r.attempts);
    td[10].textContent = printable(r.last_error || "-");
  }

  function filter() {
    const w = wanted();
    let shown = 0;
    for (const [key, r] of nodes) {
      const on = matches(r, w);
      shown += on;
      if (cells.has(key)) cells.get(key).hidden = !on;
      if (rows.has(key)) rows.get(key).hidden = !on;
    }
    for (const box of grid.querySelectorAll(".group")) {
      const n = [...box.querySelectorAll(".c")].filter((c) => !c.hidden).length;
      box.hidden = n === 0;
      box.querySelector("h3 small").textContent = String(n);
    }
    $("#summary").textContent = `${shown} of ${nodes.size} nodes`;
    counts(w);
    errors(w);
  }

  function counts(w) {
    const tally = new Map();
    for (const r of nodes.values()) {
      if (!matches(r, w)) continue;
      const k = r.stalled ? "stalled" : r.stage;
      tally.set(k, (tally.get(k) || 0) + 1);
    }
    const entries = [...tally].sort((a, b) => order.indexOf(a[0]) - order.indexOf(b[0]));
    const total = entries.reduce((n, [, c]) => n + c, 0) || 1;
    const bar = $("#stagebar");
    const svg = "http://www.w3.org/2000/svg";
    let x = 0;
    const rects = entries.map(([stage, count]) => {
      const rect = document.createElementNS(svg, "rect");
      const width = (1000 * count) / total;
      rect.setAttribute("class", "s-" + stage);
      rect.setAttribute("x", x.toFixed(2));
      rect.setAttribute("y", "0");
      rect.setAttribute("width", width.toFixed(2));
      rect.setAttribute("height", "24");
      const title = document.createElementNS(svg, "title");
      title.textContent = `${count} ${stage}`;
      rect.append(title);
      x += width;
      return rect;
    });
    bar.replaceChildren(...rects);
    $("#legend").replaceChildren(...entries.map(([stage, count]) => {
      const li = document.createElement("li");
      const sw = document.createElement("i");
      sw.className = "swatch s-" + stage;
      const b = document.createElement("b");
      b.textContent = String(count);
      li.append(sw, b, " " + stage);
      return li;
    }));
  }

  function errors(w) {
    const latest = [...nodes.values()]
      .filter((r) => r.last_error && matches(r, w))
      .sort((a, b) => (b.last_seen || 0) - (a.last_seen || 0))
      .slice(0, 10);
    const body = $("#errors tbody");
    if (!latest.length) {
      const tr = document.createElement("tr");
      tr.className = "none";
      const td = document.createElement("td");
      td.colSpan = 3;
      td.textContent = "none";
      tr.append(td);
      body.replaceChildren(tr);
      return;
    }
    body.replaceChildren(...latest.map((r) => {
      const tr = document.createElement("tr");
      const name = document.createElement("td");
      const a = link(keyOf(r));
      a.textContent = printable(keyOf(r));
      name.append(a);
      const when = document.createElement("td");
      when.textContent = ago(r.last_seen);
      const msg = document.createElement("td");
      msg.className = "msg";
      msg.textContent = printable(r.last_error);
      tr.append(name, when, msg);
      return tr;
    }));
  }

  let pending = null;
  let histogramDue = 0;
  function update(document_) {
    skew = document_.now - Date.now() / 1000;
    let joined = false;
    for (const r of document_.nodes) {
      const key = keyOf(r);
      const before = nodes.get(key);
      if (r.stage === "joined" && (!before || before.stage !== "joined")) joined = true;
      nodes.set(key, r);
      paintCell(r);
      paintRow(r);
      if (key === panelKey) loadPanel(key, false);
    }
    if (!pending) pending = requestAnimationFrame(() => { pending = null; filter(); });
    if (joined) refreshHistogram();
    document.body.dataset.version = String(version);
  }

  let histogramTimer = null;
  function refreshHistogram() {
    // at most one fetch per 5 s, and the last join of a burst is always drawn
    const now = Date.now();
    if (now < histogramDue) {
      histogramTimer ??= setTimeout(() => { histogramTimer = null; refreshHistogram(); },
        histogramDue - now);
      return;
    }
    histogramDue = now + 5000;
    fetch("/fragments/boot-times").then((r) => r.text()).then((html) => {
      $("#boot-times").innerHTML = html; // rendered and escaped by the server
    }).catch(() => {});
  }

  async function loadPanel(key, show = true) {
    panelKey = key;
    const r = await fetch("/nodes/" + encodeURIComponent(key) + "?fragment=1");
    if (panelKey !== key) return;
    const close = document.createElement("button");
    close.className = "close";
    close.textContent = "close";
    close.addEventListener("click", () => {
      panel.hidden = true;
      cells.get(panelKey)?.classList.remove("sel");
      panelKey = null;
    });
    panel.innerHTML = r.ok ? await r.text() : ""; // rendered and escaped by the server
    panel.prepend(close);
    if (show) panel.hidden = false;
    for (const c of grid.querySelectorAll(".c.sel")) c.classList.remove("sel");
    cells.get(key)?.classList.add("sel");
  }

  grid.addEventListener("click", (e) => {
    const a = e.target.closest("a[data-k]");
    if (!a || e.ctrlKey || e.metaKey || e.shiftKey) return; // a new tab: the whole page
    e.preventDefault();
    loadPanel(a.dataset.k);
  });

  form.addEventListener("change", (e) => {
    const params = new URLSearchParams(new FormData(form));
    history.replaceState(null, "", "?" + params);
    if (e.target.name === "group") {
      grid.dataset.group = e.target.value;
      grid.replaceChildren();
      cells.clear();
      for (const r of nodes.values()) paintCell(r);
    }
    rebuildTable();
    filter();
  });
  form.querySelector("button").hidden = true; // filters apply as they change

  setInterval(() => {
    for (const tr of rows.values()) {
      const td = tr.cells[7];
      if (!tr.hidden && td.dataset.ts) td.textContent = ago(Number(td.dataset.ts));
    }
  }, 5000);

  function follow() {
    const source = new EventSource(`/api/v1/status/stream?since=${version}&at=${at}`);
    source.addEventListener("nodes", (e) => {
      const doc = JSON.parse(e.data);
      version = doc.version;
      at = doc.now;
      update(doc);
    });
    source.onopen = () => { live.textContent = "live"; live.className = "live on"; };
    source.onerror = () => { live.textContent = "reconnecting"; live.className = "live off"; };
  }

  for (const a of grid.querySelectorAll("a[data-k]")) cells.set(a.dataset.k, a);
  for (const tr of tbody.querySelectorAll("tr[data-k]")) rows.set(tr.dataset.k, tr);
  fetch("/api/v1/status").then((r) => r.json()).then((doc) => {
    version = doc.version;
    at = doc.now;
    update(doc);
    follow();
  }).catch(() => { live.textContent = "cannot read /api/v1/status"; live.className = "live off"; });
})();
