'use strict';
// A mysql2 pool at module level (MySQL/MariaDB only).
//
// mysql2.createPool({connectionLimit, maxIdle, idleTimeout}) from POOL_MAX, POOL_MAX_IDLE (--env) and
// POOL_IDLE_SECONDS; unset: mysql2's defaults, connectionLimit 10, maxIdle = connectionLimit,
// idleTimeout 60 s. mysql2 (3.24) runs its idle reaper only when maxIdle < connectionLimit: with the
// defaults, and with POOL_IDLE_SECONDS alone, idle connections are never closed. When it runs, it is a
// setTimeout(1 s) chain that closes free connections above maxIdle and those idle longer than
// idleTimeout; like every timer it stands still while the environment is frozen. mysql2 pools have no
// minimum size, lifetime or acquire timeout: a borrower waits for a free connection as long as it takes.
// Connections are attributed to environments by client port.

const mysql = require('mysql2/promise');
const w = require('./settings');

const NAME = 'mysql2_pool';
const SETTINGS = w.settings();
w.requireEngine(SETTINGS, NAME, ['mysql'], 'pg_pool.mjs or sequelize_pool.js');
const maxIdle = w.number('POOL_MAX_IDLE', { integer: true });
w.ignored(NAME, {
  POOL_MIN: 'mysql2 pools have no minimum size',
  POOL_LIFETIME_SECONDS: 'mysql2 pools have no connection age limit',
  POOL_TIMEOUT_SECONDS: 'mysql2 pools wait for a free connection without a time limit',
});
if (SETTINGS.poolIdleS !== undefined && (maxIdle === undefined || maxIdle >= (SETTINGS.poolMax ?? 10))) {
  console.warn(`${NAME}: POOL_IDLE_SECONDS=${SETTINGS.poolIdleS} has no effect: mysql2 closes idle connections `
    + 'only when maxIdle < connectionLimit (set --env POOL_MAX_IDLE below --pool-max)');
}
const pool = mysql.createPool(w.defined({
  ...w.connectionParts(SETTINGS), connectionLimit: SETTINGS.poolMax, maxIdle,
  idleTimeout: w.ms(SETTINGS.poolIdleS), waitForConnections: true,
}));
const SQL = w.sleepSql(SETTINGS, '?');

async function withConnection(fn) {
  const conn = await pool.getConnection();
  try {
    await fn(conn);
  } finally {
    conn.release();
  }
}

exports.handler = async () => w.response(await w.runWork(SETTINGS, withConnection,
  (conn, seconds) => conn.query(SQL, [seconds])));
