package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	extv3 "github.com/envoyproxy/go-control-plane/envoy/service/extension/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshid/sds-server/bootstrap"
)

// Resource names a sidecar asks for, as the bootstrap `sds-server bootstrap
// envoy` writes asks for them.
var (
	secretNames = []string{bootstrap.SecretDefault, bootstrap.SecretRootCA}
	ecdsNames   = []string{bootstrap.RevokedFilterName, bootstrap.RBACFilterName}
)

// subscription is one xDS stream of a sidecar and the resources it asks for
// on it, per type.
type subscription struct {
	open  func(ctx context.Context, cc grpc.ClientConnInterface) (any, error)
	types map[string][]string // type URL -> names
	delta bool
}

// subscriptions returns the streams an Envoy opens in the given mode: one
// ADS stream carrying every type, or (SDS) one stream per secret and one
// ECDS stream.
func subscriptions(ads, delta, ecds bool) []subscription {
	if ads {
		types := map[string][]string{xdsres.SecretType: secretNames}
		if ecds {
			types[xdsres.ExtensionConfigType] = ecdsNames
		}
		open := func(ctx context.Context, cc grpc.ClientConnInterface) (any, error) {
			c := discovery.NewAggregatedDiscoveryServiceClient(cc)
			if delta {
				return c.DeltaAggregatedResources(ctx)
			}
			return c.StreamAggregatedResources(ctx)
		}
		return []subscription{{open: open, types: types, delta: delta}}
	}
	var subs []subscription
	for _, name := range secretNames {
		subs = append(subs, subscription{types: map[string][]string{xdsres.SecretType: {name}}, delta: delta,
			open: func(ctx context.Context, cc grpc.ClientConnInterface) (any, error) {
				c := secretv3.NewSecretDiscoveryServiceClient(cc)
				if delta {
					return c.DeltaSecrets(ctx)
				}
				return c.StreamSecrets(ctx)
			}})
	}
	if ecds {
		subs = append(subs, subscription{types: map[string][]string{xdsres.ExtensionConfigType: ecdsNames}, delta: delta,
			open: func(ctx context.Context, cc grpc.ClientConnInterface) (any, error) {
				c := extv3.NewExtensionConfigDiscoveryServiceClient(cc)
				if delta {
					return c.DeltaExtensionConfigs(ctx)
				}
				return c.StreamExtensionConfigs(ctx)
			}})
	}
	return subs
}

type sotwStream interface {
	Send(*discovery.DiscoveryRequest) error
	Recv() (*discovery.DiscoveryResponse, error)
}

type deltaStream interface {
	Send(*discovery.DeltaDiscoveryRequest) error
	Recv() (*discovery.DeltaDiscoveryResponse, error)
}

// sidecar is the state of one simulated Envoy: which resources it holds
// (by content hash) and when it got them.
type sidecar struct {
	node    *core.Node
	want    int // resources it must hold to be served
	mu      sync.Mutex
	have    map[string][32]byte
	started time.Time
	first   time.Time // first `default` secret
	served  chan struct{}
	// Push measurement: while armed, the first ROOTCA whose hash differs
	// from pushBase is the push.
	armed    bool
	pushBase [32]byte
	pushAt   time.Time
	pushed   chan struct{}
}

func newSidecar(node *core.Node, want int) *sidecar {
	return &sidecar{node: node, want: want, have: map[string][32]byte{}, served: make(chan struct{}), pushed: make(chan struct{})}
}

// got records a resource received at t.
func (s *sidecar) got(name string, body []byte, t time.Time) {
	h := sha256.Sum256(body)
	s.mu.Lock()
	defer s.mu.Unlock()
	if name == bootstrap.SecretDefault && s.first.IsZero() {
		s.first = t
	}
	_, had := s.have[name]
	s.have[name] = h
	if !had && len(s.have) == s.want {
		close(s.served)
	}
	if name == bootstrap.SecretRootCA && s.armed && h != s.pushBase {
		s.armed, s.pushAt = false, t
		close(s.pushed)
	}
}

// arm starts waiting for a ROOTCA different from the one held now.
func (s *sidecar) arm() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pushBase, s.armed = s.have[bootstrap.SecretRootCA], true
}

// resourceName returns the name of a SotW resource (Secret or
// TypedExtensionConfig).
func resourceName(a *anypb.Any) (string, error) {
	switch a.GetTypeUrl() {
	case xdsres.SecretType:
		var s tlsv3.Secret
		if err := a.UnmarshalTo(&s); err != nil {
			return "", fmt.Errorf("decode secret: %w", err)
		}
		return s.GetName(), nil
	case xdsres.ExtensionConfigType:
		var e core.TypedExtensionConfig
		if err := a.UnmarshalTo(&e); err != nil {
			return "", fmt.Errorf("decode extension config: %w", err)
		}
		return e.GetName(), nil
	}
	return "", fmt.Errorf("unexpected resource type %s", a.GetTypeUrl())
}

// run opens the sidecar's streams on cc, sends the first requests and then
// receives and ACKs like Envoy until ctx ends or a stream fails; the first
// stream error is sent on errc (once).
func (s *sidecar) run(ctx context.Context, cc grpc.ClientConnInterface, subs []subscription, errc chan<- error) {
	var once sync.Once
	fail := func(err error) { once.Do(func() { errc <- err }) }
	for _, sub := range subs {
		st, err := sub.open(ctx, cc)
		if err != nil {
			fail(err)
			return
		}
		if sub.delta {
			go s.runDelta(st.(deltaStream), sub, fail)
		} else {
			go s.runSotW(st.(sotwStream), sub, fail)
		}
	}
}

func (s *sidecar) runSotW(st sotwStream, sub subscription, fail func(error)) {
	first := true
	for typ, names := range sub.types {
		req := &discovery.DiscoveryRequest{TypeUrl: typ, ResourceNames: names}
		if first { // Envoy sends the node on a stream's first message only
			req.Node, first = s.node, false
		}
		if err := st.Send(req); err != nil {
			_, err = st.Recv() // the stream's status
			fail(err)
			return
		}
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			fail(err)
			return
		}
		now := time.Now()
		for _, a := range resp.GetResources() {
			name, err := resourceName(a)
			if err != nil {
				fail(err)
				return
			}
			s.got(name, a.GetValue(), now)
		}
		// ACK: the version and nonce of the response, the same names.
		if err := st.Send(&discovery.DiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResourceNames: sub.types[resp.GetTypeUrl()],
			VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
			fail(err)
			return
		}
	}
}

func (s *sidecar) runDelta(st deltaStream, sub subscription, fail func(error)) {
	first := true
	for typ, names := range sub.types {
		req := &discovery.DeltaDiscoveryRequest{TypeUrl: typ, ResourceNamesSubscribe: names}
		if first {
			req.Node, first = s.node, false
		}
		if err := st.Send(req); err != nil {
			_, err = st.Recv()
			fail(err)
			return
		}
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			fail(err)
			return
		}
		now := time.Now()
		for _, r := range resp.GetResources() {
			s.got(r.GetName(), r.GetResource().GetValue(), now)
		}
		if err := st.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}); err != nil {
			fail(err)
			return
		}
	}
}
