// ttsd status page. Polls v1/status every 2 s while the tab is visible and renders it with
// DOM nodes and textContent only: voice names, versions, reasons and folder names come from
// model folders, which are hostile input, so none of it ever reaches innerHTML.
// The bearer token (TCP listeners with --token-file) is typed in by the operator, kept in this
// tab's sessionStorage and sent in a header; the page itself never contains it.
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
  let lastGood = null;
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
      say(`${what}: ${r.voice} ${r.from ?? "–"} → ${r.to ?? "–"}`, true);
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
    if (control && v.active) {
      head.append(controlButton("Roll back", `roll ${v.name} back to its previous version`,
        () => controlCall(voicePath(v.name, "rollback"), {}, `rollback of ${v.name}`), true));
    }
    const rows = (v.versions || []).map((ver) => {
      const actions = el("td", {});
      if (control && ACTIVATABLE.has(ver.state)) {
        actions.append(controlButton("Activate", `serve ${v.name} ${ver.version}`,
          () => controlCall(voicePath(v.name, "activate"), { version: ver.version },
                            `activation of ${v.name} ${ver.version}`)));
      }
      return el("tr", { "data-version": ver.version },
        el("td", {}, ver.version), el("td", {}, badge(ver.state)),
        el("td", { class: "num" }, ver.served ?? 0), el("td", { class: "num" }, ver.model_failures ?? 0),
        el("td", { class: "num wide" }, ver.in_flight ?? 0),
        el("td", { class: "reason" }, ver.reason ?? ""), actions);
    });
    const table = el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "version"), el("th", {}, "state"),
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

  function details(entry) {
    return Object.entries(entry)
      .filter(([k]) => !["time", "voice", "from", "to", "why"].includes(k))
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
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
    const folders = s.folders || [];
    $("folders-section").hidden = folders.length === 0;
    $("folders").replaceChildren(...folders.map((f) =>
      el("li", {}, badge(f.state), " ", el("code", {}, f.folder), f.reason ? ` — ${f.reason}` : "")));
    const history = (s.history || []).slice().reverse();
    $("history").tBodies[0].replaceChildren(...history.map((h) => el("tr", {},
      el("td", {}, h.time ?? ""), el("td", {}, h.voice ?? ""), el("td", {}, h.from ?? "–"),
      el("td", {}, h.to ?? "–"), el("td", {}, h.why ?? ""), el("td", { class: "reason" }, details(h)))));
  }

  async function poll() {
    clearTimeout(timer);
    timer = null;
    const generation = ++pollGeneration;
    const live = $("live");
    try {
      const resp = await call("GET", "v1/status");
      if (resp.status === 401) {
        $("auth").hidden = false;
        live.className = "live stale";
        live.textContent = lastGood ? ` token needed (data from ${lastGood.toLocaleTimeString()})` : " token needed";
        if (token) say(`the token was refused: ${await problem(resp)}`);
      } else if (!resp.ok) {
        live.className = "live stale";
        live.textContent = ` ${await problem(resp)}`;
      } else {
        render(await resp.json());
        lastGood = new Date();
        live.className = "live";
        live.textContent = "";
        $("auth").hidden = true;
        $("token-drop").hidden = !token;
      }
    } catch (err) {
      live.className = "live stale";
      live.textContent = ` daemon unreachable (${err.message || err})`;
    }
    if (generation === pollGeneration && !document.hidden) timer = setTimeout(poll, POLL_MS);
  }

  // Whole WAV, not streamed: an <audio> element cannot play a WAV that is still arriving through
  // fetch() (Media Source Extensions take no WAV or PCM), and the token has to go in a header,
  // so the element cannot fetch the API itself. The page's texts are short; the first audio of a
  // long text is what streaming clients (ttsd say, the API) are for.
  async function speak(event) {
    event.preventDefault();
    const button = $("speak"), info = $("speak-info");
    button.disabled = true;
    info.textContent = "synthesizing…";
    const started = performance.now();
    try {
      const resp = await call("POST", "v1/synthesize",
                              { text: $("text").value, voice: $("voice").value || undefined, format: "wav" });
      if (!resp.ok) {
        info.textContent = `refused: ${await problem(resp)}`;
        return;
      }
      const blob = await resp.blob();
      if (audioUrl) URL.revokeObjectURL(audioUrl);
      audioUrl = URL.createObjectURL(blob);
      const audio = $("audio");
      audio.src = audioUrl;
      const secs = ((performance.now() - started) / 1000).toFixed(2);
      info.textContent = `${resp.headers.get("X-Ttsd-Voice")} ${resp.headers.get("X-Ttsd-Version")}: ` +
        `${resp.headers.get("X-Ttsd-Audio-Seconds")} s of audio in ${secs} s`;
      audio.play().catch(() => { /* autoplay refused: the controls are there */ });
    } catch (err) {
      info.textContent = `failed: ${err}`;
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
