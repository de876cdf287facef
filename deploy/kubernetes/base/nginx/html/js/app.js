// Herald demo page: a subscription through /herald.js (Herald's browser
// client: it resumes from the last id after errors, refused answers and
// reloads, and never shows an event twice), and a publish form for /publish.
import { subscribe } from '/herald.js';

{
  const MAX_ITEMS = 500;
  const NAME_RE = /^[A-Za-z0-9_.:-]{1,128}$/;

  const $ = (id) => document.getElementById(id);
  const el = {
    subForm: $('sub-form'), channel: $('channel'), subToken: $('sub-token'),
    connect: $('connect'), disconnect: $('disconnect'), clear: $('clear'),
    state: $('state'), lastId: $('last-id'), connCount: $('conn-count'), connInfo: $('conn-info'),
    events: $('events'),
    pubForm: $('pub-form'), pubChannel: $('pub-channel'), pubEvent: $('pub-event'),
    pubData: $('pub-data'), pubToken: $('pub-token'), publish: $('publish'), pubResult: $('pub-result'),
  };

  let sub = null;           // the current subscription (herald.js)
  let opened = 0;           // streams opened so far
  let recreated = 0;        // reconnections after a lost or refused stream
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
    el.lastId.textContent = id || 'none';
  }

  function onState(state, detail) {
    if (state === 'open') {
      everOpen = true;
      opened += 1;
      el.connCount.textContent = String(opened);
      setState('open', `channels: ${parseList(el.channel.value).join(', ')}`);
    } else if (state === 'waiting') {
      recreated += 1;
      el.state.dataset.recreated = String(recreated);
      const why = detail.status ? `answered ${detail.status}` : 'connection lost';
      setState(everOpen ? 'reconnecting' : 'connecting',
        `${why}; new connection in ${(detail.delay / 1000).toFixed(1)} s (attempt ${detail.attempt})`);
    } else if (state === 'failed') {
      setState('closed', `refused (${detail.status}): ${detail.body}`);
    }
  }

  function connect() {
    const channels = parseList(el.channel.value);
    const bad = channels.filter((c) => !NAME_RE.test(c));
    if (!channels.length || bad.length) {
      setState('closed', bad.length ? `invalid channel name: ${bad.join(', ')}` : 'enter a channel');
      return;
    }
    if (sub) sub.close();
    everOpen = false;
    const token = el.subToken.value.trim();
    setState('connecting', `channels: ${channels.join(', ')}`);
    // Same channels again: herald.js resumes where they were (sessionStorage).
    sub = subscribe({
      channels,
      token: token ? async () => token : undefined,
      onEvent(e) {
        setLastId(e.id);
        addItem(e.id, e.channel, e.event, JSON.stringify(e.data));
      },
      onReset(r) {
        setLastId(r.id);
        addItem(r.id, '', 'reset', JSON.stringify({ reason: r.reason }));
        el.connInfo.textContent = `reset (${r.reason}): history could not cover the gap; continuing from ${r.id}`;
      },
      onState,
    });
  }

  function disconnect() {
    if (sub) sub.close();
    sub = null;
    setState('closed', 'disconnected; Connect resumes from the last id');
  }

  function formatData(text) {
    try {
      return JSON.stringify(JSON.parse(text));
    } catch {
      return text;
    }
  }

  function addItem(id, channel, type, data) {
    const list = el.events;
    const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
    const li = document.createElement('li');
    li.className = `row${type === 'reset' ? ' reset' : ''}`;
    li.dataset.id = id;
    li.dataset.channel = channel;
    li.dataset.event = type;
    li.dataset.data = data;
    const cells = [
      ['time', new Date().toLocaleTimeString()],
      ['id', id || '—'],
      ['channel', channel],
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
  el.pubForm.addEventListener('submit', (e) => { e.preventDefault(); publish(); });
  window.addEventListener('pagehide', () => { if (sub) sub.close(); });

  // /?channel=a&channel=b connects at once (handy for links and tests).
  const query = new URLSearchParams(window.location.search);
  if (query.has('channel')) {
    el.channel.value = query.getAll('channel').join(', ');
    el.pubChannel.value = query.getAll('channel')[0];
    connect();
  }
}
