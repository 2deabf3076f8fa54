// A node-postgres Pool at module level (PostgreSQL only), written as an ES module.
//
// new pg.Pool({max, min, idleTimeoutMillis, maxLifetimeSeconds, connectionTimeoutMillis}) from POOL_MAX,
// POOL_MIN, POOL_IDLE_SECONDS, POOL_LIFETIME_SECONDS, POOL_TIMEOUT_SECONDS (unset: pg's defaults, max 10,
// min 0, idle 10 s, no lifetime, wait forever). pg-pool gives each idle client its own
// setTimeout(idleTimeoutMillis), which does not run while the environment is frozen: on thaw every
// overdue one fires at once. POOL_IDLE_SECONDS=0 means "never close idle clients" in pg, not "at once".
// Connections carry PGAPPNAME (lambdaemu-env-<id>) as their application_name.

import w from './settings.js';

const SETTINGS = w.settings();
w.requireEngine(SETTINGS, 'pg_pool', ['postgres'], 'sequelize_pool.js or mysql2_pool.js');
const pool = w.createPgPool(SETTINGS, 'pg_pool');
const withConnection = w.pgPoolConnection(pool);
const execute = w.pgSleeper(SETTINGS);

export const handler = async () => w.response(await w.runWork(SETTINGS, withConnection, execute));
