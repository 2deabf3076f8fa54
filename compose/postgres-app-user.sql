-- Run by compose/postgres*.yml at initialisation.
CREATE ROLE app LOGIN PASSWORD 'app';
GRANT pg_read_all_stats TO app;
CREATE DATABASE app OWNER app;
