// lqc viz report. Draws the layouts lqc.viz computed (Graphviz dot's positions) as SVG; computes no layout.
"use strict";
// The data is gzip-compressed JSON in base64 (a tenth of the size); the browser's own
// DecompressionStream inflates it.
async function loadReportData() {
  const text = document.getElementById("lqc-data").textContent.trim();
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return JSON.parse(await new Response(stream).text());
}

(async function () {
  const DATA = await loadReportData();
  const SVG_NS = "http://www.w3.org/2000/svg";
  // expanded: the group drawn node by node (one at a time); folded: its children drawn as one box each
  const state = { graph: 0, step: -1, expanded: null, folded: [], selected: null, overlay: false, zoom: 1 };

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, text) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const svgEl = (tag, attrs) => {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  };
  const fmtBytes = (b) => (b >= 1e6 ? (b / 1e6).toFixed(2) + " MB" : b >= 1e3 ? (b / 1e3).toFixed(1) + " kB" : b + " B");

  // ---- per-graph indexes ------------------------------------------------------------------------
  function graph() { return DATA.graphs[state.graph]; }
  function snapshotIndex(snapshot) {
    if (!snapshot._byName) {
      snapshot._byName = new Map(snapshot.nodes.map((n) => [n.name, n]));
      snapshot._users = new Map();
      for (const n of snapshot.nodes) for (const i of n.inputs) {
        if (!snapshot._users.has(i)) snapshot._users.set(i, []);
        snapshot._users.get(i).push(n.name);
      }
    }
    return snapshot._byName;
  }
  function stepPanes() {
    // step k >= 1: before = snapshot k-1, after = snapshot k; step 0: the capture alone.
    const g = graph();
    const k = state.step;
    if (k === 0) return { before: null, after: g.snapshots[0], record: null };
    return { before: g.snapshots[k - 1], after: g.snapshots[k], record: g.passes[k - 1] };
  }
  function diffSets(record) {
    return {
      added: new Set(record ? record.added : []),
      removed: new Set(record ? record.removed : []),
      changed: new Set(record ? record.changed : []),
    };
  }
  // the compressed graph (the recipe's last step): where fusion groups and per-node errors are known
  function isFinal(snapshot) { const g = graph(); return snapshot === g.snapshots[g.annotated_step]; }

  // ---- header, timeline -------------------------------------------------------------------------
  function initHeader() {
    $("title").textContent = DATA.title;
    const select = $("graph-select");
    DATA.graphs.forEach((g, i) => select.appendChild(el("option", { value: i }, `${g.name} (${g.snapshots[0].nodes.length} nodes)`)));
    select.style.display = DATA.graphs.length > 1 ? "" : "none";
    select.addEventListener("change", () => { state.graph = +select.value; state.step = -1; expand(null); state.selected = null; renderAll(); });
    $("overlay").addEventListener("change", (e) => { state.overlay = e.target.checked; renderPanes(); });
    $("zoom-in").addEventListener("click", () => { state.zoom *= 1.25; renderPanes(); });
    $("zoom-out").addEventListener("click", () => { state.zoom /= 1.25; renderPanes(); });
    $("collapse").addEventListener("click", () => { expand(null); renderPanes(); });
    initSearch();
    $("engine").textContent = DATA.engine;
  }

  function renderTimeline() {
    const g = graph();
    const bar = $("timeline");
    bar.innerHTML = "";
    const steps = [{ name: "capture", nodes: g.snapshots[0].nodes.length, bytes: g.capture_bytes }].concat(g.passes);
    steps.forEach((p, i) => {
      const button = el("button", { class: "pass-step" + (i === state.step ? " active" : ""), "data-step": i, "data-pass": p.name });
      button.appendChild(el("div", { class: "name" }, i === 0 ? "0 · capture" : `${i} · ${p.name}${p.stage === "lowering" ? " (lowering)" : ""}`));
      const stats = el("div", { class: "stats" });
      if (i === 0) stats.textContent = `${p.nodes} nodes · ${fmtBytes(p.bytes)}`;
      else {
        stats.appendChild(el("span", { class: "plus" }, `+${p.added.length} `));
        stats.appendChild(el("span", { class: "minus" }, `−${p.removed.length} `));
        stats.appendChild(el("span", { class: "tilde" }, `~${p.changed.length}`));
        stats.appendChild(document.createTextNode(` · ${p.ms.toFixed(0)} ms · ${fmtBytes(p.bytes_after)}`));
        if (p.rel_error !== null && p.rel_error !== undefined) stats.appendChild(document.createTextNode(` · err ${p.rel_error.toExponential(1)}`));
      }
      button.appendChild(stats);
      button.title = i === 0 ? "the graph as captured" : (p.message || p.name);
      button.addEventListener("click", () => { state.step = i; renderAll(); });
      bar.appendChild(button);
    });
  }

  // ---- drawing ----------------------------------------------------------------------------------
  function layoutFor(snapshot) {
    const group = state.expanded && snapshot.groups[state.expanded];
    if (!group) return DATA.layouts[snapshot.views[""]];
    const folded = state.folded.filter((c) => group.children[c]).sort();
    const key = state.expanded + (folded.length ? "|" + folded.join(",") : "");
    return DATA.layouts[snapshot.views[key] !== undefined ? snapshot.views[key] : snapshot.views[state.expanded]];
  }

  function expand(path) { state.expanded = path; state.folded = []; }

  // A box standing for several nodes: a collapsed group, or a folded child of the expanded group.
  function boxMembers(snapshot, path) {
    if (snapshot.groups[path]) return snapshot.groups[path].members;
    const group = state.expanded && snapshot.groups[state.expanded];
    return group && group.children[path] ? group.children[path] : [];
  }

  function groupDelta(snapshot, path, diff, side) {
    const members = boxMembers(snapshot, path);
    let plus = 0, minus = 0, tilde = 0;
    if (side === "after") for (const m of members) { if (diff.added.has(m)) plus++; if (diff.changed.has(m)) tilde++; }
    if (side === "before") for (const m of members) if (diff.removed.has(m)) minus++;
    // constants a pass added or removed count towards the block that owns them
    const consts = snapshot.groups[path] ? snapshot.group_constants[path] || [] : [];
    if (side === "after") for (const m of consts) if (diff.added.has(m)) plus++;
    if (side === "before") for (const m of consts) if (diff.removed.has(m)) minus++;
    return { plus, minus, tilde };
  }

  function errorColor(err) {
    if (!err) return null;
    const s = err.sqnr_db;
    if (s === null) return "#d9f0dc";
    if (s >= 40) return "#bfe5c6";
    if (s >= 25) return "#f4ecb0";
    if (s >= 15) return "#f8cf9a";
    return "#f2a39b";
  }
  function groupError(snapshot, path) {
    const errors = graph().errors;
    let worst = null;
    for (const m of boxMembers(snapshot, path)) {
      const e = errors[m];
      if (!e) continue;
      if (worst === null || (e.sqnr_db !== null && (worst.sqnr_db === null || e.sqnr_db < worst.sqnr_db))) worst = e;
    }
    return worst;
  }

  function renderPane(paneId, snapshot, side, diff) {
    const pane = $(paneId);
    const canvas = pane.querySelector(".canvas");
    canvas.innerHTML = "";
    if (!snapshot) { pane.classList.add("hidden"); return; }
    pane.classList.remove("hidden");
    const byName = snapshotIndex(snapshot);
    const layout = layoutFor(snapshot);
    const z = state.zoom;
    const svg = svgEl("svg", { width: layout.width * z + 20, height: layout.height * z + 20, "data-side": side });
    const root = svgEl("g", { transform: `translate(10,10) scale(${z})` });
    svg.appendChild(root);
    const overlay = state.overlay && isFinal(snapshot);
    const errors = graph().errors;

    const expandedGroup = state.expanded && snapshot.groups[state.expanded];
    for (const [key, label, x, y, w, h] of layout.clusters) {
      const path = key.slice(2);
      const outer = snapshot.groups[path] !== undefined;
      const foldable = !outer && expandedGroup && expandedGroup.children[path] !== undefined;
      const g = svgEl("g", { class: "cluster" + (outer ? " outer" : foldable ? " foldable" : ""), "data-cluster": path });
      g.appendChild(svgEl("rect", { x, y, width: w, height: h, rx: 4 }));
      const t = svgEl("text", { x: x + 6, y: y + 12 });
      t.textContent = outer ? `${label}  (${snapshot.groups[path].class}) ▾ collapse` : foldable ? `${label} ▾ fold` : label;
      if (outer) t.addEventListener("click", (ev) => { ev.stopPropagation(); expand(null); renderPanes(); });
      if (foldable) t.addEventListener("click", (ev) => { ev.stopPropagation(); state.folded = state.folded.concat([path]); renderPanes(); });
      g.appendChild(t);
      root.appendChild(g);
    }
    for (const [, , d, faint] of layout.edges) root.appendChild(svgEl("path", { class: faint ? "edge faint" : "edge", d, "marker-end": "url(#arrow)" }));

    for (const [key, [cx, cy, w, h]] of Object.entries(layout.boxes)) {
      const isGroup = key.startsWith("g:");
      const name = key.slice(2);
      const classes = ["box", isGroup ? "group" : "node"];
      const g = svgEl("g", { "data-key": key });
      const rect = svgEl("rect", { x: cx - w / 2, y: cy - h / 2, width: w, height: h, rx: isGroup ? 4 : 3 });
      const text = svgEl("text", { x: cx, y: cy + 3.5, "text-anchor": "middle" });
      const title = svgEl("title", {});
      let fill = null;
      if (isGroup) {
        const group = snapshot.groups[name];
        const members = boxMembers(snapshot, name);
        g.setAttribute(group ? "data-group" : "data-child", name);
        text.textContent = group ? name : name.split(".").pop();
        const delta = groupDelta(snapshot, name, diff, side);
        if (delta.plus || delta.minus || delta.tilde) {
          classes.push("has-changes");
          const badge = svgEl("text", { class: "badge", x: cx + w / 2 + 4, y: cy + 3 });
          for (const [cls, txt] of [["plus", delta.plus && `+${delta.plus} `], ["minus", delta.minus && `−${delta.minus} `], ["tilde", delta.tilde && `~${delta.tilde}`]]) {
            if (!txt) continue;
            const span = svgEl("tspan", { class: cls });
            span.textContent = txt;
            badge.appendChild(span);
          }
          g.appendChild(badge);
        }
        title.textContent = `${name}${group ? ` (${group.class})` : ""}: ${members.length} nodes; click to expand`;
        if (overlay) fill = errorColor(groupError(snapshot, name));
        if (group) g.addEventListener("click", () => { expand(name); renderPanes(); scrollToCluster(name); });
        else g.addEventListener("click", () => { state.folded = state.folded.filter((c) => c !== name); renderPanes(); });
      } else {
        const node = byName.get(name);
        g.setAttribute("data-node", name);
        text.textContent = labelOf(node);
        if (node.op === "placeholder" || node.op === "output") classes.push("input");
        if (side === "after" && diff.added.has(name)) classes.push("added");
        if (side === "after" && diff.changed.has(name)) classes.push("changed");
        if (side === "before" && diff.removed.has(name)) classes.push("removed");
        if (state.selected && state.selected.name === name && state.selected.side === side) classes.push("selected");
        title.textContent = `%${name}: ${node.target} ${node.shape}`;
        if (overlay) fill = errorColor(errors[name]);
        g.addEventListener("click", () => select(name, side));
      }
      g.setAttribute("class", classes.join(" "));
      if (fill) rect.style.fill = fill;
      g.appendChild(title);
      g.appendChild(rect);
      g.appendChild(text);
      root.appendChild(g);
    }
    const defs = svgEl("defs");
    const marker = svgEl("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" });
    marker.appendChild(svgEl("path", { d: "M0,0L10,5L0,10z", fill: "#9aa3ad" }));
    defs.appendChild(marker);
    svg.appendChild(defs);
    canvas.appendChild(svg);
  }

  // Scroll a pane's canvas (not the page) so that `target` is in view: its top-left corner, or centred.
  function scrollWithin(side, target, centre) {
    const canvas = document.querySelector(`#pane-${side} .canvas`);
    const c = canvas.getBoundingClientRect(), b = target.getBoundingClientRect();
    const dy = centre ? (b.height - c.height) / 2 : -8, dx = centre ? (b.width - c.width) / 2 : -8;
    canvas.scrollTop += b.top - c.top + dy;
    canvas.scrollLeft += b.left - c.left + dx;
  }

  function scrollToCluster(path) {
    for (const side of ["before", "after"]) {
      const cluster = document.querySelector(`#pane-${side} [data-cluster="${CSS.escape(path)}"]`);
      if (cluster) scrollWithin(side, cluster, false);
    }
  }

  function labelOf(node) {
    if (node.op === "placeholder") return node.name;
    if (node.op === "output") return "output";
    return node.target.replace(/^lqc::/, "");
  }

  function renderPanes() {
    const { before, after, record } = stepPanes();
    const diff = diffSets(record);
    const g = graph();
    $("pane-before").querySelector("h3").innerHTML = before ? `before <span class="hint">(after ${state.step - 1 === 0 ? "capture" : g.passes[state.step - 2].name})</span>` : "";
    $("pane-after").querySelector("h3").innerHTML = record
      ? `after ${record.name} <span class="hint">— <span class="status-added">added</span>, <span class="status-changed">rewired</span>, <span class="status-removed">removed</span> (left)</span>`
      : "captured graph";
    renderPane("pane-before", before, "before", diff);
    renderPane("pane-after", after, "after", diff);
    $("collapse").disabled = state.expanded === null;
    $("overlay-note").textContent = state.overlay ? (g.error_inputs || "no per-node errors in this report") : "";
    renderPanel();
  }

  // ---- module tree ------------------------------------------------------------------------------
  function renderTree() {
    const { after, record } = stepPanes();
    const diff = diffSets(record);
    const tree = $("tree-list");
    tree.innerHTML = "";
    const byName = snapshotIndex(after);
    for (const [path, group] of Object.entries(after.groups)) {
      const details = el("details", { "data-group": path });
      const summary = el("summary", {}, `${path} `);
      summary.appendChild(el("span", { class: "muted" }, `${group.class} · ${group.members.length}`));
      const delta = groupDelta(after, path, diff, "after");
      if (delta.plus || delta.tilde) {
        const span = el("span", { class: "delta" });
        if (delta.plus) span.appendChild(el("span", { class: "plus" }, `+${delta.plus} `));
        if (delta.tilde) span.appendChild(el("span", { class: "tilde" }, `~${delta.tilde}`));
        summary.appendChild(span);
      }
      details.appendChild(summary);
      details.addEventListener("toggle", () => {
        if (!details.open || details.dataset.filled) return;
        details.dataset.filled = "1";
        const children = new Map();
        for (const m of group.members) {
          const child = byName.get(m).child || "";
          if (!children.has(child)) children.set(child, []);
          children.get(child).push(m);
        }
        for (const [child, names] of children) {
          const holder = child ? el("details", { "data-child": child }) : details;
          if (child) { holder.appendChild(el("summary", {}, `${child} · ${names.length}`)); details.appendChild(holder); }
          for (const n of names) {
            const leaf = el("div", { class: "leaf", "data-node": n }, `${labelOf(byName.get(n))}  %${n}`);
            leaf.addEventListener("click", () => navigate(n));
            holder.appendChild(leaf);
          }
        }
      });
      tree.appendChild(details);
    }
  }

  // ---- selection and node panel -----------------------------------------------------------------
  function select(name, side) {
    state.selected = { name, side };
    renderPanes();
  }

  function navigate(name, side) {
    const panes = stepPanes();
    side = side || (snapshotIndex(panes.after).has(name) ? "after" : "before");
    const snapshot = side === "after" ? panes.after : panes.before;
    if (!snapshot) return;
    let node = snapshotIndex(snapshot).get(name);
    if (!node) return;
    if (node.op === "get_attr") {  // constants are drawn with the op that reads them
      const users = snapshot._users.get(name) || [];
      if (users.length) { node = snapshotIndex(snapshot).get(users[0]); name = node.name; }
    }
    if (state.expanded !== node.group) expand(node.group);
    if (node.child) state.folded = state.folded.filter((c) => c !== `${node.group}.${node.child}`);
    state.selected = { name, side };
    renderPanes();
    const box = document.querySelector(`#pane-${side} [data-node="${CSS.escape(name)}"]`);
    if (box) {
      box.classList.add("flash");
      scrollWithin(side, box, true);
    }
  }

  function renderPanel() {
    const panel = $("panel-body");
    panel.innerHTML = "";
    if (!state.selected) { panel.appendChild(el("p", { class: "muted" }, "Click a node to see it here; click a block to expand it.")); return; }
    const panes = stepPanes();
    const snapshot = state.selected.side === "after" ? panes.after : panes.before;
    if (!snapshot) return;
    const node = snapshotIndex(snapshot).get(state.selected.name);
    if (!node) return;
    const diff = diffSets(panes.record);
    const g = graph();
    const table = el("table");
    const row = (label, content) => {
      const tr = el("tr");
      tr.appendChild(el("td", {}, label));
      const td = el("td");
      if (content instanceof Node) td.appendChild(content); else td.textContent = content;
      tr.appendChild(td);
      table.appendChild(tr);
    };
    const links = (names, side) => {
      const span = el("span");
      names.forEach((n, i) => {
        const a = el("span", { class: "link" }, `%${n}`);
        a.addEventListener("click", () => navigate(n, side));
        span.appendChild(a);
        if (i < names.length - 1) span.appendChild(document.createTextNode(", "));
      });
      if (!names.length) span.textContent = "—";
      return span;
    };
    row("node", `%${node.name}`);
    let status = "";
    if (state.selected.side === "after" && diff.added.has(node.name)) status = "added by this pass";
    if (state.selected.side === "after" && diff.changed.has(node.name)) status = "inputs rewired by this pass";
    if (state.selected.side === "before" && diff.removed.has(node.name)) status = "removed by this pass";
    if (status) row("this pass", el("span", { class: "status-" + status.split(" ")[0].replace("inputs", "changed") }, status));
    row("op", node.op);
    row("target", node.target);
    const [dtype, ...dims] = node.shape.split("[");
    row("shape", node.shape.includes("[") ? `[${dims.join("[")}` : node.shape);
    row("dtype", node.shape.includes("[") ? dtype : "—");
    row("call", el("code", {}, node.call));
    row("module", node.module || "—");
    if (node.region) row("region", node.region);
    row("param bytes", node.bytes ? `${node.bytes.toLocaleString()} (${fmtBytes(node.bytes)})` : "0");
    if (node.constants.length) {
      const list = el("div");
      for (const [attr, shape, bytes] of node.constants) list.appendChild(el("div", {}, `${attr}  ${shape}  ${fmtBytes(bytes)}`));
      row("constants", list);
    }
    if (node.provenance) {
      const span = el("span", {}, `${node.provenance.pass}, from `);
      span.appendChild(links(node.provenance.from, state.selected.side === "after" && panes.before ? "before" : state.selected.side));
      row("created by", span);
    } else row("created by", "capture");
    row("inputs", links(node.inputs.filter((n) => snapshotIndex(snapshot).get(n).op !== "get_attr"), state.selected.side));
    row("users", links(snapshot._users.get(node.name) || [], state.selected.side));
    if (isFinal(snapshot)) {
      const kernel = g.kernels[node.name];
      if (kernel) {
        const div = el("div", {}, `fusion group ${kernel.group} (${kernel.kind} on %${kernel.anchor}), role ${kernel.role}, ${kernel.members.length} nodes; template: ${kernel.template}`);
        if (kernel.source) {
          const details = el("details", { class: "kernel-source" });
          details.appendChild(el("summary", {}, `generated kernel ${kernel.source}${kernel.in_kernel ? "" : " (this node runs after it)"}`));
          details.appendChild(el("pre", {}, g.kernel_sources[kernel.source]));
          div.appendChild(details);
        }
        row("kernel", div);
      } else if (!["placeholder", "get_attr", "output"].includes(node.op)) row("kernel", "none: Inductor compiles this node");
      const err = g.errors[node.name];
      if (err) row("error", `${err.sqnr_db === null ? "exact" : err.sqnr_db.toFixed(1) + " dB SQNR"}, cosine ${err.cosine.toFixed(6)}, rel ${err.rel_error.toExponential(2)} vs reference %${err.reference}`);
    }
    panel.appendChild(table);
  }

  // ---- search -----------------------------------------------------------------------------------
  function initSearch() {
    const input = $("search");
    const results = $("search-results");
    input.addEventListener("input", () => {
      const q = input.value.trim().toLowerCase();
      results.innerHTML = "";
      if (!q) { results.classList.remove("open"); return; }
      const { before, after } = stepPanes();
      const hits = [];
      const seen = new Set();
      for (const [snapshot, side] of [[after, "after"], [before, "before"]]) {
        if (!snapshot) continue;
        for (const n of snapshot.nodes) {
          if (seen.has(n.name)) continue;
          if (n.name.toLowerCase().includes(q) || n.target.toLowerCase().includes(q) || n.module.toLowerCase().includes(q)) {
            seen.add(n.name);
            hits.push([n, side]);
            if (hits.length >= 60) break;
          }
        }
      }
      if (!hits.length) results.appendChild(el("div", { class: "none" }, "no node matches"));
      for (const [n, side] of hits) {
        const item = el("div", { class: "hit", "data-node": n.name }, `%${n.name} · ${n.target} · ${n.module || "—"}${side === "before" ? " (before)" : ""}`);
        item.addEventListener("click", () => { results.classList.remove("open"); navigate(n.name, side); });
        results.appendChild(item);
      }
      results.classList.add("open");
    });
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") { const first = results.querySelector(".hit"); if (first) first.click(); }
      if (e.key === "Escape") results.classList.remove("open");
    });
  }

  // ---- roll-up ----------------------------------------------------------------------------------
  function renderRollup() {
    const table = $("rollup");
    table.innerHTML = "<tr><th>module</th><th>param bytes, captured</th><th>after the last pass</th><th>ratio</th></tr>";
    for (const [path, before, after] of graph().rollup) {
      const depth = path === "(all)" ? 0 : path.split(".").length;
      const tr = el("tr", { class: `depth-${Math.min(depth, 4)}` });
      tr.appendChild(el("td", {}, path));
      tr.appendChild(el("td", {}, before.toLocaleString()));
      tr.appendChild(el("td", {}, after.toLocaleString()));
      tr.appendChild(el("td", {}, before ? (after / before).toFixed(3) + "x" : "—"));
      table.appendChild(tr);
    }
  }

  function renderAll() {
    const g = graph();
    if (state.step < 0 || state.step > g.passes.length) state.step = g.annotated_step;  // opens on the compressed graph
    renderTimeline();
    renderTree();
    renderPanes();
    renderRollup();
    $("fallback").textContent = g.fallback ? `This graph fell back to Inductor: ${g.fallback}` : "";
  }

  initHeader();
  renderAll();
  document.body.setAttribute("data-ready", "1");
})();
