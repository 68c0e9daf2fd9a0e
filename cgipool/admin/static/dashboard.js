/* cgipool admin dashboard: live updates, controls and charts (plain JS, no libraries).
 *
 * The server renders every page (cgipool/admin/pages.py); this script keeps it live:
 *  - EventSource('/admin/api/events'): `status` (the whole snapshot, ~1/s) updates the
 *    numbers, service cards and process rows in place; `event` (one event log entry,
 *    with its SSE id) is prepended to the event list.  Reconnects by itself, with
 *    backoff when the browser gives up (readyState CLOSED); #conn shows the state.
 *  - Controls (scale, rolling restart, worker restart/drain, the header's Reload config)
 *    POST with X-CGIPool-CSRF and show their result in #notice (aria-live).
 *  - /admin/traffic draws SVG charts from /admin/api/metrics?window=900, refetched
 *    every few seconds and extended each second with the snapshot's newest point.
 * DOM is built with textContent / setAttribute only: data is never parsed as HTML.
 */
(function () {
  'use strict';

  var body = document.body;
  var page = body.getAttribute('data-page') || '';
  var DASH = '\u2013';
  var SHOWN_STATES = { ok: 1, degraded: 1, failing: 1 };
  var WINDOW = 900;              // seconds of traffic history on the charts
  var MIN_SPAN = 60;             // seconds: the shortest time axis (a young daemon's)
  var SERIES_REFRESH = 60000;    // ms between /admin/api/metrics resyncs (the stream adds a point each second)
  var STALE_AFTER = 5000;        // ms without a status before "reconnecting"
  var FORCE_RECONNECT = 15000;   // ms without a status before a fresh EventSource
  var MAX_RETRY = 30000;         // ms, the longest wait between reconnect attempts
  var NOTICES = 4;               // action results kept visible

  // -- formatting (same rules as pages.py) ------------------------------------------

  function serviceState(state) { return SHOWN_STATES[state] ? state : 'unavailable'; }

  function pad(n) { return (n < 10 ? '0' : '') + n; }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return DASH;
    var s = Math.floor(seconds);
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + pad(s % 60) + 's';
    if (s < 86400) return Math.floor(s / 3600) + 'h ' + pad(Math.floor(s % 3600 / 60)) + 'm';
    return Math.floor(s / 86400) + 'd ' + pad(Math.floor(s % 86400 / 3600)) + 'h';
  }

  function fmtMs(v) {
    if (v === null || v === undefined) return DASH;
    if (v < 10) return v.toFixed(2) + ' ms';
    if (v < 100) return v.toFixed(1) + ' ms';
    return v.toFixed(0) + ' ms';
  }

  function fmtRate(v) {
    if (v === null || v === undefined) return DASH;
    return v.toLocaleString('en-US', { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  }

  function fmtPercent(f) { return f === null || f === undefined ? DASH : (f * 100).toFixed(2) + '%'; }
  /** What a CGI service is, in place of "0/4 ready": it keeps no worker. */
  function fmtCgiKind(limit, running) {
    return 'cgi \u00b7 up to ' + fmtCount(limit) + ' at once \u00b7 ' + fmtCount(running) + ' running';
  }
  function fmtCgi(c) {
    if (!c) return '';
    var codes = (c.last_exit_codes || []).slice(-8);
    return fmtCgiKind(c.limit, c.in_flight) + ' \u00b7 ' + fmtCount(c.executions) + ' runs \u00b7 ' +
      fmtCount(c.queued) + ' queued \u00b7 ' + fmtCount(c.timeouts) + ' timeouts \u00b7 ' +
      fmtCount(c.failures) + ' failed' + (codes.length ? ' \u00b7 exit codes ' + codes.map(String).join(' ') : '');
  }
  function fmtCount(v) { return v === null || v === undefined ? DASH : v.toLocaleString('en-US'); }
  function fmtBytes(v) { return v === null || v === undefined ? DASH : (v / 1048576).toFixed(1) + ' MiB'; }
  function fmtCpu(v) { return v === null || v === undefined ? DASH : v.toFixed(1) + '%'; }
  function text(v) { return v === null || v === undefined ? DASH : String(v); }

  function fmtHealth(h) {
    if (!h) return DASH;
    if (h.ok) return h.latency_ms === null || h.latency_ms === undefined ? 'ok' : 'ok \u00b7 ' + fmtMs(h.latency_ms);
    return 'failed \u00b7 ' + (h.error || 'no answer');
  }

  function fmtAgo(seconds) { return seconds === null || seconds === undefined || isNaN(seconds) ? DASH : fmtDuration(Math.max(0, seconds)) + ' ago'; }

  function fmtClock(t) {
    if (t === null || t === undefined) return DASH;
    var d = new Date(t * 1000);
    return pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }

  // -- elastic pools: load, autoscaling, workers leaving (same rules as pages.py) -------

  /** In flight on workers that stay + queued, over serving workers x concurrency. */
  function serviceLoad(svc) {
    var queue = svc.queue || {};
    var queued = queue.length || 0;
    var busy = 0, serving = 0, concurrency = 1, capacity;
    if (svc.cgi) {
      busy = svc.cgi.in_flight || 0;
      serving = capacity = svc.cgi.limit || 0;
    } else {
      concurrency = svc.concurrency || 1;
      (svc.workers || []).forEach(function (w) {
        if (w.retiring) return;
        busy += w.in_flight || 0;
        if (w.state === 'ready' || w.state === 'starting') serving++;
      });
      capacity = serving * concurrency;
    }
    var demand = busy + queued;
    var u = capacity ? demand / capacity : null;
    var barBusy, barQueued;
    if (capacity && busy >= capacity) { barBusy = 100; barQueued = 0; }
    else if (capacity) { barBusy = busy / capacity * 100; barQueued = Math.min(queued / capacity * 100, 100 - barBusy); }
    else { barBusy = 0; barQueued = demand ? 100 : 0; }
    var level = u === null ? (demand ? 'over' : 'idle') : u > 1 ? 'over' : u >= 0.8 ? 'high' : u >= 0.5 ? 'mid' : 'low';
    return { busy: busy, queued: queued, queueMax: queue.max, inFlight: svc.in_flight === undefined ? busy : svc.in_flight,
      serving: serving, concurrency: concurrency, capacity: capacity, utilisation: u, level: level,
      bar: [Math.round(barBusy * 10) / 10, Math.round(barQueued * 10) / 10] };
  }

  function fmtUtilisation(load) {
    if (load.utilisation === null) return load.busy + load.queued ? 'no capacity' : DASH;
    return (load.utilisation * 100).toFixed(0) + '%';
  }

  function fmtQueue(load) { return 'queue ' + load.queued + '/' + text(load.queueMax); }

  function fmtCapacity(load) {
    return load.capacity + (load.capacity === 1 ? ' slot' : ' slots') +
      (load.concurrency === 1 ? '' : ' (' + load.serving + ' \u00d7 ' + load.concurrency + ')');
  }

  function fmtAutoscale(svc) {
    var size = svc.size, auto = svc.autoscale || {};
    if (svc.cgi) return 'per request \u00b7 at most ' + text(svc.cgi.limit) + ' at once';
    var span = size.min + '\u2013' + size.max + ' workers';
    if (auto.enabled) return 'on \u00b7 ' + span + (auto.idle_for === null || auto.idle_for === undefined ? '' : ' \u00b7 idle ' + fmtDuration(auto.idle_for));
    if (size.min === size.max) return 'off \u00b7 fixed at ' + size.min;
    return 'off \u00b7 ' + span;
  }

  /** The last autoscale decision: {move, ago, reason, title, direction}. */
  function decisionParts(svc, now) {
    var d = (svc.autoscale || {}).last_decision;
    if (!d) return { move: 'no scaling decision yet', ago: '', reason: '', title: '', direction: 'none' };
    var move = text(d.from) + ' \u2192 ' + text(d.to) + ' workers';
    var reason = d.reason ? String(d.reason) : '';
    var title = 'scaled ' + move + ' at ' + fmtClock(d.at) + ': ' + reason;
    if (d.utilisation !== null && d.utilisation !== undefined) title += ' (utilisation ' + d.utilisation.toFixed(2) + ')';
    return { move: move, ago: d.at === null || d.at === undefined || now === null ? DASH : fmtAgo(now - d.at),
      reason: reason, title: title, direction: d.to > d.from ? 'up' : 'down' };
  }

  /** A worker on its way out: [label, explanation], or null. */
  function workerNote(w) {
    if (w.recycling) return ['recycling', 'recycling: ' + w.recycling + ' (a replacement starts first, then this worker drains)'];
    if (w.retiring || w.state === 'draining') return ['leaving', 'leaving the pool: no new requests; it stops once its requests in flight are done'];
    return null;
  }

  // -- DOM helpers ---------------------------------------------------------------------

  function el(tag, attrs, kids) {
    var node = document.createElement(tag);
    var key;
    for (key in attrs || {}) {
      if (!Object.prototype.hasOwnProperty.call(attrs, key) || attrs[key] === null) continue;
      if (key === 'text') node.textContent = attrs[key];
      else node.setAttribute(key, attrs[key]);
    }
    (kids || []).forEach(function (kid) {
      if (kid === null || kid === undefined) return;
      node.appendChild(typeof kid === 'string' ? document.createTextNode(kid) : kid);
    });
    return node;
  }

  function setText(node, value) {
    if (node && node.textContent !== value) node.textContent = value;
  }

  function field(root, name) { return root.querySelector('[data-f="' + name + '"]'); }

  /** Replace the class that starts with `prefix` (e.g. "state-") by prefix + value. */
  function setClassFamily(node, prefix, value) {
    var wanted = prefix + value;
    if (node.classList.contains(wanted)) return;
    Array.prototype.slice.call(node.classList).forEach(function (c) {
      if (c.indexOf(prefix) === 0) node.classList.remove(c);
    });
    node.classList.add(wanted);
  }

  function byData(container, attr) {
    var map = new Map();
    if (!container) return map;
    Array.prototype.forEach.call(container.children, function (child) {
      if (child.hasAttribute(attr)) map.set(child.getAttribute(attr), child);
    });
    return map;
  }

  function flash(node) {
    node.classList.remove('changed');
    void node.offsetWidth;  // restart the animation
    node.classList.add('changed');
  }

  // Example links go to the proxy's origin (the admin has a listener of its own).
  var PROXY = document.body.getAttribute('data-proxy') || '';

  function safeHref(path) {
    return typeof path === 'string' && path.charAt(0) === '/' && path.charAt(1) !== '/' ? PROXY + path : null;
  }

  // -- connection indicator ------------------------------------------------------------

  var conn = document.getElementById('conn');
  var connLabels = { connecting: 'connecting', live: 'live', reconnecting: 'reconnecting', stale: 'reconnecting' };

  function setConn(state) {
    if (!conn || conn.getAttribute('data-state') === state) return;
    conn.setAttribute('data-state', state);
    setText(conn.querySelector('.conn-text'), connLabels[state] || state);
    conn.setAttribute('title', state === 'live' ? 'receiving live updates' : 'waiting for the daemon');
  }

  // -- action results --------------------------------------------------------------------

  var notice = document.getElementById('notice');

  function notify(kind, message) {
    if (!notice) return null;
    var item = el('div', { 'class': 'msg msg-' + kind }, [
      el('time', { text: fmtClock(Date.now() / 1000) }), el('span', { 'class': 'msg-text', text: message })
    ]);
    notice.insertBefore(item, notice.firstChild);
    while (notice.children.length > NOTICES) notice.removeChild(notice.lastChild);
    notice.hidden = false;
    return item;
  }

  function settle(item, kind, message) {
    if (!item) return notify(kind, message);
    item.className = 'msg msg-' + kind;
    setText(item.querySelector('.msg-text'), message);
    setText(item.querySelector('time'), fmtClock(Date.now() / 1000));
    return item;
  }

  // -- controls --------------------------------------------------------------------------

  function enc(s) { return encodeURIComponent(s); }

  function post(url, payload, button, label, describe) {
    if (button) { button.disabled = true; button.classList.add('busy'); }
    var item = notify('pending', label + '\u2026');
    return fetch(url, {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', 'X-CGIPool-CSRF': '1' },
      body: JSON.stringify(payload || {})
    }).then(function (response) {
      return response.text().then(function (raw) {
        var data = null;
        try { data = JSON.parse(raw); } catch (e) { data = null; }
        if (response.ok) {
          settle(item, 'ok', describe(data || {}, response.status));
        } else {
          var why = (data && data.error) || raw.slice(0, 200) || response.statusText;
          settle(item, 'error', label + ' failed (' + response.status + '): ' + why);
        }
      });
    }).catch(function (err) {
      settle(item, 'error', label + ' failed: ' + (err && err.message ? err.message : 'network error'));
    }).then(function () {
      if (button) { button.disabled = false; button.classList.remove('busy'); }
    });
  }

  function workerAction(button, action) {
    var row = button.closest('[data-worker]');
    var holder = button.closest('[data-service]');
    if (!row || !holder) return;
    var service = holder.getAttribute('data-service');
    var worker = row.getAttribute('data-worker');
    var name = service + '[' + worker + ']';
    var url = '/admin/api/services/' + enc(service) + '/workers/' + enc(worker) + '/' + action;
    if (action === 'restart') {
      post(url, null, button, 'Restart of ' + name, function (d) {
        var to = d.replacement && d.replacement.pid ? d.replacement.pid : '?';
        if (d.done === false) return 'Restart of ' + name + ' under way: replacement pid ' + to + ' is starting (old pid ' + text(d.old_pid) + ')';
        return 'Restarted ' + name + ': pid ' + text(d.old_pid) + ' \u2192 ' + to;
      });
    } else {
      post(url, null, button, 'Drain of ' + name, function (d) {
        return 'Draining ' + name + ' (' + text(d.in_flight) + ' in flight)' +
          (d.replaced ? '; a replacement keeps the pool at its minimum' : '');
      });
    }
  }

  document.addEventListener('click', function (e) {
    var button = e.target.closest ? e.target.closest('button[data-action]') : null;
    if (!button || button.disabled) return;
    var action = button.getAttribute('data-action');
    if (action === 'restart' || action === 'drain') {
      workerAction(button, action);
    } else if (action === 'reload') {
      post('/admin/api/reload', null, button, 'Configuration reload', function (d) {
        return 'Configuration reloaded: ' + (d.summary || 'done');
      });
    } else if (action === 'rolling-restart') {
      var card = button.closest('[data-service]');
      if (!card) return;
      var service = card.getAttribute('data-service');
      post('/admin/api/services/' + enc(service) + '/rolling-restart', null, button,
        'Rolling restart of ' + service, function (d) {
          return 'Rolling restart of ' + service + ' started (' + text(d.workers) + ' workers, one at a time)';
        });
    }
  });

  document.addEventListener('submit', function (e) {
    var form = e.target;
    if (!form.matches || !form.matches('form[data-action="scale"]')) return;
    e.preventDefault();
    var card = form.closest('[data-service]');
    var input = form.querySelector('input[name="workers"]');
    if (!card || !input) return;
    var service = card.getAttribute('data-service');
    var n = Number(input.value);
    if (!Number.isInteger(n)) {
      notify('error', 'Scaling ' + service + ': the worker count must be a whole number');
      return;
    }
    post('/admin/api/services/' + enc(service) + '/scale', { workers: n },
      form.querySelector('button[type="submit"]'), 'Scaling ' + service + ' to ' + n,
      function (d) {
        delete input.dataset.dirty;
        return d.before === d.after ? service + ' already has ' + d.after + ' workers'
          : 'Scaled ' + service + ': ' + d.before + ' \u2192 ' + d.after + ' workers';
      });
  });

  document.addEventListener('input', function (e) {
    if (e.target.matches && e.target.matches('input[name="workers"]')) e.target.dataset.dirty = '1';
  });

  // -- daemon-wide numbers ---------------------------------------------------------------

  function updateGlobals(s) {
    var t = s.traffic || {};
    var values = {
      uptime: fmtDuration(s.uptime),
      workers: s.workers.ready + '/' + s.workers.total,
      rps: fmtRate(t.rps),
      error_rate: fmtPercent(t.error_rate),
      'error_rate-hint': fmtCount(t.errors) + ' errors last minute',
      p50: fmtMs(t.p50_ms), p95: fmtMs(t.p95_ms), p99: fmtMs(t.p99_ms),
      requests_total: fmtCount(t.requests_total),
      started: fmtClock(s.started_at), now: fmtClock(s.now)
    };
    Array.prototype.forEach.call(document.querySelectorAll('[data-g]'), function (node) {
      var key = node.getAttribute('data-g');
      if (Object.prototype.hasOwnProperty.call(values, key)) setText(node, values[key]);
    });
    var bad = s.services.some(function (svc) { return serviceState(svc.state) !== 'ok'; });
    body.classList.toggle('has-problems', bad);
  }

  // -- overview: service cards -----------------------------------------------------------

  function chip(w) {
    var note = workerNote(w);
    var title = 'worker ' + w.id + ': ' + w.state + (note ? ' \u00b7 ' + note[1] : '') +
      (w.passive_failures ? ' \u00b7 ' + w.passive_failures + ' failed requests in a row' : '');
    return el('li', { 'class': 'chip state-' + w.state + (note ? ' chip-' + note[0] : ''), title: title,
      'data-worker': String(w.id) }, [
      el('span', { 'class': 'chip-id', text: '#' + w.id }), ' ',
      el('span', { 'class': 'chip-pid', text: text(w.pid) })
    ]);
  }

  var SVG = 'http://www.w3.org/2000/svg';

  function svgEl(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  function buildBar() {
    var svg = svgEl('svg', { 'class': 'util-bar', viewBox: '0 0 100 6', preserveAspectRatio: 'none', role: 'img', 'data-f': 'util-bar' });
    svg.appendChild(svgEl('rect', { 'class': 'util-track', width: '100', height: '6' }));
    svg.appendChild(svgEl('rect', { 'class': 'util-busy', width: '0', height: '6', 'data-f': 'util-busy' }));
    svg.appendChild(svgEl('rect', { 'class': 'util-queued', x: '0', width: '0', height: '6', 'data-f': 'util-queued' }));
    return svg;
  }

  function setAttr(node, name, value) {
    if (!node) return;
    if (value === null) { if (node.hasAttribute(name)) node.removeAttribute(name); }
    else if (node.getAttribute(name) !== value) node.setAttribute(name, value);
  }

  function updateLoad(card, svc, now) {
    var load = serviceLoad(svc);
    var box = field(card, 'load');
    if (!box) return;
    setClassFamily(box, 'level-', load.level);
    setText(field(box, 'util'), fmtUtilisation(load));
    setAttr(field(box, 'util-bar'), 'aria-label', 'utilisation ' + fmtUtilisation(load));
    setAttr(field(box, 'util-busy'), 'width', String(load.bar[0]));
    setAttr(field(box, 'util-queued'), 'x', String(load.bar[0]));
    setAttr(field(box, 'util-queued'), 'width', String(load.bar[1]));
    setText(field(box, 'in-flight'), fmtCount(load.inFlight) + ' in flight');
    var queue = field(box, 'queue');
    setText(queue, fmtQueue(load));
    if (queue) queue.classList.toggle('queued', load.queued > 0);
    setText(field(box, 'capacity'), fmtCapacity(load));
    setText(field(card, 'autoscale'), fmtAutoscale(svc));
    var parts = decisionParts(svc, now);
    var decision = field(card, 'decision');
    if (decision) {
      setClassFamily(decision, 'dir-', parts.direction);
      setAttr(decision, 'title', parts.title || null);
      // A new decision flashes (not the one the page was loaded with).
      var at = String(((svc.autoscale || {}).last_decision || {}).at || '');
      if (decision.dataset.at !== undefined && decision.dataset.at !== at && at) flash(decision);
      decision.dataset.at = at;
      setText(field(decision, 'decision-move'), parts.move);
      setText(field(decision, 'decision-ago'), parts.ago);
      setText(field(decision, 'decision-reason'), parts.reason);
    }
  }

  function buildCard(svc) {
    var size = svc.size;
    var examples = svc.examples || [];
    var fixed = size.min === size.max;
    var list = examples.length ? el('ul', {}, examples.map(function (ex) {
      var href = safeHref(ex.path);
      return el('li', {}, [
        href ? el('a', { href: href, 'class': 'ex-path', text: ex.path })
          : el('span', { 'class': 'ex-path', text: text(ex.path) }),
        ' ', el('span', { 'class': 'ex-status', text: text(ex.status) })
      ]);
    })) : el('p', { 'class': 'muted', text: 'No examples in the manifest.' });
    var dl = el('dl', { 'class': 'mini' }, [['Ready', 'ready'], ['Req/s', 'rps'], ['p95', 'p95'], ['Requests', 'requests']]
      .map(function (pair) { return el('div', {}, [el('dt', { text: pair[0], 'data-f': pair[1] + '-label' }), el('dd', { 'data-f': pair[1], text: DASH })]); }));
    return el('article', { 'class': 'card svc', 'data-service': svc.name }, [
      el('header', { 'class': 'card-head' }, [
        el('h3', { 'class': 'svc-name', text: svc.name }),
        el('span', { 'class': 'badge', 'data-f': 'state' })
      ]),
      el('p', { 'class': 'route' }, [el('code', { text: svc.route }), ' ', el('span', { 'class': 'lang', text: svc.language || '' })]),
      el('p', { 'class': 'desc', text: svc.description || '' }),
      dl,
      el('div', { 'class': 'load', 'data-f': 'load' }, [
        el('div', { 'class': 'load-head' }, [
          el('span', { 'class': 'load-label', text: 'Utilisation' }),
          el('span', { 'class': 'load-pct', 'data-f': 'util', text: DASH })
        ]),
        buildBar(),
        el('div', { 'class': 'load-detail' }, [
          el('span', { 'data-f': 'in-flight' }), ' \u00b7 ', el('span', { 'class': 'queue', 'data-f': 'queue' }),
          ' \u00b7 ', el('span', { 'data-f': 'capacity' })
        ])
      ]),
      el('div', { 'class': 'scaling' }, [
        el('div', { 'class': 'load-head' }, [
          el('span', { 'class': 'load-label', text: 'Autoscale' }),
          el('span', { 'class': 'autoscale', 'data-f': 'autoscale' })
        ]),
        el('p', { 'class': 'decision', 'data-f': 'decision' }, [
          el('span', { 'class': 'decision-move', 'data-f': 'decision-move' }),
          el('span', { 'class': 'decision-ago', 'data-f': 'decision-ago' }),
          el('span', { 'class': 'decision-reason', 'data-f': 'decision-reason' })
        ])
      ]),
      el('p', { 'class': 'cgi-stats', 'data-f': 'cgi', hidden: 'hidden' }),
      el('ul', { 'class': 'chips', 'data-f': 'workers', 'aria-label': 'workers' }),
      el('details', { 'class': 'examples', open: 'open' }, [el('summary', { text: 'Examples (' + examples.length + ')' }), list]),
      el('form', { 'class': 'controls', 'data-action': 'scale' }, [
        el('label', { 'class': 'scale' }, [
          el('span', { 'class': 'scale-label', text: 'Workers (' + size.min + '\u2013' + size.max + ')' }),
          el('input', { type: 'number', name: 'workers', min: String(size.min), max: String(size.max),
            value: String(size.desired), step: '1', required: 'required', 'data-f': 'desired-input',
            disabled: fixed ? 'disabled' : null })
        ]),
        el('button', { type: 'submit', 'class': 'btn', text: 'Set', disabled: fixed ? 'disabled' : null }),
        el('button', { type: 'button', 'class': 'btn btn-warn', 'data-action': 'rolling-restart', text: 'Rolling restart',
          disabled: svc.protocol === 'cgi' ? 'disabled' : null,
          title: svc.protocol === 'cgi' ? 'a CGI script runs once per request: nothing to restart' : null })
      ])
    ]);
  }

  function updateCard(card, svc, now) {
    var state = serviceState(svc.state);
    var t = svc.traffic || {};
    setClassFamily(card, 'state-', state);
    card.setAttribute('data-state', state);
    var badge = field(card, 'state');
    setText(badge, state + (state === svc.state ? '' : ' (' + svc.state + ')') + (svc.rolling_restart ? ' \u00b7 rolling' : ''));
    setClassFamily(badge, 'state-', state);
    setText(field(card, 'ready-label'), svc.cgi ? 'Running' : 'Ready');
    setText(field(card, 'ready'), svc.cgi ? fmtCount(svc.cgi.in_flight) + ' of ' + fmtCount(svc.cgi.limit)
      : svc.size.ready + '/' + svc.size.desired);
    setText(field(card, 'rps'), fmtRate(t.rps));
    setText(field(card, 'p95'), fmtMs(t.p95_ms));
    setText(field(card, 'requests'), fmtCount(svc.requests));
    updateLoad(card, svc, now);
    var cgiStats = field(card, 'cgi');
    if (cgiStats) {
      cgiStats.hidden = !svc.cgi;
      setText(cgiStats, fmtCgi(svc.cgi));
    }
    var chips = field(card, 'workers');
    var key = svc.workers.map(function (w) {
      return w.id + ':' + w.pid + ':' + w.state + ':' + (w.retiring ? 1 : 0) + ':' + (w.recycling || '') + ':' + (w.passive_failures || 0);
    }).join(',');
    if (chips && chips.getAttribute('data-key') !== key) {
      chips.setAttribute('data-key', key);
      chips.replaceChildren.apply(chips, svc.workers.map(chip));
    }
    var input = field(card, 'desired-input');
    if (input && document.activeElement !== input && !input.dataset.dirty && input.value !== String(svc.size.desired)) {
      input.value = String(svc.size.desired);
    }
    // workers.min..max can change with a configuration reload.
    var size = svc.size;
    var fixed = size.min === size.max;
    setText(card.querySelector('.scale-label'), 'Workers (' + size.min + '\u2013' + size.max + ')');
    if (input) {
      setAttr(input, 'min', String(size.min));
      setAttr(input, 'max', String(size.max));
      input.disabled = fixed;
    }
    var submit = card.querySelector('form[data-action="scale"] button[type="submit"]');
    if (submit && !submit.classList.contains('busy')) submit.disabled = fixed;
  }

  function updateCards(s) {
    var holder = document.getElementById('services');
    if (!holder) return;
    syncKeyed(holder, 'data-service', s.services.map(function (svc) {
      return { key: svc.name, build: function () { return buildCard(svc); }, update: function (card) { updateCard(card, svc, s.now); } };
    }));
  }

  /** Make `holder`'s keyed children exactly `items` (in order), building, updating, removing. */
  function syncKeyed(holder, attr, items) {
    var existing = byData(holder, attr);
    var wanted = items.map(function (item) {
      var node = existing.get(item.key);
      if (node) existing.delete(item.key);
      else node = item.build();
      item.update(node);
      return node;
    });
    existing.forEach(function (node) { node.remove(); });
    var keyed = Array.prototype.filter.call(holder.children, function (c) { return c.hasAttribute(attr); });
    wanted.forEach(function (node, i) {
      if (keyed[i] !== node) {
        holder.insertBefore(node, keyed[i] || null);
        keyed = Array.prototype.filter.call(holder.children, function (c) { return c.hasAttribute(attr); });
      }
    });
  }

  // -- processes: the table -------------------------------------------------------------

  var COLUMNS = ['service', 'id', 'pid', 'port', 'state', 'uptime', 'restarts', 'requests',
    'in_flight', 'passive', 'health', 'rss', 'cpu'];
  var NUMERIC = { id: 1, pid: 1, port: 1, uptime: 1, restarts: 1, requests: 1, in_flight: 1, passive: 1, rss: 1, cpu: 1 };

  function buildRow(service, w) {
    var cells = COLUMNS.map(function (key) {
      var cell = el('td', { 'data-f': key, 'class': NUMERIC[key] ? 'num' : null });
      if (key === 'state') cell.appendChild(el('span', { 'class': 'badge' }));
      return cell;
    });
    cells.push(el('td', { 'class': 'actions' }, [
      el('button', { type: 'button', 'class': 'btn btn-small', 'data-action': 'restart', text: 'restart' }),
      el('button', { type: 'button', 'class': 'btn btn-small btn-ghost', 'data-action': 'drain', text: 'drain' })
    ]));
    return el('tr', { 'data-service': service, 'data-worker': String(w.id), 'data-key': service + '\n' + w.id }, cells);
  }

  function updateRow(row, svc, w) {
    var pidCell = field(row, 'pid');
    var oldPid = pidCell.textContent;
    var values = {
      service: svc.name, id: String(w.id), pid: text(w.pid), port: text(w.port),
      uptime: fmtDuration(w.uptime), restarts: fmtCount(w.restarts), requests: fmtCount(w.requests),
      in_flight: fmtCount(w.in_flight), passive: fmtCount(w.passive_failures),
      health: fmtHealth(w.last_health), rss: fmtBytes(w.rss), cpu: fmtCpu(w.cpu_percent)
    };
    Object.keys(values).forEach(function (key) { setText(field(row, key), values[key]); });
    field(row, 'passive').classList.toggle('warn', !!w.passive_failures);
    var stateCell = field(row, 'state');
    var badge = stateCell.firstChild;
    setText(badge, w.state);
    setClassFamily(badge, 'state-', w.state);
    setClassFamily(row, 'state-', w.state);
    var note = workerNote(w);
    var noteNode = field(stateCell, 'note');
    // "draining" says "leaving" already: its explanation goes on the state badge.
    var hidden = note && note[0] === 'leaving' && w.state === 'draining';
    setAttr(badge, 'title', hidden ? note[1] : null);
    if (hidden) note = null;
    if (note) {
      if (!noteNode) {
        stateCell.appendChild(document.createTextNode(' '));
        noteNode = stateCell.appendChild(el('span', { 'data-f': 'note' }));
      }
      noteNode.className = 'badge note note-' + note[0];
      setText(noteNode, note[0]);
      setAttr(noteNode, 'title', note[1]);
    } else if (noteNode) {
      noteNode.remove();
      stateCell.normalize();
      if (stateCell.lastChild && stateCell.lastChild.nodeType === 3) stateCell.removeChild(stateCell.lastChild);
    }
    row.classList.toggle('leaving', !!(w.retiring || w.recycling));
    var health = field(row, 'health');
    health.classList.toggle('health-ok', !!(w.last_health && w.last_health.ok));
    health.classList.toggle('health-bad', !!(w.last_health && !w.last_health.ok));
    if (oldPid && oldPid !== values.pid) flash(row);
    Array.prototype.forEach.call(row.querySelectorAll('button[data-action]'), function (b) {
      if (!b.classList.contains('busy')) b.disabled = !!w.retiring;
    });
  }

  function updateTable(s) {
    var tbody = document.getElementById('proc-body');
    if (!tbody) return;
    Array.prototype.forEach.call(tbody.rows, function (row) {
      if (!row.hasAttribute('data-key')) row.setAttribute('data-key', row.getAttribute('data-service') + '\n' + row.getAttribute('data-worker'));
    });
    var items = [];
    s.services.forEach(function (svc) {
      svc.workers.forEach(function (w) {
        items.push({ key: svc.name + '\n' + w.id, build: function () { return buildRow(svc.name, w); },
          update: function (row) { updateRow(row, svc, w); } });
      });
    });
    syncKeyed(tbody, 'data-key', items);
  }

  // -- events ----------------------------------------------------------------------------

  var seen = new Set();
  var lastSeq = null;

  function eventKey(ev) { return ev.seq + '|' + ev.time; }

  function buildEvent(ev) {
    var who = (ev.service || '') + (ev.worker === null || ev.worker === undefined ? '' : '[' + ev.worker + ']');
    return el('li', { 'class': 'ev level-' + (ev.level || 'info') + ' kind-' + (ev.kind || ''), 'data-seq': String(ev.seq) }, [
      el('time', { 'data-t': String(ev.time), text: fmtClock(ev.time) }),
      el('span', { 'class': 'ev-kind', text: ev.kind || '' }),
      el('span', { 'class': 'ev-who', text: who }),
      el('span', { 'class': 'ev-msg', text: ev.message || '' })
    ]);
  }

  function addEvent(ev) {
    var key = eventKey(ev);
    if (seen.has(key)) return;
    seen.add(key);
    var list = document.getElementById('event-list');
    if (!list) return;
    var item = buildEvent(ev);
    list.insertBefore(item, list.firstChild);
    flash(item);
    var limit = parseInt(list.getAttribute('data-limit'), 10) || 200;
    while (list.children.length > limit) list.removeChild(list.lastChild);
    var empty = document.querySelector('.empty');
    if (empty) empty.remove();
  }

  function initEvents() {
    Array.prototype.forEach.call(document.querySelectorAll('#event-list > li'), function (li) {
      var t = parseFloat(li.querySelector('time').getAttribute('data-t'));
      seen.add(li.getAttribute('data-seq') + '|' + t);
      var seq = parseInt(li.getAttribute('data-seq'), 10);
      if (!isNaN(seq) && (lastSeq === null || seq > lastSeq)) lastSeq = seq;
    });
    Array.prototype.forEach.call(document.querySelectorAll('time[data-t]'), function (node) {
      var t = parseFloat(node.getAttribute('data-t'));
      if (!isNaN(t)) setText(node, fmtClock(t));
    });
  }

  // -- traffic charts --------------------------------------------------------------------

  var CHART_LINES = {
    rps: [['rps', 's-rps', true]],
    errors: [['errors', 's-errors', true]],
    latency: [['p50_ms', 's-p50'], ['p95_ms', 's-p95'], ['p99_ms', 's-p99']],
    workers: [['workers', 's-total'], ['workers_ready', 's-ready']]
  };
  var series = null;
  var seriesTimer = null;

  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (v <= steps[i] * p) return steps[i] * p;
    return 10 * p;
  }

  function tick(v) {
    if (v >= 1000) return (v / 1000).toFixed(v % 1000 ? 1 : 0) + 'k';
    if (v === Math.round(v)) return String(v);
    return v >= 100 ? v.toFixed(0) : v.toFixed(1);
  }

  /** Time labels for a span of `span` seconds ending now: [[seconds ago, label]...]. */
  function timeMarks(span) {
    var steps = [10, 15, 30, 60, 120, 300, 600];
    var step = steps[steps.length - 1];
    for (var i = 0; i < steps.length; i++) if (span / steps[i] <= 4) { step = steps[i]; break; }
    var marks = [];
    for (var ago = 0; ago <= span + 0.001; ago += step) {
      marks.push([ago, ago === 0 ? 'now' : '-' + (ago % 60 ? ago + 's' : ago / 60 + 'm')]);
    }
    return marks;
  }

  function drawChart(svg, cols, metric, now, span) {
    var w = Math.max(120, Math.round(svg.clientWidth || svg.getBoundingClientRect().width || 320));
    var h = Math.max(80, Math.round(svg.clientHeight || svg.getBoundingClientRect().height || 140));
    svg.setAttribute('viewBox', '0 0 ' + w + ' ' + h);
    var left = 38, right = 8, top = 8, bottom = 20;
    var pw = w - left - right, ph = h - top - bottom;
    var t0 = now - span;
    var lines = CHART_LINES[metric];
    var times = (cols && cols.t) || [];
    var max = 0;
    lines.forEach(function (line) {
      ((cols && cols[line[0]]) || []).forEach(function (v, i) {
        if (v !== null && times[i] >= t0 && v > max) max = v;
      });
    });
    if (metric === 'workers') max = Math.max(max + 1, 2);
    var top_ = niceMax(max);
    var x = function (t) { return left + (t - t0) / span * pw; };
    var y = function (v) { return top + ph - v / top_ * ph; };
    var nodes = [];
    [0, 0.5, 1].forEach(function (f) {
      var gy = (top + ph - f * ph).toFixed(1);
      nodes.push(svgEl('line', { 'class': 'grid' + (f === 0 ? ' base' : ''), x1: left, x2: left + pw, y1: gy, y2: gy }));
      var label = svgEl('text', { 'class': 'axis', x: left - 6, y: (+gy + 4).toFixed(1), 'text-anchor': 'end' });
      label.textContent = tick(top_ * f);
      nodes.push(label);
    });
    timeMarks(span).forEach(function (m) {
      var label = svgEl('text', { 'class': 'axis', x: x(now - m[0]).toFixed(1), y: h - 5,
        'text-anchor': m[0] >= span - 0.001 ? 'start' : (m[0] === 0 ? 'end' : 'middle') });
      label.textContent = m[1];
      nodes.push(label);
    });
    var drawn = 0;
    lines.forEach(function (line) {
      var values = (cols && cols[line[0]]) || [];
      var d = '', area = '', run = [], dots = [];
      var flush = function () {
        if (run.length === 1) dots.push(run[0].split(','));
        if (run.length) {
          d += 'M' + run.join('L');
          if (line[2] && run.length > 1) {
            area += 'M' + run[0].split(',')[0] + ',' + y(0).toFixed(1) + 'L' + run.join('L') +
              'L' + run[run.length - 1].split(',')[0] + ',' + y(0).toFixed(1) + 'Z';
          }
        }
        run = [];
      };
      for (var i = 0; i < values.length; i++) {
        if (times[i] < t0) continue;
        if (values[i] === null || values[i] === undefined) { flush(); continue; }
        run.push(x(times[i]).toFixed(1) + ',' + y(Math.min(values[i], top_)).toFixed(1));
        drawn++;
      }
      flush();
      if (area) nodes.push(svgEl('path', { 'class': 'area ' + line[1], d: area }));
      if (d) nodes.push(svgEl('path', { 'class': 'line ' + line[1], d: d }));
      dots.forEach(function (p) { nodes.push(svgEl('circle', { 'class': 'dot ' + line[1], cx: p[0], cy: p[1], r: 1.8 })); });
    });
    if (!drawn) {
      var empty = svgEl('text', { 'class': 'empty-chart', x: left + pw / 2, y: top + ph / 2, 'text-anchor': 'middle' });
      empty.textContent = metric === 'latency' ? 'no requests' : 'no data yet';
      nodes.push(empty);
    }
    svg.replaceChildren.apply(svg, nodes);
    svg.setAttribute('data-drawn', String(drawn));
  }

  function lastValue(cols, key) {
    var values = (cols && cols[key]) || [];
    for (var i = values.length - 1; i >= 0 && i >= values.length - 5; i--) if (values[i] !== null) return values[i];
    return null;
  }

  /** Mean of the last `n` non-null values of a column (null without any). */
  function recentMean(cols, key, n) {
    var values = ((cols && cols[key]) || []).slice(-n).filter(function (v) { return v !== null; });
    if (!values.length) return null;
    return values.reduce(function (a, b) { return a + b; }, 0) / values.length;
  }

  function drawAll() {
    if (!series) return;
    var now = series.now;
    var first = now;
    Object.keys(series.services || {}).forEach(function (name) {
      var t = series.services[name].t || [];
      if (t.length) { now = Math.max(now, t[t.length - 1]); first = Math.min(first, t[0]); }
    });
    // The last 15 minutes; a younger daemon's whole history (at least a minute).
    var span = Math.min(WINDOW, Math.max(MIN_SPAN, Math.ceil((now - first + 1) / MIN_SPAN) * MIN_SPAN));
    setText(document.getElementById('traffic-span'), span >= WINDOW ? 'last 15 minutes' : 'since start (' + fmtDuration(now - first + 1) + ')');
    Array.prototype.forEach.call(document.querySelectorAll('#traffic [data-service]'), function (section) {
      var cols = (series.services || {})[section.getAttribute('data-service')] || null;
      Array.prototype.forEach.call(section.querySelectorAll('figure[data-metric]'), function (fig) {
        var metric = fig.getAttribute('data-metric');
        drawChart(fig.querySelector('svg'), cols, metric, now, span);
        var label = DASH;
        if (metric === 'rps') label = fmtRate(recentMean(cols, 'rps', 5)) + ' req/s';
        else if (metric === 'errors') label = fmtRate(recentMean(cols, 'errors', 5)) + ' errors/s';
        else if (metric === 'latency') label = 'p95 ' + fmtMs(lastValue(cols, 'p95_ms'));
        else if (metric === 'workers' && section.getAttribute('data-protocol') === 'cgi') {
          label = fmtCgiKind(lastValue(cols, 'workers'), lastValue(cols, 'workers_ready'));
        } else if (metric === 'workers') label = text(lastValue(cols, 'workers_ready')) + '/' + text(lastValue(cols, 'workers')) + ' ready';
        setText(field(fig, 'now-' + metric), label);
      });
    });
  }

  function setTrafficStatus(message) { setText(document.getElementById('traffic-status'), message); }

  function loadSeries() {
    clearTimeout(seriesTimer);
    fetch('/admin/api/metrics?window=' + WINDOW, { credentials: 'same-origin', headers: { Accept: 'application/json' } })
      .then(function (r) {
        if (!r.ok) return r.json().catch(function () { return {}; }).then(function (d) { throw new Error(d.error || 'HTTP ' + r.status); });
        return r.json();
      })
      .then(function (data) { series = data; drawAll(); setTrafficStatus(''); })
      .catch(function (err) { setTrafficStatus('· metrics unavailable: ' + err.message); })
      .then(function () { seriesTimer = setTimeout(loadSeries, SERIES_REFRESH); });
  }

  /** Extend the series with each service's newest point from the live snapshot. */
  function updateTraffic(s) {
    Array.prototype.forEach.call(document.querySelectorAll('#traffic [data-service]'), function (section) {
      var svc = s.services.find(function (x) { return x.name === section.getAttribute('data-service'); });
      if (!svc) return;
      var state = serviceState(svc.state);
      setClassFamily(section, 'state-', state);
      var badge = field(section, 'state');
      setText(badge, state);
      setClassFamily(badge, 'state-', state);
    });
    if (!series) return;
    var grew = false;
    s.services.forEach(function (svc) {
      var point = svc.latest;
      var cols = series.services && series.services[svc.name];
      if (!point || !cols) return;
      var last = cols.t.length ? cols.t[cols.t.length - 1] : -Infinity;
      if (point.t <= last + 0.001) return;
      Object.keys(cols).forEach(function (k) { cols[k].push(point[k] === undefined ? null : point[k]); });
      while (cols.t.length && cols.t[0] < point.t - WINDOW) Object.keys(cols).forEach(function (k) { cols[k].shift(); });
      series.now = Math.max(series.now, point.t);
      grew = true;
    });
    if (grew) drawAll();
  }

  // -- the live stream -------------------------------------------------------------------

  var source = null;
  var retryDelay = 1000;
  var retryTimer = null;
  var lastStatus = 0;
  var startedAt = null;

  function onStatus(e) {
    var s;
    try { s = JSON.parse(e.data); } catch (err) { return; }
    lastStatus = Date.now();
    retryDelay = 1000;
    setConn('live');
    if (startedAt !== null && s.started_at !== startedAt) {
      notify('info', 'The daemon restarted (new start time ' + fmtClock(s.started_at) + ').');
      if (page === 'traffic') loadSeries();
    }
    startedAt = s.started_at;
    updateGlobals(s);
    if (page === 'overview') updateCards(s);
    else if (page === 'processes') updateTable(s);
    else if (page === 'traffic') updateTraffic(s);
  }

  function onEvent(e) {
    var ev;
    try { ev = JSON.parse(e.data); } catch (err) { return; }
    var seq = parseInt(e.lastEventId, 10);
    if (!isNaN(seq)) lastSeq = seq;
    addEvent(ev);
  }

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (source) source.close();
    var url = '/admin/api/events' + (lastSeq !== null ? '?since=' + lastSeq : '');
    var es = source = new EventSource(url);
    es.addEventListener('status', onStatus);
    es.addEventListener('event', onEvent);
    es.onerror = function () {
      if (es !== source) return;
      if (es.readyState === EventSource.CLOSED) scheduleReconnect();  // the browser gave up
      else setConn('reconnecting');                                    // the browser retries
    };
  }

  function scheduleReconnect() {
    if (source) { source.close(); source = null; }
    setConn('reconnecting');
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, MAX_RETRY);
  }

  function watchdog() {
    if (!source) return;
    var quiet = Date.now() - lastStatus;
    if (lastStatus && quiet > STALE_AFTER) setConn('reconnecting');
    if (quiet > FORCE_RECONNECT && !retryTimer) {
      lastStatus = Date.now();  // one fresh attempt per quiet period
      scheduleReconnect();
    }
  }

  // -- start -------------------------------------------------------------------------------

  initEvents();
  if (page === 'traffic') {
    loadSeries();
    var resizeTimer = null;
    window.addEventListener('resize', function () {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(drawAll, 150);
    });
  }
  if (typeof EventSource === 'function' && conn) {
    lastStatus = Date.now();
    connect();
    setInterval(watchdog, 1000);
  }
  window.addEventListener('pagehide', function () { if (source) source.close(); });
})();
