// Package kubernetes holds the Kubernetes manifests of sds-server: its
// Namespace, ServiceAccount, config and policy ConfigMaps, the SDS and
// metrics Services and a one-replica StatefulSet with a PersistentVolume
// for the data dir, applied with `kubectl apply -k deploy/kubernetes`. The
// tests here decode every manifest strictly into the Kubernetes API types
// (an unknown or misspelt field fails), check that names, ports, volumes,
// labels and selectors refer to each other, that the pod is locked down,
// and that the shipped policies load. The agent's DaemonSet comes with the
// agent (issue 12).
package kubernetes
