#!/usr/bin/env bash
# Regenerate the gRPC stubs from serving/voltage.proto (run from anywhere; needs grpcio-tools,
# installed with the `dev` extra). The generated files are checked in:
#   serving/voltage_pb2.py, serving/voltage_pb2.pyi, serving/voltage_pb2_grpc.py
# The proto is compiled from the repository root so the stubs import each other as
# `from serving import voltage_pb2` (a package import that works from a checkout, an installed
# wheel and a built Bento alike).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
"$PYTHON" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  serving/voltage.proto
# Generated code follows protoc's style, not ours: tell ruff to skip it (first line of each file).
for f in serving/voltage_pb2.py serving/voltage_pb2.pyi serving/voltage_pb2_grpc.py; do
  { echo "# ruff: noqa"; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
done
echo "generated: serving/voltage_pb2.py serving/voltage_pb2.pyi serving/voltage_pb2_grpc.py"
