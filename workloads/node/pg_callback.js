'use strict';
// The same node-postgres Pool as pg_pool.mjs, behind a callback handler: the Lambda pitfall of
// context.callbackWaitsForEmptyEventLoop.
//
// Lambda's Node runtime sends a callback handler's result only once the event loop is empty, unless the
// handler sets context.callbackWaitsForEmptyEventLoop = false. A pool's idle client keeps a socket open
// (and an idle timer), so the loop empties only when the pool has closed its idle clients
// (POOL_IDLE_SECONDS, pg's default 10 s): with --timeout 3s every invocation times out, and with a
// longer timeout each one lasts the idle time. CALLBACK_WAITS_FOR_EMPTY_EVENT_LOOP=0 (--env) sets the
// flag to false, the usual fix.

const w = require('./settings');

const SETTINGS = w.settings();
w.requireEngine(SETTINGS, 'pg_callback', ['postgres'], 'sequelize_pool.js or mysql2_pool.js');
const WAITS = w.flag('CALLBACK_WAITS_FOR_EMPTY_EVENT_LOOP') ?? true;
const pool = w.createPgPool(SETTINGS, 'pg_callback');
const withConnection = w.pgPoolConnection(pool);
const execute = w.pgSleeper(SETTINGS);

exports.handler = function handler(event, context, callback) {
  context.callbackWaitsForEmptyEventLoop = WAITS;
  w.runWork(SETTINGS, withConnection, execute).then((work) => callback(null, w.response(work)), callback);
};
