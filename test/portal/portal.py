#!/usr/bin/env python3
"""
A local patient portal for portal_sync's tests (SPEC section 5).

A real HTTP/1.1 server on loopback (optionally TLS) that records every
delivery request, keeps the portal's state per practice and patient (applying
upserts, deletes, snapshots, purges; dedupe by event_id; per-patient order
checks) and can be told, through a small JSON control API under /_control,
to answer in each of the ways of SPEC section 5.

    python3 test/portal/portal.py --port 0 [--host 127.0.0.1] [--log FILE]
                                  [--tls-cert CERT --tls-key KEY]

Prints "listening on PORT" on stdout once it accepts connections.  Nothing
clinical is ever printed (the --log file holds request summaries without
row data).

Delivery: any POST whose path is not under /_control.

Control API (JSON in, JSON out):
  GET  /_control/state              the portal's state (see state_json())
  GET  /_control/requests[?full=1][&since=N]
                                    request summaries (full=1: with bodies;
                                    time: arrival, answered_at: when the
                                    answer was sent, closed_at: when a close
                                    rule dropped the connection)
  GET  /_control/health             {"ok": true}
  POST /_control/reset              forget state, requests and modes
  POST /_control/mode   {...}       set the answer rules (replaces them):
        {"mode": "ok"}
        {"mode": "status", "status": 500, "count": 3}        then back to ok
        {"mode": "status", "status": 429, "retry_after": "2"}
        {"mode": "status", "status": 401}                    forever
        {"mode": "status", "status": 200, "raw_body": "<html>.."}  a body
                                    sent as it is (not applied)
        {"mode": "status", "status": 302, "headers": {"Location": ".."}}
        {"mode": "reject_event", "match": {"key": "123"}}    400 to batches
                                    holding a matching event (status: other 4xx)
        {"mode": "rejected_list", "match": {...}, "reason": "..."}
                                    200 + {"rejected":[...]} for matching
                                    events, the rest is applied
                                    ("reason_bytes": N pads each reason)
        {"mode": "hang", "seconds": 5, "apply": true}        sleep, then
                                    answer 200 (and apply unless apply=false)
        {"mode": "delay", "seconds": 0.2}                    sleep, then go on
                                    with the next rules (slow portal)
        {"mode": "gate", "name": "a", "seconds": 60}         hold the
                                    request until POST /_control/open
                                    {"name": "a"} (at most "seconds"), then
                                    go on with the next rules
        {"mode": "random_fail", "rate": 0.3, "status": 500, "seed": 1}
        {"mode": "max_body", "bytes": 4096}                  413 when the JSON
                                    is larger (before any compression)
        {"mode": "refuse_gzip"}     415 to gzip-compressed bodies
        {"mode": "close"}           drop the connection without answering
        {"mode": "require_token", "token": "abc"}            401 unless
                                    "Authorization: Bearer abc"
      or {"modes": [rule, rule, ...]}: rules are tried in order; the first
      one that decides answers; "count" on any rule limits how many times it
      decides.  A match is {field: value} over the event's fields, or
      "data.col" for a column of its data; values compare as strings; a list
      value matches any of its elements.
  POST /_control/open   {"name": "a"}   let requests held by gate "a" go
                                    on (and every later one it holds)
  POST /_control/down   {"seconds": N}  stop listening (refuse connections)
                                    and close open connections; back after
                                    N seconds (omitted: until SIGUSR2)
  SIGUSR1 / SIGUSR2: go down / come back up.
"""

import argparse
import hashlib
import decimal
import gzip
import zlib
import json
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

ISO_UTC = re.compile(r'^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$')
OPS = ('upsert', 'delete', 'snapshot_begin', 'snapshot_end', 'purge')
KINDS = ('appointment', 'ccda', 'note', 'pin', 'insurance', 'clinical',
         'patient')


def jload(raw):
    """JSON with exact numbers: a number with a fraction or exponent is kept
    as a Decimal, so that it is written back digit for digit."""
    if isinstance(raw, bytes):
        raw = raw.decode('utf-8')
    return json.loads(raw, parse_float=decimal.Decimal)


