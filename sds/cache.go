package sds

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// resource is one named xDS resource, marshaled once when it is built and
// shared read-only by every response that carries it: a trust-bundle change
// is encoded once, not once per stream.
type resource struct {
	name    string
	version string
	any     *anypb.Any
}

// newResource marshals msg once. The version is a digest of the encoding, so
// identical content keeps its version and is not pushed again.
func newResource(name string, msg proto.Message) (*resource, error) {
	a, err := anypb.New(msg)
	if err != nil {
		return nil, fmt.Errorf("encode resource %q: %w", name, err)
	}
	sum := sha256.Sum256(a.Value)
	return &resource{name: name, version: hex.EncodeToString(sum[:8]), any: a}, nil
}

// errUnknownNode is returned for a watch whose node was never admitted: the
// callbacks bind every request to an admitted node before the cache sees it.
var errUnknownNode = errors.New("stream is not bound to an admitted node")

// resourceCache is a go-control-plane cache (cache.ConfigWatcher) keyed by the
// authenticated node ID. It answers each request with exactly the names asked
// for that the node has, so a request never waits on names Envoy did not ask
// for (the snapshot cache's ADS pitfall), and a node only ever sees its own
// resources. The protocol state machine (nonces, ACK/NACK, subscriptions)
// stays in go-control-plane's server.
type resourceCache struct {
	mu    sync.RWMutex
	nodes map[string]*nodeResources
}

// nodeResources holds what one node may receive, by type URL then name, and
// the open watches waiting for a change.
type nodeResources struct {
	mu        sync.Mutex
	resources map[string]map[string]*resource
	watches   map[*watch]struct{}
}

// watch is one pending request from go-control-plane's server. It is
// answered at most once; the server opens a new watch on the next request.
type watch struct {
	typeURL string
	sub     cache.Subscription
	req     *discovery.DiscoveryRequest
	ch      chan cache.Response
	dreq    *discovery.DeltaDiscoveryRequest
	dch     chan cache.DeltaResponse
}

var _ cache.Cache = (*resourceCache)(nil)

func newResourceCache() *resourceCache {
	return &resourceCache{nodes: make(map[string]*nodeResources)}
}

func (c *resourceCache) node(id string) *nodeResources {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.nodes[id]
}

// ensureNode returns the node's entry, creating an empty one.
func (c *resourceCache) ensureNode(id string) *nodeResources {
	if n := c.node(id); n != nil {
		return n
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[id]
	if n == nil {
		n = &nodeResources{resources: make(map[string]map[string]*resource), watches: make(map[*watch]struct{})}
		c.nodes[id] = n
	}
	return n
}

// removeNode forgets a node. Open watches stay parked until their streams end.
func (c *resourceCache) removeNode(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.nodes, id)
}

// nodeIDs returns the IDs of every node in the cache.
func (c *resourceCache) nodeIDs() []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	ids := make([]string, 0, len(c.nodes))
	for id := range c.nodes {
		ids = append(ids, id)
	}
	return ids
}

// set replaces or adds resources of one type for a node and answers the
// watches that the change concerns. A nil resource deletes the name.
func (c *resourceCache) set(nodeID, typeURL string, rs map[string]*resource) {
	n := c.ensureNode(nodeID)
	n.mu.Lock()
	defer n.mu.Unlock()
	byName := n.resources[typeURL]
	if byName == nil {
		byName = make(map[string]*resource, len(rs))
		n.resources[typeURL] = byName
	}
	for name, r := range rs {
		if r == nil {
			delete(byName, name)
			continue
		}
		byName[name] = r
	}
	for w := range n.watches {
		if w.typeURL == typeURL && n.respond(w) {
			delete(n.watches, w)
		}
	}
}

// get returns a node's resource, for tests and the admin API.
func (c *resourceCache) get(nodeID, typeURL, name string) *resource {
	n := c.node(nodeID)
	if n == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.resources[typeURL][name]
}

// has reports whether the node has a resource of that type and name.
func (c *resourceCache) has(nodeID, typeURL, name string) bool {
	return c.get(nodeID, typeURL, name) != nil
}

