#!/bin/bash
# Stand-in for the edoburu/pgbouncer image's entrypoint (see ../README.md for the interface honoured).
set -euo pipefail
dir=/etc/pgbouncer
auth_file=${AUTH_FILE:-$dir/userlist.txt}
[[ -e $auth_file ]] || touch "$auth_file"
if [[ -n ${DB_USER:-} && -n ${DB_PASSWORD:-} ]] && ! grep -q "^\"$DB_USER\"" "$auth_file"; then
    if [[ ${AUTH_TYPE:-md5} == plain || ${AUTH_TYPE:-md5} == scram-sha-256 ]]; then
        pass=$DB_PASSWORD
    else
        pass="md5$(printf '%s' "$DB_PASSWORD$DB_USER" | md5sum | cut -f 1 -d ' ')"
    fi
    echo "\"$DB_USER\" \"$pass\"" >>"$auth_file"
fi
if [[ ! -f $dir/pgbouncer.ini ]]; then
    : "${DB_HOST:?Setup pgbouncer config error! You must set DB_HOST env}"
    {
        echo "[databases]"
        echo "${DB_NAME:-*} = host=$DB_HOST port=${DB_PORT:-5432} auth_user=${DB_USER:-postgres}"
        echo "[pgbouncer]"
        echo "listen_addr = ${LISTEN_ADDR:-0.0.0.0}"
        echo "listen_port = ${LISTEN_PORT:-5432}"
        echo "unix_socket_dir = ${UNIX_SOCKET_DIR:-}"
        echo "auth_file = $auth_file"
        echo "auth_type = ${AUTH_TYPE:-md5}"
        echo "admin_users = ${ADMIN_USERS:-postgres}"
        echo "ignore_startup_parameters = ${IGNORE_STARTUP_PARAMETERS:-extra_float_digits}"
        for name in POOL_MODE MAX_CLIENT_CONN DEFAULT_POOL_SIZE MIN_POOL_SIZE RESERVE_POOL_SIZE MAX_DB_CONNECTIONS \
                    MAX_USER_CONNECTIONS SERVER_IDLE_TIMEOUT QUERY_WAIT_TIMEOUT CLIENT_IDLE_TIMEOUT STATS_USERS \
                    LOG_CONNECTIONS LOG_DISCONNECTIONS LOG_POOLER_ERRORS SERVER_LIFETIME QUERY_TIMEOUT; do
            if [[ -n ${!name:-} ]]; then
                echo "${name,,} = ${!name}"
            fi
        done
    } >"$dir/pgbouncer.ini"
fi
exec "$@"
