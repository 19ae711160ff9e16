// BullMQ load driver: one client process of bench/peers/run.py (the same workload as
// bench/load.py). Run from bench/peers/ with `node bullmq_bench.mjs --url redis://... ...`
// (run.py does it); it needs `bench/peers/setup.sh` to have installed node/node_modules.
//
// Protocol with run.py (one JSON object per stdout line):
//   -> {"type":"ready", ...}        connected, queue and workers ready, nothing started
//   <- one stdin line: the start instant, wall-clock seconds since the epoch
//   -> {"type":"tick", ...}         cumulative counters, once a second
//   -> {"type":"result", ...}       counts and latency samples (µs) of the measured window
//
// Scenario `enqueue`: --concurrency loops, each awaiting Queue.add() and sending the next
// one at once (closed loop). Scenario `e2e`: concurrency/2 such loops plus --workers
// BullMQ Workers with --worker-concurrency each, whose processor returns at once; a job
// is completed when the Worker's `completed` event fires, i.e. after moveToCompleted
// returned from Redis. Window: [start + warmup, start + warmup + duration); a call
// counts when it finishes inside it. Every loop stops issuing at the window's end and is
// bounded by --max-ops; the process exits by itself at the latest call-timeout + 10 s
// after the window.

import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, 'node', 'package.json'));
const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');

const args = {
  url: 'redis://127.0.0.1:6379',
  scenario: 'enqueue',
  slot: 0,
  concurrency: 64,
  workers: 4,
  'worker-concurrency': 16,
  warmup: 2,
  duration: 10,
  'call-timeout': 10,
  'max-ops': 10_000_000,
  'run-id': `r${process.pid}`,
  queue: 'bench',
};
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, '');
  if (!(key in args) || i + 1 >= process.argv.length) {
    console.error(`bullmq_bench: unknown or incomplete option ${process.argv[i]}`);
    process.exit(2);
  }
  const val = process.argv[i + 1];
  args[key] = typeof args[key] === 'number' ? Number(val) : val;
}

const ERROR_SLEEP_MS = 50;
const PAD = 'x'.repeat(40);
const wallMs = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
// the last line: exit only once it is written out
const emitLast = (obj) => new Promise((r) => process.stdout.write(JSON.stringify(obj) + '\n', r));
const pkgVersion = (name) => JSON.parse(
  fs.readFileSync(path.join(here, 'node', 'node_modules', name, 'package.json'), 'utf8')).version;

