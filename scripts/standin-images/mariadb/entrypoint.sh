#!/bin/bash
# Stand-in for the official mariadb image's entrypoint (see ../README.md for the interface honoured).
set -euo pipefail
if [[ ${1:0:1} == - ]]; then
    set -- mariadbd "$@"
fi
datadir=/var/lib/mysql
root_password=${MARIADB_ROOT_PASSWORD:-${MYSQL_ROOT_PASSWORD:-}}
root_host=${MARIADB_ROOT_HOST:-${MYSQL_ROOT_HOST:-%}}
database=${MARIADB_DATABASE:-${MYSQL_DATABASE:-}}
user=${MARIADB_USER:-${MYSQL_USER:-}}
password=${MARIADB_PASSWORD:-${MYSQL_PASSWORD:-}}
if [[ $1 == mariadbd || $1 == mysqld ]]; then
    mkdir -p "$datadir" /run/mysqld
    chown -R mysql:mysql "$datadir" /run/mysqld
    if [[ ! -d $datadir/mysql ]]; then
        if [[ -z $root_password ]]; then
            echo "error: database is uninitialized and password option is not specified" >&2
            echo "  You need to specify one of MARIADB_ROOT_PASSWORD, MARIADB_ALLOW_EMPTY_ROOT_PASSWORD and MARIADB_RANDOM_ROOT_PASSWORD" >&2
            exit 1
        fi
        mariadb-install-db --user=mysql --datadir="$datadir" --auth-root-authentication-method=normal \
            --skip-test-db "${@:2}" >/dev/null
        socket=/run/mysqld/init.sock
        mariadbd --user=mysql --datadir="$datadir" --skip-networking --socket="$socket" "${@:2}" &
        pid=$!
        for _ in $(seq 1 300); do
            mariadb --protocol=socket --socket="$socket" -uroot -e 'SELECT 1' >/dev/null 2>&1 && break
            sleep 0.1
        done
        # As the official image does: root only at localhost (and MARIADB_ROOT_HOST), with the password.
        sql="DROP USER IF EXISTS root@'127.0.0.1', root@'::1', root@'$(hostname)', ''@'localhost', ''@'$(hostname)';"
        sql+="ALTER USER 'root'@'localhost' IDENTIFIED BY '$root_password';"
        if [[ $root_host != localhost ]]; then
            sql+="CREATE USER 'root'@'$root_host' IDENTIFIED BY '$root_password';"
            sql+="GRANT ALL ON *.* TO 'root'@'$root_host' WITH GRANT OPTION;"
        fi
        [[ -n $database ]] && sql+="CREATE DATABASE IF NOT EXISTS \`$database\`;"
        if [[ -n $user && -n $password ]]; then
            sql+="CREATE USER '$user'@'%' IDENTIFIED BY '$password';"
            [[ -n $database ]] && sql+="GRANT ALL ON \`$database\`.* TO '$user'@'%';"
        fi
        mariadb --protocol=socket --socket="$socket" -uroot -e "$sql"
        kill "$pid"
        wait "$pid" || true
        echo "MariaDB init process done. Ready for start up."
    fi
    exec "$@" --user=mysql --datadir="$datadir"
fi
exec "$@"
