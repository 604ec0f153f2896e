/* cdp web console: one page, hash routes, everything through the MSA's REST API.
 *
 * The API token lives in sessionStorage (gone with the tab) and goes out only as the
 * Authorization header of same-origin requests; never in a URL. Every piece of data is
 * put on the page as text (textContent, createElement): never innerHTML. Pages poll
 * every POLL_MS while the tab is visible.
 */
"use strict";
(() => {
  const TOKEN_KEY = "cdp.console.token";
  const POLL_MS = 2000;
  const JOB_POLL_MS = 1000;
  const HOUR_S = 3600;
  const POINTS_EVERY_MS = 10000; // the catalog is read from the store: not at every poll
  // The API's NAME (cdp.tomlread.NAME): never "." or "..", which a URL's dot segments would
  // resolve away (`/v1/failover/./cleanup` is fetched as `/v1/failover/cleanup`).
  const NAME_PATTERN = "(?!\\.\\.?$)[A-Za-z0-9._\\-]{1,64}"; // an <input pattern> (anchored; valid with the v flag)
  const NAME_RE = new RegExp(`^(?:${NAME_PATTERN})$`, "u");
  const NAME_EXPECTED = "1 to 64 characters A-Z, a-z, 0-9, '.', '_' or '-', and not '.' or '..'";
  const validName = (name) => typeof name === "string" && NAME_RE.test(name);
  const SVG_NS = "http://www.w3.org/2000/svg";

  const main = document.getElementById("main");
  const nav = document.getElementById("nav");
  const pollState = document.getElementById("poll-state");
  const siteName = document.getElementById("site-name");
  let page = null; // {refresh: async () => void}
  let refreshing = false;

  // ------------------------------------------------------------------ API

  class ApiFailure extends Error {
    constructor(status, message, field) {
      super(message);
      this.status = status;
      this.field = field || null;
    }
  }

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + (token() || "") };
    const init = { method, headers, cache: "no-store", credentials: "omit", redirect: "error" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    let doc = null;
    try {
      doc = await resp.json();
    } catch (err) {
      doc = null;
    }
    if (resp.status === 401) {
      signOut("The API refused the token (401 Unauthorized). Sign in again.");
      throw new ApiFailure(401, "unauthorized");
    }
    if (!resp.ok) {
      const e = doc && doc.error ? doc.error : {};
      throw new ApiFailure(resp.status, `${resp.status} ${e.code || resp.statusText}: ${e.message || ""}`, e.field);
    }
    return doc;
  }

  const enc = encodeURIComponent;

  // ------------------------------------------------------------------ DOM helpers

  function el(tag, props, ...kids) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === undefined || kid === null || kid === false) continue;
      node.append(typeof kid === "string" || typeof kid === "number" ? String(kid) : kid);
    }
    return node;
  }

  function svg(tag, attrs, ...kids) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "text") node.textContent = String(value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    for (const kid of kids.flat(Infinity)) if (kid) node.append(kid);
    return node;
  }

  const dash = "—";
  const show = (v) => (v === undefined || v === null || v === "" ? dash : String(v));

  function fmtBytes(n) {
    if (typeof n !== "number") return dash;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  const fmtRate = (n) => (typeof n === "number" ? fmtBytes(n) + "/s" : dash);
  const fmtSeconds = (s) => (typeof s === "number" ? `${s < 10 ? s.toFixed(2) : s.toFixed(0)} s` : dash);
  const fmtPct = (r) => (typeof r === "number" ? `${(r * 100).toFixed(1)} %` : dash);

  function fmtTime(ns) {
    if (typeof ns !== "number" || !ns) return dash;
    return new Date(ns / 1e6).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function table(caption, columns, rows, empty) {
    if (!rows.length) return el("p", { class: "muted", text: empty || "None." });
    const head = el("tr", {}, columns.map((c) => el("th", { scope: "col", text: c })));
    const body = rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c instanceof Node ? c : show(c)))));
    // A region that may scroll sideways (phone width): focusable, so a keyboard can scroll it.
    return el("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": caption },
      el("table", {}, el("caption", { text: caption }), el("thead", {}, head), el("tbody", {}, body)));
  }

  function field(label, input, hint) {
    const id = input.id || `f-${Math.random().toString(36).slice(2, 10)}`;
    input.id = id;
    return el("div", { class: "field" }, el("label", { for: id, text: label }), input,
      hint ? el("span", { class: "hint muted", text: hint }) : null);
  }

  function section(title, ...kids) {
    return el("section", { class: "card" }, el("h2", { text: title }), ...kids);
  }

  function badge(ok, yes, no) {
    return el("span", { class: ok ? "badge ok" : "badge bad", text: ok ? yes : no });
  }

  // ------------------------------------------------------------------ confirmation, jobs

  const dialog = document.getElementById("confirm");

  function confirmAction(title, message) {
    if (dialog.open) return Promise.resolve(false); // one question at a time
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-text").textContent = message;
    return new Promise((resolve) => {
      const ok = document.getElementById("confirm-ok");
      const cancel = document.getElementById("confirm-cancel");
      const done = (answer) => {
        ok.removeEventListener("click", yes);
        cancel.removeEventListener("click", no);
        dialog.removeEventListener("cancel", no);
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      const yes = () => done(true);
      const no = () => done(false);
      ok.addEventListener("click", yes);
      cancel.addEventListener("click", no);
      dialog.addEventListener("cancel", no);
      dialog.showModal();
      cancel.focus();
    });
  }

  function jobLine(job, inTable) {
    const p = job.progress || {};
    const share = typeof p.total === "number" && p.total > 0 && typeof p.done === "number" ? p.done / p.total : null;
    const bar = el("progress", { max: 1, "aria-label": `job ${job.id} progress` });
    if (share !== null) bar.value = Math.min(1, share);
    else if (job.state !== "running") bar.value = 1;
    return el("span", { class: `job job-${job.state}`, dataset: { job: job.id, state: job.state } },
      inTable ? null : el("a", { href: "#/jobs", text: `${job.name} ${job.id}` }), " ",
      el("strong", { text: job.state }), " ",
      job.state === "running" ? bar : null, p.phase ? ` ${p.phase}` : "",
      share !== null ? ` ${p.done}/${p.total}` : "", job.error ? ` — ${job.error}` : "");
  }

  // Follow a job in `out` until it ends or `out` leaves the page.
  async function followJob(id, out, onEnd) {
    while (out.isConnected) {
      let job;
      try {
        job = await api("GET", `/v1/jobs/${enc(id)}`);
      } catch (err) {
        out.replaceChildren(el("span", { class: "error", text: err.message }));
        return;
      }
      out.replaceChildren(jobLine(job));
      if (job.state !== "running") {
        if (onEnd) onEnd(job);
        return;
      }
      await new Promise((r) => setTimeout(r, JOB_POLL_MS));
    }
  }

  // Confirm, call the API, show the answer (a job is followed) in `out`.
  async function act(out, title, message, method, path, body, onEnd) {
    if (!(await confirmAction(title, message))) {
      out.replaceChildren(el("span", { class: "muted", text: `${title}: cancelled.` }));
      return;
    }
    out.replaceChildren(el("span", { text: `${title}: sent…` }));
    try {
      const doc = await api(method, path, body);
      if (doc && typeof doc.id === "string" && doc.state) {
        await followJob(doc.id, out, onEnd);
      } else {
        out.replaceChildren(el("span", { class: "done", dataset: { done: "1" }, text: `${title}: done.` }));
        if (onEnd) onEnd(doc);
      }
    } catch (err) {
      out.replaceChildren(el("span", { class: "error", role: "alert", text: `${title} failed: ${err.message}` }));
    }
  }

  function actionOut() {
    return el("p", { class: "action-out", "aria-live": "polite" });
  }

  // ------------------------------------------------------------------ sign-in

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    siteName.textContent = "";
    signInPage(message);
  }

  function signInPage(message) {
    page = null;
    nav.hidden = true;
    const input = el("input", { type: "password", id: "token", name: "token", autocomplete: "off", required: true,
                                spellcheck: "false" });
    const error = el("p", { id: "signin-error", class: "error", role: "alert" });
    if (message) error.textContent = message;
    const form = el("form", { id: "signin", class: "card", "aria-labelledby": "signin-title" },
      el("h2", { id: "signin-title", text: "API token" }),
      el("p", { class: "muted", text: "The token of the site's API ([api] token_env). It is kept for this tab only." }),
      field("API token", input), el("button", { type: "submit", class: "primary", text: "Sign in" }), error);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      error.textContent = "";
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = "";
      try {
        await api("GET", "/v1/status");
      } catch (err) {
        if (err.status !== 401) {
          sessionStorage.removeItem(TOKEN_KEY);
          error.textContent = `Sign-in failed: ${err.message}`;
        }
        return;
      }
      if (!location.hash || location.hash === "#/signin") location.hash = "#/site";
      route();
      siteTitle();
    });
    main.replaceChildren(el("h1", { text: "Sign in" }), form);
    input.focus();
  }

  // ------------------------------------------------------------------ site

  function sitePage() {
    const body = el("div", { class: "grid" });
    const protectOut = actionOut();
    const policy = policyInputs();
    const domainIn = el("input", { type: "text", pattern: NAME_PATTERN, required: true });
    const protectForm = el("form", { class: "card" }, el("h2", { text: "Protect a domain" }),
      el("div", { class: "fields" }, field("Domain", domainIn, "A domain of the site's inventory"), ...policy.fields),
      el("button", { type: "submit", class: "primary", text: "Protect…" }), protectOut);
    protectForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const name = domainIn.value.trim();
      const doc = policy.value();
      act(protectOut, "Protect", `Protect domain ${name} with ${policyText(doc)}: its DRVA restarts to serve it and ` +
        "ships its writes to the store from now on.", "POST", `/v1/domains/${enc(name)}/protect`, doc);
    });
    main.replaceChildren(el("h1", { text: "Site" }), body, protectForm);

    return {
      async refresh() {
        const st = await api("GET", "/v1/status");
        const drvas = st.drvas.map((d) => [d.name, d.listen, badge(d.up, "up", d.state), fmtPct(d.log_usage_ratio),
          `${fmtBytes(d.log_used_bytes)} of ${fmtBytes(d.log_size_bytes)}`,
          d.backpressure ? badge(false, "", "back-pressure") : "no", seedUploads(d.seed_uploads), d.restarts,
          (d.domains || []).join(", ")]);
        const domains = st.domains.map((d) => {
          const s = d.status || {};
          return [el("a", { href: `#/domain/${enc(d.name)}`, text: d.name }), d.drva, fmtSeconds(s.rpo_lag_s),
            fmtSeconds(d.policy.rpo_target_s), show(s.filter_mode), fmtRate((d.throughput || {}).received_bytes_per_s),
            d.failed_over ? `runs at ${d.failed_over.site}` : "here", d.alarms.length];
        });
        const vms = st.vms.map((v) => [v.domain, v.host, show(v.state), show((v.status || {}).acked_seq),
          v.domain && !st.domains.some((d) => d.name === v.domain) ? "not protected here" : "protected"]);
        const peer = st.peer
          ? [["site", st.peer.site], ["API", st.peer.api], ["store", st.peer_store || "this site's store"]]
          : [["peer", "none configured"]];
        const failed = Object.entries(st.failed_over || {}).map(([name, w]) => [name, w.site, w.timeline, w.fork_seq]);
        body.replaceChildren(
          section("This site", dl([["site", st.site], ["API", st.api], ["store", st.store],
            ["jobs running", st.jobs_running], ["active alarms", st.alarms.length]])),
          section("Peer site", dl(peer)),
          section("DRVAs", table("DRVAs of this site", ["DRVA", "listen", "state", "log usage", "log", "back-pressure",
            "seed uploads", "restarts", "domains"], drvas)),
          section("Store lanes", table("Store lanes of this site's DRVAs", ["DRVA", "store", "domains",
            "frame budget held", "waiting for it"], laneRows(st), "No DRVA reports its store lanes.")),
          section("Protected domains", table("Protected domains", ["domain", "DRVA", "RPO lag", "target", "mode",
            "received", "runs", "alarms"], domains, "No domain is protected here.")),
          section("VMs running here", table("Powered-on domains", ["domain", "host", "state", "acked seq", "protection"], vms,
            "No VM runs here.")),
          section("Failed over elsewhere", table("Domains another site owns now", ["domain", "site", "timeline",
            "fork seq"], failed, "None.")));
      },
    };
  }

  // A DRVA's seed upload slots (its status's seed_uploads): used of all, and the sessions
  // waiting for one; a dash from a DRVA that does not report them.
  function seedUploads(slots) {
    if (!slots) return dash;
    const waiting = slots.sessions_waiting ? `, ${slots.sessions_waiting} waiting` : "";
    return `${show(slots.slots_used)} of ${show(slots.slots)}${waiting}`;
  }

  // Each DRVA's store lanes with their frame budgets. Sessions that keep waiting while the
  // held bytes stay near the maximum: the lane's store (or a full log) holds the DRVA back.
  // A lane lists its domains by id: shown by name where the site's domains have it.
  function laneRows(st) {
    const names = new Map(st.domains.map((d) => [d.id, d.name]));
    return st.drvas.flatMap((d) => (d.lanes || []).map((lane) => [d.name, lane.store,
      (lane.domains || []).map((i) => names.get(i) || String(i)).join(", ") || dash,
      `${fmtBytes(lane.frame_budget_held_bytes)} of ${fmtBytes(lane.frame_budget_bytes_max)}`,
      lane.frame_budget_sessions_waiting
        ? badge(false, "", `${lane.frame_budget_sessions_waiting} sessions, ${fmtBytes(lane.frame_budget_waiting_bytes)}`)
        : "none"]));
  }

  function dl(pairs) {
    return el("dl", { class: "facts" }, pairs.map(([k, v]) => [el("dt", { text: k }),
      el("dd", {}, v instanceof Node ? v : show(v))]));
  }

  function policyInputs() {
    const inputs = {
      rpo_target_s: el("input", { type: "number", min: "1", step: "any", placeholder: "policy" }),
      retention: el("input", { type: "text", placeholder: "e.g. 72h", pattern: "^[0-9.]+[smhdw]?$" }),
      consolidate_after: el("input", { type: "text", placeholder: "e.g. 1h", pattern: "^[0-9.]+[smhdw]?$" }),
      consolidate_every: el("input", { type: "text", placeholder: "e.g. 15m", pattern: "^[0-9.]+[smhdw]?$" }),
    };
    const labels = { rpo_target_s: "RPO target (s)", retention: "Retention", consolidate_after: "Consolidate after",
                     consolidate_every: "Consolidate every" };
    return {
      fields: Object.entries(inputs).map(([k, input]) => field(labels[k], input)),
      value() {
        const doc = {};
        for (const [k, input] of Object.entries(inputs)) {
          const v = input.value.trim();
          if (v) doc[k] = k === "rpo_target_s" ? Number(v) : v;
        }
        return doc;
      },
    };
  }

  function policyText(doc) {
    const parts = Object.entries(doc).map(([k, v]) => `${k} ${v}`);
    return parts.length ? `policy ${parts.join(", ")} (the rest as the site file says)` : "the site file's policy";
  }

  // ------------------------------------------------------------------ domain

  function chart(title, seriesSpec, unit, fmt) {
    const box = el("div", { class: "chart-box" });
    const caption = el("figcaption", { class: "muted" });
    const figure = el("figure", { class: "chart", dataset: { samples: "0" } }, el("h3", { text: title }), box, caption);
    let plot = null;
    function width() {
      return Math.max(260, Math.floor(box.clientWidth || figure.clientWidth || 600));
    }
    function draw(data, summary) {
      figure.dataset.samples = String(data[0].length);
      figure.dataset.last = String(data[0].length ? data[0][data[0].length - 1] : 0);
      caption.textContent = summary;
      if (typeof window.uPlot !== "function") return;
      if (!plot) {
        const axis = { stroke: "#1a1a1a", grid: { stroke: "#e3e3e3" }, ticks: { stroke: "#c8c8c8" } };
        plot = new window.uPlot({
          width: width(), height: 200, legend: { show: false }, cursor: { drag: { x: false, y: false } },
          scales: { x: { time: true } },
          series: [{}, ...seriesSpec.map((s) => ({ label: s.label, stroke: s.color, width: s.width || 2,
            dash: s.dash, value: (u, v) => fmt(v), spanGaps: false, points: { show: false } }))],
          axes: [axis, { ...axis, size: 86, values: (u, vals) => vals.map((v) => fmt(v)) }],
        }, data, box);
        plot.root.setAttribute("aria-hidden", "true"); // the caption says it in words
      } else {
        plot.setData(data);
      }
    }
    function resize() {
      if (plot) plot.setSize({ width: width(), height: 200 });
    }
    const legend = el("p", { class: "legend" }, seriesSpec.map((s) =>
      el("span", { class: "key" }, el("span", { class: `swatch ${s.swatch}` }), s.label)));
    figure.insertBefore(legend, caption);
    return { figure, draw, resize };
  }

  function domainPage(name) {
    const facts = el("div");
    const rpo = chart("RPO lag, last hour", [
      { label: "RPO lag", color: "#1f5fbf", swatch: "blue" },
      { label: "RPO target", color: "#b3261e", dash: [6, 4], width: 1.5, swatch: "red" }], "seconds",
    (v) => (v === null || v === undefined ? "" : fmtSeconds(v)));
    const tput = chart("Throughput, last hour", [
      { label: "received", color: "#1f7a3a", swatch: "green" },
      { label: "uploaded", color: "#6b3fa0", swatch: "purple" }], "per second",
    (v) => (v === null || v === undefined ? "" : fmtRate(v)));
    const hist = { t: [], lag: [], rx: [], up: [], since: 0 };
    let points = null;
    let pointsAt = 0;
    const out = actionOut();
    const markIn = el("input", { type: "text", pattern: NAME_PATTERN, required: true, placeholder: "before-upgrade" });
    const deepIn = el("input", { type: "checkbox" });
    const policy = policyInputs();
    const path = `/v1/domains/${enc(name)}`;

    const markForm = el("form", { class: "inline" }, field("Mark name", markIn),
      el("button", { type: "submit", text: "Place a mark…" }));
    markForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const mark = markIn.value.trim();
      act(out, "Mark", `Place mark "${mark}" in domain ${name}'s stream, after every write acknowledged so far; ` +
        "it becomes a named recovery point once committed.", "POST", `${path}/marks`, { name: mark });
    });
    const policyForm = el("form", { class: "inline" }, ...policy.fields,
      el("button", { type: "submit", text: "Protect / change policy…" }));
    policyForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const doc = policy.value();
      act(out, "Protect", `Protect domain ${name} with ${policyText(doc)}; its DRVA may restart.`, "POST",
        `${path}/protect`, doc);
    });
    const buttons = el("div", { class: "buttons" },
      el("button", { type: "button", text: "Consolidate…", onclick: () => act(out, "Consolidate",
        `Roll domain ${name}'s old segments into a new base and apply retention with its policy.`, "POST",
        `${path}/consolidate`, {}) }),
      el("label", { class: "check" }, deepIn, " deep"),
      el("button", { type: "button", text: "Verify…", onclick: () => act(out, "Verify",
        `Check domain ${name}'s objects in the store${deepIn.checked ? ", reading every payload (deep)" : ""}.`,
        "POST", `${path}/verify`, { deep: deepIn.checked }) }),
      el("button", { type: "button", class: "danger", text: "Unprotect…", onclick: () => act(out, "Unprotect",
        `Stop protecting domain ${name}: its writes are no longer shipped (its DRVA restarts without it). ` +
        "Its recovery points stay in the store until retention.", "POST", `${path}/unprotect`, {}) }));

    main.replaceChildren(el("h1", { text: `Domain ${name}` }),
      el("p", {}, el("a", { href: `#/points/${enc(name)}`, text: "Recovery points on a time axis →" })),
      facts, el("section", { class: "card charts" }, el("h2", { text: "History" }), rpo.figure, tput.figure),
      section("Actions", markForm, buttons, policyForm, out));
    const onResize = () => { rpo.resize(); tput.resize(); };
    window.addEventListener("resize", onResize);

    return {
      dispose() { window.removeEventListener("resize", onResize); },
      async refresh() {
        const [st, h] = await Promise.all([api("GET", "/v1/status"),
          api("GET", `${path}/history?since_ns=${hist.since}`)]);
        if (Date.now() - pointsAt > POINTS_EVERY_MS) {
          pointsAt = Date.now();
          // Only what this page shows (the current timeline, how many there are): no marks.
          points = await api("GET", `${path}/points?limit=0`).catch((err) => ({ error: err.message }));
        }
        const s = h.samples;
        for (let i = 0; i < s.t_ns.length; i += 1) {
          hist.t.push(s.t_ns[i] / 1e9);
          hist.lag.push(s.rpo_lag_s[i]);
          hist.rx.push(s.received_bytes_per_s[i]);
          hist.up.push(s.uploaded_bytes_per_s[i]);
          hist.since = s.t_ns[i];
        }
        const cut = h.time_ns / 1e9 - HOUR_S;
        let drop = 0;
        while (drop < hist.t.length && hist.t[drop] < cut) drop += 1;
        if (drop) for (const k of ["t", "lag", "rx", "up"]) hist[k].splice(0, drop);
        const target = h.rpo_target_s;
        const lagNow = hist.lag.length ? hist.lag[hist.lag.length - 1] : null;
        rpo.draw([hist.t.slice(), hist.lag.slice(), hist.t.map(() => target)],
          `${hist.t.length} samples; RPO lag now ${fmtSeconds(lagNow)}, target ${fmtSeconds(target)}` +
          (typeof lagNow === "number" && typeof target === "number" && lagNow > target ? " — ABOVE TARGET" : ""));
        tput.draw([hist.t.slice(), hist.rx.slice(), hist.up.slice()],
          `received ${fmtRate(hist.rx[hist.rx.length - 1])}, uploaded ${fmtRate(hist.up[hist.up.length - 1])}`);
        const d = st.domains.find((x) => x.name === name);
        const s2 = (d && d.status) || {};
        const fo = (d && d.failed_over) || (st.failed_over || {})[name];
        const tl = points && !points.error ? points.current_timeline : null;
        facts.replaceChildren(section("State", dl([
          ["protected", d ? badge(true, "yes", "") : badge(false, "", "no")],
          ["RPO lag", fmtSeconds(s2.rpo_lag_s)], ["RPO target", fmtSeconds(d ? d.policy.rpo_target_s : null)],
          ["mode", show(s2.filter_mode)], ["received", fmtRate(d && d.throughput.received_bytes_per_s)],
          ["uploaded", fmtRate(d && d.throughput.uploaded_bytes_per_s)],
          ["committed seq", show(s2.committed_seq)], ["DRVA", d ? d.drva : dash],
          ["timeline", tl === null ? dash : `${tl} (of ${points.timelines.length})`],
          ["failover", fo ? `runs at site ${fo.site} now (timeline ${fo.timeline})` :
            s2.fenced ? "fenced" : "runs here"],
          ["alarms", d && d.alarms.length ? d.alarms.join(", ") : "none"]])));
      },
    };
  }

  // ------------------------------------------------------------------ the time axis

  // Known (seq, ts) pairs of one timeline, for placing its seqs in time: its windows'
  // ends, its marks, and its start (seq 0, or its fork, when it was created).
  function seqTimes(t) {
    const pairs = [];
    if (t.created_ns) pairs.push([t.parent ? t.fork_seq || 0 : 0, t.created_ns]);
    for (const w of t.consistent || []) {
      if (w.first_ts) pairs.push([w.first_seq, w.first_ts]);
      if (w.last_ts) pairs.push([w.last_seq, w.last_ts]);
    }
    for (const m of t.marks || []) if (m.ts) pairs.push([m.seq, m.ts]);
    pairs.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    return pairs;
  }

  function interp(pairs, x, from, to) {
    if (!pairs.length) return null;
    if (x <= pairs[0][from]) return pairs[0][to];
    for (let i = 1; i < pairs.length; i += 1) {
      const a = pairs[i - 1];
      const b = pairs[i];
      if (x <= b[from]) {
        if (b[from] === a[from]) return b[to];
        return a[to] + ((x - a[from]) * (b[to] - a[to])) / (b[from] - a[from]);
      }
    }
    return pairs[pairs.length - 1][to];
  }

  // An SVG of every timeline's points; clicking picks a point: onPick({seq, ts, timeline} | {mark, ...}).
  function timeAxis(doc, picked, onPick, widthPx) {
    const timelines = doc.timelines || [];
    const maps = new Map(timelines.map((t) => [t.timeline, seqTimes(t)]));
    const all = [...maps.values()].flat();
    if (!all.length) return el("p", { class: "muted", text: "No recovery point with a time yet." });
    const tsOf = (t, seq) => interp(maps.get(t.timeline), seq, 0, 1);
    const seqOf = (t, ts) => Math.round(interp(maps.get(t.timeline).slice().sort((a, b) => a[1] - b[1]), ts, 1, 0));
    let t0 = Math.min(...all.map((p) => p[1]));
    let t1 = Math.max(...all.map((p) => p[1]));
    if (t1 - t0 < 1e9) t1 = t0 + 1e9;
    const pad = (t1 - t0) * 0.03;
    t0 -= pad;
    t1 += pad;
    const W = Math.max(320, Math.round(widthPx || 1000)); // user units = CSS pixels: text stays legible
    const left = W < 600 ? 100 : 150;
    const rowH = 46;
    const H = 30 + rowH * timelines.length;
    const x = (ts) => left + ((ts - t0) / (t1 - t0)) * (W - left - 10);
    const tsAt = (px) => t0 + ((px - left) / (W - left - 10)) * (t1 - t0);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "axis", role: "img",
      "aria-label": `Recovery points of domain ${doc.domain.name} from ${fmtTime(t0)} to ${fmtTime(t1)}` });
    const ticks = W < 600 ? 2 : 4;
    for (let i = 0; i <= ticks; i += 1) {
      const ts = t0 + ((t1 - t0) * i) / ticks;
      root.append(svg("line", { x1: x(ts), x2: x(ts), y1: 18, y2: H, class: "tick" }),
        svg("text", { x: x(ts), y: 12, "text-anchor": i === 0 ? "start" : i === ticks ? "end" : "middle",
          class: "tick-label", text: fmtTime(ts).slice(11, 19) }));
    }
    const rowY = new Map();
    timelines.forEach((t, i) => rowY.set(t.timeline, 30 + i * rowH));
    for (const t of timelines) {
      const y = rowY.get(t.timeline);
      const g = svg("g", { class: t.current ? "tl current" : "tl", "data-timeline": t.timeline });
      g.append(svg("text", { x: 4, y: y + 16, class: "row-label",
        text: `timeline ${t.timeline}${t.current ? " *" : ""}` }),
      svg("text", { x: 4, y: y + 32, class: "row-sub", text: `${t.owner}, ${t.segments} seg.` }));
      if (!maps.get(t.timeline).length) { // nothing of it has a time yet
        root.append(g);
        continue;
      }
      const spanA = tsOf(t, Math.max(t.horizon_seq, t.fork_seq || 0));
      const spanB = tsOf(t, t.committed_seq);
      if (spanA !== null && spanB !== null) {
        g.append(svg("rect", { x: x(spanA), y: y + 4, width: Math.max(1, x(spanB) - x(spanA)), height: 26,
          class: "span" }, svg("title", { text: `retained span: seq ${t.horizon_seq}..${t.committed_seq}, ` +
          `${t.segments} segments` })));
      }
      for (const w of t.consistent || []) {
        const a = tsOf(t, w.first_seq);
        const b = tsOf(t, w.last_seq);
        g.append(svg("rect", { x: x(a), y: y + 8, width: Math.max(2, x(b) - x(a)), height: 18, class: "win" },
          svg("title", { text: `consistent: seq ${w.first_seq}..${w.last_seq}, ${fmtTime(w.first_ts)} .. ` +
            fmtTime(w.last_ts) })));
      }
      for (const w of t.not_consistent || []) {
        const a = tsOf(t, w.first_seq);
        const b = w.last_seq === null ? t1 : tsOf(t, w.last_seq);
        g.append(svg("rect", { x: x(a), y: y + 8, width: Math.max(2, x(b) - x(a)), height: 18, class: "nc" },
          svg("title", { text: `NOT consistent (${w.kind}): seq ${w.first_seq}..${show(w.last_seq)}` })));
      }
      const baseSeqs = [...new Set((t.bases || []).map((b) => b.seq))];
      for (const seq of baseSeqs) {
        const bx = x(tsOf(t, seq));
        g.append(svg("rect", { x: bx - 4, y: y + 30, width: 8, height: 8, class: "base", "data-base": seq },
          svg("title", { text: `base at seq ${seq}` })));
      }
      for (const m of t.marks || []) {
        const mx = x(m.ts || tsOf(t, m.seq));
        g.append(svg("g", { class: m.consistent ? "mark" : "mark bad", "data-mark": m.name,
          onclick: (ev) => { ev.stopPropagation(); onPick({ mark: m.name, seq: m.seq, ts: m.ts, timeline: t.timeline }); } },
        svg("line", { x1: mx, x2: mx, y1: y + 2, y2: y + 32 }),
        svg("path", { d: `M${mx - 5},${y} L${mx + 5},${y} L${mx},${y + 7} Z` }),
        svg("title", { text: `mark ${m.name}: seq ${m.seq}, ${fmtTime(m.ts)}${m.consistent ? "" : " (not consistent)"}` })));
      }
      if (t.parent && rowY.has(t.parent) && t.fork_seq) {
        const fx = x(tsOf(timelines.find((p) => p.timeline === t.parent), t.fork_seq));
        root.append(svg("path", { d: `M${fx},${rowY.get(t.parent) + 26} L${fx},${y + 8}`, class: "fork" },
          svg("title", { text: `timeline ${t.timeline} forked from ${t.parent} at seq ${t.fork_seq}` })));
      }
      root.append(g);
    }
    const current = timelines.find((tl) => tl.current);
    const latestTs = current && current.latest !== null ? tsOf(current, current.latest) : null;
    const pickedTs = picked && picked.latest ? latestTs : picked && picked.ts;
    if (pickedTs) {
      const px = x(pickedTs);
      root.append(svg("line", { x1: px, x2: px, y1: 18, y2: H, class: "picked" }));
    }
    root.addEventListener("click", (ev) => {
      const box = root.getBoundingClientRect();
      const px = ((ev.clientX - box.left) / box.width) * W;
      const py = ((ev.clientY - box.top) / box.height) * H;
      if (px < left) return;
      const t = timelines.find((tl) => py >= rowY.get(tl.timeline) && py < rowY.get(tl.timeline) + rowH) ||
        timelines.find((tl) => tl.current);
      if (!t) return;
      let seq = seqOf(t, tsAt(px));
      const wins = t.consistent || [];
      const inside = wins.find((w) => seq >= w.first_seq && seq <= w.last_seq);
      if (!inside && wins.length) { // the nearest consistent point
        let best = null;
        for (const w of wins) {
          for (const s of [w.first_seq, w.last_seq]) if (best === null || Math.abs(s - seq) < Math.abs(best - seq)) best = s;
        }
        seq = best;
      }
      if (!wins.length) return;
      onPick({ seq, ts: tsOf(t, seq), timeline: t.timeline });
    });
    return root;
  }

  function targetOf(pick) {
    if (!pick || pick.latest) return "latest";
    if (pick.mark) return { mark: pick.mark };
    return { seq: pick.seq };
  }

  function pickText(pick) {
    if (!pick || pick.latest) return "the latest point";
    if (pick.mark) return `mark "${pick.mark}" (seq ${pick.seq}, ${fmtTime(pick.ts)})`;
    return `seq ${pick.seq} (about ${fmtTime(pick.ts)}) on timeline ${pick.timeline}`;
  }

  // The axis, a list of marks (keyboard pick) and the picked point, kept across refreshes.
  function pointsView(pathOf) {
    const state = { doc: null, pick: { latest: true } };
    const axisBox = el("div", { class: "axis-box", id: "time-axis", tabindex: "0", role: "region",
                                "aria-label": "Time axis of the recovery points" });
    const pickedOut = el("p", { class: "picked-out", "aria-live": "polite" });
    const marksBox = el("div");
    const legend = el("p", { class: "legend" }, el("span", { class: "key" }, el("span", { class: "swatch green" }),
      "consistent"), el("span", { class: "key" }, el("span", { class: "swatch red" }), "not consistent"),
    el("span", { class: "key" }, el("span", { class: "swatch grey" }), "retained span (segments)"),
    el("span", { class: "key" }, el("span", { class: "swatch dark" }), "base"),
    el("span", { class: "key" }, el("span", { class: "swatch blue" }), "mark"));
    const latestBtn = el("button", { type: "button", text: "Pick the latest point",
      onclick: () => pick({ latest: true }) });
    function pick(p) {
      state.pick = p;
      draw();
    }
    function draw() {
      if (!state.doc) return;
      axisBox.replaceChildren(timeAxis(state.doc, state.pick, pick, axisBox.clientWidth));
      pickedOut.textContent = `Picked: ${pickText(state.pick)}`;
      const rows = [];
      for (const t of state.doc.timelines || []) {
        for (const m of t.marks || []) {
          rows.push([m.name, t.timeline, m.seq, fmtTime(m.ts), m.consistent ? "yes" : "no",
            el("button", { type: "button", text: "Pick", "aria-label": `Pick mark ${m.name}`,
              onclick: () => pick({ mark: m.name, seq: m.seq, ts: m.ts, timeline: t.timeline }) })]);
        }
      }
      const tls = (state.doc.timelines || []).map((t) => [t.timeline, t.owner, show(t.parent), show(t.fork_seq),
        t.current ? "yes" : "no", t.committed_seq, t.segments, (t.consistent || []).map((w) =>
          `${w.first_seq}..${w.last_seq}`).join(", ")]);
      // The API gives each timeline's newest marks (at most 1,000): say when there are more.
      const cut = (state.doc.timelines || []).filter((t) => t.marks_next_before_seq !== null &&
        t.marks_next_before_seq !== undefined).map((t) => `timeline ${t.timeline}: the newest ` +
        `${(t.marks || []).length} of its ${t.marks_total} marks are shown (cdp points lists them all)`);
      marksBox.replaceChildren(
        table("Timelines", ["timeline", "owner", "parent", "fork seq", "current", "committed seq", "segments",
          "consistent seqs"], tls),
        table("Marks", ["mark", "timeline", "seq", "time", "consistent", "pick"], rows, "No marks."),
        ...cut.map((text) => el("p", { class: "muted marks-cut", text: `${text}.` })));
    }
    const node = el("div", {}, legend, axisBox, el("div", { class: "buttons" }, latestBtn), pickedOut, marksBox);
    let drawnWidth = 0;
    const onResize = () => { // redrawn at the new width: text in the axis stays at its size
      if (node.isConnected && axisBox.clientWidth !== drawnWidth) {
        drawnWidth = axisBox.clientWidth;
        draw();
      }
    };
    window.addEventListener("resize", onResize);
    return {
      node,
      state,
      dispose() { window.removeEventListener("resize", onResize); },
      async load() {
        state.doc = await api("GET", pathOf());
        draw();
      },
      clear(message) {
        state.doc = null;
        axisBox.replaceChildren(el("p", { class: "muted", text: message }));
        marksBox.replaceChildren();
        pickedOut.textContent = "";
      },
    };
  }

  function pointsPage(name) {
    const path = `/v1/domains/${enc(name)}`;
    const view = pointsView(() => `${path}/points`);
    const out = actionOut();
    const markIn = el("input", { type: "text", pattern: NAME_PATTERN, required: true, id: "mark-name" });
    const markForm = el("form", { class: "inline" }, field("Mark name", markIn),
      el("button", { type: "submit", text: "Place a mark…" }));
    markForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const mark = markIn.value.trim();
      act(out, "Mark", `Place mark "${mark}" in domain ${name}'s stream, after every write acknowledged so far.`,
        "POST", `${path}/marks`, { name: mark }, () => view.load());
    });
    const dirIn = el("input", { type: "text", required: true, placeholder: "/srv/recovered/erp", id: "recover-dir" });
    const recoverForm = el("form", { class: "inline" }, field("Directory on the MSA's host", dirIn),
      el("button", { type: "submit", text: "Recover at the picked point…" }));
    recoverForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const to = dirIn.value.trim();
      act(out, "Recover", `Rebuild domain ${name}'s disks at ${pickText(view.state.pick)} into ${to} on the ` +
        "MSA's host (under the site's recovery_roots). Nothing else changes.", "POST", `${path}/recover`,
      { target: targetOf(view.state.pick), to });
    });
    main.replaceChildren(el("h1", { text: `Recovery points of ${name}` }),
      el("p", {}, el("a", { href: `#/domain/${enc(name)}`, text: `← Domain ${name}` })),
      section("Time axis", el("p", { class: "muted", text: "Click the axis or a mark to pick a point." }), view.node),
      section("Actions", markForm, recoverForm, out));
    let at = 0;
    return {
      dispose: view.dispose,
      async refresh() {
        if (Date.now() - at < POINTS_EVERY_MS && view.state.doc) return;
        at = Date.now();
        await view.load();
      },
    };
  }

  // ------------------------------------------------------------------ failover

  function failoverPage(initial) {
    const nameIn = el("input", { type: "text", pattern: NAME_PATTERN, required: true, id: "failover-domain",
                                 value: initial || "" });
    const out = actionOut();
    const view = pointsView(() => `/v1/failover/${enc(nameIn.value.trim())}/points`);
    const here = el("div");
    const form = el("form", { class: "inline" }, field("Domain (as the store knows it)", nameIn),
      el("button", { type: "submit", text: "Show its points" }));
    const dom = () => nameIn.value.trim();
    const refused = () => `"${dom()}" is not a domain name: expected ${NAME_EXPECTED}.`;
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      if (!validName(dom())) view.clear(refused());
      else if (dom() !== initial) location.hash = `#/failover/${enc(dom())}`;
      else view.load().catch((err) => view.clear(err.message));
    });
    // The buttons are outside the form, so its pattern does not stop them: each checks the
    // name before it asks for confirmation, let alone sends anything.
    const checked = (action) => () => {
      if (validName(dom())) return action();
      out.replaceChildren(el("span", { class: "error", role: "alert", text: refused() }));
      return undefined;
    };
    const fpath = () => `/v1/failover/${enc(dom())}`;
    const buttons = el("div", { class: "buttons" },
      el("button", { type: "button", text: "Test failover…", onclick: checked(() => act(out, "Test failover",
        `Bring domain ${dom()}'s VMs up at this site from ${pickText(view.state.pick)}, isolated: nothing is ` +
        "written to the store and the protected site keeps replicating. Clean it up afterwards.", "POST", fpath(),
      { mode: "test", target: targetOf(view.state.pick) })) }),
      el("button", { type: "button", text: "Clean up test failover…", onclick: checked(() => act(out, "Clean up",
        `Remove the test failover of domain ${dom()}: power its VMs off here, unregister them and their ` +
        "on-demand hosts, delete its test area.", "POST", `${fpath()}/cleanup`, {})) }),
      el("button", { type: "button", class: "danger", text: "Failover…", onclick: checked(() => act(out, "Failover",
        `FAIL OVER domain ${dom()} to this site at ${pickText(view.state.pick)}: its timeline forks there, the ` +
        "other site is fenced for good, its VMs start here and are protected on the new timeline. Writes after " +
        "that point are not carried over.", "POST", fpath(), { mode: "unplanned", target: targetOf(view.state.pick) },
      () => view.load())) }),
      el("button", { type: "button", class: "danger", text: "Planned failover…", onclick: checked(() => act(out,
        "Planned failover", `Planned failover of domain ${dom()}: the peer site quiesces it, places a final ` +
        "mark, and this site takes it over at that mark with no loss.", "POST", fpath(), { mode: "planned" },
      () => view.load())) }),
      el("button", { type: "button", class: "danger", text: "Failback…", onclick: checked(() => act(out, "Failback",
        `Fail domain ${dom()} back to this site from the site it failed over to: that site quiesces it, only ` +
        "the regions that differ are copied here, this site protects it on a new timeline and powers it on.",
        "POST", `/v1/failback/${enc(dom())}`, {}, () => view.load())) }));
    main.replaceChildren(el("h1", { text: "Failover and failback" }), section("Domain", form),
      section("Points in the store", view.node), section("Actions", buttons, out), here);
    if (!initial) view.clear("Name a domain to see its points.");
    let loaded = !initial;
    return {
      dispose: view.dispose,
      async refresh() {
        if (!loaded) {
          loaded = true;
          await view.load().catch((err) => view.clear(err.message));
        }
        const st = await api("GET", "/v1/status");
        const protectedHere = new Set(st.domains.map((d) => d.name));
        const vms = st.vms.map((v) => [v.domain, v.host, show(v.state),
          protectedHere.has(v.domain) ? "protected here" : "not protected (a test failover's VMs are isolated)"]);
        here.replaceChildren(section("VMs running at this site", table("VMs running here",
          ["domain", "host", "state", "protection"], vms, "No VM runs here.")));
      },
    };
  }

  // ------------------------------------------------------------------ alarms, jobs

  function alarmsPage() {
    const body = el("div");
    main.replaceChildren(el("h1", { text: "Alarms" }), body);
    const rows = (list, cleared) => list.map((a) => [el("span", { class: `sev sev-${a.severity}`, text: a.severity }),
      a.kind, `${a.subject_kind} ${a.subject}`, a.message, fmtTime(a.raised_ns), cleared ? fmtTime(a.cleared_ns) : null]
      .filter((c) => c !== null));
    return {
      async refresh() {
        const doc = await api("GET", "/v1/alarms");
        body.replaceChildren(
          section("Active", table("Active alarms", ["severity", "kind", "subject", "message", "raised"],
            rows(doc.active, false), "No active alarm.")),
          section("Cleared", table("Recently cleared alarms", ["severity", "kind", "subject", "message", "raised",
            "cleared"], rows(doc.recent.slice().reverse(), true), "None cleared recently.")));
      },
    };
  }

  function jobsPage() {
    const body = el("div");
    main.replaceChildren(el("h1", { text: "Jobs" }), body);
    return {
      async refresh() {
        const doc = await api("GET", "/v1/jobs?limit=50");
        const rows = doc.jobs.map((j) => {
          const args = j.args || {};
          const ended = j.ended_ns ? ((j.ended_ns - j.created_ns) / 1e9).toFixed(1) + " s" : "running";
          return [el("span", {}, el("strong", { text: j.name }), el("br"), el("span", { class: "muted small",
            text: j.id })), args.domain || args.kind || dash, jobLine(j, true), fmtTime(j.created_ns), ended];
        });
        body.replaceChildren(section("Recent jobs", table("Jobs, newest first", ["job", "subject",
          "state and progress", "started", "took"], rows, "No jobs yet.")));
      },
    };
  }

  // ------------------------------------------------------------------ routing, polling

  const routeOf = (pattern) => new RegExp(`^${pattern.replaceAll("NAME", `(${NAME_PATTERN})`)}$`, "u");
  const ROUTES = [
    [routeOf("#/site"), sitePage], [routeOf("#/domain/NAME"), domainPage],
    [routeOf("#/points/NAME"), pointsPage], [routeOf("#/alarms"), alarmsPage], [routeOf("#/jobs"), jobsPage],
    [routeOf("#/failover(?:/NAME)?"), failoverPage],
  ];

  function route() {
    if (page && page.dispose) page.dispose();
    page = null;
    delete main.dataset.ready;
    if (!token()) {
      signInPage();
      return;
    }
    nav.hidden = false;
    let hash = location.hash || "#/site";
    let found = ROUTES.find(([re]) => re.test(hash));
    if (!found) {
      hash = "#/site";
      found = ROUTES[0];
    }
    const arg = hash.match(found[0])[1];
    for (const a of nav.querySelectorAll("a")) {
      if (hash.startsWith(a.getAttribute("href"))) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    page = found[1](arg === undefined ? undefined : decodeURIComponent(arg));
    tick();
  }

  async function tick() {
    if (!page || refreshing || document.hidden || !token()) return;
    refreshing = true;
    const current = page;
    try {
      await current.refresh();
      if (current === page) {
        pollState.textContent = `Updated ${new Date().toISOString().slice(11, 19)} UTC`;
        main.dataset.ready = location.hash || "#/site"; // the page has its data (tests wait for this)
      }
    } catch (err) {
      if (err.status !== 401) pollState.textContent = `Update failed: ${err.message}`;
    } finally {
      refreshing = false;
    }
  }

  async function siteTitle() {
    try {
      const st = await api("GET", "/v1/status");
      siteName.textContent = `site ${st.site}`;
    } catch (err) {
      siteName.textContent = "";
    }
  }

  document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", () => {
    route();
    if (token() && !siteName.textContent) siteTitle();
  });
  setInterval(tick, POLL_MS);
  route();
  if (token()) siteTitle();
  window.cdpConsole = { tick }; // tests and curious operators: refresh now
})();
