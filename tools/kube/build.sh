#!/bin/sh
# Builds kube-apiserver, kube-controller-manager, kube-scheduler and etcd from the Kubernetes
# release pinned in go.mod into OUT (default ../../.cache/kube/<version>/bin), once: a stamp
# holding the hash of go.mod, go.sum and this script skips the build while they are unchanged.
# The Go module and build caches are Go's defaults (~/go/pkg/mod, ~/.cache/go-build), so a
# second clone on the same machine only links. CGO is off, as in Kubernetes' own release build.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
GO=${GO:-go}
command -v "$GO" >/dev/null 2>&1 || GO=/usr/local/go/bin/go
command -v "$GO" >/dev/null 2>&1 || {
    echo "build.sh: needs Go >= 1.25 on PATH or in /usr/local/go (and the Go module proxy)" >&2
    exit 1
}
KUBE_VERSION=$(sed -n 's/^[[:space:]]*k8s.io\/kubernetes \(v[0-9.]*\)$/\1/p' "$here/go.mod")
[ -n "$KUBE_VERSION" ] || { echo "build.sh: no k8s.io/kubernetes version in go.mod" >&2; exit 1; }
OUT=${1:-$here/../../.cache/kube/$KUBE_VERSION/bin}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
stamp="$OUT/.built"
want=$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "build.sh: $OUT is up to date (Kubernetes $KUBE_VERSION)" >&2
    exit 0
fi
minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
v=k8s.io/component-base/version
ldflags="-s -w -X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
ldflags="$ldflags -X $v.buildDate=1970-01-01T00:00:00Z"
export CGO_ENABLED=0
start=$(date +%s)
cd "$here"
echo "build.sh: building Kubernetes $KUBE_VERSION and etcd into $OUT (cold: tens of minutes on 2 cores)" >&2
"$GO" build -trimpath -ldflags "$ldflags" -o "$OUT/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler
"$GO" build -trimpath -ldflags "-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3
echo "$want" > "$stamp"
echo "build.sh: built in $(( $(date +%s) - start )) s" >&2
