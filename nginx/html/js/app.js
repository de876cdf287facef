// Herald demo page: an EventSource on /stream that survives the browser giving
// up, and a publish form for /publish. Plain JS, no dependencies.
//
// Why the page recreates the EventSource itself: on a network error or a clean
// end of stream the browser reconnects on its own (sending Last-Event-ID), but
// a non-200 answer (nginx's 502 while a replica restarts, a 503 from a full
// replica) or a wrong Content-Type makes it give up for good (readyState
// CLOSED). Then this page opens a new EventSource after a backoff, resuming
// with ?lastEventId= from the last id it saw. An id-only frame (the stream's
// starting position) fires no event, so the page can only know ids of events
// it was dispatched (its listened types, and `reset`, whose id is the new
// position).
'use strict';

(() => {
  const MAX_ITEMS = 500;
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const ALWAYS_LISTENED = ['reset'];
  const NAME_RE = /^[A-Za-z0-9_.:-]{1,128}$/;

  const $ = (id) => document.getElementById(id);
  const el = {
    subForm: $('sub-form'), channel: $('channel'), types: $('types'), subToken: $('sub-token'),
    connect: $('connect'), disconnect: $('disconnect'), clear: $('clear'),
    state: $('state'), lastId: $('last-id'), connCount: $('conn-count'), connInfo: $('conn-info'),
    events: $('events'),
    pubForm: $('pub-form'), pubChannel: $('pub-channel'), pubEvent: $('pub-event'),
    pubData: $('pub-data'), pubToken: $('pub-token'), publish: $('publish'), pubResult: $('pub-result'),
  };

  let source = null;        // the current EventSource
  let channels = [];        // channels of the current subscription
  let lastId = null;        // last event id seen: the resume point
  let listened = new Set(); // event types with a listener on `source`
  let retryTimer = null;
  let attempt = 0;          // failed attempts since the last open stream
  let opened = 0;           // streams opened so far
  let recreated = 0;        // EventSources recreated after the browser gave up
  let wanted = false;       // the user asked to be connected
  let everOpen = false;     // whether this subscription was open once

  const parseList = (text) => text.split(/[\s,]+/).map((s) => s.trim()).filter(Boolean);

  function setState(state, info) {
    el.state.textContent = state;
    el.state.dataset.state = state;
    el.state.className = `state state-${state}`;
    el.connInfo.textContent = info || '';
    el.connect.textContent = state === 'closed' ? 'Connect' : 'Reconnect';
    el.disconnect.disabled = state === 'closed';
  }

  function setLastId(id) {
    lastId = id;
    el.lastId.textContent = id || 'none';
  }

  function wantedTypes() {
    return new Set([...parseList(el.types.value), ...ALWAYS_LISTENED]);
  }

  function streamUrl() {
    const params = new URLSearchParams();
    for (const c of channels) params.append('channel', c);
    if (lastId) params.set('lastEventId', lastId);
    // EventSource cannot send headers: a subscribe token goes in the query.
    const token = el.subToken.value.trim();
    if (token) params.set('token', token);
    return `/stream?${params}`;
  }

  function closeSource() {
    if (source) {
      for (const t of listened) source.removeEventListener(t, onEvent);
      source.onopen = null;
      source.onerror = null;
      source.close();
      source = null;
    }
    listened = new Set();
  }

  function syncListeners() {
    if (!source) return;
    const want = wantedTypes();
    for (const t of listened) if (!want.has(t)) source.removeEventListener(t, onEvent);
    for (const t of want) if (!listened.has(t)) source.addEventListener(t, onEvent);
    listened = want;
  }

  function open() {
    clearTimeout(retryTimer);
    retryTimer = null;
    closeSource();
    const es = new EventSource(streamUrl());
    source = es;
    syncListeners();
    es.onopen = () => {
      if (es !== source) return;
      attempt = 0;
      everOpen = true;
      opened += 1;
      el.connCount.textContent = String(opened);
      setState('open', `channels: ${channels.join(', ')}`);
    };
    es.onerror = () => {
      if (es !== source) return;
      if (es.readyState === EventSource.CONNECTING) {
        // Network error or end of stream: the browser retries by itself,
        // with Last-Event-ID, after the server's `retry:` delay.
        setState('reconnecting', 'connection lost; the browser is reconnecting');
      } else {
        // CLOSED: the browser gave up (non-200 answer or wrong content type).
        recreateLater();
      }
    };
  }

  function recreateLater() {
    closeSource();
    if (!wanted) return;
    attempt += 1;
    recreated += 1;
    el.state.dataset.recreated = String(recreated);
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (attempt - 1));
    const delay = Math.round(base * (0.75 + Math.random() * 0.5)); // jitter: no herd
    setState(everOpen ? 'reconnecting' : 'connecting',
      `stream refused; new connection in ${(delay / 1000).toFixed(1)} s (attempt ${attempt})`);
    retryTimer = setTimeout(open, delay);
  }

  function connect() {
    const wantedChannels = parseList(el.channel.value);
    const bad = wantedChannels.filter((c) => !NAME_RE.test(c));
    if (!wantedChannels.length || bad.length) {
      setState('closed', bad.length ? `invalid channel name: ${bad.join(', ')}` : 'enter a channel');
      return;
    }
    // Same channels again: resume where we were; other channels: start fresh.
    if (wantedChannels.join('\n') !== channels.join('\n')) setLastId(null);
    channels = wantedChannels;
    wanted = true;
    everOpen = false;
    attempt = 0;
    setState('connecting', `channels: ${channels.join(', ')}`);
    open();
  }

  function disconnect() {
    wanted = false;
    clearTimeout(retryTimer);
    retryTimer = null;
    closeSource();
    setState('closed', lastId ? 'disconnected; Connect resumes from the last id' : 'disconnected');
  }

  function formatData(text) {
    try {
      return JSON.stringify(JSON.parse(text));
    } catch {
      return text;
    }
  }

  function onEvent(e) {
    if (e.target !== source) return;
    if (e.lastEventId) setLastId(e.lastEventId);
    addItem(e.lastEventId, e.type, e.data);
    if (e.type === 'reset') {
      let reason = 'unknown';
      try { reason = JSON.parse(e.data).reason; } catch { /* keep unknown */ }
      el.connInfo.textContent = `reset (${reason}): history could not cover the gap; continuing from ${e.lastEventId}`;
    }
  }

  function addItem(id, type, data) {
    const list = el.events;
    const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
    const li = document.createElement('li');
    li.className = `row${type === 'reset' ? ' reset' : ''}`;
    li.dataset.id = id;
    li.dataset.event = type;
    li.dataset.data = data;
    const cells = [
      ['time', new Date().toLocaleTimeString()],
      ['id', id || '—'],
      ['event', type],
      ['data', formatData(data)],
    ];
    for (const [cls, text] of cells) {
      const span = document.createElement('span');
      span.className = cls;
      span.textContent = text;
      li.appendChild(span);
    }
    list.appendChild(li);
    while (list.children.length > MAX_ITEMS) list.removeChild(list.firstElementChild);
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function parseData(text) {
    if (!text.trim()) return '';
    try {
      return JSON.parse(text);
    } catch {
      return text; // not JSON: publish it as a string
    }
  }

  async function publish() {
    const channel = el.pubChannel.value.trim();
    const event = el.pubEvent.value.trim() || 'message';
    const body = { channel, event, data: parseData(el.pubData.value) };
    const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
    const token = el.pubToken.value.trim();
    if (token) headers.Authorization = `Bearer ${token}`;

    // Make sure the event shows up here if we are subscribed to its channel.
    if (!wantedTypes().has(event)) {
      el.types.value = [...parseList(el.types.value), event].join(', ');
      syncListeners();
    }

    el.publish.disabled = true;
    const result = el.pubResult;
    result.textContent = 'publishing…';
    result.dataset.status = '';
    result.dataset.id = '';
    result.classList.remove('error');
    try {
      const response = await fetch('/publish', {
        method: 'POST', headers, body: JSON.stringify(body), cache: 'no-store',
      });
      const text = await response.text();
      let shown = text;
      let parsed = null;
      try {
        parsed = JSON.parse(text);
        shown = JSON.stringify(parsed, null, 2);
      } catch { /* not JSON: show as is */ }
      result.dataset.status = String(response.status);
      if (parsed && parsed.id) result.dataset.id = parsed.id;
      result.classList.toggle('error', !response.ok);
      result.textContent = `${response.status} ${response.statusText}\n${shown}`;
    } catch (err) {
      result.dataset.status = 'network-error';
      result.classList.add('error');
      result.textContent = `request failed: ${err.message}`;
    } finally {
      el.publish.disabled = false;
    }
  }

  el.subForm.addEventListener('submit', (e) => { e.preventDefault(); connect(); });
  el.disconnect.addEventListener('click', disconnect);
  el.clear.addEventListener('click', () => { el.events.replaceChildren(); });
  el.types.addEventListener('change', syncListeners);
  el.pubForm.addEventListener('submit', (e) => { e.preventDefault(); publish(); });
  window.addEventListener('pagehide', () => { if (source) source.close(); });

  // /?channel=a&channel=b connects at once (handy for links and tests).
  const query = new URLSearchParams(window.location.search);
  if (query.has('channel')) {
    el.channel.value = query.getAll('channel').join(', ');
    el.pubChannel.value = query.getAll('channel')[0];
    if (query.has('types')) el.types.value = query.get('types');
    connect();
  }
})();
