// The coder-index page: no framework, no network beyond this server. Every string from the server is
// set as text (never as HTML), so texts, class names and paths cannot inject markup.
"use strict";

const $ = (sel) => document.querySelector(sel);
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}
const fmt = (x, d = 3) => Number(x).toFixed(d);

async function api(path, options) {
  const res = await fetch(path, options);
  const body = res.headers.get("content-type")?.includes("json") ? await res.json() : null;
  if (!res.ok) {
    const detail = body && (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    throw new Error(`${res.status}: ${detail || res.statusText}`);
  }
  return body;
}

// ---------------------------------------------------------------- tabs
let info = null;
function showTab(name) {
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((s) => s.classList.toggle("active", s.id === name));
  if (name === "predictions") loadPredictions();
  if (name === "report") loadReport();
  if (name === "api") loadApi();
}
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));

async function loadInfo() {
  info = await api("/api/info");
  const m = info.manifest, s = info.server;
  const nTexts = Object.values(info.counts.texts).reduce((a, b) => a + b, 0);
  $("#index-info").textContent = `${m.model.model} · ${info.counts.classes} classes · ${nTexts} texts · ${s.method}`;
  $("#tab-predictions").disabled = !s.predictions;
  $("#tab-report").disabled = !s.report;
}

// ---------------------------------------------------------------- classify
function bars(target, rows) {
  target.replaceChildren(...rows.map((r, i) => {
    const fill = el("div", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(1, r.score)) * 100}%`;
    return el("div", { class: i === 0 ? "bar first" : "bar", "data-label": r.label },
      el("span", { class: "name", text: r.label, title: r.label }),
      el("div", { class: "track" }, fill),
      el("span", { class: "val", text: fmt(r.score) }));
  }));
}

function textTable(hits, withClass = true) {
  const head = el("tr", {}, el("th", { text: "cosine" }), el("th", { text: "kind" }),
    withClass ? el("th", { text: "class" }) : null, el("th", { text: "text" }));
  return el("table", { class: "texts" }, head, ...hits.map((t) => el("tr", { class: "hit" },
    el("td", { class: "num", text: fmt(t.cosine, 4) }),
    el("td", {}, el("span", { class: `kind ${t.kind}`, text: t.kind })),
    withClass ? el("td", { text: t.class }) : null,
    el("td", { text: t.text }))));
}

function explanationView(r) {
  const parts = [];
  parts.push(el("div", { class: "card" }, el("h3", { text: "Nearest texts" }), textTable(r.nearest_texts)));
  const side = [el("div", { class: "card texts-best" }, el("h3", { text: `Best texts of ${r.prediction} (prediction)` }),
    textTable(r.class_texts, false))];
  if (r.runner_up) side.push(el("div", { class: "card texts-runner" },
    el("h3", { text: `Best texts of ${r.runner_up} (runner-up)` }), textTable(r.runner_up_texts, false)));
  parts.push(el("div", { class: "cols" }, ...side));
  if (r.pairs) parts.push(pairsView(r.pairs));
  return parts;
}

function pairsView(ev) {
  const rows = ev.pairs.filter((p) => p.has_texts).map((p) => {
    const evidence = (list) => el("ul", {}, ...list.map((t) => el("li", { text: `${fmt(t.cosine, 4)}  ${t.text}` })));
    return el("tr", { class: "pair" },
      el("td", { text: `${p.a} vs ${p.b}` }),
      el("td", { class: `num ${p.score >= 0 ? "pos" : "neg"}`, text: (p.score >= 0 ? "+" : "") + fmt(p.score, 4) }),
      el("td", {}, evidence(p.a_over_b)), el("td", {}, evidence(p.b_over_a)));
  });
  const totals = ev.classes.map((c, i) => `${c} ${ev.totals[i] >= 0 ? "+" : ""}${fmt(ev.totals[i], 4)}`).join(" · ");
  return el("div", { class: "card pairs" },
    el("h3", { text: `CODER* pairs: the rerank picks ${ev.prediction}${ev.changed ? " (changed from stage 1)" : ""}` }),
    el("p", { class: "muted", text: `Totals: ${totals}. A positive score favours the first class of the pair.` }),
    el("table", { class: "texts" }, el("tr", {}, el("th", { text: "pair" }), el("th", { text: "score" }),
      el("th", { text: "texts: first differs from second" }), el("th", { text: "texts: second differs from first" })),
      ...rows));
}

async function classifyFile(file) {
  $("#classify-error").hidden = true;
  $("#result").hidden = false;
  $("#preview").src = URL.createObjectURL(file);
  $("#preview-name").textContent = file.name;
  $("#bars").replaceChildren(el("p", { class: "muted", text: "classifying…" }));
  $("#explanation").replaceChildren();
  const form = () => { const f = new FormData(); f.append("files", file, file.name); return f; };
  try {
    const [rows, why] = await Promise.all([api("/api/classify", { method: "POST", body: form() }),
      api("/api/explain", { method: "POST", body: form() })]);
    $("#method").textContent = `(${rows[0].method})`;
    bars($("#bars"), rows[0].top_k);
    $("#explanation").replaceChildren(...explanationView(why[0]));
  } catch (err) {
    $("#result").hidden = true;
    $("#classify-error").textContent = err.message;
    $("#classify-error").hidden = false;
  }
}

const drop = $("#drop");
$("#file").addEventListener("change", (e) => e.target.files[0] && classifyFile(e.target.files[0]));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) classifyFile(e.dataTransfer.files[0]);
});

$("#text-search").addEventListener("submit", async (e) => {
  e.preventDefault();
  const table = $("#text-results");
  try {
    const hits = await api(`/api/texts?${new URLSearchParams({ q: $("#text-query").value, k: 15 })}`);
    table.replaceChildren(...textTable(hits).childNodes);
  } catch (err) {
    table.replaceChildren(el("tr", {}, el("td", { class: "error", text: err.message })));
  }
  table.hidden = false;
});

// ---------------------------------------------------------------- predictions
const PAGE = 60;
let offset = 0, summaryLoaded = false;

async function loadPredictions() {
  if (!summaryLoaded) {
    const s = await api("/api/predictions/summary");
    for (const l of s.labels) $("#f-label").append(el("option", { value: l.label, text: `${l.label} (${l.count})` }));
    for (const m of s.methods) $("#f-method").append(el("option", { value: m, text: m }));
    summaryLoaded = true;
  }
  const q = { sort: $("#f-sort").value, offset, limit: PAGE };
  if ($("#f-label").value) q.label = $("#f-label").value;
  if ($("#f-method").value) q.method = $("#f-method").value;
  if ($("#f-q").value) q.q = $("#f-q").value;
  if (Number($("#f-min").value) > 0) q.min_score = $("#f-min").value;
  if (Number($("#f-max").value) < 1) q.max_score = $("#f-max").value;
  if ($("#f-changed").checked) q.changed = true;
  try {
    const page = await api(`/api/predictions?${new URLSearchParams(q)}`);
    $("#pred-count").textContent = `${page.total} image(s) match`;
    $("#grid").replaceChildren(...page.rows.map(thumb));
    $("#page-no").textContent = page.total ? `${offset + 1}–${offset + page.rows.length} of ${page.total}` : "";
    $("#prev").disabled = offset === 0;
    $("#next").disabled = offset + page.rows.length >= page.total;
  } catch (err) {
    $("#pred-count").textContent = err.message;
  }
}

// rows name their image by row number: a path that was not valid UTF-8 reaches the page as U+FFFD
const imageUrl = (row, size) => `/api/predictions/image?${new URLSearchParams({ row, size })}`;

function thumb(r) {
  return el("div", { class: "thumb", title: r.path, onclick: () => openDetail(r) },
    el("img", { src: imageUrl(r.row, 256), alt: r.path, loading: "lazy" }),
    el("div", { class: "lab", text: r.label }),
    el("div", { class: "muted", text: `${fmt(r.score)} · ${r.method}` }),
    r.changed ? el("div", { class: "changed", text: "changed by the rerank" }) : null);
}

async function openDetail(r) {
  $("#detail-img").src = imageUrl(r.row, 512);
  $("#detail-path").textContent = r.path;
  const body = $("#detail-body");
  const barBox = el("div");
  bars(barBox, r.top_k);
  body.replaceChildren(el("h2", { text: `${r.label} (${r.method})` }), barBox, el("p", { class: "muted", text: "explaining…" }));
  $("#detail").showModal();
  try {
    const why = await api(`/api/predictions/explain?${new URLSearchParams({ row: r.row })}`);
    body.replaceChildren(el("h2", { text: `${r.label} (${r.method})` }), barBox, ...explanationView(why[0]));
  } catch (err) {
    body.append(el("p", { class: "error", text: err.message }));
  }
}

$("#filters").addEventListener("submit", (e) => { e.preventDefault(); offset = 0; loadPredictions(); });
$("#prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); loadPredictions(); });
$("#next").addEventListener("click", () => { offset += PAGE; loadPredictions(); });

// ---------------------------------------------------------------- report
let reportLoaded = false;
async function loadReport() {
  if (reportLoaded) return;
  const rep = await api("/api/report");
  const sec = $("#report");
  const methods = el("table", { class: "texts" }, el("tr", {}, el("th", { text: "method" }), el("th", { text: "top-1" }),
    el("th", { text: "top-5" }), el("th", { text: "mean per-class recall" })),
    ...rep.methods.map((m) => el("tr", {}, el("td", { text: m.name }), el("td", { class: "num", text: pct(m.top1) }),
      el("td", { class: "num", text: pct(m.top5) }), el("td", { class: "num", text: pct(m.mean_per_class_recall) }))));
  const parts = [el("h2", { text: `Evaluation: ${rep.data}` }),
    el("p", { class: "muted", text: `${rep.images} images, model ${rep.model}` }), methods];
  const cols = [];
  for (const [name, per] of Object.entries(rep.per_class || {})) {
    const sorted = Object.entries(per).sort((a, b) => a[1] - b[1]);
    cols.push(el("div", { class: "card per-class" }, el("h3", { text: `Per-class accuracy, ${name} (worst first)` }),
      el("table", { class: "texts" }, ...sorted.map(([c, v]) => el("tr", {}, el("td", { text: c }),
        el("td", { class: "num", text: pct(v) }))))));
  }
  for (const [name, conf] of Object.entries(rep.confused || {})) {
    cols.push(el("div", { class: "card confused" }, el("h3", { text: `Most confused, ${name}` }),
      el("table", { class: "texts" }, el("tr", {}, el("th", { text: "true" }), el("th", { text: "predicted" }),
        el("th", { text: "images" })), ...conf.map((c) => el("tr", {}, el("td", { text: c.true }),
        el("td", { text: c.predicted }), el("td", { class: "num", text: c.count }))))));
  }
  parts.push(el("div", { class: "cols" }, ...cols));
  if (rep.has_tsne) parts.push(el("h3", { text: "t-SNE: image embeddings and CODER" }),
    el("img", { class: "tsne", src: "/api/report/tsne.png", alt: "t-SNE of image embeddings and of CODER" }));
  sec.replaceChildren(...parts);
  reportLoaded = true;
}
const pct = (x) => (x == null || Number.isNaN(x) ? "–" : `${(100 * x).toFixed(2)}%`);

// ---------------------------------------------------------------- API
async function loadApi() {
  const spec = await api("/openapi.json");
  const rows = [];
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [verb, op] of Object.entries(ops)) {
      rows.push(el("tr", {}, el("td", {}, el("code", { text: `${verb.toUpperCase()} ${path}` })),
        el("td", { text: op.summary || "" })));
    }
  }
  $("#api-table").replaceChildren(...rows);
}

loadInfo().catch((err) => { $("#index-info").textContent = err.message; });
