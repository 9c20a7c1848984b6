#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432) and RabbitMQ (127.0.0.1:5672) answer; start them if they
# are installed here but stopped. Used by `make demo`, `make test` and CI.
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # name port seconds
    local name=$1 port=$2 deadline=$((SECONDS + $3))
    until listening "$port"; do
        if ((SECONDS > deadline)); then
            echo "ensure-services: $name did not come up on port $port" >&2
            return 1
        fi
        sleep 0.5
    done
}

if ! listening 5432; then
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
        echo "ensure-services: starting PostgreSQL"
        for version in $(ls /etc/postgresql); do
            pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        done
    else
        echo "ensure-services: PostgreSQL is not running on 127.0.0.1:5432 and pg_ctlcluster is not available; start it yourself" >&2
        exit 1
    fi
    wait_for PostgreSQL 5432 60
fi

if ! listening 5672; then
    if command -v rabbitmq-server >/dev/null 2>&1; then
        echo "ensure-services: starting RabbitMQ"
        rabbitmq-server -detached
    else
        echo "ensure-services: RabbitMQ is not running on 127.0.0.1:5672 and rabbitmq-server is not installed; start it yourself" >&2
        exit 1
    fi
    wait_for RabbitMQ 5672 120
fi

# The port can open a moment before the broker accepts logins.
if command -v rabbitmq-diagnostics >/dev/null 2>&1; then
    for _ in $(seq 1 60); do
        rabbitmq-diagnostics -q check_running >/dev/null 2>&1 && break
        sleep 1
    done
fi
echo "ensure-services: PostgreSQL and RabbitMQ are up"
