//go:build tools

// Package tools pins the upstream main packages that build.sh compiles, so `go mod tidy`
// keeps every module they need in go.mod and go.sum. Nothing here is compiled into a binary:
// the binaries are built from the upstream packages themselves, unchanged.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
