/* moe-validate report page: lays out the view model embedded as JSON (computed in Python).
 * Plain DOM, no libraries, no network. Every string from the data goes through textContent or
 * setAttribute, never innerHTML, so case ids and tracebacks cannot inject markup. */
(function () {
  "use strict";
  var t0 = performance.now();
  var SVG_NS = "http://www.w3.org/2000/svg"; // an XML namespace name, not a fetched address
  var PAGE_SIZE = 100;
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var T = D.table, N = T.ids.length, OUT = D.outcomes;
  var BAD = {}; D.bad_outcomes.forEach(function (o) { BAD[OUT.indexOf(o)] = true; });
  var SEVERITY = D.severity;  // outcome -> rank, from report/model.py
  var AXES = D.axes, AXIS_BY_NAME = {};
  AXES.forEach(function (a) { AXIS_BY_NAME[a.name] = a; });
  var TABLE_AXES = AXES.slice(0, 4).map(function (a) { return a.name; });
  var HAS_DIFF = T.diff.some(function (d) { return d >= 0; });
  var idsLower = null;
  var idIndex = null;

  // ---------------------------------------------------------------- helpers
  function num(v) {
    if (v === "NaN") return NaN;
    if (v === "Infinity") return Infinity;
    if (v === "-Infinity") return -Infinity;
    return v;
  }
  function fmt(v, digits) {
    v = num(v);
    if (v === null || v === undefined) return "-";
    if (typeof v !== "number") return String(v);
    if (isNaN(v)) return "NaN";
    if (!isFinite(v)) return v > 0 ? "inf" : "-inf";
    if (v === 0) return "0";
    var d = digits || 4, a = Math.abs(v);
    if (Number.isInteger(v) && a < 1e9) return String(v);
    if (a >= 1e-3 && a < 1e6) return String(+v.toPrecision(d));
    return v.toExponential(d - 1);
  }
  function full(v) { v = num(v); return (typeof v === "number") ? String(v) : fmt(v); }
  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (k === "text") e.textContent = attrs[k]; else if (k === "cls") e.className = attrs[k]; else e.setAttribute(k, attrs[k]);
    }
    (kids || []).forEach(function (c) { if (c !== null && c !== undefined) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG_NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function marginKey(v) { v = num(v); if (v === null || v === undefined) return -Infinity; if (isNaN(v)) return Infinity; return v; }
  function reproOf(i) {
    var ex = T.repro.exceptions[String(i)];
    if (ex !== undefined) return ex;
    return T.repro.template === null ? null : T.repro.template.split("{case_id}").join(T.ids[i]);
  }
  function paramLabel(i, axis) { var v = T.params[axis][i]; return v < 0 ? null : AXIS_BY_NAME[axis].values[v]; }

  // ---------------------------------------------------------------- state
  var state = { text: "", outcomes: {}, axes: {}, diff: -1, sortKey: "severity", sortDir: -1, page: 0, open: {} };
  var filtered = [];

  function applyFilters() {
    var text = state.text.toLowerCase(), anyOutcome = Object.keys(state.outcomes).length === 0;
    if (text && !idsLower) idsLower = T.ids.map(function (s) { return s.toLowerCase(); });
    var axisNames = Object.keys(state.axes);
    var out = [];
    for (var i = 0; i < N; i++) {
      if (!anyOutcome && !state.outcomes[T.outcome[i]]) continue;
      if (state.diff >= 0 && T.diff[i] !== state.diff) continue;
      var ok = true;
      for (var a = 0; a < axisNames.length; a++) if (T.params[axisNames[a]][i] !== state.axes[axisNames[a]]) { ok = false; break; }
      if (!ok) continue;
      if (text && idsLower[i].indexOf(text) < 0) continue;
      out.push(i);
    }
    var key = state.sortKey, dir = state.sortDir, cmp;
    if (key === "id") cmp = function (a, b) { return (a - b) * dir; };
    else if (key === "severity") cmp = function (a, b) {
      var d = SEVERITY[OUT[T.outcome[a]]] - SEVERITY[OUT[T.outcome[b]]];
      if (d === 0) d = marginKey(T.margin[a]) - marginKey(T.margin[b]);
      if (d === 0 || isNaN(d)) return a - b;
      return d * dir;
    };
    else if (key === "outcome") cmp = function (a, b) { return (OUT[T.outcome[a]] < OUT[T.outcome[b]] ? -1 : OUT[T.outcome[a]] > OUT[T.outcome[b]] ? 1 : a - b) * dir; };
    else if (key === "margin" || key === "duration") cmp = function (a, b) {
      var col = key === "margin" ? T.margin : T.duration;
      var x = marginKey(col[a]), y = marginKey(col[b]);
      if (x === y) return a - b;
      return (x < y ? -1 : 1) * dir;
    };
    else if (key === "reason") cmp = function (a, b) {
      var x = T.reason[a] < 0 ? "" : T.reasons[T.reason[a]], y = T.reason[b] < 0 ? "" : T.reasons[T.reason[b]];
      return (x < y ? -1 : x > y ? 1 : a - b) * dir;
    };
    else cmp = function (a, b) { return ((T.params[key][a] - T.params[key][b]) || (a - b)) * dir; };
    out.sort(cmp);
    filtered = out;
  }

  // ---------------------------------------------------------------- case table
  var COLUMNS = [{ key: "id", label: "case" }, { key: "severity", label: "outcome" }, { key: "margin", label: "worst margin" },
                 { key: "duration", label: "s" }].concat(TABLE_AXES.map(function (a) { return { key: a, label: a }; }));
  if (HAS_DIFF) COLUMNS.push({ key: "diff", label: "vs baseline" });
  COLUMNS.push({ key: "reason", label: "reason" });

  function renderHead() {
    var head = document.getElementById("case-head");
    head.textContent = "";
    COLUMNS.forEach(function (c) {
      var th = el("th", { text: c.label, "data-key": c.key });
      if (c.key === state.sortKey) th.className = state.sortDir > 0 ? "sorted-asc" : "sorted-desc";
      if (c.key !== "diff") th.addEventListener("click", function () {
        if (state.sortKey === c.key) state.sortDir = -state.sortDir;
        else { state.sortKey = c.key; state.sortDir = (c.key === "margin" || c.key === "severity" || c.key === "duration") ? -1 : 1; }
        state.page = 0; update();
      });
      head.appendChild(th);
    });
  }

  function renderBody() {
    var body = document.getElementById("case-body");
    var pages = Math.max(1, Math.ceil(filtered.length / PAGE_SIZE));
    if (state.page >= pages) state.page = pages - 1;
    var start = state.page * PAGE_SIZE, frag = document.createDocumentFragment();
    filtered.slice(start, start + PAGE_SIZE).forEach(function (i) {
      var o = OUT[T.outcome[i]];
      var link = el("a", { href: "#case=" + encodeURIComponent(T.ids[i]), cls: "case-link", text: T.ids[i] });
      var cells = [el("td", {}, [link]), el("td", { cls: "outcome-" + o, text: o }),
                   el("td", { cls: "num", text: fmt(T.margin[i], 3) }), el("td", { cls: "num", text: fmt(T.duration[i], 3) })];
      TABLE_AXES.forEach(function (a) { cells.push(el("td", { text: paramLabel(i, a) === null ? "" : paramLabel(i, a) })); });
      if (HAS_DIFF) cells.push(el("td", { text: T.diff[i] < 0 ? "" : T.diff_labels[T.diff[i]] }));
      var reason = T.reason[i] < 0 ? "" : T.reasons[T.reason[i]];
      cells.push(el("td", { cls: "reason", text: reason, title: reason }));
      var tr = el("tr", { "data-case": T.ids[i], "data-index": String(i), cls: "case-row" }, cells);
      frag.appendChild(tr);
      if (state.open[i]) frag.appendChild(detailRow(i));
    });
    body.textContent = "";
    body.appendChild(frag);
    var count = document.getElementById("case-count");
    count.textContent = filtered.length + " of " + N + " cases";
    count.setAttribute("data-shown", String(filtered.length));
    renderPager(pages);
  }

  function renderPager(pages) {
    var pager = document.getElementById("pager");
    pager.textContent = "";
    if (pages <= 1) return;
    var prev = el("button", { type: "button", text: "< prev", id: "page-prev" }), next = el("button", { type: "button", text: "next >", id: "page-next" });
    prev.disabled = state.page === 0; next.disabled = state.page >= pages - 1;
    prev.addEventListener("click", function () { state.page--; renderBody(); });
    next.addEventListener("click", function () { state.page++; renderBody(); });
    pager.appendChild(prev);
    pager.appendChild(el("span", { text: " page " + (state.page + 1) + " of " + pages + " " }));
    pager.appendChild(next);
  }

  var updates = 0, lastUpdateMs = 0;
  function update() {
    var t = performance.now();
    applyFilters(); renderHead(); renderBody(); syncFilterControls();
    updates++; lastUpdateMs = performance.now() - t;
  }

  // ---------------------------------------------------------------- filters
  function buildFilters() {
    var text = document.getElementById("filter-text");
    var timer = null;
    text.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { state.text = text.value.trim(); state.page = 0; update(); }, 60);
    });
    var outs = document.getElementById("filter-outcomes");
    OUT.forEach(function (o, k) {
      var n = 0; for (var i = 0; i < N; i++) if (T.outcome[i] === k) n++;
      if (!n) return;
      var box = el("input", { type: "checkbox", "data-outcome": o, id: "filter-outcome-" + o });
      box.addEventListener("change", function () { if (box.checked) state.outcomes[k] = true; else delete state.outcomes[k]; state.page = 0; update(); });
      outs.appendChild(el("label", { cls: "outcome-" + o }, [box, o + " (" + n + ")"]));
    });
    var axesBox = document.getElementById("filter-axes");
    AXES.forEach(function (a) {
      if (!a.filterable || a.values.length < 2) return;
      var sel = el("select", { "data-axis": a.name, id: "filter-axis-" + a.name }, [el("option", { value: "", text: a.name + ": any" })]);
      a.values.forEach(function (v, k) { sel.appendChild(el("option", { value: String(k), text: a.name + " = " + v })); });
      sel.addEventListener("change", function () { if (sel.value === "") delete state.axes[a.name]; else state.axes[a.name] = +sel.value; state.page = 0; update(); });
      axesBox.appendChild(sel);
    });
    if (HAS_DIFF) {
      var dsel = el("select", { id: "filter-diff" }, [el("option", { value: "-1", text: "vs baseline: any" })]);
      T.diff_labels.forEach(function (l, k) { dsel.appendChild(el("option", { value: String(k), text: l })); });
      dsel.addEventListener("change", function () { state.diff = +dsel.value; state.page = 0; update(); });
      axesBox.appendChild(dsel);
    }
    document.getElementById("filter-clear").addEventListener("click", function () { clearFilters(); update(); });
  }
  function clearFilters() { state.text = ""; state.outcomes = {}; state.axes = {}; state.diff = -1; state.page = 0; }
  function syncFilterControls() {
    var text = document.getElementById("filter-text");
    if (text.value.trim() !== state.text) text.value = state.text;
    OUT.forEach(function (o, k) { var b = document.getElementById("filter-outcome-" + o); if (b) b.checked = !!state.outcomes[k]; });
    AXES.forEach(function (a) { var s = document.getElementById("filter-axis-" + a.name); if (s) s.value = a.name in state.axes ? String(state.axes[a.name]) : ""; });
    var d = document.getElementById("filter-diff"); if (d) d.value = String(state.diff);
  }

  // ---------------------------------------------------------------- pivot
  function buildPivot() {
    var rows = document.getElementById("pivot-rows"), cols = document.getElementById("pivot-cols");
    D.pivot.axes.forEach(function (a) { rows.appendChild(el("option", { value: a, text: a })); cols.appendChild(el("option", { value: a, text: a })); });
    if (D.pivot.axes.length < 2) { document.getElementById("pivot-table").textContent = "fewer than two axes with few enough values to pivot"; return; }
    rows.value = D.pivot.default[0]; cols.value = D.pivot.default[1];
    function onChange() {
      if (rows.value === cols.value) { // keep two different axes: move the other select on
        var other = D.pivot.axes.filter(function (a) { return a !== rows.value; })[0];
        if (this === rows) cols.value = other; else rows.value = other === cols.value ? D.pivot.axes.filter(function (a) { return a !== cols.value; })[0] : other;
      }
      renderPivot(rows.value, cols.value);
    }
    rows.addEventListener("change", onChange); cols.addEventListener("change", onChange);
    renderPivot(rows.value, cols.value);
  }

  function renderPivot(ra, ca) {
    var cells = D.pivot.cells[ra + "|" + ca], transposed = false;
    if (!cells) { cells = D.pivot.cells[ca + "|" + ra]; transposed = true; }
    var rv = AXIS_BY_NAME[ra].values, cv = AXIS_BY_NAME[ca].values;
    var grid = {}, usedR = {}, usedC = {};
    cells.forEach(function (c) {
      var r = transposed ? c[1] : c[0], k = transposed ? c[0] : c[1];
      grid[r + "," + k] = c; usedR[r] = true; usedC[k] = true;
    });
    var rIdx = rv.map(function (_, i) { return i; }).filter(function (i) { return usedR[i]; });
    var cIdx = cv.map(function (_, i) { return i; }).filter(function (i) { return usedC[i]; });
    var table = el("table", { id: "pivot-grid", "data-rows": ra, "data-cols": ca });
    var head = el("tr", {}, [el("th", { text: ra + " \\ " + ca })]);
    cIdx.forEach(function (k) { head.appendChild(el("th", { text: cv[k] })); });
    table.appendChild(head);
    rIdx.forEach(function (r) {
      var tr = el("tr", {}, [el("th", { text: rv[r] })]);
      cIdx.forEach(function (k) {
        var c = grid[r + "," + k];
        if (!c) { tr.appendChild(el("td", { cls: "cell-empty" })); return; }
        var counts = c.slice(2, 2 + OUT.length), total = 0, bad = 0, status = null;
        counts.forEach(function (n, o) {
          total += n; if (BAD[o]) bad += n;
          if (n && (status === null || SEVERITY[OUT[o]] > SEVERITY[status])) status = OUT[o];
        });
        var worst = c[2 + OUT.length];
        var href = "#cases?" + encodeURIComponent(ra) + "=" + encodeURIComponent(rv[r]) + "&" + encodeURIComponent(ca) + "=" + encodeURIComponent(cv[k]);
        var a = el("a", { href: href, cls: "pivot-link", "data-total": String(total), "data-bad": String(bad), title: counts.map(function (n, o) { return n ? OUT[o] + " " + n : null; }).filter(Boolean).join(", ") },
                   [bad + " / " + total, el("br"), el("small", { text: "m " + fmt(worst, 3) })]);
        tr.appendChild(el("td", { cls: "cell-" + status, "data-status": status }, [a]));
      });
      table.appendChild(tr);
    });
    var box = document.getElementById("pivot-table");
    box.textContent = "";
    box.appendChild(table);
  }

  // ---------------------------------------------------------------- details
  function kvTable(rows, cls) {
    return el("table", { cls: "small " + (cls || "") }, rows.map(function (r) { return el("tr", {}, [el("th", { text: r[0] }), el("td", { text: r[1] })]); }));
  }
  function paramList(pairs) { // compact: one wrapped line of "name value" chips
    return el("div", { cls: "params" }, pairs.map(function (kv) { return el("span", { cls: "param" }, [el("b", { text: kv[0] }), " " + kv[1]]); }));
  }
  function copyButton(text) {
    var b = el("button", { type: "button", cls: "copy", text: "copy" });
    b.addEventListener("click", function () {
      function done() { b.textContent = "copied"; setTimeout(function () { b.textContent = "copy"; }, 1200); }
      function fallback() {
        var ta = el("textarea", { cls: "offscreen" }); ta.value = text;  // a class: the CSP allows no inline style
        document.body.appendChild(ta); ta.select();
        try { document.execCommand("copy"); done(); } catch (e) { b.textContent = "select and copy by hand"; }
        document.body.removeChild(ta);
      }
      if (navigator.clipboard && navigator.clipboard.writeText) navigator.clipboard.writeText(text).then(done, fallback); else fallback();
    });
    return b;
  }
  function reproBlock(i) {
    var r = reproOf(i);
    if (!r) return el("p", { cls: "muted", text: "no repro command recorded" });
    return el("div", { cls: "repro" }, [el("strong", { text: "repro " }), el("code", { text: r }), " ", copyButton(r)]);
  }
  function colour(t) { // 0 -> pale yellow, 0.5 -> orange, 1 -> dark red
    var stops = [[255, 247, 188], [254, 153, 41], [153, 0, 13]];
    t = Math.max(0, Math.min(1, t));
    var s = t < 0.5 ? 0 : 1, u = t < 0.5 ? t * 2 : (t - 0.5) * 2, a = stops[s], b = stops[s + 1];
    return "rgb(" + [0, 1, 2].map(function (j) { return Math.round(a[j] + (b[j] - a[j]) * u); }).join(",") + ")";
  }
  function heatmapFigure(h) {
    var rows = h.rows, cols = h.cols, vmax = num(h.max);
    var cw = Math.max(4, Math.min(32, Math.floor(560 / Math.max(cols, 1)))), ch = Math.max(4, Math.min(32, Math.floor(360 / Math.max(rows, 1))));
    var W = cols * cw + 40, H = rows * ch + 24;
    var s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": "heatmap", "data-rows": rows, "data-cols": cols });
    var nonFinite = 0; // h.max/h.min cover the finite cells only: say how many cells they leave out
    h.values.forEach(function (row, r) {
      row.forEach(function (v, c) {
        var x = num(v), bad = typeof x === "number" && (isNaN(x) || !isFinite(x));
        if (bad) nonFinite++;
        var fill = (typeof x !== "number" || bad) ? "#ff00ff" : colour(vmax > 0 ? x / vmax : 0);
        var rect = svg("rect", { x: 36 + c * cw, y: r * ch, width: cw, height: ch, fill: fill });
        var title = svg("title", {}); title.textContent = "token tile " + r + ", column tile " + c + ": " + fmt(v);
        rect.appendChild(title); s.appendChild(rect);
      });
    });
    var lab = svg("text", { x: 0, y: H - 6, "font-size": 10 }); lab.textContent = "tok\\col"; s.appendChild(lab);
    return el("figure", {}, [s, el("figcaption", { text: (h.metric ? h.metric + " " : "error ") + "by (token tile of " + fmt(h.row_tile) + " rows) x (column tile of " + fmt(h.col_tile) +
      " columns); " + (nonFinite ? "finite cells: " : "") + "max " + fmt(h.max) + ", min " + fmt(h.min) +
      (nonFinite ? "; " + nonFinite + " NaN/Inf cell" + (nonFinite > 1 ? "s" : "") + " in magenta" : "; magenta = NaN/Inf") +
      (h.pooled[0] > 1 || h.pooled[1] > 1 ? "; max-pooled " + h.pooled[0] + "x" + h.pooled[1] + " from " + h.source_shape[0] + "x" + h.source_shape[1] + " tiles" : "") })]);
  }
  function barsFigure(values, labels, caption, cls, titles) {
    var n = values.length, nums = values.map(function (v) { return num(v); });
    var vmax = Math.max.apply(null, nums.filter(function (v) { return typeof v === "number" && isFinite(v); }).concat([0]));
    var bw = Math.max(3, Math.min(20, Math.floor(420 / Math.max(n, 1)))), H = 120, W = n * bw + 10;
    var s = svg("svg", { width: W, height: H + 16, viewBox: "0 0 " + W + " " + (H + 16), "class": cls });
    nums.forEach(function (v, i) {
      var bad = typeof v !== "number" || !isFinite(v), h = bad ? H : (vmax > 0 ? Math.max(0, v / vmax) * H : 0);
      var rect = svg("rect", { x: 5 + i * bw, y: H - h, width: Math.max(1, bw - 1), height: h, fill: bad ? "#ff00ff" : "#0969da" });
      var t = svg("title", {}); t.textContent = titles ? titles[i] : (labels[i] + ": " + fmt(values[i])); rect.appendChild(t);
      s.appendChild(rect);
    });
    var l0 = svg("text", { x: 2, y: H + 12, "font-size": 10 }); l0.textContent = labels[0] === undefined ? "" : labels[0]; s.appendChild(l0);
    var l1 = svg("text", { x: W - 2, y: H + 12, "font-size": 10, "text-anchor": "end" }); l1.textContent = labels[n - 1] === undefined ? "" : labels[n - 1]; s.appendChild(l1);
    return el("figure", {}, [s, el("figcaption", { text: caption })]);
  }
  function panelTable(name, p) {
    var rows = [el("tr", {}, ["metric", "value", "allowed", "margin"].map(function (h) { return el("th", { text: h }); }))];
    p.metrics.forEach(function (m) {
      rows.push(el("tr", { cls: m.exceeds ? "exceeds" : "" }, [el("td", { text: m.name }), el("td", { cls: "num", text: fmt(m.value, 5) }),
        el("td", { cls: "num", text: fmt(m.allowed, 5) }), el("td", { cls: "num", text: fmt(m.margin, 3) })]));
    });
    var extra = [];
    if (p.exceed_count !== undefined && p.exceed_count !== null) extra.push("exceeding: " + p.exceed_count + " (" + fmt(p.exceed_fraction, 3) + ")");
    Object.keys(p.extra || {}).forEach(function (k) { extra.push(k + ": " + fmt(p.extra[k])); });
    if (p.nan_inf) extra.push("NaN/Inf: " + Object.keys(p.nan_inf).map(function (k) { return k + " " + p.nan_inf[k]; }).join(", "));
    return el("div", { cls: "panel", "data-panel": name }, [el("h4", { text: name + " panel" }), el("table", { cls: "small" }, rows), el("div", { cls: "muted", text: extra.join("; ") })]);
  }
  function worstTable(name, p) {
    if (!p.worst || !p.worst.length) return null;
    var head = el("tr", {}, p.worst_columns.map(function (c) { return el("th", { text: c }); }));
    var rows = p.worst.map(function (w) { return el("tr", {}, w.map(function (v) { return el("td", { cls: "num", text: full(v) }); })); });
    return el("div", { cls: "worst", "data-panel": name }, [el("h4", { text: "worst elements (" + name + ")" }), el("table", { cls: "small worst-elements" }, [head].concat(rows))]);
  }
  function boundBlock(name, b) {
    var rows = [["atol", fmt(b.atol, 6)], ["rtol", fmt(b.rtol, 6)]];
    Object.keys(b.terms).forEach(function (k) { rows.push([k, fmt(b.terms[k], 6)]); });
    return el("div", { cls: "bound", "data-bound": name }, [el("h4", { text: "tolerance: " + name }), kvTable(rows),
      el("ol", { cls: "derivation" }, b.derivation.map(function (line) { return el("li", { text: line }); }))]);
  }

  function detailRow(i) {
    var o = OUT[T.outcome[i]], det = D.details[String(i)], parts = [];
    var reason = T.reason[i] < 0 ? null : T.reasons[T.reason[i]];
    parts.push(el("div", {}, [el("strong", { cls: "outcome-" + o, text: o }), " worst margin " + fmt(T.margin[i]) + "  ",
      reason ? el("span", { cls: "reason-text", text: reason }) : null]));
    if (det && det.omitted) {
      parts.push(el("p", { cls: "muted details-omitted", text: det.omitted }));
      det = null;
    }
    if (det) {
      parts.push(el("h4", { text: "parameters" }));
      var pr = det.params.slice(); if (det.backend) pr.push(["backend", det.backend]);
      if (det.config) pr.push(["config", JSON.stringify(det.config)]);
      parts.push(paramList(pr));
      if (det.compared_rows) parts.push(el("div", { cls: "compared-rows", text: det.compared_rows }));
      if (det.checks && det.checks.length) {
        parts.push(el("h4", { text: "checks after the comparison" }));
        parts.push(el("table", { cls: "small checks" }, det.checks.map(function (c) {
          return el("tr", { "data-check": c[0] }, [el("th", { text: c[0] }), el("td", { cls: "outcome-" + c[1], text: c[1] }), el("td", { text: c[2] })]);
        })));
      }
      var bounds = Object.keys(det.tolerance);
      if (bounds.length) parts.push(el("div", { cls: "panels" }, bounds.map(function (k) { return boundBlock(k, det.tolerance[k]); })));
      var panels = Object.keys(det.panels);
      if (panels.length) parts.push(el("div", { cls: "panels" }, panels.map(function (k) { return panelTable(k, det.panels[k]); })));
      var charts = [];
      if (det.heatmap) charts.push(heatmapFigure(det.heatmap));
      if (det.per_expert) charts.push(barsFigure(det.per_expert, det.per_expert.map(function (_, e) { return "e" + e; }), "error per expert (e0 .. e" + (det.per_expert.length - 1) + ")", "per-expert"));
      Object.keys(det.histograms).forEach(function (name) {
        var h = det.histograms[name], labels = h.counts.map(function (_, k) { return fmt(h.edges[k], 3); });
        labels[labels.length - 1] = fmt(h.edges[h.edges.length - 1], 3);
        var titles = h.counts.map(function (c, k) { return "[" + fmt(h.edges[k]) + ", " + fmt(h.edges[k + 1]) + "): " + c; });
        var total = h.counts.reduce(function (a, b) { return a + b; }, 0);
        var caption = "histogram: " + name + " (" + total + " elements in bins" +
          h.extra.map(function (x) { return "; " + x[0] + ": " + x[1]; }).join("") + ")" +
          h.notes.map(function (x) { return "; " + x; }).join("");
        charts.push(barsFigure(h.counts, labels, caption, "histogram", titles));
      });
      if (charts.length) parts.push(el("div", { cls: "charts" }, charts));
      panels.forEach(function (k) { var w = worstTable(k, det.panels[k]); if (w) parts.push(w); });
      if (det.error) { parts.push(el("h4", { text: "error" })); parts.push(el("pre", { cls: "traceback", text: det.error })); }
    } else {
      var pr2 = [];
      AXES.forEach(function (a) { var v = paramLabel(i, a.name); if (v !== null) pr2.push([a.name, v]); });
      parts.push(paramList(pr2));
      var mrow = T.margins.values[i];
      if (mrow) parts.push(el("div", { cls: "margins-compact" }, T.margins.keys.map(function (k, j) {
        return mrow[j] === null ? null : el("span", { text: k + " " + fmt(mrow[j], 3) });
      })));
    }
    parts.push(reproBlock(i));
    return el("tr", { cls: "detail-row", "data-detail-for": T.ids[i] }, [el("td", { colspan: String(COLUMNS.length) }, [el("div", { cls: "detail" }, parts)])]);
  }

  function toggleCase(i) { if (state.open[i]) delete state.open[i]; else state.open[i] = true; renderBody(); }

  function openCase(id) {
    if (!idIndex) { idIndex = {}; T.ids.forEach(function (s, k) { idIndex[s] = k; }); }
    var i = idIndex[id];
    if (i === undefined) return;
    var pos = filtered.indexOf(i);
    if (pos < 0) { clearFilters(); state.text = id; applyFilters(); pos = filtered.indexOf(i); }
    state.page = Math.floor(pos / PAGE_SIZE);
    state.open[i] = true;
    update();
    var row = document.querySelector('tr.detail-row[data-detail-for="' + CSS.escape(id) + '"]');
    if (row) row.scrollIntoView({ block: "start" });
  }

  // ---------------------------------------------------------------- routing (#case=ID, #cases?axis=value&outcome=X)
  function route(hash) {
    if (hash.indexOf("#case=") === 0) { openCase(decodeURIComponent(hash.slice(6))); return true; }
    if (hash.indexOf("#cases?") === 0) {
      clearFilters();
      hash.slice(7).split("&").forEach(function (kv) {
        var p = kv.split("="), k = decodeURIComponent(p[0]), v = decodeURIComponent(p[1] || "");
        if (k === "outcome") { var o = OUT.indexOf(v); if (o >= 0) state.outcomes[o] = true; }
        else if (k === "q") state.text = v;
        else if (AXIS_BY_NAME[k]) { var vi = AXIS_BY_NAME[k].values.indexOf(v); if (vi >= 0) state.axes[k] = vi; }
      });
      update();
      document.getElementById("cases").scrollIntoView({ block: "start" });
      return true;
    }
    return false;
  }
  document.addEventListener("click", function (ev) {
    var a = ev.target.closest ? ev.target.closest("a") : null;
    if (!a) return;
    var href = a.getAttribute("href") || "";
    if (a.classList.contains("case-link") && a.closest("#case-body")) {
      ev.preventDefault();
      toggleCase(+a.closest("tr").getAttribute("data-index"));
      return;
    }
    if (href.indexOf("#case=") === 0 || href.indexOf("#cases?") === 0) {
      ev.preventDefault();
      history.pushState(null, "", href);
      route(href);
    }
  });
  window.addEventListener("hashchange", function () { route(location.hash); });

  // ---------------------------------------------------------------- start
  buildFilters();
  buildPivot();
  update();
  if (location.hash) route(location.hash);
  // Read by the browser tests: load and filter timings measured inside the page.
  window.__moeReport = { initMs: performance.now() - t0, cases: N,
                         shown: function () { return filtered.length; },
                         updates: function () { return updates; }, lastUpdateMs: function () { return lastUpdateMs; } };
  document.body.setAttribute("data-ready", "1");
})();
