// herald.js: Herald's browser client. One ES module, no build step, no dependencies.
//
//   import { subscribe } from "/herald.js";
//   const sub = subscribe({
//     channels: ["orders", "audit"],
//     onEvent(e) {},          // e = {id, channel, event, data}; data parsed from JSON
//     onReset(r) {},          // r = {reason, id}: history could not cover the gap
//     onError(err, e) {},     // onEvent or onReset threw err for e (default: console.error)
//     onState(state, info) {}, // 'open', 'waiting' {attempt, delay, status}, 'failed' {status, body}, 'closed'
//     token: async () => jwt, // optional: for private channels, and again before it expires
//     url: '/stream',         // or another origin's: 'https://push.example.com/stream'
//     share: true,            // one stream for all the tabs of this browser (default); false: one per tab
//   });
//   sub.lastId;               // the position this subscription has delivered up to
//   sub.leading;              // whether this tab runs the stream (always, unshared)
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
// hands the same event to onEvent twice: each subscription keeps its position
// (the last id it delivered) and drops what is at or before it, per partition
// for a vector id (docs/api.md, "Stream ids").
//
// An exception thrown by onEvent (or onReset) does not lose the event and does
// not stop the stream: the event counts as delivered (it is not handed out
// again) and goes to onError(err, event) with the error, so the application
// can keep it, retry it or report it; then the next event follows. An event
// whose data is not JSON goes to onError too, its data as the raw text.
//
// One stream for many tabs. A browser opens at most 6 HTTP/1.1 connections
// per origin, over all its tabs, and a stream holds one for the page's life:
// a seventh tab would hang. So the subscriptions of one browser to the same
// stream (the same stream URL and set of channels; all those with a token, or
// all those without; a string `share` makes a group of its own, e.g. per
// user) share one connection. They elect a leader with the Web Locks API:
// each asks for the exclusive lock named
// `herald:<stream URL>|<sorted channels>|<group>`; the one that gets it holds
// it as long as it leads, runs the stream (calling its own token()) and
// relays it on a BroadcastChannel of the same name; the others wait in the
// lock's queue and follow. The messages, each {t, from, ...}:
//
//   hello   {position}           a follower, with the position it has delivered
//                                up to (null: nothing yet); sent when it
//                                subscribes, and as its answer to `roll`
//   roll    {}                   a new leader asks who is there
//   welcome {to, state, info, at} the leader to a newcomer: the stream's state
//                                and position
//   at      {id}                 the leader (re)connects: the stream goes on
//                                after id (null: from now)
//   frame   {event, data, id}    a frame of the stream as read: an event, a
//                                reset, or an id-only frame
//   state   {state, info}        the leader's onState, for the followers' own
//   rewind  {position}           a follower behind `at`: start again from here
//
// Each subscription delivers the frames to its callbacks with its own
// position check, so a replay reaches nobody twice. When the leader closes,
// or its tab is closed, crashes or is discarded, the browser passes the lock
// on: the new leader calls the roll, waits for the followers the lock's queue
// shows (at most ROLL_CALL_MS), and resumes from the lowest position among its
// own and their answers. Nobody misses an event; whoever saw some of them
// already drops the replay. A frozen page (Page Lifecycle `freeze`: a
// background tab the browser suspends, the back/forward cache) runs nothing,
// so at `freeze` a tab leaves the queue, or hands the lock on if it leads, and
// at `resume` it joins again as a follower. A follower that finds itself behind where the
// stream goes on (`at`, `welcome`, an id-only frame: it missed the roll, or
// it was reloaded) ignores the frames and asks for a `rewind`; the leader
// reconnects from there. A `reset` reaches every subscription it concerns
// (all but those exactly at its id), and a follower whose position is from
// another epoch than the stream's events gets a reset of its own, as its own
// stream would have given it. Without navigator.locks (it needs a secure
// context: https://, or http://localhost) or BroadcastChannel, each
// subscription runs its own stream.

const CONTROL = new Set(['reset', 'token_expired']);
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30000;
const REFRESH_BEFORE_S = 30; // reconnect with a new token this long before it expires
const RETRY_AFTER_MAX_MS = 5 * 60 * 1000; // the longest wait a Retry-After may impose
const ROLL_CALL_MS = 200; // how long a new leader waits for its followers' positions

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

