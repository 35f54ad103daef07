/* Electrode voltage page.
 *
 * Why plain JavaScript: no build step and nothing fetched from anywhere but this service (the
 * page is served with a Content-Security-Policy of 'self'), and every number shown comes from an
 * ordinary call to the public HTTP API (GET /models, GET /docs.json, POST /predict,
 * POST /predict_batch), so the page is also a worked example of that API. Archives are unpacked
 * here, in the browser (zip: central directory + DecompressionStream("deflate-raw"); tar and
 * .tar.gz: 512-byte headers + DecompressionStream("gzip")), then sent in /predict_batch chunks.
 * Charts are SVG strings; every text that comes from a user or the API is escaped first.
 */
"use strict";

(function () {
  const Z90 = 1.645; // voltage ± 1.645 σ covers 90% (docs/serving.md)
  const MAX_FILE_BYTES = 4 * 1024 * 1024; // one structure file, unpacked
  const MAX_ARCHIVE_BYTES = 64 * 1024 * 1024; // everything unpacked from the files chosen
  const CHUNK_ITEMS = 32; // items per /predict_batch call (the server's limit is larger)
  const CHUNK_BYTES = 512 * 1024; // JSON bytes per call (the server's default limit is 2 MiB)
  const ION_COLORS = ["#1f5fbf", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490",
    "#a16207", "#4d7c0f", "#be185d", "#334155"];
  const ELEMENT_COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
    "#ca8a04", "#db2777", "#4b5563", "#65a30d", "#7c3aed", "#0d9488"];
  const KIND_TITLES = {
    parse: "The structure could not be read",
    format: "Wrong format or request",
    unknown_ion: "Unknown working ion",
    too_many_sites: "Too many sites",
    too_large: "Input too large",
    unknown_element: "Element not supported",
    nan_coordinates: "Invalid coordinates",
    overlapping_atoms: "Atoms overlap",
    empty: "Nothing to predict",
    physics: "Physics cross-check refused",
    no_champion: "No model for this ion",
    internal: "Server error",
    network: "The service did not answer",
    http: "Unexpected answer",
    archive: "Archive not readable",
    explain: "No local voltages",
    input: "Check the input",
  };

  const state = {
    ions: [], // rows of GET /models
    physics: false, // /predict takes discharged_structure (read from /docs.json)
    fileName: null, // the single structure file loaded, and its text and format
    fileText: null,
    fileFormat: null,
    dfileText: null,
    dfileFormat: null,
    single: null, // {base, label, rows}: the last successful prediction
    sites: [], // local voltages shown
    siteSort: { key: "site", dir: 1 },
    elementColor: new Map(),
    batchFiles: [],
    csvUrl: null,
  };

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------------------- helpers
  function esc(value) {
    return String(value).replace(/[&<>"']/g, (c) => ({
      "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
    })[c]);
  }

  /** A DOM element with attributes and children (strings become text nodes: never HTML). */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const fmtV = (v) => (Number.isFinite(v) ? v.toFixed(3) : "—");

  function numCell(field, value, text) {
    return h("td", { className: "num", dataset: { field, value: value ?? "" } },
      text ?? fmtV(value));
  }

  function sizeText(n) {
    return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB`
      : `${(n / 1048576).toFixed(1)} MB`;
  }

  class ApiError extends Error {
    constructor(kind, message, status) {
      super(message);
      this.kind = kind || "http";
      this.status = status || 0;
    }
  }

  /** Show errors ({kind, message, status, label}) next to the input they belong to. */
  function showError(box, errors) {
    const list = Array.isArray(errors) ? errors : [errors];
    box.replaceChildren(...list.map((e, i) => {
      const title = KIND_TITLES[e.kind] || "Error";
      const where = e.label ? `${e.label}: ` : "";
      const status = e.status ? `, HTTP ${e.status}` : "";
      return h("div", { className: "error-line", dataset: { kind: e.kind } },
        i ? "\n" : "", h("span", { className: "kind" }, `${where}${title} (${e.kind}${status}): `),
        e.message);
    }));
    box.dataset.kind = list[0].kind;
    box.hidden = false;
  }

  function clearError(box) {
    box.hidden = true;
    box.replaceChildren();
    delete box.dataset.kind;
  }

  function banner(message) {
    let box = $("banner");
    if (!box) {
      box = h("div", { id: "banner", className: "error", role: "alert" });
      document.body.prepend(box);
    }
    box.textContent = `Something went wrong on this page: ${message}. Reload to start again; ` +
      "the API itself is unaffected (/docs).";
  }
  window.addEventListener("error", (e) => banner(e.message || "script error"));
  window.addEventListener("unhandledrejection", (e) => banner(String(e.reason)));

  // ---------------------------------------------------------------------------- the API
  /** GET (no body) or POST JSON; resolves to the decoded answer, rejects with an ApiError
   *  carrying the API's {error, kind} (or a readable stand-in when the answer is not JSON). */
  async function api(path, body) {
    const init = body === undefined ? { method: "GET" } : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    };
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (err) {
      throw new ApiError("network", `no answer from ${location.origin}${path} (${err.message});` +
        " is the service running?", 0);
    }
    const text = await resp.text();
    let data = null;
    try {
      data = JSON.parse(text);
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      if (data && typeof data === "object" && typeof data.error === "string") {
        throw new ApiError(data.kind || "http", data.error, resp.status);
      }
      throw new ApiError("http", text.slice(0, 300) || resp.statusText, resp.status);
    }
    if (data === null) throw new ApiError("http", "the answer is not JSON", resp.status);
    return data;
  }

  function curlFor(path, body) {
    let cut = false;
    const shown = JSON.stringify(body, (key, value) => {
      if (typeof value === "string" && value.length > 120) {
        cut = true;
        return `${value.slice(0, 120)}…`;
      }
      return value;
    }, 1).replace(/\n\s*/g, " ");
    return `curl -s -X POST ${location.origin}${path} -H 'Content-Type: application/json' \\\n` +
      `  -d '${shown.replace(/'/g, "'\\''")}'` +
      (cut ? "\n# long structure text shortened here; the page sent it whole" : "");
  }

  // ---------------------------------------------------------------------------- models
  async function loadModels(attempt) {
    const status = $("models-status");
    let data;
    try {
      data = await api("/models");
    } catch (err) {
      if ((err.status === 503 || err.kind === "network") && attempt < 90) {
        status.textContent = "The service is starting; asking again in 2 s…";
        setTimeout(() => loadModels(attempt + 1), 2000);
        return;
      }
      status.className = "status bad";
      status.textContent = `Cannot list the models (${err.kind}): ${err.message}`;
      return;
    }
    state.ions = data.models.map((m, i) => ({ ...m, served: m.loaded && !m.disabled,
      color: ION_COLORS[i % ION_COLORS.length] }));
    const served = state.ions.filter((m) => m.served);
    const idle = state.ions.filter((m) => !m.served);
    status.className = served.length ? "status" : "status bad";
    status.textContent = (served.length
      ? `Serving ${served.map((m) => `${m.ion} (v${m.version}, ${m.source})`).join(", ")}.`
      : "No ion has a model yet.") +
      (idle.length ? ` Not served: ${idle.map((m) => `${m.ion} (${m.disabled ? "disabled"
        : "no model"})`).join(", ")}.` : "");
    status.dataset.ready = "true";
    renderModelsTable();
    buildIonPicker($("ions"), "ion");
    buildIonPicker($("batch-ions"), "batch-ion");
    const select = $("physics-ion");
    select.replaceChildren(...served.map((m) => h("option", { value: m.ion }, m.ion)));
    $("predict").disabled = !served.length;
    updateBatchButton();
  }

  function renderModelsTable() {
    const body = $("models-table").tBodies[0];
    body.replaceChildren(...state.ions.map((m) => h("tr", { dataset: { ion: m.ion } },
      h("td", {}, m.ion),
      h("td", {}, m.name ? `${m.name} v${m.version}` : "—"),
      h("td", {}, m.source ? h("span", { className: `badge ${m.source}` }, m.source) : "—"),
      h("td", {}, m.backbone || "—"),
      numCell("test_mae", m.test_mae),
      h("td", {}, m.served ? (m.loaded_at || "yes") : m.disabled ? "disabled" : "no model"))));
    $("models-details").hidden = false;
  }

  function buildIonPicker(box, name) {
    box.replaceChildren(...state.ions.map((m) => h("label", { className: m.served ? "" : "off" },
      h("input", { type: "checkbox", name, value: m.ion, checked: m.served,
        disabled: !m.served }), ` ${m.ion}`,
      m.served ? "" : h("span", { className: "off" }, m.disabled ? " (disabled)" : " (no model)"))));
  }

  function tickedIons(name) {
    return [...document.querySelectorAll(`input[name="${name}"]:checked`)].map((i) => i.value);
  }

  function ionColor(ion) {
    const m = state.ions.find((x) => x.ion === ion);
    return m ? m.color : "#334155";
  }

  /** Does /predict take a discharged structure? Read from the OpenAPI document, not assumed. */
  async function loadPhysics() {
    try {
      const spec = await api("/docs.json");
      let schema = spec.paths["/predict"].post.requestBody.content["application/json"].schema;
      if (schema && schema.$ref) {
        schema = schema.$ref.replace(/^#\//, "").split("/").reduce((o, k) => o && o[k], spec);
      }
      state.physics = Boolean(schema && schema.properties &&
        "discharged_structure" in schema.properties);
    } catch (_) {
      state.physics = false;
    }
    $("physics").hidden = !state.physics;
  }

  // ---------------------------------------------------------------------------- formats
  function formatFromName(name) {
    const base = name.split("/").pop().toLowerCase().replace(/\.gz$/, "");
    if (base.endsWith(".cif")) return "cif";
    if (base.endsWith(".json")) return "json";
    if (base.endsWith(".vasp") || base.endsWith(".poscar") || base.startsWith("poscar") ||
      base.startsWith("contcar")) return "poscar";
    return null;
  }

  function sniffFormat(text) {
    const t = text.trimStart();
    if (t.startsWith("{")) return "json";
    if (/(^|\n)\s*data_/.test(t) || /_cell_length_a/.test(t)) return "cif";
    return "poscar";
  }

  const utf8 = new TextDecoder("utf-8");

  // ---------------------------------------------------------------------------- archives
  async function inflate(bytes, kind, limit) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream(kind));
    const reader = stream.getReader();
    const parts = [];
    let total = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.length;
      if (total > limit) {
        await reader.cancel();
        throw new Error(`larger than ${sizeText(limit)} once unpacked`);
      }
      parts.push(value);
    }
    const out = new Uint8Array(total);
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  /** Entries of a zip: [{name, bytes} | {name, error}] (stored and deflated members). */
  async function readZip(buf) {
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    let eocd = -1;
    for (let i = buf.length - 22; i >= Math.max(0, buf.length - 22 - 65535); i--) {
      if (dv.getUint32(i, true) === 0x06054b50) {
        eocd = i;
        break;
      }
    }
    if (eocd < 0) throw new Error("not a zip archive (no central directory found)");
    const count = dv.getUint16(eocd + 10, true);
    let p = dv.getUint32(eocd + 16, true);
    if (count === 0xffff || p === 0xffffffff) throw new Error("ZIP64 archives are not supported");
    const out = [];
    let total = 0;
    for (let k = 0; k < count; k++) {
      if (p + 46 > buf.length || dv.getUint32(p, true) !== 0x02014b50) {
        throw new Error("the zip's central directory is damaged");
      }
      const flags = dv.getUint16(p + 8, true);
      const method = dv.getUint16(p + 10, true);
      const csize = dv.getUint32(p + 20, true);
      const usize = dv.getUint32(p + 24, true);
      const nlen = dv.getUint16(p + 28, true);
      const skip = nlen + dv.getUint16(p + 30, true) + dv.getUint16(p + 32, true);
      const local = dv.getUint32(p + 42, true);
      const name = utf8.decode(buf.subarray(p + 46, p + 46 + nlen));
      p += 46 + skip;
      if (name.endsWith("/")) continue;
      if (flags & 1) {
        out.push({ name, error: "encrypted zip entries are not supported" });
        continue;
      }
      if (usize > MAX_FILE_BYTES) {
        out.push({ name, error: `${sizeText(usize)}: larger than ${sizeText(MAX_FILE_BYTES)}` });
        continue;
      }
      if (local + 30 > buf.length || dv.getUint32(local, true) !== 0x04034b50) {
        out.push({ name, error: "damaged zip entry (bad local header)" });
        continue;
      }
      const start = local + 30 + dv.getUint16(local + 26, true) + dv.getUint16(local + 28, true);
      const data = buf.subarray(start, start + csize);
      try {
        let bytes;
        if (method === 0) bytes = data;
        else if (method === 8) bytes = await inflate(data, "deflate-raw", MAX_FILE_BYTES);
        else throw new Error(`compression method ${method} is not supported (use deflate)`);
        total += bytes.length;
        if (total > MAX_ARCHIVE_BYTES) {
          throw new Error(`the archive is larger than ${sizeText(MAX_ARCHIVE_BYTES)} unpacked`);
        }
        out.push({ name, bytes });
      } catch (err) {
        out.push({ name, error: err.message || String(err) });
      }
    }
    return out;
  }

  function cString(bytes, start, length) {
    const field = bytes.subarray(start, start + length);
    const end = field.indexOf(0);
    return utf8.decode(end < 0 ? field : field.subarray(0, end));
  }

  function paxPath(data) {
    const text = utf8.decode(data);
    const m = text.match(/(?:^|\n)\d+ path=([^\n]*)\n/);
    return m ? m[1] : null;
  }

  /** Regular files of a (ustar, GNU or pax) tar: [{name, bytes} | {name, error}]. */
  function readTar(buf) {
    const out = [];
    let p = 0;
    let longName = null;
    let pax = null;
    while (p + 512 <= buf.length) {
      const head = buf.subarray(p, p + 512);
      if (head.every((b) => b === 0)) break;
      const name0 = cString(head, 0, 100);
      const size = parseInt(cString(head, 124, 12).trim() || "0", 8);
      if (!Number.isFinite(size) || size < 0) throw new Error("damaged tar header");
      const type = head[156] === 0 ? "0" : String.fromCharCode(head[156]);
      const prefix = cString(head, 257, 6).startsWith("ustar") ? cString(head, 345, 155) : "";
      const data = buf.subarray(p + 512, p + 512 + size);
      if (data.length < size) throw new Error("the tar archive is truncated");
      p += 512 + Math.ceil(size / 512) * 512;
      if (type === "L") {
        longName = cString(data, 0, data.length);
        continue;
      }
      if (type === "x") {
        pax = paxPath(data);
        continue;
      }
      const name = pax || longName || (prefix ? `${prefix}/${name0}` : name0);
      pax = null;
      longName = null;
      if (type !== "0" && type !== "7") continue; // directories, links, globals
      if (size > MAX_FILE_BYTES) {
        out.push({ name, error: `${sizeText(size)}: larger than ${sizeText(MAX_FILE_BYTES)}` });
      } else {
        out.push({ name, bytes: data });
      }
    }
    return out;
  }

  const isTar = (buf) => buf.length >= 262 && cString(buf, 257, 5) === "ustar";
  const isGzip = (buf) => buf.length > 2 && buf[0] === 0x1f && buf[1] === 0x8b;
  const isZip = (buf) => buf.length > 4 && buf[0] === 0x50 && buf[1] === 0x4b &&
    (buf[2] === 3 || buf[2] === 5);

  /** The structure files inside what was chosen: archives unpacked, plain files as they are. */
  async function unpack(name, buf) {
    if (isZip(buf)) return readZip(buf);
    if (isGzip(buf)) {
      const inner = await inflate(buf, "gzip", MAX_ARCHIVE_BYTES);
      if (isTar(inner) || /\.(tgz|tar\.gz)$/i.test(name)) return readTar(inner);
      return [{ name: name.replace(/\.gz$/i, ""), bytes: inner }];
    }
    if (isTar(buf) || /\.tar$/i.test(name)) return readTar(buf);
    return [{ name, bytes: buf }];
  }

  function skipped(name) {
    const base = name.split("/").pop();
    return name.startsWith("__MACOSX/") || base.startsWith(".") || base === "";
  }

  async function collectStructures(files) {
    const structures = [];
    const bad = [];
    let total = 0;
    for (const file of files) {
      let entries;
      try {
        const buf = new Uint8Array(await file.arrayBuffer());
        total += buf.length;
        if (total > MAX_ARCHIVE_BYTES) {
          throw new Error(`the files chosen exceed ${sizeText(MAX_ARCHIVE_BYTES)}`);
        }
        entries = await unpack(file.name, buf);
      } catch (err) {
        bad.push({ name: file.name, kind: "archive", message: err.message || String(err) });
        continue;
      }
      for (const entry of entries) {
        if (skipped(entry.name)) continue;
        if (entry.error) {
          bad.push({ name: entry.name, kind: "archive", message: entry.error });
          continue;
        }
        const format = formatFromName(entry.name);
        if (!format) {
          bad.push({ name: entry.name, kind: "format", message: "not a structure file: the " +
            "type comes from the name (.cif, .json, POSCAR*, CONTCAR*, .vasp)" });
          continue;
        }
        if (entry.bytes.length > MAX_FILE_BYTES) {
          bad.push({ name: entry.name, kind: "too_large", message: `${sizeText(
            entry.bytes.length)}: larger than ${sizeText(MAX_FILE_BYTES)}` });
          continue;
        }
        structures.push({ name: entry.name, text: utf8.decode(entry.bytes), format });
      }
    }
    return { structures, bad };
  }

  // ---------------------------------------------------------------------------- one structure
  async function readFileText(file) {
    if (file.size > MAX_FILE_BYTES) {
      throw new ApiError("too_large", `${file.name} is ${sizeText(file.size)}; structure files ` +
        `up to ${sizeText(MAX_FILE_BYTES)} are read`, 0);
    }
    let buf = new Uint8Array(await file.arrayBuffer());
    if (isGzip(buf)) buf = await inflate(buf, "gzip", MAX_FILE_BYTES);
    return utf8.decode(buf);
  }

  async function loadSingleFile(file) {
    clearError($("single-error"));
    try {
      const text = await readFileText(file);
      state.fileName = file.name;
      state.fileText = text;
      state.fileFormat = formatFromName(file.name);
      $("structure").value = text;
      $("source-text").checked = true;
      showSource();
      const fmt = state.fileFormat || sniffFormat(text);
      $("file-note").textContent = `Loaded ${file.name} (${sizeText(file.size)}), read as ` +
        `${fmt}${state.fileFormat ? " (from the file name)" : " (from its content)"}.`;
    } catch (err) {
      showError($("single-error"), { kind: err.kind || "input", message: err.message,
        status: err.status, label: file.name });
    }
  }

  async function loadDischargedFile(file) {
    try {
      const text = await readFileText(file);
      state.dfileText = text;
      state.dfileFormat = formatFromName(file.name);
      $("dstructure").value = text;
      guessPhysicsIon();
    } catch (err) {
      showError($("single-error"), { kind: err.kind || "input", message: err.message,
        label: file.name });
    }
  }

  /** The ion the discharged end is richer in: the first served ion named in its text. */
  function guessPhysicsIon() {
    const text = $("dstructure").value;
    for (const m of state.ions.filter((x) => x.served)) {
      if (new RegExp(`(^|[^A-Za-z])${m.ion}([^a-z]|$)`).test(text)) {
        $("physics-ion").value = m.ion;
        return;
      }
    }
  }

  function chosenFormat(select, text, fileText, fileFormat) {
    if (select.value !== "auto") return select.value;
    if (fileFormat && text === fileText) return fileFormat;
    return sniffFormat(text);
  }

  /** The request fields naming the structure: {structure, format} or {material_id}. */
  function singleInput() {
    if ($("source-id").checked) {
      const id = $("material").value.trim();
      return { base: { material_id: id }, label: id || "material id" };
    }
    const text = $("structure").value;
    const format = chosenFormat($("format"), text, state.fileText, state.fileFormat);
    const label = state.fileName && text === state.fileText ? state.fileName : "pasted text";
    return { base: { structure: text, format }, label };
  }

  function showSource() {
    const byId = $("source-id").checked;
    $("text-input").hidden = byId;
    $("id-input").hidden = !byId;
  }

  async function predictAll() {
    const box = $("single-error");
    clearError(box);
    const ions = tickedIons("ion");
    if (!ions.length) {
      showError(box, { kind: "input", message: "tick at least one working ion" });
      return;
    }
    const { base, label } = singleInput();
    const items = ions.map((ion) => ({ ion, ...base }));
    const dtext = $("dstructure").value;
    let physicsIon = null;
    if (state.physics && dtext.trim()) {
      physicsIon = $("physics-ion").value;
      items.push({ ion: physicsIon, ...base, discharged_structure: dtext,
        discharged_format: chosenFormat($("dformat"), dtext, state.dfileText,
          state.dfileFormat) });
    }
    $("predict").disabled = true;
    $("single-busy").hidden = false;
    let answers;
    try {
      answers = await api("/predict_batch", items);
    } catch (err) {
      $("results").hidden = true;
      showError(box, { kind: err.kind, message: err.message, status: err.status });
      return;
    } finally {
      $("predict").disabled = false;
      $("single-busy").hidden = true;
    }
    const rows = ions.map((ion, i) => ({ ion, answer: answers[i] }));
    const physics = physicsIon ? { ion: physicsIon, answer: answers[answers.length - 1] } : null;
    const ok = rows.filter((r) => r.answer.ok);
    if (!ok.length) {
      // Every ion refused: the input (or the service) is the problem, say so by the input.
      $("results").hidden = true;
      $("why").hidden = true;
      const seen = new Map();
      for (const r of rows) {
        const key = `${r.answer.kind}\n${r.answer.error}`;
        if (!seen.has(key)) seen.set(key, { ...r.answer, ions: [] });
        seen.get(key).ions.push(r.ion);
      }
      showError(box, [...seen.values()].map((e) => ({ kind: e.kind, message: e.error,
        status: e.status, label: seen.size > 1 ? e.ions.join(", ") : label })));
      return;
    }
    state.single = { base, label, rows };
    renderSingle(rows, physics, label);
    $("request-sent").textContent = curlFor("/predict_batch", items);
  }

  function renderSingle(rows, physics, label) {
    const ok = rows.filter((r) => r.answer.ok).map((r) => ({ ion: r.ion, p: r.answer.prediction }));
    ok.sort((a, b) => b.p.voltage - a.p.voltage);
    const failed = rows.filter((r) => !r.answer.ok);
    const first = ok[0].p;
    let phys = null;
    let physErr = null;
    if (physics) {
      if (physics.answer.ok) phys = physics.answer.prediction.physics_voltage;
      else physErr = physics.answer;
    }
    $("summary").replaceChildren(
      h("strong", {}, first.formula), ` · ${first.n_sites} sites · ${label}`,
      first.material_id ? ` · snapshot id ${first.material_id}` : "");
    $("chart").innerHTML = ionChart(ok.map(({ ion, p }) => ({
      ion, v: p.voltage, s: p.uncertainty, ref: p.reference_voltage,
      phys: physics && physics.ion === ion ? phys : null,
      model: `${p.model.name} v${p.model.version} (${p.model.source})` })));
    const body = $("ion-table").tBodies[0];
    body.replaceChildren(
      ...ok.map(({ ion, p }) => {
        const physCell = physics && physics.ion === ion
          ? (physErr ? h("td", { className: "warn", dataset: { field: "physics",
            kind: physErr.kind } }, `refused (${physErr.kind}): ${physErr.error}`)
            : numCell("physics", phys))
          : numCell("physics", null);
        return h("tr", { dataset: { ion } },
          h("th", { scope: "row" }, ion),
          numCell("voltage", p.voltage),
          numCell("uncertainty", p.uncertainty),
          h("td", { className: "num", dataset: { field: "interval" } },
            `${fmtV(p.voltage - Z90 * p.uncertainty)} – ${fmtV(p.voltage + Z90 * p.uncertainty)}`),
          numCell("reference", p.reference_voltage),
          physCell,
          h("td", { dataset: { field: "model", version: p.model.version } },
            `${p.model.name} v${p.model.version}`),
          h("td", { dataset: { field: "source" } },
            h("span", { className: `badge ${p.model.source}` }, p.model.source)),
          warningsCell(p));
      }),
      ...failed.map((r) => h("tr", { className: "failed", dataset: { ion: r.ion,
        kind: r.answer.kind } }, h("th", { scope: "row" }, r.ion),
      h("td", { colspan: 8 }, `not predicted (${r.answer.kind}): ${r.answer.error}`))));
    $("results").hidden = false;
    const select = $("why-ion");
    const previous = select.value;
    select.replaceChildren(...ok.map(({ ion }) => h("option", { value: ion }, ion)));
    if (ok.some((r) => r.ion === previous)) select.value = previous;
    $("why").hidden = false;
    $("why-results").hidden = true;
    clearError($("why-error"));
  }

  function warningsCell(p) {
    const items = [...p.warnings];
    if (!items.length) return h("td", { dataset: { field: "warnings" } }, "—");
    return h("td", { className: "warn", dataset: { field: "warnings",
      unseen: p.unseen_elements.join(" ") } },
    h("ul", { className: "warnings" }, items.map((w) => h("li", {}, w))));
  }

  // ---------------------------------------------------------------------------- charts
  function niceTicks(lo, hi, n) {
    const raw = (hi - lo) / n;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const norm = raw / mag;
    const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
    const ticks = [];
    for (let t = Math.floor(lo / step) * step; t <= hi + step * 0.999; t += step) {
      ticks.push(Math.round(t / step) * step);
      if (t >= hi) break;
    }
    return { ticks, digits: Math.max(0, -Math.floor(Math.log10(step) + 1e-9)) };
  }

  function scale(values, minSpan) {
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    if (hi - lo < minSpan) {
      const c = (lo + hi) / 2;
      lo = c - minSpan / 2;
      hi = c + minSpan / 2;
    }
    const { ticks, digits } = niceTicks(lo, hi, 6);
    return { ticks, digits, x0: ticks[0], x1: ticks[ticks.length - 1] };
  }

  function axis(sc, X, top, bottom, label, center) {
    const parts = [];
    for (const t of sc.ticks) {
      const x = X(t).toFixed(1);
      parts.push(`<line x1="${x}" x2="${x}" y1="${top}" y2="${bottom}" stroke="#e3e7ed"/>`,
        `<text x="${x}" y="${bottom + 14}" font-size="11" text-anchor="middle" ` +
        `fill="#5b6575">${t.toFixed(sc.digits)}</text>`);
    }
    parts.push(`<text x="${center}" y="${bottom + 30}" font-size="12" text-anchor="middle" ` +
      `fill="#5b6575">${esc(label)}</text>`);
    return parts.join("");
  }

  /** Voltage per ion, sorted, with the 90% interval, DFT reference and physics voltage. */
  function ionChart(rows) {
    const W = 760, L = 56, R = 170, T = 8, RH = 32, AX = 40;
    const H = T + rows.length * RH + AX;
    const values = rows.flatMap((r) => [r.v - Z90 * r.s, r.v + Z90 * r.s, r.ref, r.phys])
      .filter((v) => typeof v === "number" && Number.isFinite(v));
    const sc = scale(values, 0.5);
    const X = (v) => L + ((v - sc.x0) / (sc.x1 - sc.x0)) * (W - L - R);
    const parts = [axis(sc, X, T, T + rows.length * RH, "voltage vs. the metal (V)", L +
      (W - L - R) / 2)];
    rows.forEach((r, i) => {
      const y = T + i * RH + RH / 2;
      const color = ionColor(r.ion);
      const lo = X(r.v - Z90 * r.s), hi = X(r.v + Z90 * r.s);
      parts.push(`<g data-ion="${esc(r.ion)}"><title>${esc(`${r.ion}: ${fmtV(r.v)} V, 90% ` +
        `interval ${fmtV(r.v - Z90 * r.s)} – ${fmtV(r.v + Z90 * r.s)} V, ${r.model}`)}</title>`,
      `<text x="${L - 10}" y="${y + 4}" font-size="13" font-weight="600" text-anchor="end" ` +
        `fill="${color}">${esc(r.ion)}</text>`,
      `<rect x="${lo.toFixed(1)}" y="${y - 4}" width="${Math.max(1, hi - lo).toFixed(1)}" ` +
        `height="8" rx="4" fill="${color}" fill-opacity="0.22"/>`,
      `<line x1="${lo.toFixed(1)}" x2="${hi.toFixed(1)}" y1="${y}" y2="${y}" stroke="${color}" ` +
        `stroke-width="1.5"/>`,
      `<circle cx="${X(r.v).toFixed(1)}" cy="${y}" r="5.5" fill="${color}"/>`);
      if (Number.isFinite(r.ref)) {
        const x = X(r.ref);
        parts.push(`<path d="M${x} ${y - 7}L${x + 6} ${y}L${x} ${y + 7}L${x - 6} ${y}Z" ` +
          `fill="#fff" stroke="#1d2430" stroke-width="1.5"><title>DFT ${fmtV(r.ref)} V</title>` +
          "</path>");
      }
      if (Number.isFinite(r.phys)) {
        const x = X(r.phys);
        parts.push(`<path d="M${x} ${y - 7}L${x + 6} ${y + 5}L${x - 6} ${y + 5}Z" fill="#fff" ` +
          `stroke="#7e22ce" stroke-width="1.5"><title>CHGNet ${fmtV(r.phys)} V</title></path>`);
      }
      parts.push(`<text x="${W - R + 12}" y="${y + 4}" font-size="13" fill="#1d2430">` +
        `${fmtV(r.v)} ± ${fmtV(r.s)} V</text></g>`);
    });
    return `<svg viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" ` +
      `aria-label="Predicted voltage per ion with 90% intervals">${parts.join("")}</svg>`;
  }

  /** Local voltage of every site, one row per element, each element in its colour. */
  function siteStrip(groups) {
    const W = 760, L = 56, R = 170, T = 8, RH = 26, AX = 40;
    const H = T + groups.length * RH + AX;
    const sc = scale(groups.flatMap((g) => g.values), 0.2);
    const X = (v) => L + ((v - sc.x0) / (sc.x1 - sc.x0)) * (W - L - R);
    const parts = [axis(sc, X, T, T + groups.length * RH, "local voltage (V)", L +
      (W - L - R) / 2)];
    groups.forEach((g, i) => {
      const y = T + i * RH + RH / 2;
      parts.push(`<text x="${L - 10}" y="${y + 4}" font-size="13" font-weight="600" ` +
        `text-anchor="end" fill="${g.color}">${esc(g.element)}</text>`);
      for (const v of g.values) {
        parts.push(`<circle cx="${X(v).toFixed(1)}" cy="${y}" r="4" fill="${g.color}" ` +
          `fill-opacity="0.55"/>`);
      }
      const m = X(g.mean).toFixed(1);
      parts.push(`<line x1="${m}" x2="${m}" y1="${y - 9}" y2="${y + 9}" stroke="${g.color}" ` +
        `stroke-width="2.5"/>`, `<text x="${W - R + 12}" y="${y + 4}" font-size="12" ` +
        `fill="#1d2430">mean ${fmtV(g.mean)} V (${g.values.length})</text>`);
    });
    return `<svg viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" ` +
      `aria-label="Local voltage of each site by element">${parts.join("")}</svg>`;
  }

  // ---------------------------------------------------------------------------- why
  async function explain() {
    const box = $("why-error");
    clearError(box);
    if (!state.single) return;
    const ion = $("why-ion").value;
    const body = { ion, ...state.single.base, explain: true };
    $("explain").disabled = true;
    $("why-busy").hidden = false;
    let p;
    try {
      p = await api("/predict", body);
    } catch (err) {
      showError(box, { kind: err.kind, message: err.message, status: err.status, label: ion });
      return;
    } finally {
      $("explain").disabled = false;
      $("why-busy").hidden = true;
    }
    if (!p.local_voltages) {
      const why = p.warnings.find((w) => w.startsWith("local voltages")) ||
        "the service returned no local voltages for this ion";
      $("why-results").hidden = true;
      showError(box, { kind: "explain", message: why, label: ion });
      return;
    }
    state.sites = p.local_voltages;
    renderWhy(ion, p);
  }

  function colorOf(element) {
    if (!state.elementColor.has(element)) {
      state.elementColor.set(element,
        ELEMENT_COLORS[state.elementColor.size % ELEMENT_COLORS.length]);
    }
    return state.elementColor.get(element);
  }

  function renderWhy(ion, p) {
    const sites = state.sites;
    const mean = sites.reduce((a, s) => a + s.local_voltage, 0) / sites.length;
    $("why-summary").replaceChildren(
      `${ion} in ${p.formula}: ${sites.length} sites, mean local voltage `,
      h("strong", { dataset: { field: "mean" } }, `${fmtV(mean)} V`),
      ` (the local head's crystal voltage); the model predicts ${fmtV(p.voltage)} V.`);
    const byElement = new Map();
    for (const s of sites) {
      if (!byElement.has(s.element)) byElement.set(s.element, []);
      byElement.get(s.element).push(s.local_voltage);
    }
    const groups = [...byElement.entries()].map(([element, values]) => ({
      element, values, color: colorOf(element),
      mean: values.reduce((a, v) => a + v, 0) / values.length,
      min: Math.min(...values), max: Math.max(...values),
    })).sort((a, b) => b.mean - a.mean);
    $("element-summary").replaceChildren(...groups.map((g) => {
      const swatch = h("span", { className: "swatch" });
      swatch.style.backgroundColor = g.color; // CSSOM: allowed by the page's CSP
      return h("div", { className: "element", dataset: { element: g.element, mean: g.mean } },
        h("div", { className: "big" }, swatch, g.element),
        h("div", {}, `${g.values.length} site${g.values.length > 1 ? "s" : ""}`),
        h("div", {}, `mean ${fmtV(g.mean)} V`),
        h("div", { className: "note" }, `${fmtV(g.min)} – ${fmtV(g.max)} V`));
    }));
    $("site-strip").innerHTML = siteStrip(groups);
    state.siteSort = { key: "site", dir: 1 };
    renderSites();
    $("why-results").hidden = false;
  }

  function renderSites() {
    const { key, dir } = state.siteSort;
    const rows = [...state.sites].sort((a, b) => {
      const x = a[key], y = b[key];
      const c = typeof x === "string" ? x.localeCompare(y) : x - y;
      return dir * c || a.site - b.site;
    });
    $("site-table").tBodies[0].replaceChildren(...rows.map((s) => {
      const swatch = h("span", { className: "swatch" });
      swatch.style.backgroundColor = colorOf(s.element);
      return h("tr", { dataset: { site: s.site, element: s.element } },
        h("td", { className: "num" }, s.site),
        h("td", {}, swatch, s.element),
        numCell("local_voltage", s.local_voltage));
    }));
    for (const th of $("site-table").tHead.rows[0].cells) {
      const k = th.querySelector("button").dataset.sort;
      th.setAttribute("aria-sort", k !== key ? "none" : dir > 0 ? "ascending" : "descending");
    }
  }

  function sortSites(key) {
    const s = state.siteSort;
    state.siteSort = { key, dir: s.key === key ? -s.dir : 1 };
    renderSites();
  }

  // ---------------------------------------------------------------------------- many structures
  function updateBatchButton() {
    $("run-batch").disabled = !state.batchFiles.length || !state.ions.some((m) => m.served);
  }

  function chooseBatchFiles(files) {
    state.batchFiles = [...files];
    const n = state.batchFiles.length;
    $("archive-note").textContent = n ? `${n} file${n > 1 ? "s" : ""} chosen: ` +
      state.batchFiles.map((f) => `${f.name} (${sizeText(f.size)})`).join(", ") : "";
    updateBatchButton();
  }

  function chunks(items) {
    const out = [];
    let current = [];
    let bytes = 0;
    items.forEach((item, i) => {
      const size = JSON.stringify(item.body).length;
      if (current.length && (current.length >= CHUNK_ITEMS || bytes + size > CHUNK_BYTES)) {
        out.push(current);
        current = [];
        bytes = 0;
      }
      current.push(i);
      bytes += size;
    });
    if (current.length) out.push(current);
    return out;
  }

  async function runBatch() {
    const box = $("batch-error");
    clearError(box);
    $("batch-results").hidden = true;
    const ions = tickedIons("batch-ion");
    if (!ions.length) {
      showError(box, { kind: "input", message: "tick at least one working ion" });
      return;
    }
    const progress = $("batch-progress");
    const status = $("batch-status");
    $("run-batch").disabled = true;
    status.textContent = "reading the files…";
    try {
      const { structures, bad } = await collectStructures(state.batchFiles);
      const items = [];
      for (const s of structures) {
        for (const ion of ions) {
          items.push({ file: s.name, ion, body: { ion, structure: s.text, format: s.format } });
        }
      }
      const results = new Array(items.length);
      progress.max = Math.max(1, items.length);
      progress.value = 0;
      progress.hidden = false;
      let done = 0;
      const tick = (n) => {
        done += n;
        progress.value = done;
        status.textContent = `${done} / ${items.length} predictions`;
      };
      tick(0);
      const run = async (idx) => {
        try {
          const out = await api("/predict_batch", idx.map((i) => items[i].body));
          out.forEach((answer, k) => { results[idx[k]] = answer; });
          tick(idx.length);
        } catch (err) {
          if (err.kind === "too_large" && idx.length > 1) { // the server's body limit: halve
            const half = Math.ceil(idx.length / 2);
            await run(idx.slice(0, half));
            await run(idx.slice(half));
            return;
          }
          for (const i of idx) {
            results[i] = { ok: false, kind: err.kind, error: err.message, status: err.status };
          }
          tick(idx.length);
        }
      };
      for (const idx of chunks(items)) await run(idx);
      renderBatch(items, results, bad, structures.length);
      if (!structures.length) {
        showError(box, { kind: "input", message: "no structure file in what was chosen; " +
          "each one is listed below with the reason" });
      }
      status.textContent = `done: ${items.length} predictions`;
      $("batch-results").dataset.done = "true";
    } finally {
      $("run-batch").disabled = false;
      updateBatchButton();
    }
  }

  function renderBatch(items, results, bad, nStructures) {
    const ok = [];
    const failedByFile = new Map();
    items.forEach((item, i) => {
      const r = results[i];
      if (r.ok) ok.push({ file: item.file, ion: item.ion, p: r.prediction });
      else {
        if (!failedByFile.has(item.file)) failedByFile.set(item.file, []);
        failedByFile.get(item.file).push({ ion: item.ion, kind: r.kind, message: r.error,
          status: r.status });
      }
    });
    ok.sort((a, b) => b.p.voltage - a.p.voltage || a.file.localeCompare(b.file));
    const notPredicted = [...bad];
    for (const [file, fails] of failedByFile) {
      const same = fails.every((f) => f.kind === fails[0].kind && f.message === fails[0].message);
      const nIons = items.filter((it) => it.file === file).length;
      if (same && fails.length === nIons) notPredicted.push({ name: file, ...fails[0] });
      else fails.forEach((f) => notPredicted.push({ name: `${file} (${f.ion})`, ...f }));
    }
    $("batch-table").tBodies[0].replaceChildren(...ok.map((r, k) => h("tr",
      { dataset: { file: r.file, ion: r.ion, rank: k + 1 } },
      h("td", { className: "num" }, k + 1),
      h("td", {}, r.file),
      h("td", {}, r.ion),
      h("td", {}, r.p.formula),
      numCell("voltage", r.p.voltage),
      numCell("uncertainty", r.p.uncertainty),
      h("td", { className: "num" }, `${fmtV(r.p.voltage - Z90 * r.p.uncertainty)} – ` +
        `${fmtV(r.p.voltage + Z90 * r.p.uncertainty)}`),
      h("td", {}, `${r.p.model.name} v${r.p.model.version} `,
        h("span", { className: `badge ${r.p.model.source}` }, r.p.model.source)),
      warningsCell(r.p))));
    $("bad-files").replaceChildren(...notPredicted.map((b) => h("li",
      { dataset: { file: b.name, kind: b.kind } }, h("span", { className: "mono" }, b.name),
      " — ", h("span", { className: "kind" }, `${KIND_TITLES[b.kind] || "Error"} (${b.kind}` +
        `${b.status ? `, HTTP ${b.status}` : ""})`), `: ${b.message}`)));
    $("bad-files-box").hidden = !notPredicted.length;
    $("batch-summary").textContent = `${ok.length} predictions from ${nStructures} structure ` +
      `file${nStructures === 1 ? "" : "s"}; ${notPredicted.length} not predicted.`;
    if (state.csvUrl) URL.revokeObjectURL(state.csvUrl);
    state.csvUrl = URL.createObjectURL(new Blob([toCsv(ok, notPredicted)],
      { type: "text/csv" }));
    $("csv").href = state.csvUrl;
    $("batch-results").hidden = false;
  }

  function csvField(value, text) {
    let s = value === null || value === undefined ? "" : String(value);
    if (text && /^[=+\-@\t\r]/.test(s)) s = `'${s}`; // no formulas when opened in a spreadsheet
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }

  function toCsv(ok, notPredicted) {
    const header = ["rank", "file", "ion", "formula", "n_sites", "voltage_V", "uncertainty_V",
      "low90_V", "high90_V", "model", "version", "source", "unseen_elements", "warnings",
      "error_kind", "error"];
    const lines = [header.join(",")];
    ok.forEach((r, k) => {
      const p = r.p;
      lines.push([k + 1, csvField(r.file, true), r.ion, csvField(p.formula, true), p.n_sites,
        p.voltage, p.uncertainty, p.voltage - Z90 * p.uncertainty,
        p.voltage + Z90 * p.uncertainty, p.model.name, p.model.version, p.model.source,
        csvField(p.unseen_elements.join(" "), true), csvField(p.warnings.join("; "), true),
        "", ""].join(","));
    });
    for (const b of notPredicted) {
      lines.push(["", csvField(b.name, true), b.ion || "", "", "", "", "", "", "", "", "", "",
        "", "", b.kind, csvField(b.message, true)].join(","));
    }
    return `${lines.join("\n")}\n`;
  }

  // ---------------------------------------------------------------------------- wiring
  function dropZone(zone, onFiles) {
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      if (e.dataTransfer && e.dataTransfer.files.length) onFiles(e.dataTransfer.files);
    });
  }

  function init() {
    // A file dropped beside a drop zone must not replace the page.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
    dropZone($("drop"), (files) => loadSingleFile(files[0]));
    dropZone($("ddrop"), (files) => loadDischargedFile(files[0]));
    dropZone($("archive-drop"), chooseBatchFiles);
    $("file").addEventListener("change", (e) => {
      if (e.target.files.length) loadSingleFile(e.target.files[0]);
    });
    $("dfile").addEventListener("change", (e) => {
      if (e.target.files.length) loadDischargedFile(e.target.files[0]);
    });
    $("dstructure").addEventListener("change", guessPhysicsIon);
    $("archive").addEventListener("change", (e) => chooseBatchFiles(e.target.files));
    for (const radio of document.querySelectorAll('input[name="source"]')) {
      radio.addEventListener("change", showSource);
    }
    $("material").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !$("predict").disabled) predictAll();
    });
    $("predict").addEventListener("click", predictAll);
    $("explain").addEventListener("click", explain);
    $("run-batch").addEventListener("click", runBatch);
    for (const button of document.querySelectorAll("#site-table th button")) {
      button.addEventListener("click", () => sortSites(button.dataset.sort));
    }
    showSource();
    loadModels(0);
    loadPhysics();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
