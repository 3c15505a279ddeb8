#!/usr/bin/env python3
"""
Sink for test/bench_delivery.sh (latency and WAN phases).  Not a portal: it
answers every POST with 200 and an empty JSON object, and records, for each
upsert event whose data column COL holds "lat ROUND EPOCH" (EPOCH being the
inserting transaction's clock_timestamp(), in seconds), the line
"ROUND SECONDS" where SECONDS = arrival - EPOCH.  The arrival time is taken
when the whole request body has been read, before it is parsed.

With --hold-ms MS (the WAN phase) it holds every answer MS milliseconds
after the body has been read (a wide-area round trip); the body is parsed
during the hold, so the hold is the whole delay the sink adds.  One thread
per connection: the hold of one connection does not delay another.  By
default (MS = 0) it answers at once and parses afterwards.

GET /_sample answers the body with the most events accepted since the start
or the last GET /_reset, as it was sent (after chunked decoding, still
compressed), with X-Sample-Encoding (its Content-Encoding) and
X-Sample-Events.  GET /_reset sets the counters to 0 and forgets the sample.
Any other GET answers the counters as JSON: requests, events, bad (bodies
that did not parse), wire_bytes (bodies as sent, after chunked decoding),
json_bytes (the same decompressed), and seconds summed over the requests:
recv_s (headers read -> body's end: the client sending the body), gap_s
over gaps requests (previous answer on the same connection -> next request:
the client's time between requests; gaps across a GET /_reset are left
out), late_s and late_max_s (answers later than the hold, or than at once
without one).

    delivery_sink.py serve --port 0 --out FILE [--col drug_name] [--hold-ms 0]
        prints "listening on PORT" once it accepts connections
    delivery_sink.py stats FILE ROUND
        prints "count p50_ms p99_ms max_ms" of that round (nearest rank)
    delivery_sink.py load --port PORT [--concurrency 32] [--seconds 3]
        the sink check: CONCURRENCY connections POST the sink's sample body
        (GET /_sample) to it again and again for SECONDS; prints
        "requests requests_per_s events_per_s bytes_per_request failed"
"""

import argparse
import gzip
import http.client
import json
import math
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RESPONSE = (b'HTTP/1.1 200 OK\r\n'
            b'Content-Type: application/json\r\n'
            b'Content-Length: 2\r\n'
            b'\r\n'
            b'{}')


def read_request_body(handler):
    """The body as sent: Content-Length or chunked (compressed bodies)."""
    if (handler.headers.get('Transfer-Encoding') or '').lower() != 'chunked':
        return handler.rfile.read(int(handler.headers.get('Content-Length') or 0))
    parts = []
    while True:
        size = int(handler.rfile.readline(1024).split(b';')[0].strip() or b'0', 16)
        if size == 0:
            while handler.rfile.readline(1024) not in (b'\r\n', b'\n', b''):
                pass
            return b''.join(parts)
        parts.append(handler.rfile.read(size))
        handler.rfile.readline(8)


