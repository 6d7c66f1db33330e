// ttsd status page. Polls v1/status every 2 s while the tab is visible and renders it with
// DOM nodes and textContent only: voice names, versions, reasons and folder names come from
// model folders, which are hostile input, so none of it ever reaches innerHTML.
// The bearer token (TCP listeners with --token-file) is typed in by the operator, kept in this
// tab's sessionStorage and sent in a header; the page itself never contains it. Until it is
// given (v1/status answers 401) the page shows what the listener tells anyone: healthz and
// readyz, and the control as locked.
"use strict";
(() => {
  const POLL_MS = 2000;
  const TOKEN_KEY = "ttsd-token";
  // versions an operator may activate (the daemon decides; this only hides pointless buttons)
  const ACTIVATABLE = new Set(["standby", "available", "retired", "rolled-back", "deferred"]);
  const STATES = new Set(["incomplete", "verifying", "loading", "warming", "canary", "active", "standby",
                          "available", "retired", "refused", "deferred", "rolled-back"]);
  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let timer = null;
  let control = false;
  let audioUrl = null;
  let pollGeneration = 0;  // a poll started by a button supersedes the one in flight

  // A node with text children: strings become text nodes (never parsed as HTML).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function headers(json) {
    const h = {};
    if (token) h["Authorization"] = "Bearer " + token;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  async function call(method, path, body) {
    const init = { method, headers: headers(body !== undefined), cache: "no-store" };
    if (body !== undefined) init.body = JSON.stringify(body);
    return fetch(path, init);
  }

  async function problem(resp) {
    try {
      const e = (await resp.json()).error;
      return `${resp.status} ${e.code}: ${e.message}`;
    } catch (_) {
      return `HTTP ${resp.status}`;
    }
  }

  function say(text, ok) {
    const m = $("message");
    m.textContent = text;
    m.className = ok ? "message ok" : "message";
    m.hidden = !text;
  }

  function duration(seconds) {
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s}s`;
  }

  function badge(state) {
    const cls = STATES.has(state) ? `badge s-${state}` : "badge";
    return el("span", { class: cls }, state);
  }

  function seconds(s) {
    const n = Number(s);
    if (!Number.isFinite(n)) return String(s);
    return `${n >= 10 ? Math.round(n) : n >= 0.1 ? n.toFixed(1) : n.toFixed(2)} s`;
  }

  // Versions compared as their numbers read (1.10 after 1.9); the daemon orders them by PEP 440,
  // which agrees for the plain versions model folders carry.
  function compareVersions(a, b) {
    const pa = String(a).split(/[^0-9A-Za-z]+/), pb = String(b).split(/[^0-9A-Za-z]+/);
    for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
      const x = pa[i], y = pb[i];
      if (x === undefined) return -1;
      if (y === undefined) return 1;
      if (/^\d+$/.test(x) && /^\d+$/.test(y)) {
        if (Number(x) !== Number(y)) return Number(x) < Number(y) ? -1 : 1;
      } else if (x !== y) {
        return x < y ? -1 : 1;
      }
    }
    return 0;
  }

  // The version a rollback would serve, or null when there is none. The daemon's own answer
  // ("rollback_to", when the status carries it) wins. Else: a version kept loaded for rollback
  // (standby), or failing that the newest older version still known (available, retired),
  // which is what the daemon's stack of previous versions holds after upgrades.
  function rollbackTarget(v) {
    if (Object.prototype.hasOwnProperty.call(v, "rollback_to")) return v.rollback_to ?? null;
    if (!v.active) return null;
    const others = (v.versions || []).filter((x) => x.version !== v.active);
    const older = (x) => compareVersions(x.version, v.active) < 0;
    const newest = (list) => list.slice().sort((a, b) => compareVersions(b.version, a.version))[0];
    const standby = others.filter((x) => x.state === "standby");
    if (standby.length) return (newest(standby.filter(older)) || newest(standby)).version;
    const kept = newest(others.filter((x) => (x.state === "available" || x.state === "retired") && older(x)));
    return kept ? kept.version : null;
  }

  // An in-page question (a <dialog>, so tests can answer it): true for yes; Esc or Cancel is no.
  function ask(title, text, yes) {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-yes").textContent = yes;
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
      dialog.showModal();
      $("confirm-no").focus();
    });
  }

  function controlButton(label, title, action, danger) {
    const b = el("button", { type: "button", title, class: danger ? "danger" : "" }, label);
    b.addEventListener("click", async () => {
      b.disabled = true;
      try {
        await action();
      } finally {
        b.disabled = false;
      }
    });
    return b;
  }

  async function controlCall(path, body, what) {
    try {
      const resp = await call("POST", path, body);
      if (!resp.ok) {
        say(`${what} refused: ${await problem(resp)}`);
        return;
      }
      const r = await resp.json();
      say(`${what}: ${r.voice} now serves ${r.to ?? "nothing"}` + (r.from ? ` (was ${r.from})` : ""), true);
    } catch (err) {
      say(`${what} failed: ${err}`);
    }
    poll();
  }

  const voicePath = (name, action) => `v1/voices/${encodeURIComponent(name)}/${action}`;

  function renderVoice(v) {
    const head = el("div", { class: "voice-head" },
      el("h3", {}, v.name),
      v.default ? el("span", { class: "badge" }, "default") : null,
      el("span", {}, "active ", el("b", { class: "active-version" }, v.active ?? "none")),
      v.canary ? el("span", {}, "canary ", el("b", {}, v.canary)) : null);
    const target = rollbackTarget(v);
    if (control && v.active && target !== null) {
      const active = v.active;
      // during a canary the rollback ends the canary: the active version serves every request
      const from = v.canary && target === active ? v.canary : active;
      head.append(controlButton("Roll back", `roll ${v.name} back from ${from} to ${target}`, async () => {
        const yes = await ask(`Roll back ${v.name}?`,
          from === active
            ? `${v.name} serves version ${active} now. Rolling back serves version ${target} instead, ` +
              `and marks ${active} rolled back: it does not serve again unless someone activates it.`
            : `${v.name} serves version ${active}, and ${from} as a canary. Rolling back ends the canary: ` +
              `${active} serves every request, and ${from} is marked rolled back: it does not serve again ` +
              `unless someone activates it.`,
          `Roll back to ${target}`);
        // "to": the version named above, whatever changed while the question was open
        if (yes) await controlCall(voicePath(v.name, "rollback"), { to: target }, `rollback of ${v.name}`);
      }, true));
    }
    const rows = (v.versions || []).map((ver) => {
      const actions = el("td", { class: "actions" });
      if (control && ACTIVATABLE.has(ver.state)) {
        actions.append(controlButton("Activate", `serve ${v.name} ${ver.version}`,
          () => controlCall(voicePath(v.name, "activate"), { version: ver.version },
                            `activation of ${v.name} ${ver.version}`)));
      }
      // data-label: what a cell is called when the table stacks on a narrow screen
      return el("tr", { "data-version": ver.version },
        el("td", { class: "version" }, ver.version), el("td", {}, badge(ver.state)),
        // "name (hint)" when verified against a trusted key, "unverified, key …" without trusted keys
        el("td", ver.signer ? { class: "signer", "data-label": "signed by" }
                            : { class: "signer muted", "data-label": "signed by", title: "no signature seen (unsigned, or not checked yet)" },
           ver.signer ?? "–"),
        el("td", { class: "num", "data-label": "served" }, ver.served ?? 0),
        el("td", { class: "num", "data-label": "failed" }, ver.model_failures ?? 0),
        el("td", { class: "num wide", "data-label": "in flight" }, ver.in_flight ?? 0),
        el("td", { class: "reason" }, ver.reason ?? ""), actions);
    });
    const table = el("table", { class: "stack versions" },
      el("thead", {}, el("tr", {}, el("th", {}, "version"), el("th", {}, "state"),
        el("th", { title: "the key that signed it: a trusted key's name, or unverified where the daemon has no trusted keys" }, "signed by"),
        el("th", { title: "requests served" }, "served"), el("th", { title: "failures counted against the model" }, "failed"),
        el("th", { class: "wide" }, "in flight"), el("th", {}, "reason"), el("th", {}, ""))),
      el("tbody", {}, ...rows));
    return el("div", { class: "voice", "data-voice": v.name }, head, el("div", { class: "scroll" }, table));
  }

  function renderVoiceSelect(voices) {
    const select = $("voice");
    const names = voices.map((v) => v.name);
    const have = Array.from(select.options, (o) => o.value);
    if (names.join("\n") === have.join("\n")) return;
    const chosen = select.value || (voices.find((v) => v.default) || voices[0] || {}).name;
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    if (chosen !== undefined && names.includes(chosen)) select.value = chosen;
  }

  // An audit entry ({time, voice, from, to, why, ...details}) in words: "restarted on 2",
  // "rolled back from 2 to 1", "loaded in 1.2 s".
  const SAID_BY_WHAT = new Set(["restart", "refused", "deferred", "canary failed"]);
  const WHY = { "rollback requested": "by an operator", "activate requested": "by an operator" };

  function happened(h) {
    const from = h.from ?? null, to = h.to ?? null, why = String(h.why ?? "");
    if (why === "refused") return `${to} refused`;
    if (why === "deferred") return `${to} put off (tried again later)`;
    if (why === "canary failed") return `canary ${from} failed` + (to !== null ? `, ${to} serves` : "");
    if (why.startsWith("withdrawn")) return to === null ? `${from} withdrawn` : `${from} withdrawn, ${to} serves`;
    if (from === null) return to === null ? "nothing serves" : `started serving ${to}`;
    if (to === null) return `stopped serving ${from}`;
    if (String(from) === String(to)) return why === "restart" ? `restarted on ${to}` : `serving ${to} again`;
    if (why.includes("rollback")) return `rolled back from ${from} to ${to}`;
    return `switched from ${from} to ${to}`;
  }

  function because(h) {
    const why = String(h.why ?? "");
    const parts = SAID_BY_WHAT.has(why) || !why ? [] : [WHY[why] ?? why];
    for (const [k, v] of Object.entries(h)) {
      if (["time", "voice", "from", "to", "why"].includes(k) || v === null || v === undefined) continue;
      if (k === "load_seconds") parts.push(`loaded in ${seconds(v)}`);
      else if (k === "reason") parts.push(String(v));
      else if (k.endsWith("_seconds")) parts.push(`${k.slice(0, -8).replace(/_/g, " ")}: ${seconds(v)}`);
      else parts.push(`${k.replace(/_/g, " ")}: ${typeof v === "object" ? JSON.stringify(v) : v}`);
    }
    return parts.join(" · ");
  }

  // "2026-01-01T10:00:00+0100" -> "2026-01-01 10:00:00" (the whole stamp in the tooltip)
  const when = (time) => String(time ?? "").replace("T", " ").replace(/(Z|[+-]\d\d:?\d\d)$/, "");

  // Which view shows: "data" (the status), "locked" (before the token: public health only), or
  // neither while loading. Never empty cards: the sections that need the status hide without it.
  function view(which) {
    $("auth").hidden = which !== "locked";
    for (const section of document.querySelectorAll("section.data")) section.hidden = which !== "data";
    if (which !== "data") {  // what was shown with a token goes with it
      $("folders-section").hidden = true;
      for (const id of ["voices", "box", "folders", "voice"]) $(id).replaceChildren();
      $("history").tBodies[0].replaceChildren();
    }
    document.body.dataset.view = which;
  }

  async function probe(path) {
    try {
      const resp = await fetch(path, { cache: "no-store" });  // public: no token sent
      return { status: resp.status, problem: resp.ok ? "" : await problem(resp) };
    } catch (err) {
      return { status: 0, problem: String(err.message || err) };
    }
  }

  // Before the token: /healthz and /readyz, which a guarded listener answers to anyone. Whether
  // the daemon could be reached at all.
  async function renderLocked() {
    const [health, ready] = await Promise.all([probe("healthz"), probe("readyz")]);
    const said = (ok, words) => [el("span", { class: ok ? "badge s-up" : "badge" }, words[0]),
                                 words[1] ? ` ${words[1]}` : ""];
    const up = health.status === 200 ? ["up", ""]
      : health.status === 0 ? ["unreachable", health.problem]
      : health.status === 401 ? ["unknown", "this listener tells its health to token holders only"]
      : ["unknown", health.problem];
    const serving = ready.status === 200 ? ["ready", "a voice is active"]
      : ready.status === 503 ? ["not ready", "no voice is active yet"]
      : ready.status === 401 ? ["unknown", "this listener tells its readiness to token holders only"]
      : ["unknown", ready.problem];
    $("health").replaceChildren(...said(health.status === 200, up));
    $("ready").replaceChildren(...said(ready.status === 200, serving));
    $("health").dataset.status = String(health.status);
    $("ready").dataset.status = String(ready.status);
    $("summary").textContent = health.status === 200 ? `daemon up · ${serving[0]}` : `daemon ${up[0]}`;
    return health.status !== 0;
  }

  function render(s) {
    control = !!s.control;
    $("summary").textContent = [s.version, s.pid && `pid ${s.pid}`, `up ${duration(s.uptime ?? 0)}`]
      .filter(Boolean).join(" · ");
    const voices = s.voices || [];
    $("voices").replaceChildren(...(voices.length ? voices.map(renderVoice)
                                                    : [el("p", { class: "muted" }, "no voices yet")]));
    renderVoiceSelect(voices);
    const q = s.queue || {}, r = s.requests || {};
    const facts = [["uptime", duration(s.uptime ?? 0)],
      ["queue", `${q.waiting ?? 0} waiting, ${q.running ?? 0} running` + (q.capacity ? ` (room for ${q.capacity})` : "")],
      ["requests", `${r.completed ?? 0} completed, ${r.failed ?? 0} failed, ${r.refused ?? 0} refused, ${r.cancelled ?? 0} cancelled`],
      ["workers", s.workers ?? "?"], ["models dir", s.models ?? ""],
      ["control", control ? "rollback and activate allowed here" : "read-only listener (no --token-file)"]];
    $("box").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    view("data");
    const folders = s.folders || [];
    $("folders-section").hidden = folders.length === 0;
    $("folders").replaceChildren(...folders.map((f) =>
      el("li", {}, badge(f.state), " ", el("code", {}, f.folder), f.reason ? ` — ${f.reason}` : "")));
    const history = (s.history || []).slice().reverse();
    $("history").tBodies[0].replaceChildren(...history.map((h) => el("tr", {},
      el("td", { class: "time", title: h.time ?? "" }, when(h.time)), el("td", { class: "who" }, h.voice ?? ""),
      el("td", { class: "what" }, happened(h)), el("td", { class: "reason" }, because(h)))));
  }

  async function poll() {
    clearTimeout(timer);
    timer = null;
    const generation = ++pollGeneration;
    const live = $("live");
    try {
      const resp = await call("GET", "v1/status");
      // after each wait: a newer poll (a token just typed, an action's) owns the page
      const superseded = () => generation !== pollGeneration;
      if (resp.status === 401) {
        // not an error: this listener shows its status to token holders only
        const refused = token ? `the token was refused: ${await problem(resp)}` : "";
        if (superseded()) return;
        view("locked");
        $("token-drop").hidden = true;
        const reachable = await renderLocked();
        if (superseded()) return;
        live.className = reachable ? "live locked" : "live stale";
        live.textContent = reachable ? " locked" : " daemon unreachable";
        if (refused) say(refused);
      } else if (!resp.ok) {
        live.className = "live stale";
        live.textContent = ` ${await problem(resp)}`;
      } else {
        const status = await resp.json();
        if (superseded()) return;
        render(status);
        live.className = "live";
        live.textContent = "";
        $("token-drop").hidden = !token;
      }
    } catch (err) {
      live.className = "live stale";
      live.textContent = ` daemon unreachable (${err.message || err})`;
    }
    if (generation === pollGeneration && !document.hidden) timer = setTimeout(poll, POLL_MS);
  }

  // Speak streams: raw 16-bit PCM ("format": "pcm", "stream": true, the rate in X-Ttsd-Sample-Rate)
  // read from the body as it arrives and played with Web Audio, each piece scheduled right after
  // the one before on one AudioContext. An <audio> element cannot do this (it cannot play a WAV
  // still arriving through fetch(), and Media Source Extensions take no WAV or PCM), and it could
  // not send the token, which goes in a header. Raw PCM needs no codec and no CSP change: the
  // samples never leave this script. At the end the same bytes become a WAV in the <audio>
  // element and a download link, which is also how the page plays where Web Audio is refused.
  const LEAD_S = 0.1;  // the first piece starts this far ahead, so the next has time to arrive
  let audioContext;  // undefined: not tried yet; null: this browser refused Web Audio
  let playing = [];  // the sources of the last Speak, stopped by the next one

  function webAudio() {
    if (audioContext === undefined) {
      try {
        audioContext = new (window.AudioContext || window.webkitAudioContext)();
      } catch (_) {
        audioContext = null;
      }
    }
    // made or resumed in the click's handler: autoplay rules let a user gesture start audio
    if (audioContext && audioContext.state === "suspended") audioContext.resume().catch(() => {});
    return audioContext;
  }

  // Little-endian 16-bit samples -> Float32 in [-1, 1).
  function floats(bytes) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const out = new Float32Array(bytes.byteLength >> 1);
    for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
    return out;
  }

  // A 16-bit mono WAV of the received PCM, for the <audio> element and the download link.
  function wav(pieces, rate) {
    const size = pieces.reduce((n, p) => n + p.byteLength, 0);
    const head = new DataView(new ArrayBuffer(44));
    const text = (at, s) => { for (let i = 0; i < s.length; i++) head.setUint8(at + i, s.charCodeAt(i)); };
    text(0, "RIFF"); head.setUint32(4, 36 + size, true); text(8, "WAVE");
    text(12, "fmt "); head.setUint32(16, 16, true); head.setUint16(20, 1, true); head.setUint16(22, 1, true);
    head.setUint32(24, rate, true); head.setUint32(28, rate * 2, true); head.setUint16(32, 2, true);
    head.setUint16(34, 16, true); text(36, "data"); head.setUint32(40, size, true);
    return new Blob([head, ...pieces], { type: "audio/wav" });
  }

  async function speak(event) {
    event.preventDefault();
    const button = $("speak"), info = $("speak-info"), save = $("speak-save"), audio = $("audio");
    button.disabled = true;
    info.textContent = "synthesizing…";
    for (const key of Object.keys(info.dataset)) delete info.dataset[key];
    save.hidden = true;
    audio.pause();
    for (const source of playing) source.stop();
    playing = [];
    const ctx = webAudio();
    const started = performance.now();
    const since = () => (performance.now() - started) / 1000;
    const pieces = [];  // whole samples as they came, for the WAV at the end
    let rate = 0, carry = null, next = 0, scheduled = 0, chunks = 0, firstAudio = null, who = "";
    const shown = (what) => {
      info.textContent = `${who}: ${what}` + (firstAudio === null ? "" : `, first audio after ${firstAudio.toFixed(2)} s`);
    };
    try {
      const resp = await call("POST", "v1/synthesize", { text: $("text").value, voice: $("voice").value || undefined,
                                                        format: "pcm", stream: true });
      if (!resp.ok) {
        info.textContent = `refused: ${await problem(resp)}`;
        info.dataset.state = "refused";
        return;
      }
      rate = parseInt(resp.headers.get("X-Ttsd-Sample-Rate"), 10);
      who = `${resp.headers.get("X-Ttsd-Voice")} ${resp.headers.get("X-Ttsd-Version")}`;
      if (!(rate > 0)) throw new Error("the answer has no X-Ttsd-Sample-Rate");
      const reader = resp.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        let bytes = value;
        if (carry !== null) {  // the odd byte of the last piece begins this one's first sample
          bytes = new Uint8Array(value.byteLength + 1);
          bytes[0] = carry;
          bytes.set(value, 1);
          carry = null;
        }
        if (bytes.byteLength % 2) {
          carry = bytes[bytes.byteLength - 1];
          bytes = bytes.subarray(0, bytes.byteLength - 1);
        }
        if (!bytes.byteLength) continue;
        pieces.push(bytes);
        chunks += 1;
        if (ctx) {
          const samples = floats(bytes);
          const buffer = ctx.createBuffer(1, samples.length, rate);  // played at the context's rate
          buffer.copyToChannel(samples, 0);
          const source = ctx.createBufferSource();
          source.buffer = buffer;
          source.connect(ctx.destination);
          const at = Math.max(next, ctx.currentTime + (firstAudio === null ? LEAD_S : 0.02));
          source.start(at);
          playing.push(source);
          next = at + buffer.duration;
          scheduled += samples.length / rate;
          if (firstAudio === null) {
            firstAudio = since();
            info.dataset.firstAudio = firstAudio.toFixed(3);
            info.dataset.firstBytes = String(bytes.byteLength);  // what had arrived when it was scheduled
          }
          info.dataset.scheduled = scheduled.toFixed(3);
        }
        shown("streaming…");
      }
      const total = since(), bytes = pieces.reduce((n, p) => n + p.byteLength, 0);
      Object.assign(info.dataset, { total: total.toFixed(3), chunks: String(chunks), bytes: String(bytes),
                                   rate: String(rate) });
      if (audioUrl) URL.revokeObjectURL(audioUrl);
      audioUrl = URL.createObjectURL(wav(pieces, rate));
      audio.src = save.href = audioUrl;
      save.hidden = false;
      shown(`${(bytes / 2 / rate).toFixed(2)} s of audio in ${total.toFixed(2)} s` +
            (ctx ? "" : " (no Web Audio in this browser: played once complete)"));
      // Web Audio refused or held suspended: the <audio> element plays it (or its controls will)
      if (!ctx || ctx.state !== "running") audio.play().catch(() => { /* autoplay refused */ });
      info.dataset.state = "done";
    } catch (err) {
      info.textContent = `failed: ${err.message || err}` + (pieces.length ? " (the audio was cut off)" : "");
      info.dataset.state = "failed";
    } finally {
      button.disabled = false;
    }
  }

  function useToken(event) {
    event.preventDefault();
    token = $("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    say("");
    poll();
  }

  function forgetToken() {
    token = "";
    $("token-drop").hidden = true;
    sessionStorage.removeItem(TOKEN_KEY);
    say("");
    poll();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("speak-form").addEventListener("submit", speak);
    $("token-form").addEventListener("submit", useToken);
    $("token-forget").addEventListener("click", forgetToken);
    $("token-drop").addEventListener("click", forgetToken);
    $("confirm-yes").addEventListener("click", () => $("confirm").close("yes"));
    $("confirm-no").addEventListener("click", () => $("confirm").close("no"));
    document.addEventListener("visibilitychange", () => {
      if (document.hidden) {
        clearTimeout(timer);
        timer = null;
      } else {
        poll();
      }
    });
    poll();
  });
})();
