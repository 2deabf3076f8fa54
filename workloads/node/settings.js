'use strict';
// What every Node.js workload shares, as workloads/_settings.py does for the Python ones: the settings
// (environment variables, as a Lambda function reads its configuration), how to reach the database, and
// the invocation's work.
//
// | variable | flag | default |
// |---|---|---|
// | DATABASE_URL, DB_ENGINE | --engine | (set by lambdaemu) postgresql://... or mysql://... |
// | DB_PROXY | --proxy | unset |
// | POOL_MAX | --pool-max | unset: the library's default (sequelize 5, pg 10, mysql2 10); lambdaemu sets it (5) |
// | POOL_MIN, POOL_IDLE_SECONDS, POOL_LIFETIME_SECONDS, POOL_TIMEOUT_SECONDS | --pool-min, ... | unset: the library's default |
// | POOL_EVICT_SECONDS, POOL_ACQUIRE_SECONDS | --env | unset: the library's default (sequelize only) |
// | WORK_SECONDS, WORK_DIST | --work, --work-dist | 0.3, fixed |
// | QUERIES, PARALLEL_QUERIES | --queries, --parallel-queries | 1, 1 |
//
// A workload that cannot run with its settings, or on its engine, throws WorkloadError at init (module
// level): the runtime posts it as an init error of type WorkloadError, and lambdaemu ends the run with
// its message instead of failing every cold start.

const ENGINES = ['postgres', 'mysql'];
const WORK_DISTS = ['fixed', 'exp'];

class WorkloadError extends Error {}
WorkloadError.prototype.name = 'WorkloadError';

function raw(name) {
  const value = (process.env[name] || '').trim();
  return value === '' ? undefined : value;
}

/** A numeric setting (`fallback` when unset), at least `minimum`; a bad value names the variable. */
function number(name, { integer = false, fallback = undefined, minimum = 0 } = {}) {
  const text = raw(name);
  if (text === undefined) return fallback;
  const expected = integer ? 'a whole number' : 'a number of seconds';
  const value = Number(text);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value)) || value < minimum) {
    throw new WorkloadError(`${name}=${JSON.stringify(text)}: expected ${expected} >= ${minimum}`);
  }
  return value;
}

function flag(name) {
  const text = raw(name);
  if (text === undefined) return undefined;
  if (['1', 'true', 'yes', 'on'].includes(text.toLowerCase())) return true;
  if (['0', 'false', 'no', 'off'].includes(text.toLowerCase())) return false;
  throw new WorkloadError(`${name}=${JSON.stringify(text)}: expected 1/true/yes/on or 0/false/no/off`);
}

/** Read and check the settings from the environment (call it at module level: the init phase). */
function settings() {
  const url = raw('DATABASE_URL');
  if (url === undefined) {
    throw new WorkloadError('DATABASE_URL is not set: run the handler through lambdaemu, or set it to '
      + 'postgresql://user:password@host:port/db or mysql://...');
  }
  const engine = raw('DB_ENGINE') || (url.startsWith('mysql') ? 'mysql' : 'postgres');
  if (!ENGINES.includes(engine)) {
    throw new WorkloadError(`DB_ENGINE=${JSON.stringify(engine)}: expected one of ${ENGINES.join(', ')}`);
  }
  const workDist = raw('WORK_DIST') || 'fixed';
  if (!WORK_DISTS.includes(workDist)) {
    throw new WorkloadError(`WORK_DIST=${JSON.stringify(workDist)}: expected one of ${WORK_DISTS.join(', ')}`);
  }
  const s = Object.freeze({
    engine,
    proxy: raw('DB_PROXY'),
    databaseUrl: url,
    poolMax: number('POOL_MAX', { integer: true, minimum: 1 }),
    poolMin: number('POOL_MIN', { integer: true }),
    poolIdleS: number('POOL_IDLE_SECONDS'),
    poolLifetimeS: number('POOL_LIFETIME_SECONDS'),
    poolTimeoutS: number('POOL_TIMEOUT_SECONDS'),
    workS: number('WORK_SECONDS', { fallback: 0.3 }),
    workDist,
    queries: number('QUERIES', { integer: true, fallback: 1, minimum: 1 }),
    parallelQueries: number('PARALLEL_QUERIES', { integer: true, fallback: 1, minimum: 1 }),
  });
  if (s.poolMin !== undefined && s.poolMax !== undefined && s.poolMin > s.poolMax) {
    throw new WorkloadError(`POOL_MIN=${s.poolMin} is more than POOL_MAX=${s.poolMax}: lower --pool-min or `
      + 'raise --pool-max');
  }
  if (s.parallelQueries > s.queries) {
    // Every parallel connection runs at least one query; fewer queries would silently mean fewer
    // connections than asked for.
    throw new WorkloadError(`PARALLEL_QUERIES=${s.parallelQueries} is more than QUERIES=${s.queries}: each `
      + `parallel connection needs a query; set --queries ${s.parallelQueries} or more`);
  }
  return s;
}

/** Refuse, at init, an engine the workload's library cannot talk to. */
function requireEngine(s, workload, engines, instead) {
  if (!engines.includes(s.engine)) {
    throw new WorkloadError(`${workload} runs on ${engines.join(' or ')} only, not ${s.engine} (DB_ENGINE): `
      + `use --engine ${engines[0]}, or ${instead}`);
  }
}

/** Refuse more than one query at a time on a workload that has one connection. */
function requireSerialQueries(s, workload, instead) {
  if (s.parallelQueries > 1) {
    throw new WorkloadError(`${workload} has one connection, which cannot run PARALLEL_QUERIES=`
      + `${s.parallelQueries} queries at once: use --parallel-queries 1, or ${instead}`);
  }
}