// requested lists the names a subscription asks for that the node has, in
// name order so responses are deterministic.
func (n *nodeResources) requested(w *watch) []*resource {
	byName := n.resources[w.typeURL]
	var out []*resource
	if w.sub.IsWildcard() {
		for _, r := range byName {
			out = append(out, r)
		}
	} else {
		for name := range w.sub.SubscribedResources() {
			if r, ok := byName[name]; ok {
				out = append(out, r)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// respond sends w a response if the node has something the client does not
// have yet, and reports whether it did. Callers hold n.mu.
func (n *nodeResources) respond(w *watch) bool {
	rs := n.requested(w)
	returned := w.sub.ReturnedResources()
	if w.dch != nil {
		return n.respondDelta(w, rs, returned)
	}
	changed := false
	for _, r := range rs {
		if returned[r.name] != r.version {
			changed = true
			break
		}
	}
	if !changed {
		return false
	}
	anys := make([]*anypb.Any, len(rs))
	versions := make(map[string]string, len(rs))
	var sb strings.Builder
	for i, r := range rs {
		anys[i] = r.any
		versions[r.name] = r.version
		sb.WriteString(r.version)
	}
	w.ch <- &cache.PassthroughResponse{
		Request: w.req,
		DiscoveryResponse: &discovery.DiscoveryResponse{
			VersionInfo: responseVersion(sb.String()),
			Resources:   anys,
			TypeUrl:     w.typeURL,
		},
		ReturnedResources: versions,
	}
	return true
}

func (n *nodeResources) respondDelta(w *watch, rs []*resource, returned map[string]string) bool {
	var out []*discovery.Resource
	next := make(map[string]string, len(returned)+len(rs))
	for k, v := range returned {
		next[k] = v
	}
	var sb strings.Builder
	for _, r := range rs {
		sb.WriteString(r.version)
		if returned[r.name] == r.version {
			continue
		}
		out = append(out, &discovery.Resource{Name: r.name, Version: r.version, Resource: r.any})
		next[r.name] = r.version
	}
	// A name the client holds that is subscribed but no longer exists (a
	// policy removed, say) is reported removed.
	var removed []string
	byName := n.resources[w.typeURL]
	for name := range returned {
		if _, ok := byName[name]; !ok {
			removed = append(removed, name)
			delete(next, name)
		}
	}
	if len(out) == 0 && len(removed) == 0 {
		return false
	}
	sort.Strings(removed)
	w.dch <- &cache.DeltaPassthroughResponse{
		DeltaRequest:   w.dreq,
		NextVersionMap: next,
		DeltaDiscoveryResponse: &discovery.DeltaDiscoveryResponse{
			SystemVersionInfo: responseVersion(sb.String()),
			Resources:         out,
			RemovedResources:  removed,
			TypeUrl:           w.typeURL,
		},
	}
	return true
}

func responseVersion(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:8])
}

// CreateWatch implements cache.ConfigWatcher for state-of-the-world streams.
func (c *resourceCache) CreateWatch(req *cache.Request, sub cache.Subscription, ch chan cache.Response) (func(), error) {
	return c.watch(req.GetNode().GetId(), &watch{typeURL: req.GetTypeUrl(), sub: sub, req: req, ch: ch})
}

// CreateDeltaWatch implements cache.ConfigWatcher for incremental streams.
func (c *resourceCache) CreateDeltaWatch(req *cache.DeltaRequest, sub cache.Subscription, ch chan cache.DeltaResponse) (func(), error) {
	return c.watch(req.GetNode().GetId(), &watch{typeURL: req.GetTypeUrl(), sub: sub, dreq: req, dch: ch})
}

func (c *resourceCache) watch(nodeID string, w *watch) (func(), error) {
	n := c.node(nodeID)
	if n == nil {
		return nil, errUnknownNode
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.respond(w) {
		return func() {}, nil
	}
	n.watches[w] = struct{}{}
	return func() {
		n.mu.Lock()
		delete(n.watches, w)
		n.mu.Unlock()
	}, nil
}

// Fetch implements cache.ConfigFetcher. REST polling is not served: every
// client authenticates on a gRPC stream.
func (c *resourceCache) Fetch(context.Context, *cache.Request) (cache.Response, error) {
	return nil, errors.New("fetch is not supported: use a gRPC xDS stream")
}
