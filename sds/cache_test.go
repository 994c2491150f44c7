package sds

import (
	"context"
	"errors"
	"maps"
	"slices"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	xdsres "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
)

const testNode = "node-a"

// testResource builds a secret resource whose content (and so version)
// depends on content.
func testResource(t *testing.T, name, content string) *resource {
	t.Helper()
	r, err := newResource(name, &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{
		ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: content}},
		},
	}})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// testCache returns a cache where testNode has secrets a and b.
func testCache(t *testing.T) (*resourceCache, map[string]*resource) {
	t.Helper()
	c := newResourceCache()
	rs := map[string]*resource{"a": testResource(t, "a", "a1"), "b": testResource(t, "b", "b1")}
	c.set(testNode, xdsres.SecretType, rs)
	return c, rs
}

func sotwWatch(t *testing.T, c *resourceCache, node, typeURL string, names []string, returned map[string]string) (chan cache.Response, func(), error) {
	t.Helper()
	sub := stream.NewSotwSubscription(names, true)
	if returned != nil {
		sub.SetReturnedResources(returned)
	}
	ch := make(chan cache.Response, 1)
	cancel, err := c.CreateWatch(&discovery.DiscoveryRequest{Node: &core.Node{Id: node}, TypeUrl: typeURL, ResourceNames: names}, sub, ch)
	return ch, cancel, err
}

func deltaWatch(t *testing.T, c *resourceCache, node string, subscribe, unsubscribe []string, returned map[string]string) (chan cache.DeltaResponse, func(), error) {
	t.Helper()
	sub := stream.NewDeltaSubscription(subscribe, nil, maps.Clone(returned), true)
	sub.UpdateResourceSubscriptions(nil, unsubscribe)
	ch := make(chan cache.DeltaResponse, 4)
	cancel, err := c.CreateDeltaWatch(&discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: node}, TypeUrl: xdsres.SecretType,
		ResourceNamesSubscribe: subscribe}, sub, ch)
	return ch, cancel, err
}

func sotwNames(t *testing.T, resp cache.Response) []string {
	t.Helper()
	dr, err := resp.GetDiscoveryResponse()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, a := range dr.GetResources() {
		sec, err := unmarshalSecret(a)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, sec.GetName())
	}
	return names
}

func TestCacheSotw(t *testing.T) {
	c, rs := testCache(t)
	va, vb := rs["a"].version, rs["b"].version
	tests := []struct {
		name     string
		node     string
		typeURL  string
		names    []string
		returned map[string]string
		err      error
		want     []string // response names in order; nil means the watch is parked
		versions map[string]string
	}{
		{name: "one name of two", names: []string{"a"}, want: []string{"a"}, versions: map[string]string{"a": va}},
		{name: "sorted by name", names: []string{"b", "a"}, want: []string{"a", "b"}, versions: map[string]string{"a": va, "b": vb}},
		{name: "unknown name left out", names: []string{"a", "zzz"}, want: []string{"a"}, versions: map[string]string{"a": va}},
		{name: "only unknown names: parked", names: []string{"zzz"}},
		{name: "legacy wildcard", names: nil, want: []string{"a", "b"}, versions: map[string]string{"a": va, "b": vb}},
		{name: "explicit wildcard", names: []string{"*"}, want: []string{"a", "b"}, versions: map[string]string{"a": va, "b": vb}},
		{name: "client up to date: parked", names: []string{"a"}, returned: map[string]string{"a": va}},
		{name: "wildcard up to date: parked", names: nil, returned: map[string]string{"a": va, "b": vb}},
		{name: "client has an old version", names: []string{"a"}, returned: map[string]string{"a": "old"}, want: []string{"a"}, versions: map[string]string{"a": va}},
		{name: "one new name: full state", names: []string{"a", "b"}, returned: map[string]string{"a": va}, want: []string{"a", "b"}, versions: map[string]string{"a": va, "b": vb}},
		{name: "other type: parked", typeURL: xdsres.ExtensionConfigType, names: []string{"a"}},
		{name: "unknown node", node: "stranger", names: []string{"a"}, err: errUnknownNode},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			node, typeURL := tc.node, tc.typeURL
			if node == "" {
				node = testNode
			}
			if typeURL == "" {
				typeURL = xdsres.SecretType
			}
			ch, cancel, err := sotwWatch(t, c, node, typeURL, tc.names, tc.returned)
			if !errors.Is(err, tc.err) {
				t.Fatalf("CreateWatch error %v, want %v", err, tc.err)
			}
			if err != nil {
				return
			}
			defer cancel()
			select {
			case resp := <-ch:
				if tc.want == nil {
					t.Fatalf("got a response %v, want the watch parked", sotwNames(t, resp))
				}
				if got := sotwNames(t, resp); !slices.Equal(got, tc.want) {
					t.Errorf("response names %v, want %v", got, tc.want)
				}
				if got := resp.GetReturnedResources(); !maps.Equal(got, tc.versions) {
					t.Errorf("returned resources %v, want %v", got, tc.versions)
				}
				dr, _ := resp.GetDiscoveryResponse()
				if dr.GetTypeUrl() != typeURL || dr.GetVersionInfo() == "" {
					t.Errorf("response type %q version %q", dr.GetTypeUrl(), dr.GetVersionInfo())
				}
			default:
				if tc.want != nil {
					t.Fatalf("no response, want %v", tc.want)
				}
			}
		})
	}
}

