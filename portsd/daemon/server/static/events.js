// portsd status page: its never-ending requests (the event stream, live logs), made by a
// dedicated worker.
//
// Made by the page itself, such a request keeps the page "loading" for whatever waits for
// the network to go quiet: headless Chromium's --virtual-time-budget never expires, a
// crawler or a screenshot never comes. A worker's requests are not the page's.
//
// The page asks: {events: url, kinds}, {follow: id, url}, {stop: id}. The worker answers:
// {type: "open"}, {type: "error"}, {type: "event", kind, data}, {type: "log", id, text},
// {type: "log-end", id, error}.
"use strict";

let retry = 1000;
const logs = new Map(); // build id -> AbortController

function connect(url, kinds) {
  const source = new EventSource(url);
  source.addEventListener("open", () => {
    retry = 1000;
    postMessage({ type: "open" });
  });
  for (const kind of [...kinds, "message"]) {
    source.addEventListener(kind, (event) => postMessage({ type: "event", kind, data: event.data }));
  }
  source.addEventListener("error", () => {
    postMessage({ type: "error" });
    if (source.readyState === EventSource.CLOSED) {
      // the browser gave up (an HTTP error): try again, more slowly each time
      source.close();
      setTimeout(() => connect(url, kinds), retry);
      retry = Math.min(retry * 2, 30000);
    }
  });
}

async function follow(id, url) {
  const controller = new AbortController();
  logs.set(id, controller);
  let error = null;
  try {
    const response = await fetch(url, { signal: controller.signal, cache: "no-store" });
    if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      postMessage({ type: "log", id, text: decoder.decode(value, { stream: true }) });
    }
    postMessage({ type: "log", id, text: decoder.decode() });
  } catch (failure) {
    if (failure.name !== "AbortError") error = failure.message;
  } finally {
    if (logs.get(id) === controller) logs.delete(id);
    postMessage({ type: "log-end", id, error });
  }
}

onmessage = ({ data }) => {
  if (data.events) connect(data.events, data.kinds);
  else if (data.follow) follow(data.follow, data.url);
  else if (data.stop) logs.get(data.stop)?.abort();
};