def serve(args):
    lock = threading.Lock()
    out = open(args.out, 'a', buffering=1)
    col = args.col
    hold = max(0.0, args.hold_ms) / 1000.0
    counters = {'requests': 0, 'events': 0, 'bad': 0, 'wire_bytes': 0, 'json_bytes': 0,
                'recv_s': 0.0, 'gap_s': 0.0, 'gaps': 0, 'late_s': 0.0, 'late_max_s': 0.0}
    last = {'body': None, 'encoding': '', 'events': 0, 'reset_at': 0.0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'
        disable_nagle_algorithm = True

        def log_message(self, *a):
            pass

        def answer(self):
            # One write: headers and body in one segment.
            self.wfile.write(RESPONSE)
            self.wfile.flush()
            self.answered = time.time()

        def do_POST(self):
            # Times (in the counters): recv_s, from the headers read to the
            # body's end; gap_s, from the previous answer on this connection
            # to this request's headers (the client's time between
            # requests); late_s, the answer's delay beyond the hold.
            start = time.time()
            sent = read_request_body(self)
            arrival = time.time()
            answered = getattr(self, 'answered', None)
            gap = start - answered if answered and answered >= last['reset_at'] else None
            if not hold:
                self.answer()
            try:
                self.account(sent, arrival)
            finally:
                if hold:
                    delay = arrival + hold - time.time()
                    if delay > 0:
                        time.sleep(delay)
                    self.answer()
                late = self.answered - arrival - hold
                with lock:
                    counters['recv_s'] += arrival - start
                    if gap is not None:
                        counters['gap_s'] += gap
                        counters['gaps'] += 1
                    counters['late_s'] += max(0.0, late)
                    counters['late_max_s'] = max(counters['late_max_s'], late)

        def account(self, sent, arrival):
            lines = []
            encoding = self.headers.get('Content-Encoding') or ''
            body = sent
            try:
                if encoding == 'gzip':
                    body = gzip.decompress(body)
                events = json.loads(body).get('events', [])
            except (ValueError, OSError, EOFError, AttributeError):
                with lock:
                    counters['bad'] += 1
                return
            for ev in events:
                data = ev.get('data')
                if ev.get('op') != 'upsert' or not isinstance(data, dict):
                    continue
                v = data.get(col)
                if isinstance(v, str) and v.startswith('lat '):
                    parts = v.split()
                    if len(parts) == 3:
                        try:
                            lines.append('%s %.6f\n' % (parts[1], arrival - float(parts[2])))
                        except ValueError:
                            pass
            with lock:
                counters['requests'] += 1
                counters['events'] += len(events)
                counters['wire_bytes'] += len(sent)
                counters['json_bytes'] += len(body)
                if last['body'] is None or len(events) > last['events']:
                    last.update(body=sent, encoding=encoding, events=len(events))
                if lines:
                    out.write(''.join(lines))

        def do_GET(self):
            extra = {}
            with lock:
                if self.path == '/_reset':
                    for k in counters:
                        counters[k] = 0
                    last.update(body=None, encoding='', events=0, reset_at=time.time())
                    body = json.dumps(counters).encode()
                elif self.path == '/_sample':
                    if last['body'] is None:
                        self.send_error(404, 'no POST yet')
                        return
                    body = last['body']
                    extra = {'X-Sample-Encoding': last['encoding'],
                             'X-Sample-Events': str(last['events'])}
                else:
                    body = json.dumps(counters).encode()
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 128
    server = ThreadingHTTPServer(('127.0.0.1', args.port), Handler)
    print('listening on %d' % server.server_address[1], flush=True)
    server.serve_forever()


def stats(args):
    values = []
    with open(args.file) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[0] == args.round:
                values.append(float(parts[1]) * 1000.0)
    if not values:
        print('0 - - -')
        return
    values.sort()

    def rank(q):
        return values[max(0, math.ceil(q * len(values)) - 1)]
    print('%d %.1f %.1f %.1f' % (len(values), rank(0.50), rank(0.99), values[-1]))


def load(args):
    """The sink check: many connections POSTing the sink's sample body."""
    conn = http.client.HTTPConnection('127.0.0.1', args.port, timeout=30)
    conn.request('GET', '/_sample')
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        print('load: no sample body (GET /_sample: %d)' % resp.status, file=sys.stderr)
        return 1
    headers = {'Content-Type': 'application/json'}
    encoding = resp.getheader('X-Sample-Encoding') or ''
    if encoding:
        headers['Content-Encoding'] = encoding
    nevents = int(resp.getheader('X-Sample-Events') or 0)
    conn.close()
    lock = threading.Lock()
    done = {'requests': 0, 'failed': 0}
    start = threading.Barrier(args.concurrency + 1)
    window = {}

    def client():
        c = http.client.HTTPConnection('127.0.0.1', args.port, timeout=30)
        c.connect()
        ok = failed = 0
        start.wait()
        t0 = window['t0']
        while time.time() - t0 < args.seconds:
            try:
                c.request('POST', '/events', body, headers)
                r = c.getresponse()
                r.read()
                if r.status == 200:
                    ok += 1
                else:
                    failed += 1
            except (OSError, http.client.HTTPException):
                failed += 1
                c.close()
                c = http.client.HTTPConnection('127.0.0.1', args.port, timeout=30)
        c.close()
        with lock:
            done['requests'] += ok
            done['failed'] += failed

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    window['t0'] = time.time()
    start.wait()
    for t in threads:
        t.join()
    secs = time.time() - window['t0']
    print('%d %.1f %.0f %d %d' % (done['requests'], done['requests'] / secs,
                                  done['requests'] * nevents / secs, len(body), done['failed']))
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser('serve')
    s.add_argument('--port', type=int, default=0)
    s.add_argument('--out', required=True)
    s.add_argument('--col', default='drug_name')
    s.add_argument('--hold-ms', type=float, default=0.0)
    t = sub.add_parser('stats')
    t.add_argument('file')
    t.add_argument('round')
    g = sub.add_parser('load')
    g.add_argument('--port', type=int, required=True)
    g.add_argument('--concurrency', type=int, default=32)
    g.add_argument('--seconds', type=float, default=3.0)
    args = p.parse_args()
    if args.cmd == 'serve':
        return serve(args)
    if args.cmd == 'load':
        return load(args)
    return stats(args)


if __name__ == '__main__':
    sys.exit(main())
