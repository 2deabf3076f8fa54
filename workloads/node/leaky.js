'use strict';
// A leaky handler: every invocation opens new driver connections (pg Client or mysql2, by engine) and
// never closes them, as workloads/leaky.py does. Each invocation leaves PARALLEL_QUERIES more
// connections open, so an environment's count grows until it is reclaimed. They are kept in a
// module-level array, as leaked objects usually are. Pool settings are ignored: there is no pool.

const w = require('./settings');

const NAME = 'leaky';
const SETTINGS = w.settings();
w.ignored(NAME, Object.fromEntries(['POOL_MIN', 'POOL_IDLE_SECONDS', 'POOL_LIFETIME_SECONDS',
  'POOL_TIMEOUT_SECONDS'].map((name) => [name, 'no pool'])));
/** Every connection this environment opened; none is ever closed. */
const LEAKED = [];

async function connectPostgres() {
  const { Client } = require('pg');
  const client = new Client(w.connectionParts(SETTINGS));
  // Without a listener, a server-side close of a leaked client (idle timeout) would end the process.
  client.on('error', () => {});
  await client.connect();
  return client;
}

async function connectMysql() {
  const mysql = require('mysql2/promise');
  const conn = await mysql.createConnection(w.connectionParts(SETTINGS));
  conn.on('error', () => {});
  return conn;
}

const connect = SETTINGS.engine === 'mysql' ? connectMysql : connectPostgres;
const SQL = w.sleepSql(SETTINGS, SETTINGS.engine === 'mysql' ? '?' : '$1');

async function newConnection(fn) {
  const conn = await connect();
  LEAKED.push(conn);
  await fn(conn); // and no end()
}

exports.LEAKED = LEAKED;
exports.handler = async () => w.response(await w.runWork(SETTINGS, newConnection,
  (conn, seconds) => conn.query(SQL, [seconds])));