function withTimeout(promise, ms) {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout after ${ms} ms`)), ms);
  });
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}

const u = new URL(args.url);
if (!['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname)) {
  console.error('bullmq_bench: loopback targets only');
  process.exit(2);
}
const connection = { host: u.hostname, port: Number(u.port) };
const callTimeoutMs = args['call-timeout'] * 1000;

const rec = {
  enq_ok: 0, enq_ok_win: 0, enq_lat_us: [],
  done_ok: 0, done_ok_win: 0, stale_done_win: 0, e2e_lat_us: [], complete_lat_us: [],
  errors: {}, error_msgs: {}, err_total: 0,
};
function recordError(op, err) {
  const msg = String(err && err.message ? err.message : err).slice(0, 200);
  const key = `${op}: ${msg}`;
  rec.errors[op] = (rec.errors[op] || 0) + 1;
  if (key in rec.error_msgs || Object.keys(rec.error_msgs).length < 20) {
    rec.error_msgs[key] = (rec.error_msgs[key] || 0) + 1;
  }
  rec.err_total += 1;
}

let winStart = Infinity;
let winEnd = -Infinity;
const inWindow = (t) => t >= winStart && t < winEnd;

async function main() {
  const info = { peer: 'bullmq', node: process.version };
  const admin = new IORedis(connection);
  try {
    const cfg = await admin.config('GET', 'append*');
    for (let i = 0; i + 1 < cfg.length; i += 2) {
      if (cfg[i] === 'appendonly' || cfg[i] === 'appendfsync') info[cfg[i]] = cfg[i + 1];
    }
    const srv = await admin.info('server');
    info.redis_version = (srv.match(/redis_version:(\S+)/) || [])[1];
  } finally {
    admin.disconnect();
  }
  info.bullmq = pkgVersion('bullmq');
  info.ioredis = pkgVersion('ioredis');

  const queue = new Queue(args.queue, { connection });
  queue.on('error', (e) => recordError('queue', e));
  await queue.waitUntilReady();

  const workers = [];
  const started = new Map();
  if (args.scenario === 'e2e') {
    for (let w = 0; w < args.workers; w++) {
      const worker = new Worker(args.queue, async (job) => {
        started.set(job.id, wallMs());
        return null;
      }, { connection, concurrency: args['worker-concurrency'], autorun: false });
      worker.on('completed', (job) => {
        const t1 = wallMs();
        rec.done_ok += 1;
        const t0 = started.get(job.id);
        started.delete(job.id);
        if (!inWindow(t1)) return;
        rec.done_ok_win += 1;
        if (t0 !== undefined) rec.complete_lat_us.push(Math.round((t1 - t0) * 1000));
        const d = job.data || {};
        if (d.run === args['run-id'] && typeof d.ts === 'number') {
          rec.e2e_lat_us.push(Math.round(t1 * 1000 - d.ts));
        } else {
          rec.stale_done_win += 1;
        }
      });
      worker.on('failed', (job, e) => recordError('job_failed', e));
      worker.on('error', (e) => recordError('worker', e));
      await worker.waitUntilReady();
      workers.push(worker);
    }
  }
  emit({ type: 'ready', slot: args.slot, info });

  const rl = readline.createInterface({ input: process.stdin });
  const line = await new Promise((resolve) => rl.once('line', resolve));
  rl.close();
  const startMs = Number(line) * 1000;
  if (!Number.isFinite(startMs)) throw new Error(`bad start line ${JSON.stringify(line)}`);
  winStart = startMs + args.warmup * 1000;
  winEnd = winStart + args.duration * 1000;
  const stopAt = winEnd;

  // the process never outlives its window by more than call-timeout + 10 s
  const hard = setTimeout(() => {
    emitLast({ type: 'result', slot: args.slot, info, hard_limit: true, ...rec })
      .then(() => process.exit(3));
  }, Math.max(0, stopAt - wallMs()) + callTimeoutMs + 10_000);

  const tick = setInterval(() => {
    emit({ type: 'tick', slot: args.slot, enq: rec.enq_ok, done: rec.done_ok, err: rec.err_total });
  }, 1000);

  await sleep(Math.max(0, startMs - wallMs()));

  async function enqueuer(n) {
    for (let i = 0; i < args['max-ops'];) {
      const t = wallMs();
      if (t >= stopAt) break;
      i += 1;
      const ts = Math.round(wallMs() * 1000);
      const data = { run: args['run-id'], p: args.slot, n, i, ts, pad: PAD };
      try {
        await withTimeout(queue.add('bench', data), callTimeoutMs);
      } catch (e) {
        recordError('add', e);
        await sleep(ERROR_SLEEP_MS);
        continue;
      }
      const t1 = wallMs();
      rec.enq_ok += 1;
      if (inWindow(t1)) {
        rec.enq_ok_win += 1;
        rec.enq_lat_us.push(Math.round((t1 - t) * 1000));
      }
    }
  }

  const nEnq = args.scenario === 'e2e' ? Math.max(1, Math.floor(args.concurrency / 2)) : args.concurrency;
  const loops = [];
  for (let n = 0; n < nEnq; n++) loops.push(enqueuer(n));
  const runs = workers.map((w) => w.run().catch((e) => recordError('worker_run', e)));
  const stopWorkers = (async () => {
    await sleep(Math.max(0, stopAt - wallMs()));
    // close() lets the active jobs finish (their processor returns at once)
    await withTimeout(Promise.all(workers.map((w) => w.close())), callTimeoutMs)
      .catch((e) => recordError('worker_close', e));
  })();
  await Promise.all(loops);
  await stopWorkers;
  await withTimeout(Promise.all(runs), 5000).catch((e) => recordError('worker_run', e));
  await withTimeout(queue.close(), 5000).catch((e) => recordError('queue_close', e));
  clearInterval(tick);
  clearTimeout(hard);
  emit({ type: 'tick', slot: args.slot, enq: rec.enq_ok, done: rec.done_ok, err: rec.err_total });
  await emitLast({ type: 'result', slot: args.slot, info, ...rec });
}

main().then(() => process.exit(0), (e) => {
  recordError('fatal', e);
  emitLast({ type: 'result', slot: args.slot, fatal: String(e && e.stack ? e.stack : e), ...rec })
    .then(() => process.exit(1));
});
