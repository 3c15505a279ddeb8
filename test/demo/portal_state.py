#!/usr/bin/env python3
"""
test/demo.sh helper: fetch the local portal's state (GET /_control/state)
and write it as CSV files that psql can \\copy into the demo database:

    portal_state.py URL PRACTICE_ID OUTDIR

  OUTDIR/items.csv     patient_id, source, key, data (JSON)
  OUTDIR/patients.csv  patient_id, purged, snapshots, open_snapshot, applied
  OUTDIR/meta.csv      name, value   (request/duplicate/violation counts,
                                      applied events by op)
"""
import csv
import json
import sys
import urllib.request


def main():
    url, practice, outdir = sys.argv[1:4]
    with urllib.request.urlopen(url + '/_control/state', timeout=30) as r:
        state = json.load(r)
    patients = state.get('practices', {}).get(practice, {}).get('patients', {})
    other = [p for p in state.get('practices', {}) if p != practice]
    with open(outdir + '/items.csv', 'w', newline='') as f:
        w = csv.writer(f)
        for pid, p in patients.items():
            for src, items in p.get('items', {}).items():
                for key, data in items.items():
                    w.writerow([pid, src, key, json.dumps(data)])
    with open(outdir + '/patients.csv', 'w', newline='') as f:
        w = csv.writer(f)
        for pid, p in patients.items():
            w.writerow([pid, 't' if p.get('purged') else 'f', p.get('snapshots', 0),
                        '' if p.get('open_snapshot') is None else p['open_snapshot'],
                        p.get('applied', 0)])
    meta = {
        'requests': state.get('requests', 0),
        'applied_event_ids': state.get('applied_event_ids', 0),
        'duplicates': state.get('duplicates', 0),
        'order_violations': len(state.get('order_violations', [])),
        'ccda_violations': len(state.get('ccda_violations', [])),
        'purge_violations': len(state.get('purge_violations', [])),
        'snapshot_violations': len(state.get('snapshot_violations', [])),
        'protocol_errors': len(state.get('protocol_errors', [])),
        'other_practices': len(other),
        'non_2xx_answers': sum(n for s, n in state.get('answers', {}).items()
                               if not s.startswith('2')),
    }
    # Events the portal applied, by op, from its request log (no row data).
    with urllib.request.urlopen(url + '/_control/requests', timeout=30) as r:
        requests = json.load(r)
    seen = set()
    upserted = set()
    for op in ('upsert', 'delete', 'snapshot_begin', 'snapshot_end', 'purge'):
        meta['op_' + op] = 0
    meta['delete_never_sent'] = 0
    for req in requests:
        if not req.get('applied'):
            continue
        rejected = set(req.get('rejected') or [])
        for ev in req.get('events', []):
            eid = ev.get('event_id')
            if eid in seen or eid in rejected:
                continue
            seen.add(eid)
            op = ev.get('op')
            meta['op_' + str(op)] = meta.get('op_' + str(op), 0) + 1
            item = (ev.get('patient_id'), ev.get('source'), ev.get('key'))
            if op == 'upsert':
                upserted.add(item)
            elif op == 'delete' and item not in upserted:
                meta['delete_never_sent'] += 1
                k = 'delete_never_sent:' + str(ev.get('source'))
                meta[k] = meta.get(k, 0) + 1
    with open(outdir + '/meta.csv', 'w', newline='') as f:
        w = csv.writer(f)
        for k, v in meta.items():
            w.writerow([k, v])
    # First few violations, for the report (no row data in them).
    with open(outdir + '/violations.txt', 'w') as f:
        for name in ('protocol_errors', 'order_violations', 'ccda_violations',
                     'purge_violations', 'snapshot_violations'):
            for v in state.get(name, [])[:3]:
                f.write('%s: %s\n' % (name, json.dumps(v, sort_keys=True)))


if __name__ == '__main__':
    main()
