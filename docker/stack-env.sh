#!/bin/sh
# Entrypoint of the stack's pgbackflow image: read secrets from files (compose secrets, mode
# 0600) into the variables Prefect reads, then exec the command. Prefect takes its encryption
# key, auth strings and database password only from the environment; the files keep them out
# of the compose file, `docker inspect` and the server's database. `docker exec` skips the
# entrypoint: prefix the command with this script there (docker/stack.py doctor does).
set -eu
for name in PREFECT_SERVER_ENCRYPTION_KEY PREFECT_SERVER_API_AUTH_STRING PREFECT_API_AUTH_STRING \
            PREFECT_SERVER_DATABASE_PASSWORD; do
    file_var="${name}_FILE"
    eval "file=\${$file_var:-}"
    if [ -n "$file" ]; then
        if [ ! -r "$file" ]; then
            echo "error: $file_var names '$file', which this container (uid $(id -u)) cannot read: check the secret file and its owner" >&2
            exit 1
        fi
        value=$(cat "$file")
        export "$name=$value"
        unset "$file_var"
    fi
done
exec "$@"
