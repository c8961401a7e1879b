// The peers' side of the job benchmark: BullMQ and pg-boss doing what `cargo bench
// --bench jobs` makes mediaplane do, on the same machine, so the two can be compared
// in the same hour (this machine's speed drifts by tens of percent over a night).
// Our own code on the peers' published client APIs; run through run.sh.
//
//   node peers.mjs bull-e2e PRODUCERS CONCURRENCY TOTAL   one add per job, awaited
//   node peers.mjs bull-full CONCURRENCY TOTAL            drain a pre-filled queue
//   node peers.mjs boss-full WORKERS BATCH TOTAL          pre-filled, batch fetching
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';
import PgBoss from 'pg-boss';
import { readFileSync } from 'node:fs';

const [mode, ...args] = process.argv.slice(2);
const n = args.map(Number);
const queueName = `peer_bench_${process.pid}`;
// BullMQ's workers block on Redis: they need retries without a limit.
const connection = () =>
  new IORedis(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', { maxRetriesPerRequest: null });

const perSecond = (jobs, t0) => Math.round(jobs / ((performance.now() - t0) / 1000));

/** Busy CPU seconds of the whole machine so far (all but idle and iowait, /proc/stat). */
function machineBusySecs() {
  const cpu = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1, 9).map(Number);
  return cpu.reduce((sum, v, i) => (i === 3 || i === 4 ? sum : sum + v), 0) / 100;
}

/** Fills a queue before a drain: `add(size)` enqueues `size` jobs, at most 1,000 per call. */
async function prefill(total, add) {
  for (let i = 0; i < total; i += 1000) await add(Math.min(1000, total - i));
}

async function bullTeardown(worker, queue) {
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
}

/** Resolves with the worker once `total` jobs have completed (each removed as it completes). */
function bullWorker(concurrency, total) {
  let done = 0;
  return new Promise((resolve) => {
    const worker = new Worker(queueName, async () => {}, {
      connection: connection(),
      concurrency,
      removeOnComplete: { count: 0 },
    });
    worker.on('completed', () => {
      if (++done === total) resolve(worker);
    });
  });
}

async function bullE2e(producers, concurrency, total) {
  const queue = new Queue(queueName, { connection: connection() });
  const finished = bullWorker(concurrency, total);
  const t0 = performance.now();
  const busy0 = machineBusySecs();
  let added = 0;
  // Like the Rust bench's producers: each waits for its add before the next.
  await Promise.all(
    Array.from({ length: producers }, async () => {
      while (added < total) {
        added++;
        await queue.add('bench', {});
      }
    }),
  );
  const worker = await finished;
  const rate = perSecond(total, t0);
  const machineUs = Math.round(((machineBusySecs() - busy0) * 1e6) / total);
  console.log(`BullMQ end to end, ${total} jobs, ${producers} producers, worker concurrency ${concurrency}: ${rate} jobs/s, machine CPU ${machineUs} µs per job`);
  // For `cargo bench --bench jobs`, which runs this right after mediaplane's rows.
  console.log(`RESULT ${JSON.stringify({ jobs_per_sec: rate, machine_us_per_job: machineUs })}`);
  await bullTeardown(worker, queue);
}

async function bullFull(concurrency, total) {
  const queue = new Queue(queueName, { connection: connection() });
  await prefill(total, (size) =>
    queue.addBulk(Array.from({ length: size }, () => ({ name: 'bench', data: {} }))),
  );
  const t0 = performance.now();
  const worker = await bullWorker(concurrency, total);
  console.log(`BullMQ pre-filled queue of ${total}, worker concurrency ${concurrency}: ${perSecond(total, t0)} jobs/s`);
  await bullTeardown(worker, queue);
}

async function bossFull(workers, batchSize, total) {
  const boss = new PgBoss({ connectionString: process.env.PEER_DATABASE_URL, max: workers + 2 });
  boss.on('error', (e) => console.error(e));
  await boss.start();
  await boss.createQueue(queueName);
  await prefill(total, (size) =>
    boss.insert(Array.from({ length: size }, () => ({ name: queueName, data: {} }))),
  );
  let done = 0;
  const t0 = performance.now();
  // Batch fetching: every worker loop fetches up to batchSize jobs and completes them in one call.
  await Promise.all(
    Array.from({ length: workers }, async () => {
      while (done < total) {
        const jobs = await boss.fetch(queueName, { batchSize });
        if (jobs.length === 0) {
          await new Promise((r) => setTimeout(r, 10));
          continue;
        }
        await boss.complete(queueName, jobs.map((j) => j.id));
        done += jobs.length;
      }
    }),
  );
  console.log(`pg-boss pre-filled queue of ${total}, ${workers} workers fetching ${batchSize}: ${perSecond(total, t0)} jobs/s`);
  await boss.stop({ graceful: false, wait: false });
}

if (mode === 'bull-e2e') await bullE2e(n[0], n[1], n[2]);
else if (mode === 'bull-full') await bullFull(n[0], n[1]);
else if (mode === 'boss-full') await bossFull(n[0], n[1], n[2]);
else throw new Error(`unknown mode ${mode}`);
process.exit(0);