// TestCacheSotwPush: a parked watch is answered by a change it concerns,
// and only by such a change.
func TestCacheSotwPush(t *testing.T) {
	tests := []struct {
		name             string
		typeURL          string
		setName, content string // the resource set on the node
		push             bool
	}{
		{name: "watched name changes", setName: "a", content: "a2", push: true},
		{name: "other name changes", setName: "b", content: "b2"},
		{name: "new unwatched name", setName: "c", content: "c1"},
		{name: "same content again", setName: "a", content: "a1"},
		{name: "other type", typeURL: xdsres.ExtensionConfigType, setName: "a", content: "a2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, rs := testCache(t)
			ch, cancel, err := sotwWatch(t, c, testNode, xdsres.SecretType, []string{"a"}, map[string]string{"a": rs["a"].version})
			if err != nil {
				t.Fatal(err)
			}
			defer cancel()
			typeURL := tc.typeURL
			if typeURL == "" {
				typeURL = xdsres.SecretType
			}
			set := map[string]*resource{tc.setName: testResource(t, tc.setName, tc.content)}
			c.set(testNode, typeURL, set)
			select {
			case resp := <-ch:
				if !tc.push {
					t.Fatalf("got %v, want no push", sotwNames(t, resp))
				}
				if got := sotwNames(t, resp); !slices.Equal(got, []string{"a"}) {
					t.Errorf("push names %v, want [a]", got)
				}
				if v := resp.GetReturnedResources()["a"]; v != set["a"].version {
					t.Errorf("push returns version %q of a, want %q", v, set["a"].version)
				}
			default:
				if tc.push {
					t.Fatal("no push, want [a]")
				}
			}
		})
	}

	t.Run("cancelled watch", func(t *testing.T) {
		c, rs := testCache(t)
		ch, cancel, err := sotwWatch(t, c, testNode, xdsres.SecretType, []string{"a"}, map[string]string{"a": rs["a"].version})
		if err != nil {
			t.Fatal(err)
		}
		cancel()
		c.set(testNode, xdsres.SecretType, map[string]*resource{"a": testResource(t, "a", "a2")})
		select {
		case resp := <-ch:
			t.Fatalf("cancelled watch got %v", sotwNames(t, resp))
		default:
		}
	})

	t.Run("answered at most once", func(t *testing.T) {
		c, rs := testCache(t)
		ch, cancel, err := sotwWatch(t, c, testNode, xdsres.SecretType, []string{"a"}, map[string]string{"a": rs["a"].version})
		if err != nil {
			t.Fatal(err)
		}
		defer cancel()
		c.set(testNode, xdsres.SecretType, map[string]*resource{"a": testResource(t, "a", "a2")})
		// The channel holds one response; a second answer would block set.
		c.set(testNode, xdsres.SecretType, map[string]*resource{"a": testResource(t, "a", "a3")})
		if len(ch) != 1 {
			t.Fatalf("%d responses queued, want 1", len(ch))
		}
	})
}

