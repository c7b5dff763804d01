#!/bin/sh
# Entrypoint of pgbackflow's local postgres:<major> images (docker/build_images.py).
#
# Honours the contract of the official image's docker-entrypoint.sh that pgbackflow relies on:
#   - first argument starting with "-": it is an option of postgres ("-c fsync=off");
#   - started as root: prepare PGDATA and /var/run/postgresql, then re-run as postgres (uid 999);
#   - empty PGDATA: initdb as POSTGRES_USER (default postgres) with POSTGRES_PASSWORD (through a
#     temporary pwfile, never on a command line), POSTGRES_INITDB_ARGS; pg_hba.conf gets
#     "host all all all $POSTGRES_HOST_AUTH_METHOD" (default scram-sha-256); refuse to start
#     without a password unless POSTGRES_HOST_AUTH_METHOD=trust; create POSTGRES_DB; run
#     /docker-entrypoint-initdb.d/*.sh, *.sql, *.sql.gz, *.sql.xz on a socket-only server;
#   - exec the server, so postgres is PID 1 and `docker stop` (SIGINT) shuts it down cleanly.
# POSTGRES_PASSWORD_FILE, POSTGRES_USER_FILE, POSTGRES_DB_FILE and POSTGRES_INITDB_ARGS_FILE work
# as in the official image. Written for busybox sh (no bash in the image).
set -eu

POSTGRES_UID=999
POSTGRES_GID=999
SELF=/usr/local/bin/docker-entrypoint.sh

log() { printf '%s\n' "$*"; }
die() {
    printf 'Error: %s\n' "$*" >&2
    exit 1
}

# file_env VAR [DEFAULT]: VAR from itself, from the file named by VAR_FILE, or DEFAULT.
file_env() {
    _var=$1
    _def=${2-}
    eval "_val=\${$_var-}"
    eval "_file=\${${_var}_FILE-}"
    if [ -n "$_val" ] && [ -n "$_file" ]; then
        die "both $_var and ${_var}_FILE are set (but are exclusive)"
    fi
    if [ -n "$_file" ]; then
        _val=$(cat "$_file")
    elif [ -z "$_val" ]; then
        _val=$_def
    fi
    export "$_var=$_val"
    unset "${_var}_FILE" _var _def _val _file
}

# Is this a request for help/version/config output rather than a server start?
want_help() {
    for arg in "$@"; do
        case "$arg" in
        -'?' | --help | --describe-config | -V | --version | -C | -C*) return 0 ;;
        esac
    done
    return 1
}

setup_env() {
    : "${PGDATA:?PGDATA must be set}"
    file_env POSTGRES_PASSWORD
    file_env POSTGRES_USER postgres
    file_env POSTGRES_DB "$POSTGRES_USER"
    file_env POSTGRES_INITDB_ARGS
    : "${POSTGRES_HOST_AUTH_METHOD:=}"
    DATABASE_ALREADY_EXISTS=
    if [ -s "$PGDATA/PG_VERSION" ]; then
        DATABASE_ALREADY_EXISTS=true
    fi
}

# As root: make PGDATA and the socket directory belong to postgres. Only touches what is not
# already right, so the image's own directories need no capability but SETUID/SETGID; a mount
# owned by someone else (tmpfs, bind mount) needs CHOWN.
prepare_dirs_as_root() {
    mkdir -p "$PGDATA" /var/run/postgresql
    for dir in "$PGDATA" /var/run/postgresql; do
        if [ "$(stat -c %u "$dir")" != "$POSTGRES_UID" ]; then
            # chmod first: after the chown root no longer owns it (would need CAP_FOWNER).
            if [ "$dir" = "$PGDATA" ]; then chmod 700 "$dir"; else chmod 3775 "$dir"; fi
            chown -R "$POSTGRES_UID:$POSTGRES_GID" "$dir" ||
                die "cannot give $dir to postgres (uid $POSTGRES_UID): start the container with --cap-add CHOWN, or as --user $POSTGRES_UID with a directory it owns"
        fi
    done
}

verify_minimum_env() {
    if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
        cat >&2 <<'EOE'
Error: Database is uninitialized and superuser password is not specified.
       You must specify POSTGRES_PASSWORD to a non-empty value for the
       superuser. For example, "-e POSTGRES_PASSWORD=password" on "docker run".

       You may also use "POSTGRES_HOST_AUTH_METHOD=trust" to allow all
       connections without a password. This is *not* recommended.
EOE
        exit 1
    fi
    if [ "$POSTGRES_HOST_AUTH_METHOD" = trust ]; then
        log 'WARNING: POSTGRES_HOST_AUTH_METHOD=trust: every connection is accepted without a password.'
    fi
}

