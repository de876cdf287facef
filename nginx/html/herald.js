// herald.js: Herald's browser client. One ES module, no build step, no dependencies.
//
//   import { subscribe } from "/herald.js";
//   const sub = subscribe({
//     channels: ["orders", "audit"],
//     onEvent(e) {},          // e = {id, channel, event, data}; data parsed from JSON
//     onReset(r) {},          // r = {reason, id}: history could not cover the gap
//     token: async () => jwt, // optional: for private channels, and again before it expires
//   });
//   sub.close();
//
// It reads /stream with fetch() rather than EventSource, so that it sees every
// event name, the answer's status and Retry-After, and can send the token in a
// header. It resumes from the last id it saw (Last-Event-ID) after a network
// error, after any non-200 answer, and across a page reload in the same tab
// (sessionStorage); it backs off with jitter, honours Retry-After, reconnects
// with a fresh token before the current one expires, and never hands the same
// id to onEvent twice.

const CONTROL = new Set(['reset', 'token_expired']);
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30000;
const REFRESH_BEFORE_S = 30; // reconnect with a new token this long before it expires
const SEEN_MAX = 1000;

// Seconds until a JWT's `exp`, or null (no exp, or not a JWT).
function secondsLeft(jwt) {
  try {
    const payload = JSON.parse(atob(jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')));
    return typeof payload.exp === 'number' ? payload.exp - Date.now() / 1000 : null;
  } catch {
    return null;
  }
}

// Server-Sent Events parsing (WHATWG HTML, "Server-sent events"): lines end at
// CRLF, LF or CR; a blank line ends a frame; `id` moves the last event id even
// when the frame has no data (then no event is dispatched).
class Parser {
  constructor(onFrame) {
    this.onFrame = onFrame;
    this.buffer = '';
    this.reset();
  }

  reset() {
    this.data = [];
    this.event = '';
    this.id = null;
  }

  feed(text) {
    this.buffer += text;
    // A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
    const end = this.buffer.endsWith('\r') ? this.buffer.length - 1 : this.buffer.length;
    const lines = this.buffer.slice(0, end).split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + this.buffer.slice(end);
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === '') {
      this.onFrame(this.event || 'message', this.data.length ? this.data.join('\n') : null, this.id);
      this.reset();
      return;
    }
    if (line.startsWith(':')) return;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') this.data.push(value);
    else if (field === 'event') this.event = value;
    else if (field === 'id' && !value.includes('\0')) this.id = value;
  }
}

export function subscribe({ channels, onEvent, onReset = () => {}, onState = () => {}, token, url = '/stream' }) {
  const list = [...new Set(channels)];
  if (!list.length) throw new Error('subscribe to at least one channel');
  const storageKey = `herald:last:${url}:${list.join(',')}`;
  let last = sessionStorage.getItem(storageKey); // survives a reload in this tab
  const seen = new Set();
  let closed = false;
  let controller = null;
  let attempt = 0;
  let timer = null;
  let refresh = null;

  const remember = (id) => {
    last = id;
    sessionStorage.setItem(storageKey, id);
  };

  function dispatch(type, data, id) {
    if (id !== null) remember(id);
    if (data === null) return; // a position frame: no event
    if (type === 'reset') {
      let reason = 'unknown';
      try { reason = JSON.parse(data).reason; } catch { /* keep unknown */ }
      onReset({ reason, id });
      return;
    }
    if (type === 'token_expired') return; // the stream ends; we come back with a new token
    if (id !== null) {
      if (seen.has(id)) return;
      seen.add(id);
      if (seen.size > SEEN_MAX) seen.delete(seen.values().next().value);
    }
    let parsed = JSON.parse(data);
    let channel = list[0];
    if (list.length > 1 && !CONTROL.has(type)) {
      // On a stream of several channels each event names its channel.
      channel = parsed.channel;
      parsed = parsed.data;
    }
    onEvent({ id, channel, event: type, data: parsed });
  }

  function retryLater(response) {
    if (closed) return;
    attempt += 1;
    let delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (attempt - 1)) * (0.5 + Math.random() / 2);
    const after = response && Number.parseInt(response.headers.get('Retry-After') || '', 10);
    if (after >= 0) delay = after * 1000 + Math.random() * 250;
    onState('waiting', { attempt, delay, status: response ? response.status : null });
    timer = setTimeout(connect, delay);
  }

  function scheduleRefresh(jwt) {
    clearTimeout(refresh);
    const left = secondsLeft(jwt);
    if (left === null) return;
    const inMs = Math.max(1000, (left - REFRESH_BEFORE_S) * 1000, left * 500);
    // Reconnect with a new token; the resume point makes it lossless.
    refresh = setTimeout(() => { if (controller) controller.abort(); }, Math.min(inMs, left * 1000));
  }

  async function connect() {
    timer = null;
    if (closed) return;
    const headers = { Accept: 'text/event-stream' };
    if (last) headers['Last-Event-ID'] = last;
    controller = new AbortController();
    const mine = controller;
    let response = null;
    try {
      if (token) {
        const jwt = await token();
        headers.Authorization = `Bearer ${jwt}`;
        scheduleRefresh(jwt);
      }
      const query = new URLSearchParams(list.map((c) => ['channel', c]));
      response = await fetch(`${url}?${query}`, { headers, signal: mine.signal, cache: 'no-store' });
      if (response.status !== 200) {
        if (response.status >= 400 && response.status < 500 && response.status !== 401
            && response.status !== 429) {
          onState('failed', { status: response.status, body: await response.text() });
          return; // a request that cannot succeed as it is
        }
        retryLater(response);
        return;
      }
      attempt = 0;
      onState('open', {});
      const parser = new Parser(dispatch);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(value);
      }
    } catch {
      // A network error, or our own abort (close, token refresh): resume below.
    }
    if (!closed) {
      if (mine.signal.aborted && !closed) { attempt = 0; connect(); return; }
      retryLater(null);
    }
  }

  connect();
  return {
    close() {
      closed = true;
      clearTimeout(timer);
      clearTimeout(refresh);
      if (controller) controller.abort();
      onState('closed', {});
    },
    get lastId() { return last; },
  };
}
