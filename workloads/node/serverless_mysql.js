'use strict';
// serverless-mysql (MySQL/MariaDB only): one connection per environment, managed for Lambda.
//
// The library keeps one mysql2 connection at module level and, at the end of each invocation
// (`await mysql.end()`), decides whether to keep it: when the server's connections are above
// connUtilization × max_connections it closes its own, and it kills "zombie" connections of the same user
// that have slept longer than zombieMaxTimeout (KILL <id>: frozen or vanished environments' connections
// are closed by whichever environment runs next). Settings from --env: CONN_UTILIZATION (default 0.8),
// ZOMBIE_MAX_TIMEOUT_SECONDS (900), ZOMBIE_MIN_TIMEOUT_SECONDS (3). One connection cannot run queries at
// once: PARALLEL_QUERIES > 1 is refused at init; the POOL_* settings do not apply.

const serverlessMysql = require('serverless-mysql');
const w = require('./settings');

const NAME = 'serverless_mysql';
const SETTINGS = w.settings();
w.requireEngine(SETTINGS, NAME, ['mysql'], 'pg_pool.mjs or sequelize_pool.js');
w.requireSerialQueries(SETTINGS, NAME, 'a pool (mysql2_pool.js)');
w.ignored(NAME, Object.fromEntries(['POOL_MIN', 'POOL_IDLE_SECONDS', 'POOL_LIFETIME_SECONDS', 'POOL_TIMEOUT_SECONDS']
  .map((name) => [name, 'one connection, no pool'])));
const utilization = w.number('CONN_UTILIZATION');
if (utilization !== undefined && utilization > 1) {
  throw new w.WorkloadError(`CONN_UTILIZATION=${utilization}: expected a fraction between 0 and 1`);
}
const mysql = serverlessMysql(w.defined({
  config: w.connectionParts(SETTINGS),
  connUtilization: utilization,
  zombieMaxTimeout: w.number('ZOMBIE_MAX_TIMEOUT_SECONDS', { integer: true }),
  zombieMinTimeout: w.number('ZOMBIE_MIN_TIMEOUT_SECONDS', { integer: true }),
}));
const SQL = w.sleepSql(SETTINGS, '?');

exports.handler = async () => {
  const work = await w.runWork(SETTINGS, (fn) => fn(null), (_, seconds) => mysql.query(SQL, [seconds]));
  await mysql.end(); // the library's per-invocation step: keep, close, or kill zombies
  return w.response(work);
};
