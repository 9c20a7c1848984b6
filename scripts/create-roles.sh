#!/usr/bin/env bash
# Least-privilege roles for Baton (README, "Security and trust model").
#
#   scripts/create-roles.sh postgres   # PostgreSQL roles `baton` and `baton_operator` (scripts/roles.sql)
#   scripts/create-roles.sh rabbitmq   # RabbitMQ users `baton` and `baton-submitter`
#
# Passwords come from the environment (BATON_DB_PASSWORD, BATON_OPERATOR_PASSWORD,
# BATON_MQ_PASSWORD, BATON_SUBMITTER_PASSWORD), never from the command line. Optional:
# BATON_DB (database name, default baton), BATON_PREFIX (message_queue.prefix, default baton),
# BATON_VHOST (default /), PSQL (how to reach PostgreSQL as a superuser, default `psql -U postgres`),
# and the names: BATON_DB_USER and BATON_OPERATOR_USER (default baton, baton_operator),
# BATON_MQ_USER and BATON_SUBMITTER_USER (default baton, baton-submitter): one deployment's roles
# beside another's on a shared server.
# Idempotent: run it again to rotate passwords.
set -euo pipefail

need() { [ -n "${!1:-}" ] || { echo "create-roles: set $1 in the environment" >&2; exit 2; }; }
prefix=${BATON_PREFIX:-baton}
vhost=${BATON_VHOST:-/}
db_user=${BATON_DB_USER:-baton}
operator_user=${BATON_OPERATOR_USER:-baton_operator}
mq_user=${BATON_MQ_USER:-baton}
submitter_user=${BATON_SUBMITTER_USER:-baton-submitter}
# RabbitMQ permissions are regular expressions over names; the prefix is matched literally.
p=$(printf '%s' "$prefix" | sed 's/[.[\*^$()+?{|]/\\&/g')

case "${1:-}" in
postgres)
    need BATON_DB_PASSWORD
    need BATON_OPERATOR_PASSWORD
    ${PSQL:-psql -U postgres} -v ON_ERROR_STOP=1 -q -d postgres \
        -v db="${BATON_DB:-baton}" \
        -v service_role="$db_user" \
        -v operator_role="$operator_user" \
        -v service_password="$BATON_DB_PASSWORD" \
        -v operator_password="$BATON_OPERATOR_PASSWORD" \
        -f "$(dirname "$0")/roles.sql"
    echo "create-roles: PostgreSQL roles $db_user and $operator_user are ready"
    ;;
rabbitmq)
    need BATON_MQ_PASSWORD
    need BATON_SUBMITTER_PASSWORD
    rabbitmqctl -q list_users | cut -f1 | grep -qxF "$mq_user" || rabbitmqctl -q add_user "$mq_user" "$BATON_MQ_PASSWORD"
    rabbitmqctl -q list_users | cut -f1 | grep -qxF "$submitter_user" \
        || rabbitmqctl -q add_user "$submitter_user" "$BATON_SUBMITTER_PASSWORD"
    rabbitmqctl -q change_password "$mq_user" "$BATON_MQ_PASSWORD"
    rabbitmqctl -q change_password "$submitter_user" "$BATON_SUBMITTER_PASSWORD"
    # Services: everything under the prefix, their own reply queues, and replies through the
    # default exchange.
    rabbitmqctl -q set_permissions -p "$vhost" "$mq_user" \
        "^($p\\..*|amq\\.gen-.*)\$" "^($p\\..*|amq\\.gen-.*|amq\\.default)\$" "^($p\\..*|amq\\.gen-.*)\$"
    # Submitters: declare their own reply queue (`<prefix>.reply.*`, or server-named), publish
    # requests, hear replies and notifications. They cannot read any worker's queue, publish
    # dispatches, or delete anything of Baton's.
    rabbitmqctl -q set_permissions -p "$vhost" "$submitter_user" \
        "^($p\\.reply\\..*|amq\\.gen-.*)\$" \
        "^($p\\.executions|$p\\.reply\\..*|amq\\.gen-.*)\$" \
        "^($p\\.notifications|$p\\.reply\\..*|amq\\.gen-.*)\$"
    echo "create-roles: RabbitMQ users $mq_user and $submitter_user are ready (vhost $vhost, prefix $prefix)"
    ;;
*)
    echo "usage: $0 postgres|rabbitmq" >&2
    exit 2
    ;;
esac
