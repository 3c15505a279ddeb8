#!/usr/bin/env python3
"""
Timestamping sink for test/bench_delivery.sh (latency phase).  Not a portal:
it answers every POST with 200 and an empty JSON object, and records, for
each upsert event whose data column COL holds "lat ROUND EPOCH" (EPOCH being
the inserting transaction's clock_timestamp(), in seconds), the line
"ROUND SECONDS" where SECONDS = arrival - EPOCH.  The arrival time is taken
when the whole request body has been read, before it is parsed.

    delivery_sink.py serve --port 0 --out FILE [--col drug_name]
        prints "listening on PORT" once it accepts connections
    delivery_sink.py stats FILE ROUND
        prints "count p50_ms p99_ms max_ms" of that round (nearest rank)
"""

import argparse
import gzip
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
    counters = {'requests': 0, 'events': 0, 'bad': 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'
        disable_nagle_algorithm = True

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = read_request_body(self)
            arrival = time.time()
            # One write: headers and body in one segment.
            self.wfile.write(RESPONSE)
            self.wfile.flush()
            lines = []
            try:
                if (self.headers.get('Content-Encoding') or '') == 'gzip':
                    body = gzip.decompress(body)
                events = json.loads(body).get('events', [])
            except (ValueError, OSError, EOFError):
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
                if lines:
                    out.write(''.join(lines))

        def do_GET(self):
            with lock:
                body = json.dumps(counters).encode()
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer.daemon_threads = True
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


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser('serve')
    s.add_argument('--port', type=int, default=0)
    s.add_argument('--out', required=True)
    s.add_argument('--col', default='drug_name')
    t = sub.add_parser('stats')
    t.add_argument('file')
    t.add_argument('round')
    args = p.parse_args()
    if args.cmd == 'serve':
        serve(args)
    else:
        stats(args)


if __name__ == '__main__':
    sys.exit(main())
