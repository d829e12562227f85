// portsd status page: live updates without reloading. Plain JS, no framework, no build step.
//
// The server renders the whole page; this script only keeps it current:
// - it listens to the daemon's server-sent events (body[data-events]); on an event it fetches
//   the sections the event can change from /ui/fragments (server-rendered HTML) and swaps
//   them in, keeping open <details>, focus and the live logs;
// - it follows the log of each running build (pre[data-follow], a streamed text/plain body)
//   into its <pre>, a few at a time (a browser allows only 6 connections to a host);
// - it reconnects by itself, and refreshes everything after a reconnect (events were missed);
// - both streams are read by a worker (static/events.js), started once the page has loaded.
"use strict";

(() => {
  const body = document.body;
  const fragmentsUrl = body.dataset.fragments;
  const eventsUrl = body.dataset.events;
  const live = document.getElementById("live");

  const ALL = ["status", "running", "plan", "graph", "failures", "history"];
  // Which sections an event can change, from its kind and data.
  const EFFECTS = {
    evaluation: () => ["status", "plan", "graph", "history"],
    build: (data) =>
      data.state === undefined && data.step !== undefined
        ? ["running"] // a running build moved to its next step
        : ["status", "running", "plan", "graph", "failures", "history"],
    status: () => ["status", "running"],
    log: () => [],
  };
  const DELAY = 120; // ms to gather a burst of events into one request
  const RETRY = 3000; // ms before asking again for sections a failed request did not bring
  const MAX_STREAMS = 3; // live logs at once: with the event stream, 4 of 6 connections
  const LOG_LIMIT = 200000; // characters kept in a followed log's <pre>
  const ANSI = /\x1b\[[0-9;?]*[ -/]*[@-~]/g;

  const streams = new Map(); // build id -> {pre, size, first}
  window.portsd = { refreshes: 0, connected: false };

  // -- sections ------------------------------------------------------------------------

  // One channel fetches at most one request at a time and gathers what is asked meanwhile;
  // a failed request is tried again a little later. The graph has its own channel: a slow
  // `dot` never delays the other sections.
  function channel() {
    const dirty = new Set();
    let timer = null;
    let busy = false;
    const later = (delay) => {
      if (timer === null) timer = setTimeout(run, delay);
    };
    const run = () => {
      timer = null;
      if (busy || dirty.size === 0) return;
      const names = [...dirty];
      dirty.clear();
      busy = true;
      refresh(names)
        .then(() => {
          busy = false;
          if (dirty.size) later(DELAY);
        })
        .catch((error) => {
          busy = false;
          names.forEach((name) => dirty.add(name));
          if (window.portsd.connected) live.textContent = `Live (an update failed: ${error.message})`;
          later(RETRY);
        });
    };
    return (names) => {
      names.forEach((name) => dirty.add(name));
      if (!busy) later(DELAY);
    };
  }
  const sectionsChannel = channel();
  const graphChannel = channel();

  function schedule(names) {
    const rest = names.filter((name) => name !== "graph");
    if (rest.length) sectionsChannel(rest);
    if (rest.length !== names.length) graphChannel(["graph"]);
  }

  async function refresh(names) {
    const query = new URLSearchParams({ sections: names.join(",") });
    const history = document.getElementById("history");
    if (history && names.includes("history")) query.set("history", history.dataset.offset || "0");
    const response = await fetch(`${fragmentsUrl}?${query}`, {
      headers: { Accept: "application/json" },
      cache: "no-store",
    });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const parts = await response.json();
    for (const name of names) {
      if (typeof parts[name] === "string") swap(name, parts[name]);
    }
    window.portsd.refreshes += 1;
    if (window.portsd.connected) live.textContent = "Live";
  }

  function swap(name, html) {
    const old = document.getElementById(name);
    if (!old) return;
    const template = document.createElement("template");
    template.innerHTML = html;
    const fresh = template.content.firstElementChild;
    if (!fresh || fresh.id !== name) return;
    // What the reader opened stays open.
    for (const details of old.querySelectorAll("details[open][id]")) {
      const twin = fresh.querySelector(`#${CSS.escape(details.id)}`);
      if (twin) twin.open = true;
    }
    // Live logs move over as they are, stream and scroll position included.
    const scrolls = new Map();
    for (const pre of fresh.querySelectorAll("pre[data-follow]")) {
      const stream = streams.get(pre.dataset.build);
      if (stream) {
        scrolls.set(stream.pre, stream.pre.scrollTop);
        pre.replaceWith(stream.pre);
      }
    }
    const focusId = focusedId(old);
    old.replaceWith(fresh);
    toEnd(fresh);
    for (const [pre, top] of scrolls) pre.scrollTop = top;
    if (focusId) refocus(fresh, focusId);
    if (name === "running") followLogs();
    if (name === "status" && fresh.dataset.title) document.title = fresh.dataset.title;
    if (name === "history") enhanceHistory(fresh);
  }

  // A log is read from its end: that is where a build fails.
  function toEnd(root) {
    for (const pre of root.querySelectorAll("pre.log")) pre.scrollTop = pre.scrollHeight;
  }

  function focusedId(section) {
    const active = document.activeElement;
    if (!active || !section.contains(active)) return null;
    const owner = active.closest("[id]");
    return owner && section.contains(owner) ? owner.id : null;
  }

  function refocus(section, id) {
    const owner = section.querySelector(`#${CSS.escape(id)}`);
    if (!owner) return;
    const target = owner.matches("details") ? owner.querySelector("summary") : owner;
    if (target) target.focus({ preventScroll: true });
  }

  // History pages load in place; the links still work without this script.
  function enhanceHistory(section) {
    for (const link of section.querySelectorAll("nav.pages a[data-offset]")) {
      link.addEventListener("click", (event) => {
        event.preventDefault();
        section.dataset.offset = link.dataset.offset;
        window.history.replaceState(null, "", link.href);
        sectionsChannel(["history"]);
      });
    }
  }

  // -- live logs -----------------------------------------------------------------------

  function followLogs() {
    if (worker === null) return; // not loaded yet: start() follows them
    const pres = [...document.querySelectorAll("#running pre[data-follow]")];
    const shown = new Set(pres.map((pre) => pre.dataset.build));
    for (const [id, stream] of streams) {
      if (!shown.has(id)) {
        worker.postMessage({ stop: id });
        stream.pre.removeAttribute("aria-busy");
        streams.delete(id);
      }
    }
    for (const pre of pres) {
      if (streams.has(pre.dataset.build)) continue;
      if (streams.size >= MAX_STREAMS) {
        pre.title = "Only a few logs are followed live; this one shows its last lines.";
        continue;
      }
      follow(pre);
    }
  }

  function follow(pre) {
    const id = pre.dataset.build;
    streams.set(id, { pre, size: 0, first: true });
    pre.setAttribute("aria-busy", "true");
    worker.postMessage({ follow: id, url: new URL(pre.dataset.follow, document.baseURI).href });
  }

  function logText(id, text) {
    const stream = streams.get(id);
    if (!stream) return;
    if (stream.first && text) {
      stream.pre.textContent = ""; // the stream starts at the beginning of the log
      stream.first = false;
    }
    append(stream, text);
  }

  function logEnd(id, error) {
    const stream = streams.get(id);
    if (!stream) return;
    stream.pre.removeAttribute("aria-busy");
    if (error) stream.pre.title = `The live log stopped: ${error}`;
    streams.delete(id);
  }

  function append(stream, text) {
    if (!text) return;
    const pre = stream.pre;
    const atEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
    text = text.replace(ANSI, "");
    pre.append(text);
    stream.size += text.length;
    while (stream.size > LOG_LIMIT && pre.firstChild && pre.firstChild !== pre.lastChild) {
      stream.size -= pre.firstChild.textContent.length;
      pre.firstChild.remove();
    }
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }

  // -- events --------------------------------------------------------------------------

  function parse(data) {
    try {
      const value = JSON.parse(data);
      return value && typeof value === "object" ? value : {};
    } catch {
      return {};
    }
  }

  function showLive(connected, text) {
    window.portsd.connected = connected;
    body.dataset.live = connected ? "1" : "0";
    live.className = connected ? "connected" : "disconnected";
    live.textContent = text;
  }

  // The event stream and the live logs are read by a worker (static/events.js): see there
  // why. It starts once the page has loaded.
  let worker = null;
  function onWorker(event) {
    const message = event.data;
    if (message.type === "open") {
      showLive(true, "Live");
      schedule(ALL); // whatever happened while we were not listening
    } else if (message.type === "error") {
      showLive(false, "Reconnecting…");
    } else if (message.type === "log") {
      logText(message.id, message.text);
    } else if (message.type === "log-end") {
      logEnd(message.id, message.error);
    } else if (Object.hasOwn(EFFECTS, message.kind)) {
      schedule(EFFECTS[message.kind](parse(message.data)));
    } else {
      schedule(ALL); // events of an unknown kind
    }
  }

  enhanceHistory(document.getElementById("history"));
  toEnd(document);
  const start = () => {
    worker = new Worker(body.dataset.worker);
    worker.addEventListener("message", onWorker);
    const events = new URL(eventsUrl, document.baseURI).href;
    worker.postMessage({ events, kinds: Object.keys(EFFECTS) });
    followLogs();
  };
  if (document.readyState === "complete") start();
  else window.addEventListener("load", start, { once: true });
})();
