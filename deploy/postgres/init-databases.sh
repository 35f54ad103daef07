#!/bin/sh
# The deployment's two databases, each owned by its own login role:
#   mlflow  MLflow's backend store (experiments, runs, metrics, the model registry)
#   optuna  the tuning studies (`voltage tune --storage postgresql://optuna:...@<host>/optuna`)
# Separate databases because each tool owns its schema and migrates it on its own (both keep an
# `alembic_version` table), and separate roles so a tuning worker's credentials cannot touch the
# registry.
#
# Run once on a new server as a superuser. The postgres image runs it from
# /docker-entrypoint-initdb.d (deploy/compose.yaml, deploy/k8s/postgres.yaml); the rehearsal
# (tests/project/test_cluster.py) runs it against its throwaway server. Connection: psql's usual PG*
# variables or the local socket; the user is $POSTGRES_USER (default postgres).
# Passwords: $MLFLOW_DB_PASSWORD and $OPTUNA_DB_PASSWORD (psql quotes them: any characters).
set -eu
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
: "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD}"
psql -v ON_ERROR_STOP=1 -U "${POSTGRES_USER:-postgres}" -d postgres \
  -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v optuna_pw="$OPTUNA_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE ROLE optuna LOGIN PASSWORD :'optuna_pw';
CREATE DATABASE optuna OWNER optuna;
SQL
