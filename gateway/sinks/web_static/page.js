// Live updates for the status page: apply Server-Sent Events to the server-rendered cells.
// Every text from the server goes through textContent, never innerHTML (tag names and error
// messages come from config files and devices).
"use strict";
(() => {
  const QN = ["GOOD", "UNCERTAIN", "BAD"];
  const rows = new Map(); // tag key -> {tr, dev, val, qb, why, age, ts}
  for (const tr of document.querySelectorAll("tr[data-k]")) {
    const ts = parseFloat(tr.dataset.ts);
    rows.set(tr.dataset.k, {
      tr,
      dev: tr.closest("article[data-d]").dataset.d,
      val: tr.querySelector(".val"),
      qb: tr.querySelector(".qb"),
      why: tr.querySelector(".why"),
      age: tr.querySelector(".a"),
      ts: Number.isFinite(ts) ? ts : null,
    });
  }
  const devices = new Map(); // device name -> {el, f: {field: element}, ls, lets, le}
  for (const el of document.querySelectorAll("article[data-d]")) {
    const f = {};
    for (const x of el.querySelectorAll("[data-f]")) f[x.dataset.f] = x;
    devices.set(el.dataset.d, { el, f, ls: null, lets: null, le: "", brk: null });
  }
  const sinks = new Map();
  for (const el of document.querySelectorAll("[data-sink]")) sinks.set(el.dataset.sink, el);

  const $ = (id) => document.getElementById(id);
  const banner = $("conn");
  let skew = 0; // server clock minus browser clock, seconds
  let lastMsg = 0;

  const setText = (el, text) => {
    if (el && el.textContent !== text) el.textContent = text;
  };
  const fmtAge = (s) => {
    s = Math.max(0, Math.floor(s));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h ago";
  };
  const now = () => Date.now() / 1000 + skew;
  // The device's own error is shown once, above its table, not under each of its tags.
  const why = (reason, detail, deviceError) => {
    const label = reason.replace(/_/g, " ");
    return detail && detail !== deviceError ? label + ": " + detail : label;
  };

  function applyTag(key, row) {
    const r = rows.get(key);
    if (!r) return;
    const [text, q, reason, detail, ts] = row;
    setText(r.val, text);
    const cls = "qb q" + q;
    if (r.qb.className !== cls) {
      r.qb.className = cls;
      r.tr.dataset.q = String(q);
    }
    setText(r.qb, QN[q]);
    const dev = devices.get(r.dev);
    setText(r.why, why(reason, detail, dev ? dev.le : ""));
    r.ts = ts;
    setText(r.age, ts === null ? "—" : fmtAge(now() - ts));
  }

  // The same rule as _fmt_breaker in web.py.
  function breakerText(b) {
    let text = { closed: "closed", open: "OPEN", half_open: "probing" }[b.brk] || b.brk;
    if (b.brk === "open" && b.np !== null) {
      text += " · probe in " + Math.max(0, Math.ceil(b.np - now())) + " s";
    }
    if (!b.trips) return text;
    return text + " (" + b.trips + (b.trips === 1 ? " trip)" : " trips)");
  }

  function lastError(d) {
    if (!d.le) return "";
    return (d.lets === null ? "" : fmtAge(now() - d.lets) + ": ") + d.le;
  }

  function applyDevice(name, d) {
    const dev = devices.get(name);
    if (!dev) return;
    const f = dev.f;
    const cls = "badge big st-" + d.state;
    if (f.state.className !== cls) f.state.className = cls;
    setText(f.state, d.state.toUpperCase());
    dev.el.dataset.state = d.state;
    dev.ls = d.ls;
    dev.lets = d.lets;
    dev.le = d.le;
    setText(f.ls, d.ls === null ? "never" : fmtAge(now() - d.ls));
    setText(f.dur, d.dur);
    setText(f.polls, d.good + " / " + d.polls);
    setText(f.over, String(d.over));
    setText(f.errors, d.errors);
    dev.brk = { brk: d.brk, np: d.np, trips: d.trips };
    if (f.brk) {
      setText(f.brk, breakerText(dev.brk));
      f.brk.classList.toggle("warntext", d.brk !== "closed");
    }
    setText(f.skip, String(d.skip));
    if (f.line && d.line.length) {
      const dds = f.line.querySelectorAll("dd");
      setText(dds[0], d.line[0]);
      setText(dds[1], d.line[1]);
      f.line.classList.toggle("warn", !d.line[2]);
    }
    f.le.hidden = !d.le;
    setText(f.le, lastError(d));
  }

  function applyHealth(h) {
    for (const [name, el] of sinks) {
      const entry = h[name];
      if (!entry) continue;
      el.classList.remove("muted");
      for (const x of el.querySelectorAll("[data-f]")) {
        const v = entry[x.dataset.f];
        if (v === undefined) continue;
        if (x.dataset.kind === "conn") {
          const cls = "badge " + (v === true ? "ok" : v === false ? "bad" : "idle");
          if (x.className !== cls) x.className = cls;
          setText(x, v === true ? "CONNECTED" : v === false ? "DISCONNECTED" : "—");
        } else if (x.dataset.kind === "sync") {
          // The same table as _SYNC_BADGE in web.py.
          const [cls, text] = v === true ? ["ok", "SYNCED"] : v === false ? ["bad", "NOT SYNCED"] : ["idle", "UNKNOWN"];
          if (x.className !== "badge " + cls) x.className = "badge " + cls;
          setText(x, text);
        } else if (x.dataset.kind === "secs") {
          // The same rule as _fmt_secs in web.py.
          setText(x, typeof v !== "number" ? "—" : v < 120 ? v.toFixed(0) + " s" : (v / 60).toFixed(0) + " min");
        } else {
          setText(x, v === null ? "—" : String(v));
        }
      }
    }
  }

  function apply(m) {
    skew = m.t - Date.now() / 1000;
    setText($("uptime"), fmtAge(m.up).replace(/ ago$/, ""));
    setText($("n-on"), String(m.s.on));
    setText($("n-all"), String(m.s.n));
    const ok = $("gw-ok");
    ok.className = "badge " + (m.ok ? "ok" : "bad");
    setText(ok, m.ok ? "OK" : "NOT OK");
    for (let i = 0; i < 3; i++) setText($("q" + i), String(m.q[i]));
    applyHealth(m.h);
    for (const name in m.d) applyDevice(name, m.d[name]);
    for (const key in m.g) applyTag(key, m.g[key]);
  }

  // Ages move every second even when no value changes.
  function tickAges() {
    const t = now();
    for (const r of rows.values()) {
      if (r.ts !== null) setText(r.age, fmtAge(t - r.ts));
    }
    for (const d of devices.values()) {
      if (d.ls !== null) setText(d.f.ls, fmtAge(t - d.ls));
      if (d.le) setText(d.f.le, lastError(d));
      if (d.brk && d.brk.brk === "open" && d.f.brk) setText(d.f.brk, breakerText(d.brk));
    }
    // A stream can stall without an error (a dead Wi-Fi link): say so after a few seconds.
    if (lastMsg && Date.now() - lastMsg > 5000) banner.hidden = false;
  }

  let es = null;
  function connect() {
    es = new EventSource("api/stream");
    es.onmessage = (ev) => {
      lastMsg = Date.now();
      banner.hidden = true;
      document.body.classList.remove("offline");
      apply(JSON.parse(ev.data));
    };
    es.onerror = () => {
      banner.hidden = false;
      document.body.classList.add("offline");
      // The browser retries by itself unless the answer was not a stream (a proxy's 502, or
      // a 401 once the login ended): then it gives up, and we start over, or reload into
      // the login form.
      if (es.readyState === EventSource.CLOSED) {
        fetch("api/status", { cache: "no-store" })
          .then((r) => {
            if (r.status === 401) location.reload();
            else setTimeout(connect, 3000);
          })
          .catch(() => setTimeout(connect, 3000));
      }
    };
  }
  connect();
  setInterval(tickAges, 1000);

  // Forms that change something ask first (a certificate to trust, say).
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (ev) => {
      if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
    });
  }
})();
