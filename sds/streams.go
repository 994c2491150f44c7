package sds

import (
	"context"
	"errors"

	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	extensionservice "github.com/envoyproxy/go-control-plane/envoy/service/extension/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc/status"
)

// endable lets the server end one stream from outside (a revoked node)
// with a status of its choosing. go-control-plane's handlers only end when
// the client does, so each handler runs under a context the server can
// cancel with a cause, and the status is returned as soon as it is.
type endable struct {
	xds serverv3.Server
}

// streamEndKey carries a stream's cancel function from the handler wrapper to
// the OnStreamOpen callback.
type streamEndKey struct{}

// endFunc returns the function that ends the stream whose context is ctx
// with a cause; a no-op for a context not made by runStream.
func endFunc(ctx context.Context) func(error) {
	if f, ok := ctx.Value(streamEndKey{}).(context.CancelCauseFunc); ok {
		return f
	}
	return func(error) {}
}

// errEnded marks a cause set by the server (not the client going away).
type errEnded struct{ st *status.Status }

func (e errEnded) Error() string { return e.st.Message() }

// endStreamWith returns the cause that ends a stream with st.
func endStreamWith(st *status.Status) error { return errEnded{st} }

// runStream runs handler under a context the server can end with a cause.
func runStream(parent context.Context, handler func(context.Context) error) error {
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	ctx = context.WithValue(ctx, streamEndKey{}, cancel)
	errc := make(chan error, 1)
	go func() { errc <- handler(ctx) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		var ended errEnded
		if errors.As(context.Cause(ctx), &ended) {
			return ended.st.Err()
		}
		return <-errc
	}
}

type (
	adsSotwStream   = discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesServer
	adsDeltaStream  = discoverygrpc.AggregatedDiscoveryService_DeltaAggregatedResourcesServer
	sdsSotwStream   = secretservice.SecretDiscoveryService_StreamSecretsServer
	sdsDeltaStream  = secretservice.SecretDiscoveryService_DeltaSecretsServer
	ecdsSotwStream  = extensionservice.ExtensionConfigDiscoveryService_StreamExtensionConfigsServer
	ecdsDeltaStream = extensionservice.ExtensionConfigDiscoveryService_DeltaExtensionConfigsServer
	adsServer       = discoverygrpc.AggregatedDiscoveryServiceServer
	sdsServer       = secretservice.SecretDiscoveryServiceServer
	ecdsServer      = extensionservice.ExtensionConfigDiscoveryServiceServer
)

// Streams with an overridden context, one per stream type.
type (
	adsSotwCtx struct {
		adsSotwStream
		ctx context.Context
	}
	adsDeltaCtx struct {
		adsDeltaStream
		ctx context.Context
	}
	sdsSotwCtx struct {
		sdsSotwStream
		ctx context.Context
	}
	sdsDeltaCtx struct {
		sdsDeltaStream
		ctx context.Context
	}
	ecdsSotwCtx struct {
		ecdsSotwStream
		ctx context.Context
	}
	ecdsDeltaCtx struct {
		ecdsDeltaStream
		ctx context.Context
	}
)

func (s adsSotwCtx) Context() context.Context   { return s.ctx }
func (s adsDeltaCtx) Context() context.Context  { return s.ctx }
func (s sdsSotwCtx) Context() context.Context   { return s.ctx }
func (s sdsDeltaCtx) Context() context.Context  { return s.ctx }
func (s ecdsSotwCtx) Context() context.Context  { return s.ctx }
func (s ecdsDeltaCtx) Context() context.Context { return s.ctx }

// The services, each method delegating to go-control-plane under run.
type (
	adsService  struct{ endable }
	sdsService  struct{ endable }
	ecdsService struct{ endable }
)

var (
	_ adsServer  = adsService{}
	_ sdsServer  = sdsService{}
	_ ecdsServer = ecdsService{}
)

func (a adsService) StreamAggregatedResources(s adsSotwStream) error {
	return runStream(s.Context(), func(ctx context.Context) error {
		return a.xds.StreamAggregatedResources(adsSotwCtx{s, ctx})
	})
}

func (a adsService) DeltaAggregatedResources(s adsDeltaStream) error {
	return runStream(s.Context(), func(ctx context.Context) error {
		return a.xds.DeltaAggregatedResources(adsDeltaCtx{s, ctx})
	})
}

func (a sdsService) StreamSecrets(s sdsSotwStream) error {
	return runStream(s.Context(), func(ctx context.Context) error { return a.xds.StreamSecrets(sdsSotwCtx{s, ctx}) })
}

func (a sdsService) DeltaSecrets(s sdsDeltaStream) error {
	return runStream(s.Context(), func(ctx context.Context) error { return a.xds.DeltaSecrets(sdsDeltaCtx{s, ctx}) })
}

func (a sdsService) FetchSecrets(ctx context.Context, r *discoverygrpc.DiscoveryRequest) (*discoverygrpc.DiscoveryResponse, error) {
	return a.xds.FetchSecrets(ctx, r)
}

func (a ecdsService) StreamExtensionConfigs(s ecdsSotwStream) error {
	return runStream(s.Context(), func(ctx context.Context) error {
		return a.xds.StreamExtensionConfigs(ecdsSotwCtx{s, ctx})
	})
}

func (a ecdsService) DeltaExtensionConfigs(s ecdsDeltaStream) error {
	return runStream(s.Context(), func(ctx context.Context) error {
		return a.xds.DeltaExtensionConfigs(ecdsDeltaCtx{s, ctx})
	})
}

func (a ecdsService) FetchExtensionConfigs(ctx context.Context, r *discoverygrpc.DiscoveryRequest) (*discoverygrpc.DiscoveryResponse, error) {
	return a.xds.FetchExtensionConfigs(ctx, r)
}