func deltaResult(t *testing.T, resp cache.DeltaResponse) (names, removed []string, next map[string]string) {
	t.Helper()
	dr, err := resp.GetDeltaDiscoveryResponse()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range dr.GetResources() {
		names = append(names, r.GetName())
	}
	return names, dr.GetRemovedResources(), resp.GetNextVersionMap()
}

func TestCacheDelta(t *testing.T) {
	c, rs := testCache(t)
	va, vb := rs["a"].version, rs["b"].version
	tests := []struct {
		name        string
		node        string
		subscribe   []string
		unsubscribe []string
		returned    map[string]string
		err         error
		parked      bool
		want        []string
		removed     []string
		next        map[string]string
	}{
		{name: "subscribe one", subscribe: []string{"a"}, want: []string{"a"}, next: map[string]string{"a": va}},
		{name: "subscribe both, sorted", subscribe: []string{"b", "a"}, want: []string{"a", "b"}, next: map[string]string{"a": va, "b": vb}},
		{name: "unknown name left out", subscribe: []string{"a", "zzz"}, want: []string{"a"}, next: map[string]string{"a": va}},
		{name: "only unknown names: parked", subscribe: []string{"zzz"}, parked: true},
		{name: "legacy wildcard", want: []string{"a", "b"}, next: map[string]string{"a": va, "b": vb}},
		{name: "explicit wildcard", subscribe: []string{"*"}, want: []string{"a", "b"}, next: map[string]string{"a": va, "b": vb}},
		{name: "up to date: parked", subscribe: []string{"a", "b"}, returned: map[string]string{"a": va, "b": vb}, parked: true},
		{name: "only the changed one", subscribe: []string{"a", "b"}, returned: map[string]string{"a": va, "b": "old"},
			want: []string{"b"}, next: map[string]string{"a": va, "b": vb}},
		{name: "held name gone: removed", subscribe: []string{"a", "gone"}, returned: map[string]string{"a": va, "gone": "v"},
			removed: []string{"gone"}, next: map[string]string{"a": va}},
		{name: "wildcard, held name gone: removed", returned: map[string]string{"a": va, "b": vb, "gone": "v"},
			removed: []string{"gone"}, next: map[string]string{"a": va, "b": vb}},
		{name: "wildcard, explicit unsubscribe of an existing name: resent", subscribe: []string{"*", "a"}, unsubscribe: []string{"a"},
			returned: map[string]string{"a": va, "b": vb}, want: []string{"a"}, next: map[string]string{"a": va, "b": vb}},
		{name: "unknown node", node: "stranger", subscribe: []string{"a"}, err: errUnknownNode},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			node := tc.node
			if node == "" {
				node = testNode
			}
			ch, cancel, err := deltaWatch(t, c, node, tc.subscribe, tc.unsubscribe, tc.returned)
			if !errors.Is(err, tc.err) {
				t.Fatalf("CreateDeltaWatch error %v, want %v", err, tc.err)
			}
			if err != nil {
				return
			}
			defer cancel()
			select {
			case resp := <-ch:
				names, removed, next := deltaResult(t, resp)
				if tc.parked {
					t.Fatalf("got a response (%v, removed %v), want the watch parked", names, removed)
				}
				if !slices.Equal(names, tc.want) {
					t.Errorf("resources %v, want %v", names, tc.want)
				}
				if !slices.Equal(removed, tc.removed) {
					t.Errorf("removed %v, want %v", removed, tc.removed)
				}
				if !maps.Equal(next, tc.next) {
					t.Errorf("next version map %v, want %v", next, tc.next)
				}
			default:
				if !tc.parked {
					t.Fatalf("no response, want %v (removed %v)", tc.want, tc.removed)
				}
			}
		})
	}
}

