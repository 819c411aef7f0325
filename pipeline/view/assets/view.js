// The gmner-pipeline view: filters over an index of every record, pages of record cards whose details are loaded a
// chunk at a time (script files beside the page, so that it works from file:// without a server).
"use strict";
(function () {
  const INDEX = JSON.parse(document.getElementById("gmner-index").textContent);
  const META = JSON.parse(document.getElementById("gmner-meta").textContent);
  const chunks = new Map(); // chunk number -> array of record details
  const waiting = new Map(); // chunk number -> [resolve]
  const state = {page: 0, filtered: INDEX};

  window.gmnerChunk = function (n, records) {
    chunks.set(n, records);
    (waiting.get(n) || []).forEach((resolve) => resolve(records));
    waiting.delete(n);
  };

  function loadChunk(n) {
    if (chunks.has(n)) return Promise.resolve(chunks.get(n));
    return new Promise((resolve, reject) => {
      if (!waiting.has(n)) {
        waiting.set(n, []);
        const s = document.createElement("script");
        s.src = META.assets + "/records-" + String(n).padStart(5, "0") + ".js";
        s.onerror = () => reject(new Error("cannot load " + s.src));
        document.head.appendChild(s);
      }
      waiting.get(n).push(resolve);
    });
  }

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "style") el.style.cssText = v;
      else if (k.startsWith("data-")) el.setAttribute(k, v);
      else el[k] = v;
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return el;
  }

  const fmtBox = (b) => "[" + b.map((v) => Math.round(v)).join(",") + "]";

  // --- filters ---------------------------------------------------------------------------------------------------
  const FILTERS = [
    ["status", "status", (r) => [r.status]],
    ["reason", "drop reason", (r) => [r.reason || "(none)"]],
    ["style", "chain style", (r) => (r.styles.length ? r.styles : ["(no chain)"])],
    ["teacher", "teacher", (r) => (r.teachers.length ? r.teachers : ["(no chain)"])],
    ["grpo", "GRPO keep/drop", (r) => [r.grpo || "(not sampled)"]],
    ["grpo_reason", "GRPO drop rule", (r) => [r.grpo_reason || "(none)"]],
    ["dsplit", "D1 / D2", (r) => [r.dsplit || "(none)"]],
    ["consistent", "consistent chain", (r) => [r.consistent ? "yes" : "no"]],
  ];

  function buildFilters() {
    const bar = document.getElementById("filters");
    for (const [key, label, values] of FILTERS) {
      const counts = new Map();
      INDEX.forEach((r) => values(r).forEach((v) => counts.set(v, (counts.get(v) || 0) + 1)));
      const select = h("select", {id: "f-" + key, "data-filter": key},
        h("option", {value: ""}, "all"),
        [...counts.keys()].sort().map((v) => h("option", {value: v}, v + " (" + counts.get(v) + ")")));
      select.addEventListener("change", apply);
      // a filter with one value cannot narrow anything (e.g. GRPO keep/drop of a run without grpo_filter): hidden
      bar.appendChild(h("label", {hidden: counts.size < 2}, label + " ", select));
    }
    const search = h("input", {id: "f-search", type: "search", placeholder: "id or text"});
    search.addEventListener("input", apply);
    bar.appendChild(h("label", {}, "search ", search));
  }

  function apply() {
    const chosen = FILTERS.map(([key, , values]) => [document.getElementById("f-" + key).value, values])
      .filter(([v]) => v);
    const q = document.getElementById("f-search").value.trim().toLowerCase();
    state.filtered = INDEX.filter((r) => chosen.every(([v, values]) => values(r).includes(v)) &&
      (!q || r.id.toLowerCase().includes(q) || r.text.toLowerCase().includes(q)));
    state.page = 0;
    render();
  }

  // --- one record --------------------------------------------------------------------------------------------------
  function imageBlock(rec) {
    const w = rec.image.width, hgt = rec.image.height;
    // portrait images get a narrower frame, so a card stays about as tall as its text
    const frame = h("div", {class: "frame", style: w && hgt && hgt > w ? "width:" + Math.round(420 * w / hgt) +
      "px" : null});
    if (rec.image.thumb) {
      frame.appendChild(h("img", {src: META.assets + "/img/" + rec.image.thumb, alt: rec.image.name || rec.id,
        loading: "lazy"}));
    } else {
      const ratio = w && hgt ? (100 * hgt / w).toFixed(3) : "60";
      frame.appendChild(h("div", {class: "noimg", style: "padding-top:" + ratio + "%"},
        h("span", {}, rec.image.name ? "image not on disk: " + rec.image.name : "no image")));
    }
    if (w && hgt) {
      const box = (b, cls, label) => h("div", {class: "box " + cls, title: label + " " + fmtBox(b),
        "data-box": b.join(","), style: "left:" + (100 * b[0] / w) + "%;top:" + (100 * b[1] / hgt) + "%;width:" +
          (100 * (b[2] - b[0]) / w) + "%;height:" + (100 * (b[3] - b[1]) / hgt) + "%"}, h("span", {}, label));
      rec.detections.forEach((d) => d.box[2] >= d.box[0] && d.box[3] >= d.box[1] &&
        frame.appendChild(box(d.box, "det", d.label + " " + d.score)));
      rec.entities.forEach((e) => e.boxes.forEach((b) => b[2] >= b[0] && b[3] >= b[1] &&
        frame.appendChild(box(b, "gold", e.text))));
    }
    return h("div", {class: "left"}, frame,
      h("div", {class: "legend"}, h("span", {class: "k gold"}, "gold"),
        rec.detections.length ? [" ", h("span", {class: "k det"}, "detector")] : null,
        w && hgt ? " " + w + "×" + hgt : ""));
  }

  function entitiesBlock(rec) {
    if (!rec.entities.length) return h("p", {class: "muted"}, "no entities");
    const where = (e) => e.boxes.length ? e.boxes.map(fmtBox).join(" ") :
      (rec.grounding === "present" ? "not visible" : "unknown");
    return h("table", {class: "ents"}, h("tr", {}, h("th", {}, "entity"), h("th", {}, "type"),
      h("th", {}, "fine type"), h("th", {}, "gold boxes")),
    rec.entities.map((e) => h("tr", {}, h("td", {}, e.text), h("td", {}, e.type), h("td", {}, e.fine_type || ""),
      h("td", {class: e.boxes.length ? "gold-t" : "muted"}, where(e)))));
  }

  function knowledgeBlock(rec) {
    if (!rec.knowledge.length) return null;
    return h("div", {class: "knowledge"}, h("h4", {}, "knowledge"), rec.knowledge.map((k) => h("div", {class: "kitem"},
      h("p", {}, h("b", {}, k.entity), " (" + (k.fine_type || k.type) + ")",
        k.status && k.status !== "ok" ? h("span", {class: "badge dropped"}, k.status) : null, ": ",
        k.summary || h("i", {}, "no summary")),
      (k.aspects.length || k.answers.length || k.notes.length) ? h("details", {},
        h("summary", {}, "vote (" + k.aspects.length + " aspects) and " + k.answers.length + " answers" +
          (k.fine_type_support.length ? "; fine type from " + k.fine_type_support.join(", ") : "")),
        k.aspects.length ? h("table", {}, h("tr", {}, h("th", {}, "aspect"), h("th", {}, "voted"),
          h("th", {}, "support")), k.aspects.map((a) => h("tr", {}, h("td", {}, a.aspect), h("td", {}, a.text),
          h("td", {}, a.support.join(", "))))) : null,
        k.answers.map((a) => h("p", {class: a.ok ? "" : "error"}, h("b", {}, (a.role || a.model || "?") + ": "),
          a.ok ? a.text : "failed: " + (a.error || ""))),
        k.notes.map((n) => h("p", {class: "muted"}, "note: " + n))) : null)));
  }

  function chainsBlock(rec) {
    if (!rec.chains.length) return rec.cot_skipped ? h("p", {class: "muted"}, "no chain: " + rec.cot_skipped) : null;
    return h("div", {class: "chains"}, h("h4", {}, "chains" + (rec.cot_split ? " (" + rec.cot_split + ")" : "")),
      rec.chains.map((c) => h("details", {class: "chain"},
        h("summary", {}, h("span", {class: "badge " + (c.consistent ? "ok" : "error")},
          c.consistent ? "consistent" : "rejected"), " " + c.style + " / " + (c.route || "-") + " / " + c.teacher +
          (c.rejection ? " — " + c.rejection : "") + (c.heldout ? " (held out)" : "")),
        h("pre", {}, c.think), h("pre", {class: "answer"}, "answer: " + c.answer))));
  }

  function grpoBlock(rec) {
    const g = rec.grpo;
    if (!g) return null;
    const stat = ["mean", "std", "max", "median"].map((k) => k + " " + (g[k] === null ? "-" : g[k])).join(", ");
    return h("div", {class: "grpo"}, h("h4", {}, "GRPO ", h("span", {class: "badge " + (g.keep ? "ok" : "dropped")},
      g.keep ? "kept" : "dropped" + (g.reason ? ": " + g.reason : ""))),
    h("p", {}, "policy " + (g.policy || "-") + "; " + stat),
    h("div", {class: "rewards"}, g.rewards.map((r, i) => h("span", {class: "reward", title: g.responses[i] || "",
      style: "--r:" + (r === null ? 0 : r)}, r === null ? "–" : r.toFixed(2)))),
    g.responses.length ? h("details", {class: "responses"}, h("summary", {}, g.responses.length + " responses"),
      g.responses.map((t, i) => h("div", {class: "response"}, h("span", {class: "reward", style: "--r:" +
        (g.rewards[i] === null || g.rewards[i] === undefined ? 0 : g.rewards[i])},
      g.rewards[i] === null || g.rewards[i] === undefined ? "–" : g.rewards[i].toFixed(2)),
      h("pre", {}, t || "(no sample came back)")))) : null);
  }

  function recordCard(rec) {
    const reason = rec.drop_reason ? " (" + rec.drop_reason + ")" : "";
    return h("article", {class: "rec", "data-id": rec.id},
      imageBlock(rec),
      h("div", {class: "right"},
        h("h3", {}, rec.id + " ", h("span", {class: "badge " + rec.status}, rec.status + reason),
          rec.split ? h("span", {class: "muted"}, " " + rec.split) : null),
        h("p", {class: "text"}, rec.text),
        rec.error ? h("p", {class: "error"}, "[" + (rec.error_stage || "?") + "] " + rec.error) : null,
        entitiesBlock(rec),
        rec.detections.length ? h("p", {class: "det-t"}, "detections (" + (rec.detector || "detector") + "): " +
          rec.detections.map((d) => d.label + " " + d.score + " " + fmtBox(d.box)).join("; ")) : null,
        knowledgeBlock(rec), chainsBlock(rec), grpoBlock(rec)));
  }

  // --- a page of results -------------------------------------------------------------------------------------------
  let renderToken = 0;
  async function render() {
    const token = ++renderToken;
    const size = META.page_size, n = state.filtered.length, pages = Math.max(1, Math.ceil(n / size));
    state.page = Math.min(state.page, pages - 1);
    const slice = state.filtered.slice(state.page * size, state.page * size + size);
    document.querySelectorAll(".pageinfo").forEach((el) => {
      el.textContent = n ? "records " + (state.page * size + 1) + "–" + (state.page * size + slice.length) +
        " of " + n + " (page " + (state.page + 1) + " of " + pages + ")" : "no record matches";
    });
    document.querySelectorAll(".prev").forEach((b) => { b.disabled = state.page === 0; });
    document.querySelectorAll(".next").forEach((b) => { b.disabled = state.page >= pages - 1; });
    const list = document.getElementById("records");
    list.setAttribute("data-state", "loading");
    const needed = [...new Set(slice.map((r) => Math.floor(r.i / META.chunk_size)))];
    await Promise.all(needed.map(loadChunk));
    if (token !== renderToken) return; // a newer render started meanwhile
    list.replaceChildren(...slice.map((r) => recordCard(chunks.get(Math.floor(r.i / META.chunk_size))[
      r.i % META.chunk_size])));
    list.setAttribute("data-state", "ready");
  }

  function pager() {
    document.querySelectorAll(".prev").forEach((b) => b.addEventListener("click", () => { state.page--; render(); }));
    document.querySelectorAll(".next").forEach((b) => b.addEventListener("click", () => { state.page++; render(); }));
  }

  buildFilters();
  pager();
  render().catch((err) => { document.getElementById("records").textContent = String(err); throw err; });
})();