init_database_dir() {
    if [ ! -w "$PGDATA" ]; then
        die "PGDATA $PGDATA is not writable by uid $(id -u)"
    fi
    chmod 700 "$PGDATA" 2>/dev/null || :
    secrets=$(mktemp -d)
    # The password goes to initdb through a file only this user can read, never through argv.
    if [ -n "$POSTGRES_PASSWORD" ]; then
        (umask 077 && printf '%s\n' "$POSTGRES_PASSWORD" >"$secrets/pwfile")
        set -- "--pwfile=$secrets/pwfile"
    else
        set --
    fi
    # eval: POSTGRES_INITDB_ARGS may hold quoted words, as with the official image.
    status=0
    eval 'initdb --username="$POSTGRES_USER" "$@" '"$POSTGRES_INITDB_ARGS" || status=$?
    rm -rf "$secrets"
    [ "$status" = 0 ] || die "initdb failed with exit code $status"
}

# initdb writes its compiled-in socket directory (/tmp for these binaries); the official
# image's server (Debian build) uses /var/run/postgresql. Offer both.
setup_postgresql_conf() {
    printf "\nunix_socket_directories = '/var/run/postgresql, /tmp'\n" >>"$PGDATA/postgresql.conf"
}

setup_hba_conf() {
    : "${POSTGRES_HOST_AUTH_METHOD:=scram-sha-256}"
    {
        echo
        if [ "$POSTGRES_HOST_AUTH_METHOD" = trust ]; then
            echo '# warning trust is enabled for all connections'
        fi
        printf 'host all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD"
    } >>"$PGDATA/pg_hba.conf"
}

psql_init() {
    psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password --username "$POSTGRES_USER" "$@"
}

temp_server_start() {
    # Socket only: nothing can reach the server before initialisation is complete.
    PGUSER=$POSTGRES_USER pg_ctl -D "$PGDATA" -w -s \
        -o "-c listen_addresses='' -p ${PGPORT:-5432}" start
}

temp_server_stop() {
    PGUSER=$POSTGRES_USER pg_ctl -D "$PGDATA" -m fast -w -s stop
}

setup_db() {
    [ "$POSTGRES_DB" = postgres ] && return 0
    exists=$(psql_init --dbname postgres -Atq --set db="$POSTGRES_DB" <<'EOSQL'
SELECT 1 FROM pg_database WHERE datname = :'db';
EOSQL
)
    if [ -z "$exists" ]; then
        psql_init --dbname postgres -q --set db="$POSTGRES_DB" <<'EOSQL'
CREATE DATABASE :"db";
EOSQL
        log "created database $POSTGRES_DB"
    fi
}

process_init_files() {
    for f in "$@"; do
        case "$f" in
        *.sh)
            if [ -x "$f" ]; then
                log "$0: running $f"
                "$f"
            else
                log "$0: sourcing $f"
                # shellcheck disable=SC1090
                . "$f"
            fi
            ;;
        *.sql) log "$0: running $f" && psql_init --dbname "$POSTGRES_DB" -f "$f" ;;
        *.sql.gz) log "$0: running $f" && gunzip -c "$f" | psql_init --dbname "$POSTGRES_DB" ;;
        *.sql.xz) log "$0: running $f" && xzcat "$f" | psql_init --dbname "$POSTGRES_DB" ;;
        *) log "$0: ignoring $f" ;;
        esac
    done
}

has_init_files() {
    for f in /docker-entrypoint-initdb.d/*; do
        [ -e "$f" ] && return 0
    done
    return 1
}

main() {
    case "${1-}" in
    -*) set -- postgres "$@" ;;
    esac
    if [ "${1-}" != postgres ] || want_help "$@"; then
        exec "$@"
    fi

    setup_env
    if [ "$(id -u)" = 0 ]; then
        prepare_dirs_as_root
        export HOME=/var/lib/postgresql
        exec su-exec "$POSTGRES_UID:$POSTGRES_GID" "$SELF" "$@"
    fi

    if [ -z "$DATABASE_ALREADY_EXISTS" ]; then
        verify_minimum_env
        init_database_dir
        setup_postgresql_conf
        setup_hba_conf
        # The official image always runs a temporary server; it only matters when there is
        # something to do, so skip it otherwise (one second less per throwaway container).
        if [ "$POSTGRES_DB" != postgres ] || has_init_files; then
            export PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
            temp_server_start
            setup_db
            if has_init_files; then
                process_init_files /docker-entrypoint-initdb.d/*
            fi
            temp_server_stop
            unset PGPASSWORD
        fi
        log
        log 'PostgreSQL init process complete; ready for start up.'
        log
    else
        log
        log 'PostgreSQL Database directory appears to contain a database; Skipping initialization'
        log
    fi
    exec "$@"
}

main "$@"
