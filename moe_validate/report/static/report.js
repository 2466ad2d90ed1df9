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
  var HAS_VERDICTS = T.verdicts.some(function (v) { return !!v; });
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
  if (HAS_VERDICTS) COLUMNS.push({ key: "verdicts", label: "accuracy / conformance" });
  COLUMNS.push({ key: "reason", label: "diagnosis / reason" });
  function verdictCodes(i) {
    var v = T.verdicts[i];
    if (!v) return [];
    return v.map(function (code, k) { var o = T.verdict_codes[code]; return el("span", { cls: "vbadge vbadge-" + o, "data-verdict": k ? "conformance" : "accuracy", text: (k ? "conf " : "acc ") + o }); });
  }

  function renderHead() {
    var head = document.getElementById("case-head");
    head.textContent = "";
    COLUMNS.forEach(function (c) {
      var th = el("th", { text: c.label, "data-key": c.key });
      if (c.key === state.sortKey) th.className = state.sortDir > 0 ? "sorted-asc" : "sorted-desc";
      if (c.key !== "diff" && c.key !== "verdicts") th.addEventListener("click", function () {
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
      if (HAS_VERDICTS) cells.push(el("td", { cls: "verdict-cell" }, verdictCodes(i)));
      var short = T.diagnosis[i] < 0 ? null : T.diagnoses[T.diagnosis[i]];
      cells.push(el("td", { cls: "reason", title: reason }, short ? [el("b", { cls: "diagnosis-short", text: short }), " " + reason] : [reason]));
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
  function svgText(parent, x, y, text, attrs) {
    var t = svg("text", Object.assign({ x: x, y: y, "font-size": 10, fill: "#444" }, attrs || {}));
    t.textContent = text; parent.appendChild(t); return t;
  }
  function svgLine(parent, x1, y1, x2, y2, attrs) {
    parent.appendChild(svg("line", Object.assign({ x1: x1, y1: y1, x2: x2, y2: y2, stroke: "#8c959f", "stroke-width": 1 }, attrs || {})));
  }
  var LIMIT = { stroke: "#cf222e", "stroke-width": 1.5, "stroke-dasharray": "5,3", "class": "limit-line" };
  function heatmapFigure(h) {
    var rows = h.rows, cols = h.cols, vmax = num(h.max);
    // Cells large enough to read: a small case's few cells are drawn big, a large one's small.
    var cw = Math.max(4, Math.min(48, Math.floor(560 / Math.max(cols, 1)))), ch = Math.max(4, Math.min(40, Math.floor(220 / Math.max(rows, 1))));
    var L = 44, T = 4, W = L + cols * cw + 8, H = T + rows * ch + 30;
    var s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": "heatmap", "data-rows": rows, "data-cols": cols });
    var nonFinite = 0, over = 0; // h.max/h.min cover the finite cells only: say how many cells they leave out
    h.values.forEach(function (row, r) {
      row.forEach(function (v, c) {
        var x = num(v), bad = typeof x === "number" && (isNaN(x) || !isFinite(x));
        if (bad) nonFinite++;
        var fill = (typeof x !== "number" || bad) ? "#ff00ff" : colour(vmax > 0 ? x / vmax : 0);
        var attrs = { x: L + c * cw, y: T + r * ch, width: cw, height: ch, fill: fill };
        if (bad || (typeof x === "number" && x > 1)) { over++; attrs.stroke = "#1f2328"; attrs["stroke-width"] = 1; } // over the limit 1: outlined
        var rect = svg("rect", attrs);
        var title = svg("title", {}); title.textContent = "tokens " + (r * h.row_tile) + "-" + ((r + 1) * h.row_tile - 1) + ", columns " + (c * h.col_tile) + "-" + ((c + 1) * h.col_tile - 1) + ": " + fmt(v);
        rect.appendChild(title); s.appendChild(rect);
      });
    });
    // axes: token down, column across, first and last index of each
    svgText(s, L - 4, T + 9, "0", { "text-anchor": "end" });
    svgText(s, L - 4, T + rows * ch, String(rows * h.row_tile - 1), { "text-anchor": "end" });
    svgText(s, 2, T + rows * ch / 2 + 3, "token");
    svgText(s, L, T + rows * ch + 12, "0");
    svgText(s, L + cols * cw, T + rows * ch + 12, String(cols * h.col_tile - 1), { "text-anchor": "end" });
    svgText(s, L + cols * cw / 2, T + rows * ch + 24, "column", { "text-anchor": "middle" });
    return el("figure", { cls: "heatmap-figure" }, [s, el("figcaption", { text: (h.metric ? h.metric + " " : "error ") + "per cell of " + fmt(h.row_tile) + " token(s) x " + fmt(h.col_tile) +
      " column(s); " + (nonFinite ? "finite cells: " : "") + "max " + fmt(h.max) + ", min " + fmt(h.min) + "; " + over + " cell(s) over the limit 1 outlined" +
      (nonFinite ? "; " + nonFinite + " NaN/Inf cell" + (nonFinite > 1 ? "s" : "") + " in magenta" : "; magenta = NaN/Inf") +
      (h.pooled[0] > 1 || h.pooled[1] > 1 ? "; max-pooled " + h.pooled[0] + "x" + h.pooled[1] + " from " + h.source_shape[0] + "x" + h.source_shape[1] + " cells" : "") })]);
  }
  // Bars with a y axis, each bar's value, and (limit) a dashed line at the bound. A log y axis
  // when the values span more than two decades, said on the axis.
  function barsFigure(values, labels, caption, cls, opts) {
    opts = opts || {};
    var n = values.length, nums = values.map(function (v) { return num(v); });
    var finite = nums.filter(function (v) { return typeof v === "number" && isFinite(v); });
    var vmax = Math.max.apply(null, finite.concat([opts.limit || 0, 0]));
    var pos = finite.filter(function (v) { return v > 0; });
    var vminPos = pos.length ? Math.min.apply(null, pos) : 1;
    var logY = opts.limit !== undefined && vmax > 0 && vmax / Math.min(vminPos, opts.limit || vminPos) > 100;
    var bw = Math.max(6, Math.min(36, Math.floor(440 / Math.max(n, 1)))), L = 46, T = 14, P = 110, B = 30;
    var W = L + n * bw + 48, H = T + P + B;
    var lo = logY ? Math.pow(10, Math.floor(Math.log10(Math.min(vminPos, opts.limit || 1) / 2))) : 0;
    var hi = logY ? vmax * 1.5 : (vmax > 0 ? vmax * 1.1 : 1);
    function y(v) {
      if (logY) return T + P - P * (Math.log10(Math.max(v, lo)) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo));
      return T + P - P * v / hi;
    }
    var s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": cls });
    svgLine(s, L, T, L, T + P); svgLine(s, L, T + P, L + n * bw, T + P);
    var ticks = logY ? [] : [0, hi / 2, vmax];
    if (logY) for (var e = Math.log10(lo); e <= Math.log10(hi); e++) ticks.push(Math.pow(10, e));
    ticks.forEach(function (v) { svgLine(s, L - 3, y(v), L, y(v)); svgText(s, L - 5, y(v) + 3, fmt(v, 2), { "text-anchor": "end" }); });
    svgText(s, 2, T - 4, (opts.yLabel || "") + (logY ? " (log scale)" : ""));
    nums.forEach(function (v, i) {
      var bad = typeof v !== "number" || !isFinite(v), top = bad ? T : y(v);
      var rect = svg("rect", { x: L + i * bw + 1, y: top, width: Math.max(1, bw - 2), height: Math.max(0, T + P - top), fill: bad ? "#ff00ff" : (opts.limit !== undefined && v > opts.limit ? "#cf222e" : "#0969da") });
      var t = svg("title", {}); t.textContent = (opts.titles ? opts.titles[i] : labels[i] + ": " + fmt(values[i])); rect.appendChild(t);
      s.appendChild(rect);
      if (n <= 24) svgText(s, L + i * bw + bw / 2, top - 2, fmt(values[i], 3), { "text-anchor": "middle", "font-size": 9, "class": "bar-value" });
      var every = Math.ceil(n / 16);
      if (i % every === 0) svgText(s, L + i * bw + bw / 2, T + P + 12, labels[i], { "text-anchor": "middle", "font-size": 9 });
    });
    if (opts.limit !== undefined) {
      svgLine(s, L, y(opts.limit), L + n * bw + 4, y(opts.limit), LIMIT);
      svgText(s, L + n * bw + 5, y(opts.limit) + 3, "limit " + fmt(opts.limit), { fill: "#cf222e", "font-size": 9 });
    }
    if (opts.xLabel) svgText(s, L + n * bw / 2, T + P + 26, opts.xLabel, { "text-anchor": "middle" });
    return el("figure", {}, [s, el("figcaption", { text: caption })]);
  }
  // A histogram over the recorded bin edges, on a log x axis (the edges grow geometrically;
  // the first bin, from 0, is drawn one decade wide); every edge marked, the non-finite count
  // apart, the limit 1 as a dashed line on the normalized-error histogram.
  function histogramFigure(name, h) {
    var edges = h.edges.map(function (e) { return num(e); }), counts = h.counts, n = counts.length;
    var firstPos = edges.filter(function (e) { return e > 0; })[0] || 1;
    // log x where the edges allow it (increasing, only the first may be 0); else linear, said so
    var logX = edges.every(function (e, k) { return (k === 0 ? e >= 0 : e > 0) && (k === 0 || e > edges[k - 1]); });
    function lx(e) { return !logX ? e : e <= 0 ? Math.log10(firstPos) - 1 : Math.log10(e); }
    var L = 46, T = 14, P = 100, B = 44, PW = 430, extraW = h.extra.length ? 40 : 0;
    var x0 = lx(edges[0]), x1 = lx(edges[edges.length - 1]);
    function x(e) { return L + PW * (lx(e) - x0) / (x1 - x0 || 1); }
    var cmax = Math.max.apply(null, counts.concat(h.extra.map(function (e) { return e[1]; })).concat([1]));
    function y(c) { return T + P - P * c / (cmax * 1.15); }
    var W = L + PW + extraW + 40, H = T + P + B;
    var s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, "class": "histogram", "data-name": name, "data-xscale": logX ? "log" : "linear" });
    svgLine(s, L, T, L, T + P); svgLine(s, L, T + P, L + PW, T + P);
    [0, cmax].forEach(function (c) { svgLine(s, L - 3, y(c), L, y(c)); svgText(s, L - 5, y(c) + 3, String(c), { "text-anchor": "end" }); });
    svgText(s, 2, T - 4, "elements");
    var lastLabel = -Infinity;
    counts.forEach(function (c, k) {
      var a = x(edges[k]), b = x(edges[k + 1]);
      var rect = svg("rect", { x: a + 0.5, y: y(c), width: Math.max(1, b - a - 1), height: T + P - y(c), fill: "#0969da" });
      var t = svg("title", {}); t.textContent = "[" + fmt(edges[k]) + ", " + fmt(edges[k + 1]) + (k === n - 1 ? ", and above): " : "): ") + c; rect.appendChild(t);
      s.appendChild(rect);
      if (c) svgText(s, (a + b) / 2, y(c) - 2, String(c), { "text-anchor": "middle", "font-size": 9, "class": "bar-value" });
    });
    edges.forEach(function (e) { // every edge ticked; labels where they do not collide
      svgLine(s, x(e), T + P, x(e), T + P + 3);
      if (x(e) - lastLabel >= 24) { svgText(s, x(e), T + P + 13, fmt(e, 3), { "text-anchor": "middle", "font-size": 9, "class": "edge-label" }); lastLabel = x(e); }
    });
    h.extra.forEach(function (e, k) {
      var xa = L + PW + 12 + k * 36, rect = svg("rect", { x: xa, y: y(e[1]), width: 24, height: T + P - y(e[1]), fill: "#ff00ff" });
      var t = svg("title", {}); t.textContent = e[0] + ": " + e[1]; rect.appendChild(t); s.appendChild(rect);
      svgText(s, xa + 12, y(e[1]) - 2, String(e[1]), { "text-anchor": "middle", "font-size": 9, "class": "bar-value" });
      svgText(s, xa + 12, T + P + 13, "NaN/Inf", { "text-anchor": "middle", "font-size": 9 });
    });
    if (name === "normalized_error" && edges[0] <= 1 && edges[edges.length - 1] >= 1) {
      svgLine(s, x(1), T - 2, x(1), T + P, LIMIT);
      svgText(s, x(1) + 3, T + 6, "limit 1", { fill: "#cf222e", "font-size": 9 });
    }
    var what = name === "normalized_error" ? "|diff| / allowed" : name === "ulp_distance" ? "ULP distance" : name;
    svgText(s, L + PW / 2, T + P + 28, what + (logX ? " (log scale" + (edges[0] === 0 ? "; first bin from 0)" : ")") : " (linear scale)"),
            { "text-anchor": "middle" });
    var total = counts.reduce(function (a, b) { return a + b; }, 0);
    return el("figure", {}, [s, el("figcaption", { text: "histogram: " + name + " (" + total + " elements in bins" +
      h.extra.map(function (x) { return "; " + x[0] + ": " + x[1]; }).join("") + ")" + h.notes.map(function (x) { return "; " + x; }).join("") +
      "; x: " + what + ", " + (logX ? "log" : "linear") + " scale, every bin edge marked" })]);
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

  function verdictBadges(vs) {
    if (!vs || !vs.length) return null;
    return el("span", { cls: "verdicts" }, vs.map(function (v) {
      var label = v.name + " " + v.outcome + (v.gating === false ? " (not gating)" : "");
      return el("span", { cls: "vbadge vbadge-" + v.outcome + (v.gating === false ? " vbadge-soft" : ""), "data-verdict": v.name,
                          title: (v.reason || "") + (v.margin !== null && v.margin !== undefined ? " (margin " + fmt(v.margin) + ")" : ""), text: label });
    }));
  }
  function diagnosisBlock(d, reason) {
    var kids = [el("div", { cls: "diagnosis-summary", text: d.summary })];
    if (d.lines.length) kids.push(el("ul", {}, d.lines.map(function (l) { return el("li", {}, [el("b", { text: l[0] + " " }), l[1]]); })));
    if (reason) kids.push(el("div", { cls: "muted" }, ["reason: ", el("span", { cls: "reason-text", text: reason })]));
    return el("div", { cls: "diagnosis" }, kids);
  }

  function detailRow(i) {
    var o = OUT[T.outcome[i]], det = D.details[String(i)], parts = [];
    var reason = T.reason[i] < 0 ? null : T.reasons[T.reason[i]];
    if (det && det.omitted) {
      parts.push(el("div", { cls: "detail-head" }, [el("strong", { cls: "outcome-" + o, text: o }), " worst margin " + fmt(T.margin[i]) + "  ",
        reason ? el("span", { cls: "reason-text", text: reason }) : null]));
      parts.push(el("p", { cls: "muted details-omitted", text: det.omitted }));
      det = null;
    }
    if (det) {
      // What broke and where first: outcome and verdicts, the diagnosis, the error panels.
      parts.push(el("div", { cls: "detail-head" }, [el("strong", { cls: "outcome-" + o, text: o }), " worst margin " + fmt(T.margin[i]) + " ",
        verdictBadges(det.verdicts)]));
      if (det.diagnosis) parts.push(diagnosisBlock(det.diagnosis, reason));
      else if (reason) parts.push(el("div", { cls: "reason-text", text: reason }));
      var panels = Object.keys(det.panels);
      if (panels.length) parts.push(el("div", { cls: "panels" }, panels.map(function (k) { return panelTable(k, det.panels[k]); })));
      var charts = [];
      if (det.heatmap) charts.push(heatmapFigure(det.heatmap));
      if (det.per_expert) charts.push(barsFigure(det.per_expert, det.per_expert.map(function (_, e) { return "e" + e; }),
        "max |diff| / allowed per expert (e0 .. e" + (det.per_expert.length - 1) + "); over the limit 1 in red", "per-expert",
        { limit: 1, yLabel: "max |diff| / allowed", xLabel: "expert" }));
      Object.keys(det.histograms).forEach(function (name) { charts.push(histogramFigure(name, det.histograms[name])); });
      if (charts.length) parts.push(el("div", { cls: "charts" }, charts));
      if (det.error) { parts.push(el("h4", { text: "error" })); parts.push(el("pre", { cls: "traceback", text: det.error })); }
      panels.forEach(function (k) { var w = worstTable(k, det.panels[k]); if (w) parts.push(w); });
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
      // The derivations explain the bounds; folded, so the errors come first.
      if (bounds.length) parts.push(el("details", { cls: "derivations" }, [el("summary", { text: "how the bounds were derived (" + bounds.join(", ") + ")" }),
        el("div", { cls: "panels" }, bounds.map(function (k) { return boundBlock(k, det.tolerance[k]); }))]));
    } else if (!parts.length) {
      parts.push(el("div", { cls: "detail-head" }, [el("strong", { cls: "outcome-" + o, text: o }), " worst margin " + fmt(T.margin[i]) + "  ",
        reason ? el("span", { cls: "reason-text", text: reason }) : null]));
    }
    if (!det) {
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
