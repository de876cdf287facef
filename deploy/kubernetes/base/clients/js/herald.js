// herald.js: Herald's browser client. One ES module, no build step, no dependencies.
//
//   import { subscribe } from "/herald.js";
//   const sub = subscribe({
//     channels: ["orders", "audit"],
//     onEvent(e) {},          // e = {id, channel, event, data}; data parsed from JSON
//     onReset(r) {},          // r = {reason, id}: history could not cover the gap
//     onError(err, e) {},     // onEvent or onReset threw err for e (default: console.error)
//     token: async () => jwt, // optional: for private channels, and again before it expires
//     url: '/stream',         // or another origin's: 'https://push.example.com/stream'
//   });
//   sub.close();
//
// It reads /stream with fetch() rather than EventSource, so that it sees every
// event name, the answer's status and Retry-After, and sends the token in the
// Authorization header (never in the URL) and its resume point as
// Last-Event-ID. From another origin that takes a CORS preflight, which the
// stream service answers for the origins in CORS_ALLOWED_ORIGINS. It resumes
// from the last id it saw after a network error, after any non-200 answer, and
// across a page reload in the same tab (sessionStorage); it backs off with
// jitter, honours Retry-After (seconds or an HTTP-date, at most 5 minutes),
// reconnects with a fresh token before the current one expires, and never
// hands the same id to onEvent twice.
//
// An exception thrown by onEvent (or onReset) does not lose the event and does
// not stop the stream: the event counts as delivered (it is not handed out
// again) and goes to onError(err, event) with the error, so the application
// can keep it, retry it or report it; then the next event follows. An event
// whose data is not JSON goes to onError too, its data as the raw text.

const CONTROL = new Set(['reset', 'token_expired']);
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30000;
const REFRESH_BEFORE_S = 30; // reconnect with a new token this long before it expires
const RETRY_AFTER_MAX_MS = 5 * 60 * 1000; // the longest wait a Retry-After may impose
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

// Milliseconds a Retry-After asks for, at most RETRY_AFTER_MAX_MS; null when it
// is absent or neither ASCII digits nor an HTTP-date (RFC 9110, IMF-fixdate).
export function retryAfterMs(value, now = Date.now()) {
  const text = (value || '').trim();
  let ms = null;
  if (/^[0-9]+$/.test(text)) {
    ms = text.length > 9 ? RETRY_AFTER_MAX_MS : Number(text) * 1000;
  } else if (/^[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT$/.test(text)) {
    const when = Date.parse(text);
    if (Number.isFinite(when)) ms = Math.max(0, when - now);
  }
  return ms === null ? null : Math.min(RETRY_AFTER_MAX_MS, ms);
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

function reportError(err, event) {
  console.error('herald.js: a callback threw for event', event && event.id, err);
}

export function subscribe({
  channels, onEvent, onReset = () => {}, onState = () => {}, onError = reportError, token, url = '/stream',
}) {
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

  // Hand `event` to `callback`; what it throws goes to onError, never up to the
  // reader (which would drop the stream and, with it, this event).
  function deliver(callback, event) {
    try {
      callback(event);
    } catch (err) {
      try { onError(err, event); } catch (again) { reportError(again, event); }
    }
  }

  function dispatch(type, data, id) {
    if (id !== null) remember(id);
    if (data === null) return; // a position frame: no event
    if (type === 'reset') {
      let reason = 'unknown';
      try { reason = JSON.parse(data).reason; } catch { /* keep unknown */ }
      deliver(onReset, { reason, id });
      return;
    }
    if (type === 'token_expired') return; // the stream ends; we come back with a new token
    if (id !== null) {
      if (seen.has(id)) return;
      seen.add(id);
      if (seen.size > SEEN_MAX) seen.delete(seen.values().next().value);
    }
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch (err) {
      try { onError(err, { id, channel: null, event: type, data }); } catch (again) { reportError(again); }
      return;
    }
    let channel = list[0];
    if (list.length > 1 && !CONTROL.has(type) && parsed !== null && typeof parsed === 'object') {
      // On a stream of several channels each event names its channel.
      channel = parsed.channel;
      parsed = parsed.data;
    }
    deliver(onEvent, { id, channel, event: type, data: parsed });
  }

  function retryLater(response) {
    if (closed) return;
    attempt += 1;
    let delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (attempt - 1)) * (0.5 + Math.random() / 2);
    // Strict and bounded: a hostile proxy's "Retry-After: 99999999999" must
    // neither park the page for years nor overflow setTimeout into a tight loop.
    const after = response ? retryAfterMs(response.headers.get('Retry-After')) : null;
    if (after !== null) delay = after + Math.random() * 250;
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