// --- Positions -----------------------------------------------------------
// An id as a Map partition -> {epoch, seq}: '' for a plain id `<epoch>-<seq>`,
// the partition of each `<p>.<epoch>-<seq>` entry of a vector id; null for
// anything else (then ids are only compared for equality).
function parseId(id) {
  if (typeof id !== 'string' || !id) return null;
  const out = new Map();
  for (const entry of id.split('_')) {
    const match = /^(?:([0-9]+)\.)?([0-9a-fA-F]+)-([0-9]+)$/.exec(entry);
    if (!match || out.has(match[1] || '')) return null;
    out.set(match[1] || '', { epoch: match[2], seq: BigInt(match[3]) });
  }
  return out;
}

function formatId(entries) {
  if (entries.size === 1 && entries.has('')) {
    const { epoch, seq } = entries.get('');
    return `${epoch}-${seq}`;
  }
  return [...entries].sort((a, b) => Number(a[0]) - Number(b[0]))
    .map(([p, { epoch, seq }]) => `${p}.${epoch}-${seq}`).join('_');
}

// Whether two parsed ids are positions in the same history: the same
// partitions, each in the same epoch.
function comparable(a, b) {
  if (!a || !b || a.size !== b.size) return false;
  for (const [p, { epoch }] of a) if (!b.has(p) || b.get(p).epoch !== epoch) return false;
  return true;
}

// Whether the position `mine` includes everything up to `id`.
function covers(mine, id) {
  const [a, b] = [parseId(mine), parseId(id)];
  if (!a || !b) return mine !== null && mine === id;
  return comparable(a, b) && [...b].every(([p, { seq }]) => a.get(p).seq >= seq);
}

// The position after `mine` has seen `id`: the later of the two in each
// partition; `id` itself when they are not comparable (another epoch).
function merged(mine, id) {
  const [a, b] = [parseId(mine), parseId(id)];
  if (!comparable(a, b)) return id;
  return formatId(new Map([...b].map(([p, e]) => [p, a.get(p).seq > e.seq ? a.get(p) : e])));
}

// A resume point that loses nothing of `a` nor of `b`: the earlier of the two
// in each partition. null is no position; when they are not comparable, `a`
// (the subscription of `b` then gets a reset: see Receiver.frame).
function lowest(a, b) {
  if (a === null || a === undefined) return b === undefined ? null : b;
  if (b === null || b === undefined) return a;
  const [x, y] = [parseId(a), parseId(b)];
  if (!comparable(x, y)) return a;
  return formatId(new Map([...x].map(([p, e]) => [p, y.get(p).seq < e.seq ? y.get(p) : e])));
}

// Whether `mine` lies before `id` in the same history: a stream that goes on
// after `id` would leave a gap.
function before(mine, id) {
  return mine !== null && id !== null && comparable(parseId(mine), parseId(id)) && !covers(mine, id);
}

function reportError(err, event) {
  console.error('herald.js: a callback threw for event', event && event.id, err);
}

// --- Delivery: one subscription's callbacks and position -----------------
// Frames in (from its own stream, or the leader's), callbacks out: each event
// once, in order. Its position (also in sessionStorage, for a reload) only
// moves forward, except to a reset's.
class Receiver {
  constructor({ list, storageKey, onEvent, onReset, onError }) {
    Object.assign(this, { list, storageKey, onEvent, onReset, onError });
    this.position = sessionStorage.getItem(storageKey);
    this.streamAt = null; // the last id of the stream that feeds us
    // Ignore frames until an `at` says where the stream stands (and, if it is
    // past our position, until the rewind that asks for): else a gap.
    this.behind = this.position !== null;
  }

  move(id) {
    this.position = id;
    if (id === null) sessionStorage.removeItem(this.storageKey);
    else sessionStorage.setItem(this.storageKey, id);
  }

  // Hand `value` to `callback`; what it throws goes to onError, never up to the
  // reader (which would drop the stream and, with it, this event).
  deliver(callback, value) {
    try {
      callback(value);
    } catch (err) {
      try { this.onError(err, value); } catch (again) { reportError(again, value); }
    }
  }

  // The stream (re)starts after `id`: true if that leaves us a gap (then ask
  // for a rewind to our position). Having seen nothing yet, we start there.
  at(id) {
    this.streamAt = id;
    if (this.position === null && id !== null) this.move(id);
    this.behind = before(this.position, id);
    return this.behind;
  }

