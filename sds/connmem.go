package sds

import "google.golang.org/grpc"

// connReadBuffer is the gRPC read buffer of each xDS connection. Requests
// are a few hundred bytes (a node, a type and a few names) and the TLS
// layer buffers whole records below it, so gRPC's 32 KiB default only
// costs memory: 10,000 sidecars each on its own connection held 320 MiB of
// it.
const connReadBuffer = 4 << 10

// connMemoryOptions are the gRPC server options that size per-connection
// buffers for xDS's small, rare messages: a small read buffer, and write
// buffers taken from a pool for each flush and returned after (instead of
// 32 KiB kept by every idle connection).
func connMemoryOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ReadBufferSize(connReadBuffer),
		grpc.SharedWriteBuffer(true),
	}
}
