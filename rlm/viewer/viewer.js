// The rlm run viewer: builds the page from the JSON in #rlm-data. Nodes are drawn when first
// opened, so a run of thousands of events opens at once. Every text goes in with textContent.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("rlm-data").textContent);
  const TEXTS = DATA.texts;
  const PREVIEW = 280; // characters shown before "show all"
  const PAGE = 100; // sub-calls or child runs drawn per "show more"
  const nodes = new Map(); // id -> {id, kind, parent, data, el}
  let query = "";

  const text = (ref) => (ref === null || ref === undefined ? "" : TEXTS[ref]);
  const el = (tag, cls, content) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (content !== undefined && content !== null) node.textContent = content;
    return node;
  };
  const num = (n) => Number(n || 0).toLocaleString("en-US");
  const secs = (s) => (s === null || s === undefined ? "" : s < 1 ? (s * 1000).toFixed(0) + " ms" : Number(s).toFixed(2) + " s");
  const money = (c) => (c === null || c === undefined ? "unpriced" : "$" + Number(c).toFixed(4));
  const oneLine = (s, n) => { s = String(s || "").replace(/\s+/g, " ").trim(); return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; };
  const tokens = (u) => num(u[0]) + " \u2192 " + num(u[1]) + " tok";

  // -- the index of every node: for search and for opening a path to a node ------------------
  function indexRun(run, parent) {
    const rid = "r" + run.id;
    nodes.set(rid, { id: rid, kind: "run", parent, data: run });
    run.turns.forEach((turn) => {
      const tid = rid + ".t" + turn.n;
      nodes.set(tid, { id: tid, kind: "turn", parent: rid, data: turn });
      turn.cells.forEach((cell) => {
        const cid = tid + ".c" + cell.i;
        nodes.set(cid, { id: cid, kind: "cell", parent: tid, data: cell });
        cell.subs.forEach((sub, k) => nodes.set(cid + ".s" + k, { id: cid + ".s" + k, kind: "sub", parent: cid, data: sub }));
        cell.children.forEach((child) => indexRun(child, cid));
      });
      turn.subs.forEach((sub, k) => nodes.set(tid + ".s" + k, { id: tid + ".s" + k, kind: "sub", parent: tid, data: sub }));
      turn.children.forEach((child) => indexRun(child, tid));
    });
    run.children.forEach((child) => indexRun(child, rid));
  }

  // -- text blocks: a preview, "show all" for the rest, search matches marked ----------------
  function fill(target, str) {
    target.textContent = "";
    if (!query) { target.textContent = str; return; }
    const lower = str.toLowerCase();
    let at = 0;
    for (let hit = lower.indexOf(query); hit !== -1; hit = lower.indexOf(query, at)) {
      target.append(str.slice(at, hit), el("mark", null, str.slice(hit, hit + query.length)));
      at = hit + query.length;
    }
    target.append(str.slice(at));
  }

  function textBlock(label, ref, cls) {
    const str = text(ref);
    const box = el("div", "text");
    box.append(el("div", "label", label + " (" + num(str.length) + " chars)"));
    const pre = el("pre", cls || "");
    const long = str.length > PREVIEW;
    let full = !long || (query && str.slice(PREVIEW).toLowerCase().includes(query));
    const draw = () => fill(pre, full ? str : str.slice(0, PREVIEW) + " \u2026");
    draw();
    box.append(pre);
    if (long) {
      const button = el("button", "show-all", full ? "show less" : "show all");
      button.type = "button";
      button.addEventListener("click", () => { full = !full; button.textContent = full ? "show less" : "show all"; draw(); });
      box.append(button);
    }
    return box;
  }

  // -- nodes: a head line that opens a lazily drawn body -------------------------------------
  function nodeEl(id) {
    const node = nodes.get(id);
    const box = el("div", "node kind-" + node.kind);
    box.dataset.id = id;
    const head = el("div", "head");
    head.tabIndex = 0;
    head.setAttribute("role", "button");
    head.setAttribute("aria-expanded", "false");
    head.append(el("span", "caret", "\u25b8"));
    HEADS[node.kind](head, node.data, box);
    const body = el("div", "body");
    body.hidden = true;
    box.append(head, body);
    head.addEventListener("click", () => toggle(box));
    head.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); toggle(box); } });
    node.el = box;
    return box;
  }

  function toggle(box, open) {
    const body = box.lastChild;
    const show = open === undefined ? body.hidden : open;
    if (show && !body.dataset.drawn) {
      const node = nodes.get(box.dataset.id);
      BODIES[node.kind](body, node.data, node.id);
      body.dataset.drawn = "1";
    }
    body.hidden = !show;
    box.firstChild.setAttribute("aria-expanded", String(show));
    box.firstChild.firstChild.textContent = show ? "\u25be" : "\u25b8";
  }

  function paged(container, ids) {
    let shown = 0;
    const more = el("button", "more");
    more.type = "button";
    const step = (upTo) => {
      const end = Math.min(ids.length, Math.max(upTo || 0, shown + PAGE));
      for (; shown < end; shown++) container.insertBefore(nodeEl(ids[shown]), more);
      more.textContent = "show " + Math.min(PAGE, ids.length - shown) + " more (" + num(ids.length - shown) + " left)";
      more.hidden = shown >= ids.length;
    };
    more.addEventListener("click", () => step());
    container.append(more);
    container.showUpTo = (index) => { if (index >= shown) step(index + 1); };
    step();
  }

  const facts = (head, parts) => head.append(el("span", "facts", parts.filter(Boolean).join(" \u00b7 ")));

  const HEADS = {
    run(head, run) {
      head.append(el("span", "name", run.depth === 0 ? "Run" : "Child run " + run.id));
      facts(head, ["depth " + run.depth, run.model, run.status, run.turns.length + " turn(s)",
        run.batch_index !== null && run.batch_index !== undefined ? "batch item " + run.batch_index : ""]);
      head.append(el("span", "preview", oneLine(text(run.query), 100)));
    },
    turn(head, turn, box) {
      const subs = turn.cells.reduce((n, c) => n + c.subs.length, turn.subs.length);
      const kids = turn.cells.reduce((n, c) => n + c.children.length, turn.children.length);
      head.append(el("span", "name", "Turn " + turn.n));
      facts(head, [turn.has_call ? secs(turn.latency) : "no model call", turn.has_call ? tokens(turn.usage) : "",
        turn.has_call ? money(turn.cost) : "", turn.cells.length + " cell(s)", subs ? subs + " sub-call(s)" : "",
        kids ? kids + " child run(s)" : "", turn.shortened ? turn.shortened + " message(s) shortened" : ""]);
      if (turn.final !== null) head.append(el("span", "warn ok", "FINAL"));
      if (turn.errors.length) { head.append(el("span", "warn", turn.errors[0].kind)); box.classList.add("failed"); }
      head.append(el("span", "preview", oneLine(text(turn.reply), 90)));
    },
    cell(head, cell, box) {
      head.append(el("span", "name", "Cell " + cell.i));
      facts(head, [cell.ran ? secs(cell.duration) : "did not finish", cell.subs.length ? cell.subs.length + " sub-call(s)" : "",
        cell.children.length ? cell.children.length + " child run(s)" : ""]);
      const problem = cell.timed_out ? "timed out" : cell.restarted ? "worker restarted" : cell.error !== null ? "error" : "";
      if (problem) { head.append(el("span", "warn", problem)); box.classList.add("failed"); }
      head.append(el("span", "preview", oneLine(text(cell.code), 90)));
    },
    sub(head, sub, box) {
      const where = sub.size ? " " + (sub.index + 1) + "/" + sub.size : "";
      head.append(el("span", "name", (sub.kind || "llm_query") + where));
      facts(head, sub.tool ? [secs(sub.latency)] : [sub.cache_hit ? "cache hit" : secs(sub.latency),
        sub.cache_hit ? "" : tokens(sub.usage), sub.cache_hit ? "" : money(sub.cost), sub.model]);
      if (sub.error !== null) { head.append(el("span", "warn", "failed")); box.classList.add("failed"); }
      head.append(el("span", "preview", oneLine(text(sub.prompt), 60) + "  \u2192  " + oneLine(text(sub.reply), 50)));
    },
  };

  const BODIES = {
    run(body, run, id) {
      const ctx = run.context || {};
      body.append(el("div", "facts", ["root model " + (run.model || "?"), "sub-model " + (run.sub_model || "?"),
        "context: " + (ctx.type || "?") + ", " + num(ctx.total_length) + " chars", "run id " + run.run_id].join(" \u00b7 ")));
      body.append(textBlock("question", run.query));
      if (run.answer !== null) body.append(textBlock("answer", run.answer));
      if (run.system !== null) body.append(textBlock("system prompt", run.system));
      run.errors.forEach((e) => body.append(textBlock("error: " + e.kind, e.message, "err")));
      const list = el("div", "children");
      body.append(list);
      paged(list, [...run.turns.map((t) => id + ".t" + t.n), ...run.children.map((c) => "r" + c.id)]);
    },
    turn(body, turn, id) {
      turn.messages.forEach((m) => body.append(textBlock("sent: " + m.role + " message", m.text)));
      if (turn.reasoning !== null) body.append(textBlock("reasoning", turn.reasoning));
      if (turn.has_call) body.append(textBlock("reply from " + (turn.model || "the model"), turn.reply));
      if (turn.final !== null) body.append(textBlock("final answer (" + turn.final_source + ")", turn.final));
      turn.errors.forEach((e) => body.append(textBlock("error: " + e.kind, e.message, "err")));
      const list = el("div", "children");
      body.append(list);
      paged(list, [...turn.cells.map((c) => id + ".c" + c.i), ...turn.subs.map((_, k) => id + ".s" + k),
        ...turn.children.map((c) => "r" + c.id)]);
    },
    cell(body, cell, id) {
      body.append(textBlock("code", cell.code, "code"));
      if (cell.stdout !== null) body.append(textBlock("output", cell.stdout));
      if (cell.stderr !== null) body.append(textBlock("stderr", cell.stderr, "err"));
      if (cell.error !== null) body.append(textBlock("error", cell.error, "err"));
      const list = el("div", "children");
      body.append(list);
      paged(list, [...cell.subs.map((_, k) => id + ".s" + k), ...cell.children.map((c) => "r" + c.id)]);
    },
    sub(body, sub) {
      if (sub.note) body.append(el("div", "facts", sub.note));
      body.append(textBlock(sub.tool ? "arguments" : "prompt", sub.prompt));
      body.append(textBlock(sub.tool ? "result" : "reply", sub.reply));
      if (sub.error !== null) body.append(textBlock("error", sub.error, "err"));
    },
  };

  // -- opening the path to a node (search results, timeline clicks) ---------------------------
  function reveal(id) {
    const chain = [];
    for (let at = id; at; at = nodes.get(at).parent) chain.unshift(at);
    let box = null;
    for (const step of chain) {
      if (box === null) { box = document.querySelector('#tree > .node[data-id="' + step + '"]'); }
      else {
        toggle(box, true);
        const list = box.lastChild.querySelector(":scope > .children");
        const ids = [...list.children].map((c) => c.dataset && c.dataset.id);
        if (!ids.includes(step)) list.showUpTo(childPosition(box.dataset.id, step));
        box = list.querySelector(':scope > .node[data-id="' + step + '"]');
      }
      if (!box) return;
    }
    toggle(box, true);
    document.querySelectorAll(".hit").forEach((n) => n.classList.remove("hit"));
    box.classList.add("hit");
    box.scrollIntoView({ block: "center" });
  }

  function childPosition(parentId, childId) {
    let position = 0;
    for (const node of nodes.values()) {
      if (node.parent === parentId) { if (node.id === childId) return position; position++; }
    }
    return position;
  }

  // -- search ----------------------------------------------------------------------------------
  const lowered = new Map();
  const low = (ref) => { if (!lowered.has(ref)) lowered.set(ref, text(ref).toLowerCase()); return lowered.get(ref); };
  const SEARCHED = {
    run: (d) => [["question", d.query], ["answer", d.answer], ["system prompt", d.system]],
    turn: (d) => [...d.messages.map((m) => [m.role + " message", m.text]), ["reply", d.reply], ["reasoning", d.reasoning], ["final", d.final]],
    cell: (d) => [["code", d.code], ["output", d.stdout], ["stderr", d.stderr], ["error", d.error]],
    sub: (d) => [["prompt", d.prompt], ["reply", d.reply], ["error", d.error]],
  };

  function search(value) {
    query = value.trim().toLowerCase();
    const results = document.getElementById("search-results");
    results.textContent = "";
    document.getElementById("search-count").textContent = "";
    if (query.length < 2) { query = ""; return; }
    let count = 0;
    for (const node of nodes.values()) {
      for (const [what, ref] of SEARCHED[node.kind](node.data)) {
        if (ref === null || ref === undefined) continue;
        const at = low(ref).indexOf(query);
        if (at === -1) continue;
        count++;
        if (count <= 200) results.append(resultItem(node, what, text(ref), at));
        break;
      }
    }
    document.getElementById("search-count").textContent = count + (count === 1 ? " match" : " matches") + (count > 200 ? " (first 200 listed)" : "");
  }

  function resultItem(node, what, str, at) {
    const item = el("li");
    item.dataset.target = node.id;
    item.append(el("span", "where", describe(node) + ", " + what + ":"), oneLine(str.slice(Math.max(0, at - 40), at + 80), 120));
    item.addEventListener("click", () => reveal(node.id));
    return item;
  }

  function describe(node) {
    const parts = [];
    for (let at = node; at; at = at.parent ? nodes.get(at.parent) : null) {
      const d = at.data;
      parts.unshift(at.kind === "run" ? (d.depth ? "child run " + d.id : "run") : at.kind === "turn" ? "turn " + d.n
        : at.kind === "cell" ? "cell " + d.i : "sub-call" + (d.index !== null ? " " + (d.index + 1) : ""));
    }
    return parts.join(" \u203a ");
  }

  // -- header, totals, timeline ----------------------------------------------------------------
  function header() {
    const meta = DATA.meta;
    document.getElementById("run-id").textContent = meta.run_id;
    const badge = document.getElementById("status");
    badge.textContent = meta.status + (meta.truncated ? " (file cut short)" : "");
    badge.classList.add(meta.status === "answered" ? "ok" : "bad");
    const summary = document.getElementById("summary");
    const row = (k, v, cls) => { if (v) summary.append(el("dt", null, k), el("dd", cls || null, v)); };
    if (meta.error !== null) row("error", text(meta.error), "failure");
    if (meta.reason !== null) row("stopped", text(meta.reason), "failure");
    row("question", text(meta.query));
    row("answer", meta.answer === null ? "(none)" : text(meta.answer));
    row("file", (meta.file || "") + (meta.started ? "  \u00b7  " + new Date(meta.started * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "") + "  \u00b7  format v" + meta.version);
  }

  function totals() {
    const t = DATA.totals;
    const box = document.getElementById("totals");
    const stat = (value, label) => { const s = el("div", "stat"); s.append(el("b", null, value), el("span", null, label)); box.append(s); };
    stat(secs(t.duration), "wall time");
    stat(num(DATA.root.turns.length), "root turns");
    stat(num(t.model_calls), "model calls (all runs)");
    stat(num(t.sub_calls), "sub-calls");
    stat(num(t.cache_hits), "cache hits");
    stat(num(t.runs - 1), "child runs");
    stat(num(t.cells), "cells");
    stat(num(t.input_tokens) + " / " + num(t.output_tokens), "tokens in / out");
    stat("$" + t.cost.toFixed(4) + (t.unpriced_calls ? " +" : ""), t.unpriced_calls ? num(t.unpriced_calls) + " unpriced call(s)" : "cost");
    if (t.failed_calls) stat(num(t.failed_calls), "failed calls");
  }

  const LANE_COLORS = { "root model": "c-root", code: "c-code", "sub-calls": "c-sub", "child runs": "c-child" };
  const PART_COLORS = ["c-root", "c-code", "c-sub", "c-other"];

  function timeline() {
    const tl = DATA.timeline;
    const bar = el("div", "bar");
    const legend = el("div", "legend");
    tl.breakdown.forEach((part, k) => {
      const share = Math.max(0, part.seconds / tl.wall * 100);
      const piece = el("div", PART_COLORS[k]);
      piece.style.width = share.toFixed(3) + "%";
      piece.title = part.name + ": " + secs(part.seconds);
      bar.append(piece);
      const item = el("span");
      item.append(el("span", "swatch " + PART_COLORS[k]), part.name + " " + secs(part.seconds) + " (" + share.toFixed(0) + "%)" + (part.note ? ", " + part.note : ""));
      legend.append(item);
    });
    document.getElementById("breakdown").append(bar, legend);
    const lanes = document.getElementById("timeline");
    tl.lanes.forEach((lane) => {
      const row = el("div", "lane");
      const track = el("div", "track");
      lane.spans.forEach(([start, end, label, target]) => {
        const span = el("div", "span " + LANE_COLORS[lane.name]);
        span.style.left = (start / tl.wall * 100).toFixed(3) + "%";
        span.style.width = ((end - start) / tl.wall * 100).toFixed(3) + "%";
        span.title = label + ": " + secs(end - start) + " at " + secs(start);
        if (target && nodes.has(target)) { span.dataset.target = target; span.addEventListener("click", () => reveal(target)); }
        track.append(span);
      });
      row.append(el("div", "lane-name", lane.name + " (" + lane.spans.length + ")"), track);
      lanes.append(row);
    });
    const axis = el("div", "axis");
    const ticks = el("div", "ticks");
    for (let k = 0; k <= 4; k++) ticks.append(el("span", null, secs(tl.wall * k / 4)));
    axis.append(el("span"), ticks);
    lanes.append(axis);
  }

  function controls() {
    const input = document.getElementById("search");
    let timer = 0;
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => search(input.value), 150); });
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") { clearTimeout(timer); search(input.value); } });
    document.addEventListener("keydown", (e) => { if (e.key === "/" && document.activeElement !== input) { e.preventDefault(); input.focus(); } });
    document.getElementById("expand-turns").addEventListener("click", () => {
      document.querySelectorAll("#tree .node.kind-run").forEach((box) => { if (!box.closest(".body[hidden]")) toggle(box, true); });
      document.querySelectorAll("#tree .node.kind-turn").forEach((box) => { if (!box.closest(".body[hidden]")) toggle(box, true); });
    });
    document.getElementById("collapse-all").addEventListener("click", () => document.querySelectorAll("#tree .node").forEach((box) => toggle(box, false)));
  }

  indexRun(DATA.root, null);
  header();
  totals();
  timeline();
  const rootBox = nodeEl("r0");
  document.getElementById("tree").append(rootBox);
  toggle(rootBox, true);
  controls();
  document.body.dataset.readyMs = String(Math.round(performance.now())); // time to first paint-ready page
  document.body.dataset.ready = "1";
})();