  // One frame of the stream; true if it shows a gap before it (ask for a rewind).
  frame(type, data, id) {
    if (this.behind) return false; // the rewind replays it
    const previous = this.streamAt;
    if (id !== null) this.streamAt = id;
    if (type === 'reset') return this.reset(data, id);
    if (type === 'token_expired') return false; // the stream ends; it comes back with a new token
    if (id !== null && this.position !== null && !comparable(parseId(this.position), parseId(id))
        && parseId(id) !== null) {
      this.foreign(data === null || !comparable(parseId(previous), parseId(id)) ? id : previous, id);
    }
    if (data === null) { // an id-only frame: a position, no event
      if (id === null) return false;
      if (before(this.position, id)) { this.behind = true; return true; }
      this.move(merged(this.position, id));
      return false;
    }
    if (id !== null) {
      if (covers(this.position, id)) return false; // delivered already: a replay
      this.move(merged(this.position, id));
    }
    this.event(type, data, id);
    return false;
  }

  // Our position is from another history (epoch, partitions) than the
  // stream's: history cannot cover our gap, as our own stream would have said.
  foreign(at, id) {
    const [mine, theirs] = [parseId(this.position), parseId(id)];
    const epochs = mine && [...theirs].some(([p, { epoch }]) => mine.has(p) && mine.get(p).epoch !== epoch);
    this.move(null);
    this.deliver(this.onReset, { reason: epochs ? 'epoch_changed' : 'unknown_id', id: at });
  }

  reset(data, id) {
    if (id !== null && this.position === id) return false; // exactly there: no gap for us
    const fresh = this.position === null;
    this.move(id);
    if (fresh && id !== null) return false; // nothing seen yet: nothing to reload
    let reason = 'unknown';
    try { reason = JSON.parse(data).reason; } catch { /* keep unknown */ }
    this.deliver(this.onReset, { reason, id });
    return false;
  }

  event(type, data, id) {
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch (err) {
      try { this.onError(err, { id, channel: null, event: type, data }); } catch (again) { reportError(again); }
      return;
    }
    let channel = this.list[0];
    if (this.list.length > 1 && !CONTROL.has(type) && parsed !== null && typeof parsed === 'object') {
      // On a stream of several channels each event names its channel.
      channel = parsed.channel;
      parsed = parsed.data;
    }
    this.deliver(this.onEvent, { id, channel, event: type, data: parsed });
  }
}

// --- The stream ----------------------------------------------------------
// GET /stream with fetch(), parsed; resumed after every end from the last id
// read. `position`: where it starts (null: from now). onConnect(id) hears
// where each connection starts, onFrame(type, data, id) every frame.
// rewind(id): start again, at once, from `id` if that is earlier.
class Stream {
  constructor({ url, list, token, position, onConnect, onFrame, onState }) {
    Object.assign(this, { url, list, token, position, onConnect, onFrame, onState });
    this.floor = null; // a rewind asked for: the next connection starts no later
    this.closed = false;
    this.controller = null;
    this.attempt = 0;
    this.timer = null;
    this.refresh = null;
  }

  start() { this.connect(); }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    clearTimeout(this.refresh);
    if (this.controller) this.controller.abort();
  }

  rewind(id) {
    this.floor = lowest(this.floor, id);
    if (this.controller) this.controller.abort(); // a live connection comes back at once
  }

  retryLater(response) {
    if (this.closed) return;
    this.attempt += 1;
    let delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (this.attempt - 1)) * (0.5 + Math.random() / 2);
    // Strict and bounded: a hostile proxy's "Retry-After: 99999999999" must
    // neither park the page for years nor overflow setTimeout into a tight loop.
    const after = response ? retryAfterMs(response.headers.get('Retry-After')) : null;
    if (after !== null) delay = after + Math.random() * 250;
    this.onState('waiting', { attempt: this.attempt, delay, status: response ? response.status : null });
    this.timer = setTimeout(() => this.connect(), delay);
  }

  scheduleRefresh(jwt) {
    clearTimeout(this.refresh);
    const left = secondsLeft(jwt);
    if (left === null) return;
    const inMs = Math.max(1000, (left - REFRESH_BEFORE_S) * 1000, left * 500);
    // Reconnect with a new token; the resume point makes it lossless.
    this.refresh = setTimeout(() => { if (this.controller) this.controller.abort(); }, Math.min(inMs, left * 1000));
  }

  // Where the next connection starts: the last id read, or a rewind's if earlier.
  startingPoint() {
    for (let round = 0; round < 2 && (round === 0 || this.floor !== null); round += 1) {
      this.position = lowest(this.position, this.floor);
      this.floor = null;
      this.onConnect(this.position); // may ask for a rewind: a second round
    }
    return this.position;
  }

  async connect() {
    this.timer = null;
    if (this.closed) return;
    const from = this.startingPoint();
    const headers = { Accept: 'text/event-stream' };
    if (from) headers['Last-Event-ID'] = from;
    this.controller = new AbortController();
    const mine = this.controller;
    let response = null;
    try {
      if (this.token) {
        const jwt = await this.token();
        headers.Authorization = `Bearer ${jwt}`;
        this.scheduleRefresh(jwt);
      }
      const query = new URLSearchParams(this.list.map((c) => ['channel', c]));
      response = await fetch(`${this.url}?${query}`, { headers, signal: mine.signal, cache: 'no-store' });
      if (response.status !== 200) {
        if (response.status >= 400 && response.status < 500 && response.status !== 401
            && response.status !== 429) {
          this.onState('failed', { status: response.status, body: await response.text() });
          return; // a request that cannot succeed as it is
        }
        this.retryLater(response);
        return;
      }
      this.attempt = 0;
      this.onState('open', {});
      const parser = new Parser((type, data, id) => {
        if (mine.signal.aborted) return; // rewound: what follows comes again
        if (id !== null) this.position = id;
        this.onFrame(type, data, id);
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(value);
      }
    } catch {
      // A network error, or our own abort (close, token refresh, rewind): resume below.
    }
    if (this.closed) return;
    if (mine.signal.aborted) { this.attempt = 0; this.connect(); return; }
    this.retryLater(null);
  }
}

