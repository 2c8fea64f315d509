#!/usr/bin/env python3
"""Paired A/B of devstreams builds or flags: CPU per byte of each process, round by round.

Usage: pairs.py RATE_MBPS SECONDS ROUNDS MODES PAIR [PAIR...]
  RATE_MBPS  pace of each transfer (MB/s); above what the machine moves, it saturates
  SECONDS    length of one transfer
  ROUNDS     rounds; every round runs each pair once per mode, in a rotating order
  MODES      u (upload: operator -> device), d (download), or u,d
  PAIR       label|binary directory|extra proxy arguments|ENV=value,ENV=value
             the first pair is the baseline the others are compared with
  STREAMS    (environment) parallel transfers per measurement, each at RATE/STREAMS (default 1)

Example (resume off against resume on, one build):
  bench/diagnostics/pairs.py 3000 3 10 u,d "off|target/release|--no-resume|" "on|target/release||"

All pairs share one relay (from the first pair's directory) and one target, so a
round's transfers run seconds apart on the same machine; each proxy's and the
relay's CPU time is read from /proc over each transfer. It prints medians and,
per pair, the median of per-round ratios to the baseline ("paired"), which
cancels most of a noisy host's drift. A diagnostic, not the benchmark: bulk
figures for BENCHMARKS.md come from `bench`.
"""
import subprocess, sys, os, time, tempfile, statistics, threading, queue, shutil
if len(sys.argv) < 6:
    sys.exit(__doc__)
streams = int(os.environ.get('STREAMS', '1'))
rate = float(sys.argv[1]) * 1e6; secs = float(sys.argv[2]); rounds = int(sys.argv[3]); modes = sys.argv[4].split(',')
pairs = [p.split('|') for p in sys.argv[5:]]
here = os.path.dirname(os.path.abspath(__file__))
tmp = tempfile.mkdtemp(prefix='pairs-'); procs = []
def spawn(args, env={}):
    """Starts a process; a thread of its own queues its output lines."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, 'log-%d' % len(procs)), 'w'), text=True, env=dict(os.environ, RUST_LOG='warn', **env))
    p.lines = queue.Queue()
    threading.Thread(target=lambda: [p.lines.put(line) for line in p.stdout], daemon=True).start()
    procs.append(p); return p
def wait_line(p, prefix, timeout=30):
    """The rest of the first line holding prefix, within timeout seconds."""
    deadline = time.time() + timeout
    while True:
        try:
            l = p.lines.get(timeout=max(0.01, deadline - time.time()))
        except queue.Empty:
            raise SystemExit('no %r within %d s; logs in %s' % (prefix, timeout, tmp))
        if prefix in l: return l.split(prefix, 1)[1].strip()
try:
    tport = int(wait_line(spawn([sys.executable, os.path.join(here, 'target.py')]), 'port '))
    relaybin = pairs[0][1]
    relay = spawn([relaybin + '/relay', 'serve', '--data-dir', tmp + '/data', '--listen', '127.0.0.1:0', '--no-mqtt'])
    wait_line(relay, 'Listening on ')
    scs = wait_line(relay, 'Service connection string: ')
    ca = wait_line(relay, 'CA certificate for clients (--ca-cert): ')
    pids = {'relay': relay.pid}; ports = {}
    for label, b, extra, envs in pairs:
        env = dict(e.split('=', 1) for e in envs.split(',') if e)
        out = subprocess.run([relaybin + '/relay', 'device', 'add', 'pairs-' + label, '--data-dir', tmp + '/data'], capture_output=True, text=True, timeout=30).stdout
        dcs = [l.strip() for l in out.splitlines() if l.strip().startswith('HostName=')][0]
        d = spawn([b + '/device-proxy', dcs, '127.0.0.1', str(tport), '--ca-cert', ca] + extra.split(), env)
        s = spawn([b + '/service-proxy', scs, 'pairs-' + label, '0', '--ca-cert', ca] + extra.split(), env)
        ports[label] = int(wait_line(s, 'Listening on ').split()[0].rsplit(':', 1)[1])
        pids['dev-' + label] = d.pid; pids['svc-' + label] = s.pid
    time.sleep(2)
    hz = os.sysconf('SC_CLK_TCK')
    def cpu(pid):
        f = open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split(); return (int(f[11]) + int(f[12])) / hz
    labels = [p[0] for p in pairs]; res = {}
    for r in range(rounds):
        for m in modes:
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            if r % 2: order = order[::-1]
            for label in order:
                who = ['relay', 'dev-' + label, 'svc-' + label]
                before = {w: cpu(pids[w]) for w in who}
                clients = [subprocess.Popen([sys.executable, os.path.join(here, 'client.py'), str(ports[label]), m, str(rate / streams), str(secs)], stdout=subprocess.PIPE, text=True) for _ in range(streams)]
                outs = [c.communicate(timeout=secs + 30)[0].split() for c in clients]
                after = {w: cpu(pids[w]) for w in who}
                moved = sum(int(o[0]) for o in outs)
                gb = moved / 1e9; mbps = moved / 1e6 / max(float(o[1]) for o in outs)
                res.setdefault((m, label), []).append([mbps] + [(after[w] - before[w]) / gb for w in who])
                time.sleep(0.5)
    print('medians over %d rounds (CPU-s/GB); sender = svc for u, dev for d' % rounds)
    for m in modes:
        base = None
        for label in labels:
            rows = res[(m, label)]
            med = [statistics.median(x[i] for x in rows) for i in range(4)]
            snd = med[3] if m == 'u' else med[2]
            if base is None: base = (med[0], snd)
            offrows = res[(m, labels[0])]
            k = 3 if m == 'u' else 2
            pr = statistics.median(x[k] / y[k] for x, y in zip(rows, offrows))
            pt = statistics.median(x[0] / y[0] for x, y in zip(rows, offrows))
            ptot = statistics.median((x[1]+x[2]+x[3]) / (y[1]+y[2]+y[3]) for x, y in zip(rows, offrows))
            print('%s %-10s total GB %.3f' % (m, label, sum(x[0] for x in rows) * secs / 1e3))
            print('%s %-10s paired: MB/s %3.0f%%  sender %+4.0f%%  total %+4.0f%%' % (m, label, 100 * pt, 100 * (pr - 1), 100 * (ptot - 1)))
            print('%s %-10s MB/s %4.0f (%3.0f%%) relay %.3f dev %.3f svc %.3f  sender %.3f (%+4.0f%%)  sender rounds %s' % (m, label, med[0], 100 * med[0] / base[0], med[1], med[2], med[3], snd, 100 * (snd / base[1] - 1), ' '.join('%.2f' % (x[3] if m == 'u' else x[2]) for x in rows)))
finally:
    for p in procs:
        try: p.kill()
        except Exception: pass
    shutil.rmtree(tmp, ignore_errors=True)