/** Say in the environment's log which set variables this library has no use for ({name: why}). */
function ignored(workload, names) {
  for (const [name, why] of Object.entries(names)) {
    if (raw(name) !== undefined) console.warn(`${workload}: ${name}=${raw(name)} ignored: ${why}`);
  }
}

/** Milliseconds for a seconds setting, or undefined when unset (the library keeps its default). */
function ms(seconds) {
  return seconds === undefined ? undefined : Math.round(seconds * 1000);
}

/** Drop undefined values, so a library sees only the options that were set. */
function defined(options) {
  return Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined));
}

// --- reaching the database ---------------------------------------------------------------------------

/** {host, port, user, password, database} from DATABASE_URL, for pg, mysql2 and sequelize alike.
 * application_name is left out on purpose: node-postgres then takes PGAPPNAME, which lambdaemu sets per
 * environment (lambdaemu-env-<id>), so the database can tell who holds what; MySQL connections are
 * attributed by client port. */
function connectionParts(s) {
  const url = new URL(s.databaseUrl.replace(/^[a-z0-9+]+:\/\//i, 'db://'));
  return {
    host: url.hostname || '127.0.0.1',
    port: Number(url.port) || (s.engine === 'mysql' ? 3306 : 5432),
    user: decodeURIComponent(url.username),
    password: decodeURIComponent(url.password),
    database: decodeURIComponent(url.pathname.replace(/^\//, '')) || undefined,
  };
}

// --- the invocation's work ---------------------------------------------------------------------------

/** This invocation's database time: WORK_SECONDS, or (WORK_DIST=exp) an exponential draw with that mean. */
function drawWork(s) {
  if (s.workDist === 'exp' && s.workS > 0) return -Math.log(1 - Math.random()) * s.workS;
  return s.workS;
}

/** The statement that keeps a connection busy for `seconds` on the server, in the engine's dialect, with
 * the placeholder style given (`$1`, `?`, or `:seconds`). */
function sleepSql(s, placeholder) {
  return s.engine === 'mysql' ? `SELECT SLEEP(${placeholder})` : `SELECT pg_sleep(${placeholder})`;
}

/**
 * Do one invocation's work and return its length in seconds.
 *
 * The drawn work time is split evenly over QUERIES sleep statements. With PARALLEL_QUERIES = K they are
 * dealt out over K concurrent chains; each chain runs `withConnection(fn)` (which borrows a connection,
 * calls `fn(conn)` and gives it back) and runs its share one after the other on it, so the environment
 * uses up to K connections at once. Every chain has ended when this resolves (a frozen environment has
 * no work in flight); the first failure is thrown.
 */
async function runWork(s, withConnection, execute) {
  const total = drawWork(s);
  const perQuery = total / s.queries;
  const k = s.parallelQueries;
  const shares = Array.from({ length: k }, (_, i) => Math.floor(s.queries / k) + (i < s.queries % k ? 1 : 0));
  const chain = (n) => withConnection(async (conn) => {
    for (let i = 0; i < n; i++) await execute(conn, perQuery);
  });
  const results = await Promise.allSettled(shares.map(chain));
  const failed = results.find((r) => r.status === 'rejected');
  if (failed) throw failed.reason;
  return total;
}

/** What every workload's handler returns. */
function response(workS) {
  return { statusCode: 200, workSeconds: Math.round(workS * 1e6) / 1e6 };
}

module.exports = {
  WorkloadError, settings, number, flag, raw, requireEngine, requireSerialQueries, ignored, ms, defined,
  connectionParts, drawWork, sleepSql, runWork, response,
};

// --- pools shared by several workloads -----------------------------------------------------------------

/**
 * A node-postgres Pool for these settings: POOL_MAX → max (pg: 10), POOL_MIN → min (0),
 * POOL_IDLE_SECONDS → idleTimeoutMillis (10 s; 0 means never), POOL_LIFETIME_SECONDS →
 * maxLifetimeSeconds (0, never), POOL_TIMEOUT_SECONDS → connectionTimeoutMillis (0: wait forever, for a
 * new connection and for a pooled one alike). An idle client's socket keeps Node's event loop alive
 * (allowExitOnIdle is false), which is what holds back a callback handler's response.
 */
function createPgPool(s, workload) {
  const { Pool } = require('pg');
  const pool = new Pool(defined({
    ...connectionParts(s), max: s.poolMax, min: s.poolMin, idleTimeoutMillis: ms(s.poolIdleS),
    maxLifetimeSeconds: s.poolLifetimeS, connectionTimeoutMillis: ms(s.poolTimeoutS),
  }));
  // node-postgres documents this listener as required: an idle client the server closes (e.g.
  // idle_session_timeout, --db-idle-timeout) emits 'error' on the pool, and without a listener that
  // ends the process.
  pool.on('error', (err) => console.error(`${workload}: idle client error: ${err.message}`));
  return pool;
}

/** `withConnection` for runWork over a pg Pool: borrow a client, run, give it back. */
function pgPoolConnection(pool) {
  return async (fn) => {
    const client = await pool.connect();
    try {
      await fn(client);
    } finally {
      client.release();
    }
  };
}

/** `execute` for runWork on a node-postgres client or pool. */
function pgSleeper(s) {
  const sql = sleepSql(s, '$1');
  return (client, seconds) => client.query(sql, [seconds]);
}

module.exports.createPgPool = createPgPool;
module.exports.pgPoolConnection = pgPoolConnection;
module.exports.pgSleeper = pgSleeper;