// --- One stream per tab, or one shared by the tabs -----------------------

function alone({ url, list, token, tab, onState }) {
  const stream = new Stream({
    url, list, token, position: tab.position, onState,
    onConnect: (id) => { if (tab.at(id)) stream.rewind(tab.position); },
    onFrame: (type, data, id) => { if (tab.frame(type, data, id)) stream.rewind(tab.position); },
  });
  stream.start();
  return { close: () => stream.close(), leading: () => !stream.closed };
}

function canShare(share) {
  return share !== false && typeof BroadcastChannel === 'function' && typeof navigator === 'object'
    && !!navigator.locks && typeof navigator.locks.request === 'function';
}

// The lock's (and the BroadcastChannel's) name: one per stream URL, set of
// channels and group (with a token or without, or the `share` string).
function groupName(url, list, token, share) {
  const where = new URL(url, globalThis.location && globalThis.location.href);
  const group = (token ? 'token' : 'public') + (typeof share === 'string' ? `:${share}` : '');
  return `herald:${where.origin}${where.pathname}|${[...list].sort().join(',')}|${group}`;
}

function shared({ name, url, list, token, tab, onState }) {
  const me = `${Date.now().toString(36)}.${Math.random().toString(36).slice(2)}`;
  const channel = new BroadcastChannel(name);
  let quit = null; // while we are in the lock's queue or lead: withdraws us
  let closed = false;
  let leading = false;
  let stream = null; // ours, while we lead
  let stepDown = null; // ends the lock's callback: the next in the queue leads
  let roll = null; // while our roll call runs: from -> position
  let rollHeard = () => {};
  let state = null; // the stream's state as last reported: [state, info]

  const post = (message) => {
    if (closed) return;
    try { channel.postMessage({ ...message, from: me }); } catch { /* the page is going away */ }
  };
  const report = (s, info) => {
    state = [s, info];
    onState(s, info);
  };
  const askRewind = () => post({ t: 'rewind', position: tab.position });

  function follow(m) {
    if (m.t === 'roll') post({ t: 'hello', position: tab.position });
    else if (m.t === 'welcome') {
      if (m.state && (!state || state[0] !== m.state)) report(m.state, m.info);
      if (tab.at(m.at)) askRewind();
    } else if (m.t === 'at') {
      if (tab.at(m.id)) askRewind();
    } else if (m.t === 'frame') {
      if (tab.frame(m.event, m.data, m.id)) askRewind();
    } else if (m.t === 'state') report(m.state, m.info);
  }

  function hear(m) {
    if (m.t === 'hello' || (m.t === 'rewind' && roll)) {
      if (roll) {
        roll.set(m.from, m.position);
        rollHeard();
      } else if (stream) {
        post({ t: 'welcome', to: m.from, state: state && state[0], info: state && state[1], at: stream.position });
      }
    } else if (m.t === 'rewind' && stream) stream.rewind(m.position);
  }

  // Who is there, and what has each delivered? Waits for as many answers as
  // the lock's queue holds followers, at most ROLL_CALL_MS; the lowest wins.
  async function rollCall() {
    roll = new Map();
    let expected = Infinity;
    try {
      const { pending = [] } = await navigator.locks.query();
      expected = pending.filter((lock) => lock.name === name).length;
    } catch { /* unknown: wait the whole time */ }
    if (expected > roll.size) {
      post({ t: 'roll' });
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, ROLL_CALL_MS);
        rollHeard = () => { if (roll.size >= expected) { clearTimeout(timer); resolve(); } };
      });
    }
    const answers = [...roll.values()];
    roll = null;
    return answers.reduce(lowest, tab.position);
  }

  async function lead() {
    const mine = quit;
    const current = () => !closed && quit === mine && mine !== null; // not withdrawn since
    if (!current()) return; // granted as we withdrew: pass it on
    leading = true;
    const from = await rollCall();
    if (!current()) return;
    stream = new Stream({
      url, list, token, position: from,
      onConnect: (id) => {
        post({ t: 'at', id });
        if (tab.at(id)) stream.rewind(tab.position);
      },
      onFrame: (event, data, id) => {
        post({ t: 'frame', event, data, id });
        if (tab.frame(event, data, id)) stream.rewind(tab.position);
      },
      onState: (s, info) => {
        report(s, info);
        post({ t: 'state', state: s, info });
      },
    });
    stream.start();
    await new Promise((resolve) => { stepDown = resolve; });
  }

  // Take a place in the lock's queue (the lock at once, if nobody holds it),
  // and tell the leader where we are: it answers with where the stream is.
  function join() {
    if (closed || quit) return;
    quit = new AbortController();
    post({ t: 'hello', position: tab.position });
    navigator.locks.request(name, { mode: 'exclusive', signal: quit.signal }, lead)
      .catch(() => { /* withdrawn before our turn */ });
  }

  // Leave the queue, or stop leading: the lock goes to the next in the queue.
  function withdraw() {
    if (!quit) return;
    quit.abort();
    quit = null;
    leading = false;
    // What is relayed while we are away is not delivered: back, we wait for
    // where the stream stands (an `at`, a `welcome`) before taking frames.
    tab.behind = true;
    if (stream) stream.close();
    stream = null;
    if (stepDown) stepDown();
    stepDown = null;
  }

  // A frozen page (a background tab the browser suspends, or one going into
  // the back/forward cache: Page Lifecycle's `freeze`) runs nothing. Holding
  // the lock it would stall every tab (a stream nobody reads), and next in the
  // queue it would be granted the lock and never take it up. So it withdraws
  // at `freeze`, and at `resume` joins again as a follower, which catches up
  // from its own position (the leader's `welcome` says where the stream is).
  const onFreeze = () => withdraw();
  const onResume = () => join();
  const onShow = (e) => { if (e.persisted) join(); }; // back from the cache
  const page = typeof document === 'object' && document && typeof document.addEventListener === 'function'
    ? document : null;
  if (page) {
    page.addEventListener('freeze', onFreeze);
    page.addEventListener('resume', onResume);
    globalThis.addEventListener('pageshow', onShow);
  }

  channel.onmessage = ({ data: m }) => {
    if (closed || !m || (m.to !== undefined && m.to !== me)) return;
    if (leading) hear(m);
    else if (quit) follow(m);
  };
  join();

  return {
    close() {
      withdraw();
      closed = true;
      if (page) {
        page.removeEventListener('freeze', onFreeze);
        page.removeEventListener('resume', onResume);
        globalThis.removeEventListener('pageshow', onShow);
      }
      channel.close();
    },
    leading: () => leading && !closed,
  };
}

export function subscribe({
  channels, onEvent, onReset = () => {}, onState = () => {}, onError = reportError, token, url = '/stream',
  share = true,
}) {
  const list = [...new Set(channels)];
  if (!list.length) throw new Error('subscribe to at least one channel');
  const tab = new Receiver({ list, storageKey: `herald:last:${url}:${list.join(',')}`, onEvent, onReset, onError });
  const options = { url, list, token, tab, onState };
  const run = canShare(share) ? shared({ ...options, name: groupName(url, list, token, share) }) : alone(options);
  let closed = false;
  return {
    close() {
      if (closed) return;
      closed = true;
      run.close();
      onState('closed', {});
    },
    get lastId() { return tab.position; },
    get leading() { return !closed && run.leading(); },
  };
}
