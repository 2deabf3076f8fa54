'use strict';
// sequelize with its pool at module level (PostgreSQL through pg, MySQL through mysql2): the Node
// pattern behind most "too many connections" reports from Lambda.
//
// new Sequelize(db, user, password, {dialect, pool: {max, min, idle, evict, acquire, maxUses}}) with
// every pool option from the environment; unset ones keep sequelize 6's defaults (max 5, min 0, idle
// 10 s, evict 1 s, acquire 60 s, maxUses unlimited):
//   POOL_MAX → max, POOL_MIN → min, POOL_IDLE_SECONDS → idle, POOL_EVICT_SECONDS → evict,
//   POOL_TIMEOUT_SECONDS or POOL_ACQUIRE_SECONDS → acquire, POOL_MAX_USES → maxUses.
// Each invocation runs QUERIES sleep statements as PARALLEL_QUERIES concurrent chains of
// sequelize.query(), each query borrowing a pooled connection, so K chains use up to min(K, max).
//
// What sequelize-pool 7.1.0 (the version sequelize 6 uses) does with them, measured against PostgreSQL
// (README, tests/test_node_workloads.py): a released connection is stamped `Date.now() + idle` and one
// chained setTimeout(evict) reaps the overdue ones, so a connection lives between idle and idle + evict
// after its last use; nothing runs while the environment is frozen, and the overdue reap runs first
// on thaw. idle 0, evict 0 and acquire 0 are read as "unset" (`x || default`): idle 0 is 30 s, not
// "close at once". The first query of a cold start opens one more connection, outside the pool, to read
// the server version, and closes it.

const { Sequelize } = require('sequelize');
const w = require('./settings');

const NAME = 'sequelize_pool';
const SETTINGS = w.settings();
const timeoutS = SETTINGS.poolTimeoutS;
const acquireS = w.number('POOL_ACQUIRE_SECONDS');
if (timeoutS !== undefined && acquireS !== undefined && timeoutS !== acquireS) {
  throw new w.WorkloadError(`POOL_TIMEOUT_SECONDS=${timeoutS} and POOL_ACQUIRE_SECONDS=${acquireS} both set `
    + "sequelize's pool.acquire: give only one (--pool-timeout is the same setting)");
}
w.ignored(NAME, { POOL_LIFETIME_SECONDS: 'sequelize-pool has no connection age limit (POOL_MAX_USES sets maxUses)' });
const POOL = w.defined({
  max: SETTINGS.poolMax,
  min: SETTINGS.poolMin,
  idle: w.ms(SETTINGS.poolIdleS),
  evict: w.ms(w.number('POOL_EVICT_SECONDS')),
  acquire: w.ms(acquireS ?? timeoutS),
  maxUses: w.number('POOL_MAX_USES', { integer: true, minimum: 1 }),
});
const parts = w.connectionParts(SETTINGS);
const sequelize = new Sequelize(parts.database, parts.user, parts.password, {
  host: parts.host, port: parts.port, dialect: SETTINGS.engine, logging: false, pool: POOL,
});
const SQL = w.sleepSql(SETTINGS, ':seconds');

exports.sequelize = sequelize;
exports.handler = async () => {
  const work = await w.runWork(SETTINGS, (fn) => fn(null),
    (_, seconds) => sequelize.query(SQL, { replacements: { seconds } }));
  return w.response(work);
};
