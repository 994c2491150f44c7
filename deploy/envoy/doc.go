// Package envoyconfig holds the Envoy sidecar configuration sds-server
// ships: sidecar-example.yaml, a commented example of the bootstrap that
// `sds-server bootstrap envoy` writes. The template itself is the generator
// in bootstrap/envoy.go (bootstrap.RenderEnvoy); the tests here regenerate
// the example from fixed inputs, so it cannot drift from the generator, and
// check it with `envoy --mode validate`.
package envoyconfig