def jdump(o):
    """JSON text of o; Decimals written as the numbers they were read as."""
    if isinstance(o, dict):
        return '{' + ','.join(json.dumps(str(k)) + ':' + jdump(v)
                              for k, v in o.items()) + '}'
    if isinstance(o, (list, tuple)):
        return '[' + ','.join(jdump(v) for v in o) + ']'
    if isinstance(o, decimal.Decimal):
        return str(o)
    if isinstance(o, set):
        return jdump(sorted(o))
    return json.dumps(o)


def now_iso():
    t = time.time()
    return time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t)) + \
        '.%03dZ' % int((t % 1) * 1000)


class Portal:
    """State of the portal, shared by all handler threads (one lock)."""

    def __init__(self, log_path=None):
        self.lock = threading.Lock()
        self.log_path = log_path
        self.log_file = open(log_path, 'a', buffering=1) if log_path else None
        self.reset()

    def reset(self):
        self.practices = {}
        self.applied = set()
        self.duplicates = 0
        self.order_violations = []
        self.ccda_violations = []
        self.purge_violations = []
        self.snapshot_violations = []
        self.protocol_errors = []
        self.requests = []
        self.rules = []
        self.answers = {}
        self.rng = random.Random(0)
        self.gates = {}
        self._pending_gates = []

    # ------------------------------------------------------------ rules
    def set_rules(self, spec):
        if 'modes' in spec:
            rules = list(spec['modes'])
        else:
            rules = [spec]
        out = []
        for r in rules:
            r = dict(r)
            m = r.get('mode', 'ok')
            if m not in ('ok', 'status', 'reject_event', 'rejected_list',
                         'hang', 'delay', 'gate', 'random_fail', 'max_body',
                         'close', 'require_token', 'refuse_gzip'):
                raise ValueError('unknown mode %r' % m)
            r['mode'] = m
            if 'seed' in r:
                self.rng = random.Random(r['seed'])
            r['fired'] = 0
            if m == 'gate':
                self.gates.setdefault(str(r.get('name', '')), threading.Event())
            out.append(r)
        self.rules = out

    @staticmethod
    def event_matches(ev, match):
        if not match:
            return False
        for field, want in match.items():
            if field.startswith('data.'):
                data = ev.get('data')
                if not isinstance(data, dict):
                    return False
                have = data.get(field[5:])
            else:
                have = ev.get(field)
            wants = want if isinstance(want, list) else [want]
            if have is None:
                if None not in wants:
                    return False
                continue
            if str(have) not in [str(w) for w in wants if w is not None]:
                return False
        return True

    # ------------------------------------------------------------ validation
    def validate(self, headers, body):
        """Protocol errors of one delivery request (a list of strings)."""
        errs = []
        ct = headers.get('Content-Type') or ''
        if not ct.lower().startswith('application/json'):
            errs.append('Content-Type is %r' % ct)
        ua = headers.get('User-Agent') or ''
        if not ua.startswith('portal_sync/'):
            errs.append('User-Agent is %r' % ua)
        if not isinstance(body, dict):
            errs.append('body is not a JSON object')
            return errs
        for f in ('batch_id', 'practice_id', 'events'):
            if f not in body:
                errs.append('body has no %s' % f)
        if not isinstance(body.get('batch_id'), str) or not body.get('batch_id'):
            errs.append('batch_id is not a non-empty string')
        if not isinstance(body.get('practice_id'), str) or not body.get('practice_id'):
            errs.append('practice_id is not a non-empty string')
        ik = headers.get('Idempotency-Key')
        if ik is None:
            errs.append('no Idempotency-Key')
        elif ik != body.get('batch_id'):
            errs.append('Idempotency-Key differs from batch_id')
        evs = body.get('events')
        if not isinstance(evs, list) or not evs:
            errs.append('events is not a non-empty list')
            return errs
        for i, ev in enumerate(evs):
            if not isinstance(ev, dict):
                errs.append('event %d is not an object' % i)
                continue
            for f in ('event_id', 'seq', 'patient_id', 'op', 'captured_at'):
                if f not in ev:
                    errs.append('event %d has no %s' % (i, f))
            if not isinstance(ev.get('event_id'), str) or not ev.get('event_id'):
                errs.append('event %d: event_id not a non-empty string' % i)
            if not isinstance(ev.get('seq'), int) or isinstance(ev.get('seq'), bool):
                errs.append('event %d: seq not an integer' % i)
            if not isinstance(ev.get('patient_id'), str):
                errs.append('event %d: patient_id not a string' % i)
            op = ev.get('op')
            if op not in OPS:
                errs.append('event %d: op %r' % (i, op))
            if not isinstance(ev.get('captured_at'), str) or \
                    not ISO_UTC.match(ev.get('captured_at')):
                errs.append('event %d: captured_at %r not ISO 8601 UTC'
                            % (i, ev.get('captured_at')))
            if op in ('upsert', 'delete'):
                if not isinstance(ev.get('source'), str) or not ev.get('source'):
                    errs.append('event %d: %s without source' % (i, op))
                if ev.get('kind') not in KINDS:
                    errs.append('event %d: kind %r' % (i, ev.get('kind')))
                if not isinstance(ev.get('key'), str):
                    errs.append('event %d: %s key not a string' % (i, op))
            if op == 'upsert' and not isinstance(ev.get('data'), dict):
                errs.append('event %d: upsert without data object' % i)
            if op == 'delete' and ev.get('data') is not None:
                errs.append('event %d: delete with data' % i)
            if op in ('snapshot_begin', 'snapshot_end', 'purge'):
                if ev.get('key') is not None or ev.get('data') is not None:
                    errs.append('event %d: %s with key/data' % (i, op))
        return errs

    # ------------------------------------------------------------ applying
    def patient(self, practice, pid):
        pr = self.practices.setdefault(practice, {'patients': {}})
        return pr['patients'].setdefault(pid, {
            'items': {}, 'kinds': {}, 'purged': False, 'snapshots': 0,
            'open_snapshot': None, 'mentioned': set(), 'last_seq': None,
            'seqs': [], 'applied': 0})

    def apply(self, body, skip_ids, reqno):
        """Apply an accepted batch (lock held)."""
        practice = body.get('practice_id')
        for ev in body.get('events') or []:
            if not isinstance(ev, dict):
                continue
            eid = ev.get('event_id')
            if eid in skip_ids:
                continue
            if eid in self.applied:
                self.duplicates += 1
                continue
            self.applied.add(eid)
            pid = ev.get('patient_id')
            p = self.patient(practice, pid)
            seq = ev.get('seq')
            op = ev.get('op')
            kind = ev.get('kind')
            src = ev.get('source')
            key = ev.get('key')
            p['applied'] += 1
            p['seqs'].append(seq)
            where = {'request': reqno, 'practice_id': practice,
                     'patient_id': pid, 'event_id': eid, 'seq': seq,
                     'op': op, 'source': src, 'key': key}
            if kind == 'ccda':
                # C-CDA documents wait for the patient's accepted snapshot.
                if op == 'upsert' and (p['snapshots'] == 0 or
                                       p['open_snapshot'] is not None):
                    self.ccda_violations.append(
                        dict(where, problem='ccda upsert before the '
                             "patient's snapshot_end was accepted"))
            elif isinstance(seq, int):
                if p['last_seq'] is not None and seq < p['last_seq']:
                    self.order_violations.append(
                        dict(where, previous_seq=p['last_seq']))
                else:
                    p['last_seq'] = seq
            # insurance flows for patients who are not enrolled: after an
            # unenroll()'s purge it is sent again
            if p['purged'] and op in ('upsert', 'delete') and \
                    kind != 'insurance':
                self.purge_violations.append(
                    dict(where, problem='item event for a purged patient '
                         'before its next snapshot'))
            if op == 'upsert':
                p['items'].setdefault(src, {})[key] = ev.get('data')
                p['kinds'][src] = kind
                if p['open_snapshot'] is not None and \
                        p['open_snapshot'] == seq:
                    p['mentioned'].add((src, key))
            elif op == 'delete':
                items = p['items'].get(src)
                if items is not None:
                    items.pop(key, None)
                    if not items:
                        del p['items'][src]
            elif op == 'snapshot_begin':
                if p['open_snapshot'] is not None:
                    self.snapshot_violations.append(
                        dict(where, problem='snapshot_begin while snapshot %s '
                             'is open' % p['open_snapshot']))
                p['open_snapshot'] = seq
                p['mentioned'] = set()
                p['purged'] = False
            elif op == 'snapshot_end':
                if p['open_snapshot'] != seq:
                    self.snapshot_violations.append(
                        dict(where, problem='snapshot_end without matching '
                             'snapshot_begin (open: %s)' % p['open_snapshot']))
                else:
                    for s in list(p['items']):
                        if p['kinds'].get(s) == 'ccda':
                            continue
                        for k in list(p['items'][s]):
                            if (s, k) not in p['mentioned']:
                                del p['items'][s][k]
                        if not p['items'][s]:
                            del p['items'][s]
                    p['snapshots'] += 1
                    p['open_snapshot'] = None
                    p['mentioned'] = set()
            elif op == 'purge':
                p['items'] = {}
                p['purged'] = True
                p['open_snapshot'] = None
                p['mentioned'] = set()

    # ------------------------------------------------------------ deciding
    def decide(self, headers, raw, body, events):
        """
        Decide the answer to one delivery request (lock held).  Returns
        (action, status, extra_headers, answer_body, rejected_ids, sleep,
        apply_after_sleep, rule_name).
        """
        for r in self.rules:
            count = r.get('count')
            if count is not None and r['fired'] >= count:
                continue
            m = r['mode']
            decided = None
            if m == 'ok':
                decided = ('answer', 200, {}, {}, set(), 0, True)
            elif m == 'status':
                hdrs = dict(r.get('headers') or {})
                if r.get('retry_after') is not None:
                    hdrs['Retry-After'] = str(r['retry_after'])
                body = r.get('body', {'error': 'status mode'})
                if r.get('raw_body') is not None:
                    body = str(r['raw_body'])
                    hdrs.setdefault('Content-Type', 'text/html')
                decided = ('answer', int(r.get('status', 500)), hdrs,
                           body, set(), 0, False)
            elif m == 'reject_event':
                if any(self.event_matches(ev, r.get('match'))
                       for ev in events if isinstance(ev, dict)):
                    decided = ('answer', int(r.get('status', 400)), {},
                               {'error': 'invalid event'}, set(), 0, False)
            elif m == 'rejected_list':
                rej = [ev.get('event_id') for ev in events
                       if isinstance(ev, dict) and
                       self.event_matches(ev, r.get('match'))]
                if rej:
                    reason = r.get('reason', 'rejected by the test portal')
                    if r.get('reason_bytes'):
                        reason = (reason + ' ' + 'x' * int(r['reason_bytes']))[:int(r['reason_bytes'])]
                    decided = ('answer', 200, {},
                               {'rejected': [{'event_id': e, 'reason': reason}
                                             for e in rej]},
                               set(rej), 0, True)
            elif m == 'hang':
                decided = ('answer', 200, {}, {}, set(),
                           float(r.get('seconds', 3600)),
                           bool(r.get('apply', True)))
            elif m == 'delay':
                # Not a decision: sleeps, then the next rules decide.
                if count is not None:
                    r['fired'] += 1
                self._pending_delay = getattr(self, '_pending_delay', 0) + \
                    float(r.get('seconds', 0.1))
                continue
            elif m == 'gate':
                # Not a decision: waits for the test, then the next rules.
                if count is not None:
                    r['fired'] += 1
                self._pending_gates.append(
                    (self.gates[str(r.get('name', ''))],
                     float(r.get('seconds', 60))))
                continue
            elif m == 'random_fail':
                if self.rng.random() < float(r.get('rate', 0.3)):
                    decided = ('answer', int(r.get('status', 500)), {},
                               {'error': 'random failure'}, set(), 0, False)
            elif m == 'refuse_gzip':
                if headers.get('Content-Encoding'):
                    decided = ('answer', 415, {'Accept-Encoding': 'identity'},
                               {'error': 'unsupported content encoding'},
                               set(), 0, False)
            elif m == 'max_body':
                if len(raw) > int(r.get('bytes', 4096)):
                    decided = ('answer', 413, {}, {'error': 'too large'},
                               set(), 0, False)
            elif m == 'close':
                decided = ('close', 0, {}, None, set(), 0, False)
            elif m == 'require_token':
                want = 'Bearer %s' % r.get('token', '')
                if headers.get('Authorization') != want:
                    decided = ('answer', 401, {'WWW-Authenticate': 'Bearer'},
                               {'error': 'unauthorized'}, set(), 0, False)
            if decided is not None:
                r['fired'] += 1
                return decided + (m,)
        return ('answer', 200, {}, {}, set(), 0, True, 'default')

    # ------------------------------------------------------------ reports
    def state_json(self, with_seqs=False):
        prs = {}
        for practice, pr in self.practices.items():
            pts = {}
            for pid, p in pr['patients'].items():
                d = {'items': p['items'], 'purged': p['purged'],
                     'snapshots': p['snapshots'],
                     'open_snapshot': p['open_snapshot'],
                     'last_seq': p['last_seq'], 'applied': p['applied']}
                if with_seqs:
                    d['seqs'] = p['seqs']
                pts[pid] = d
            prs[practice] = {'patients': pts}
        return {'practices': prs, 'applied_event_ids': len(self.applied),
                'duplicates': self.duplicates,
                'order_violations': self.order_violations,
                'ccda_violations': self.ccda_violations,
                'purge_violations': self.purge_violations,
                'snapshot_violations': self.snapshot_violations,
                'protocol_errors': self.protocol_errors,
                'requests': len(self.requests),
                'answers': self.answers}

    def log(self, summary):
        if self.log_file:
            s = dict(summary)
            s['events'] = [{k: v for k, v in ev.items() if k != 'data'}
                           for ev in s.get('events', [])]
            s.pop('body', None)
            self.log_file.write(jdump(s) + '\n')


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'portal_sync-test-portal/1.0'

    def log_message(self, fmt, *args):  # nothing on stderr/stdout
        pass

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()
        with self.server.app_conns_lock:
            self.server.app_conns.add(self.connection)

    def handle_one_request(self):
        # A connection accepted just before the portal went down (its
        # thread registered it after go_down() closed the others) must not
        # go on serving a keep-alive client while the portal is down.
        if self.server.app.server is not self.server:
            self.close_connection = True
            return
        super().handle_one_request()

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.app_conns_lock:
                self.server.app_conns.discard(self.connection)

    # -------------------------------------------------------------- helpers
    def read_body(self):
        """The request body as sent (Content-Length or chunked); sets
        self.body_complete."""
        self.body_complete = True
        if (self.headers.get('Transfer-Encoding') or '').lower() == 'chunked':
            parts = []
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b';')[0].strip(), 16)
                except ValueError:
                    self.body_complete = False
                    break
                if size == 0:
                    while self.rfile.readline(1024) not in (b'\r\n', b'\n', b''):
                        pass            # trailers
                    break
                data = self.rfile.read(size)
                self.rfile.readline(8)  # CRLF after the chunk
                if len(data) < size:
                    self.body_complete = False
                    break
                parts.append(data)
            return b''.join(parts)
        n = int(self.headers.get('Content-Length') or 0)
        data = b''
        while len(data) < n:
            chunk = self.rfile.read(n - len(data))
            if not chunk:
                break
            data += chunk
        self.body_complete = len(data) == n
        return data

    def answer_raw(self, status, raw):
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)
        self.wfile.flush()

    def answer(self, status, obj, extra=None):
        """Answer obj as JSON, or a str as it is (raw_body)."""
        extra = dict(extra or {})
        if isinstance(obj, str):
            raw = obj.encode()
        else:
            raw = jdump(obj).encode() if obj is not None else b''
        self.send_response(status)
        self.send_header('Content-Type',
                         extra.pop('Content-Type', 'application/json'))
        self.send_header('Content-Length', str(len(raw)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if raw:
            self.wfile.write(raw)
        self.wfile.flush()

    # -------------------------------------------------------------- control
    def do_GET(self):
        portal = self.server.portal
        u = urlparse(self.path)
        q = parse_qs(u.query)
        if u.path == '/_control/health':
            return self.answer(200, {'ok': True})
        if u.path == '/_control/state':
            with portal.lock:
                raw = jdump(portal.state_json(with_seqs='seqs' in q))
            return self.answer_raw(200, raw.encode())
        if u.path == '/_control/requests':
            full = 'full' in q
            since = int(q.get('since', ['0'])[0])
            with portal.lock:
                out = []
                for r in portal.requests[since:]:
                    r = dict(r)
                    if not full:
                        r.pop('body', None)
                        r['events'] = [{k: v for k, v in ev.items()
                                        if k != 'data'}
                                       for ev in r.get('events', [])]
                    out.append(r)
                raw = jdump(out)
            return self.answer_raw(200, raw.encode())
        return self.answer(404, {'error': 'not found'})

    def do_POST(self):
        raw = self.read_body()
        u = urlparse(self.path)
        if u.path.startswith('/_control'):
            return self.control(u.path, raw)
        return self.delivery(raw)

    def do_PUT(self):
        raw = self.read_body()
        return self.answer(405, {'error': 'POST only'})

    def control(self, path, raw):
        portal = self.server.portal
        try:
            body = jload(raw) if raw else {}
        except ValueError:
            return self.answer(400, {'error': 'bad json'})
        if path == '/_control/reset':
            with portal.lock:
                portal.reset()
            return self.answer(200, {'ok': True})
        if path == '/_control/mode':
            try:
                with portal.lock:
                    portal.set_rules(body)
                    portal._pending_delay = 0
                    portal._pending_gates = []
            except (ValueError, TypeError) as e:
                return self.answer(400, {'error': str(e)})
            return self.answer(200, {'ok': True})
        if path == '/_control/open':
            with portal.lock:
                gate = portal.gates.setdefault(str(body.get('name', '')),
                                               threading.Event())
            gate.set()
            return self.answer(200, {'ok': True})
        if path == '/_control/down':
            self.answer(200, {'ok': True})
            self.close_connection = True
            secs = body.get('seconds')
            threading.Thread(target=self.server.app.go_down,
                             args=(secs,), daemon=True).start()
            return None
        return self.answer(404, {'error': 'not found'})

    # -------------------------------------------------------------- delivery
    def delivery(self, raw):
        portal = self.server.portal
        if not self.body_complete:
            # The sender went away in the middle of the body (a killed
            # worker): nothing was delivered, and there is nobody to answer.
            self.close_connection = True
            return None
        hdrs = {k: self.headers.get(k) for k in
                ('Authorization', 'Idempotency-Key', 'User-Agent',
                 'Content-Type', 'Content-Length', 'Expect',
                 'Content-Encoding', 'Transfer-Encoding')}
        body = None
        parse_error = None
        wire = raw
        encoding = (hdrs.get('Content-Encoding') or '').lower()
        if encoding == 'gzip':
            try:
                raw = gzip.decompress(wire)
            except (OSError, EOFError, zlib.error) as e:
                parse_error = 'body is not valid gzip: %s' % type(e).__name__
        elif encoding not in ('', 'identity'):
            parse_error = 'Content-Encoding is %r' % encoding
        try:
            if parse_error is None:
                body = jload(raw)
        except (ValueError, UnicodeDecodeError) as e:
            parse_error = 'body is not JSON: %s' % type(e).__name__
        events = body.get('events') if isinstance(body, dict) else None
        if not isinstance(events, list):
            events = []
        with portal.lock:
            reqno = len(portal.requests)
            summary = {
                'n': reqno, 'time': time.time(), 'time_iso': now_iso(),
                'path': self.path, 'method': 'POST', 'headers': hdrs,
                'bytes': len(wire), 'json_bytes': len(raw),
                'encoding': encoding or None,
                'batch_id': body.get('batch_id') if isinstance(body, dict) else None,
                'practice_id': body.get('practice_id') if isinstance(body, dict) else None,
                'events': [ev if isinstance(ev, dict) else {'bad': True}
                           for ev in events],
                # what identifies the content: the body as sent, and
                # each event as it would be sent again (all but seq)
                'body_sha': hashlib.sha256(raw).hexdigest(),
                'event_digests': [
                    hashlib.sha256(jdump({k: v for k, v in sorted(ev.items())
                                          if k != 'seq'}).encode()).hexdigest()
                    if isinstance(ev, dict) else None for ev in events],
                'status': None, 'rule': None, 'rejected': [],
            }
            portal.requests.append(summary)
            errs = [parse_error] if parse_error else \
                portal.validate(hdrs, body)
            for e in errs:
                portal.protocol_errors.append({'request': reqno, 'error': e})
            portal._pending_delay = 0
            portal._pending_gates = []
            if errs:
                decision = ('answer', 400, {}, {'error': 'bad request',
                                                'details': errs},
                            set(), 0, False, 'protocol_error')
            else:
                decision = portal.decide(hdrs, raw, body, events)
            delay = portal._pending_delay
            portal._pending_delay = 0
            gates = portal._pending_gates
            portal._pending_gates = []
        for gate, seconds in gates:
            gate.wait(seconds)
        action, status, extra, answer_body, rejected, sleep, do_apply, rule = \
            decision
        if delay:
            time.sleep(delay)
        if sleep:
            time.sleep(sleep)
        with portal.lock:
            summary['rule'] = rule
            summary['rejected'] = sorted(rejected)
            if action == 'close':
                summary['status'] = 'closed'
                summary['closed_at'] = time.time()
            else:
                summary['status'] = status
                summary['answered_at'] = time.time()
            portal.answers[str(summary['status'])] = \
                portal.answers.get(str(summary['status']), 0) + 1
            if action == 'answer' and 200 <= status < 300 and do_apply:
                portal.apply(body, rejected, reqno)
                summary['applied'] = True
            portal.log(summary)
        if action == 'close':
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        try:
            self.answer(status, answer_body, extra)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True


class App:
    """Owns the listening server; can go down and come back on one port."""

    def __init__(self, args):
        self.args = args
        self.portal = Portal(args.log)
        self.port = args.port
        self.server = None
        self.up_event = threading.Event()
        self.stopping = False
        self.state_lock = threading.Lock()
        self.ssl_ctx = None
        if args.tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
            self.ssl_ctx = ctx

    def make_server(self):
        ThreadingHTTPServer.allow_reuse_address = True
        # a worker may open max_inflight connections at once, and the
        # tests' own control requests come beside them: a listen backlog
        # of socketserver's default 5 drops connections under load
        ThreadingHTTPServer.request_queue_size = 128
        srv = ThreadingHTTPServer((self.args.host, self.port), Handler)
        srv.daemon_threads = True
        # going down must not wait for handler threads (a held request)
        srv.block_on_close = False
        srv.portal = self.portal
        srv.app = self
        srv.app_conns = set()
        srv.app_conns_lock = threading.Lock()
        if self.ssl_ctx:
            # The handshake happens in the handler thread, so a client that
            # never completes it cannot block the accept loop.
            srv.socket = self.ssl_ctx.wrap_socket(
                srv.socket, server_side=True, do_handshake_on_connect=False)
        self.port = srv.server_address[1]
        return srv

    def go_down(self, seconds=None):
        with self.state_lock:
            srv = self.server
            if srv is None:
                return
            self.server = None
            self.up_event.clear()
        srv.shutdown()        # serve_forever returns in the main loop
        with srv.app_conns_lock:
            conns = list(srv.app_conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if seconds is not None:
            t = threading.Timer(float(seconds), self.come_up)
            t.daemon = True
            t.start()

    def come_up(self):
        self.up_event.set()

    def run(self):
        first = True
        while not self.stopping:
            for attempt in range(100):
                try:
                    srv = self.make_server()
                    break
                except OSError as e:
                    if first:
                        raise
                    if attempt % 10 == 0:
                        print('cannot listen again on port %d yet: %s' % (self.port, e),
                              file=sys.stderr, flush=True)
                    time.sleep(0.1)
            else:
                raise SystemExit('cannot listen again on port %d' % self.port)
            with self.state_lock:
                self.server = srv
            if first:
                print('listening on %d' % self.port, flush=True)
                first = False
            srv.serve_forever(poll_interval=0.05)
            srv.server_close()
            if self.stopping:
                break
            # Down: wait to come back up.
            while not self.up_event.wait(0.2):
                if self.stopping:
                    return


def main():
    ap = argparse.ArgumentParser(description='local portal for portal_sync tests')
    ap.add_argument('--port', type=int, default=0)
    ap.add_argument('--host', default='127.0.0.1')
    ap.add_argument('--log')
    ap.add_argument('--tls-cert')
    ap.add_argument('--tls-key')
    args = ap.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error('--tls-cert and --tls-key go together')
    app = App(args)

    def sig_down(signum, frame):
        threading.Thread(target=app.go_down, daemon=True).start()

    def sig_up(signum, frame):
        app.come_up()

    def sig_term(signum, frame):
        app.stopping = True
        app.up_event.set()
        srv = app.server
        if srv is not None:
            threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGUSR1, sig_down)
    signal.signal(signal.SIGUSR2, sig_up)
    signal.signal(signal.SIGTERM, sig_term)
    signal.signal(signal.SIGINT, sig_term)
    app.run()


if __name__ == '__main__':
    main()