// TestCacheDeltaPush: deleting a held resource sends its removal; updating
// one sends only it.
func TestCacheDeltaPush(t *testing.T) {
	tests := []struct {
		name     string
		set      func(t *testing.T) map[string]*resource
		want     []string
		removed  []string
		nextKeys []string
	}{
		{name: "delete a", set: func(*testing.T) map[string]*resource { return map[string]*resource{"a": nil} },
			removed: []string{"a"}, nextKeys: []string{"b"}},
		{name: "update b", set: func(t *testing.T) map[string]*resource { return map[string]*resource{"b": testResource(t, "b", "b2")} },
			want: []string{"b"}, nextKeys: []string{"a", "b"}},
		{name: "delete an unheld name", set: func(*testing.T) map[string]*resource { return map[string]*resource{"zzz": nil} }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, rs := testCache(t)
			ch, cancel, err := deltaWatch(t, c, testNode, []string{"a", "b"}, nil,
				map[string]string{"a": rs["a"].version, "b": rs["b"].version})
			if err != nil {
				t.Fatal(err)
			}
			defer cancel()
			c.set(testNode, xdsres.SecretType, tc.set(t))
			select {
			case resp := <-ch:
				names, removed, next := deltaResult(t, resp)
				if tc.want == nil && tc.removed == nil {
					t.Fatalf("got (%v, removed %v), want no push", names, removed)
				}
				if !slices.Equal(names, tc.want) || !slices.Equal(removed, tc.removed) {
					t.Errorf("push (%v, removed %v), want (%v, removed %v)", names, removed, tc.want, tc.removed)
				}
				if keys := slices.Sorted(maps.Keys(next)); !slices.Equal(keys, tc.nextKeys) {
					t.Errorf("next version map has %v, want %v", keys, tc.nextKeys)
				}
			default:
				if tc.want != nil || tc.removed != nil {
					t.Fatalf("no push, want (%v, removed %v)", tc.want, tc.removed)
				}
			}
		})
	}
}

func TestCacheBookkeeping(t *testing.T) {
	c, rs := testCache(t)
	if !c.has(testNode, xdsres.SecretType, "a") || c.has(testNode, xdsres.SecretType, "zzz") ||
		c.has("stranger", xdsres.SecretType, "a") || c.has(testNode, xdsres.ExtensionConfigType, "a") {
		t.Error("has answers wrongly")
	}
	if c.get(testNode, xdsres.SecretType, "a") != rs["a"] {
		t.Error("get does not return the stored resource")
	}
	c.set("node-b", xdsres.SecretType, map[string]*resource{"a": rs["a"]})
	if ids := slices.Sorted(slices.Values(c.nodeIDs())); !slices.Equal(ids, []string{testNode, "node-b"}) {
		t.Errorf("nodeIDs = %v", ids)
	}
	c.removeNode("node-b")
	if c.has("node-b", xdsres.SecretType, "a") {
		t.Error("removed node still has resources")
	}
	if _, _, err := sotwWatch(t, c, "node-b", xdsres.SecretType, []string{"a"}, nil); !errors.Is(err, errUnknownNode) {
		t.Errorf("watch of a removed node: %v, want errUnknownNode", err)
	}
	if _, err := c.Fetch(context.Background(), &discovery.DiscoveryRequest{}); err == nil {
		t.Error("Fetch succeeded, want it refused")
	}

	// Versions follow content, not identity.
	same, other := testResource(t, "a", "a1"), testResource(t, "a", "a2")
	if same.version != rs["a"].version || other.version == rs["a"].version {
		t.Errorf("versions: same content %q vs %q, other content %q", same.version, rs["a"].version, other.version)
	}
}
