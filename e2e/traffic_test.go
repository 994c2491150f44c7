package e2e

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"sync"
	"sync/atomic"
	"time"
)

// traffic is steady load through a sidecar while something changes under
// it (a rotation, a CA renewal): requests on fresh connections, so every one
// makes a new TLS handshake against the current certificates, and requests
// on one keep-alive connection, which must survive. Every request must
// answer 200; the first failures are kept with their time.
type traffic struct {
	target  string
	started time.Time

	sent, failed, keepAliveReused atomic.Int64

	mu       sync.Mutex
	failures []string
}

// maxKeptFailures bounds the failures a traffic keeps for the report.
const maxKeptFailures = 10

// startTraffic sends freshPerSec requests a second on new connections and
// keepPerSec on one keep-alive connection to target until bg stops.
func startTraffic(bg *background, target string, freshPerSec, keepPerSec int) *traffic {
	tr := &traffic{target: target, started: time.Now()}
	fresh := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	keep := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1, IdleConnTimeout: time.Hour}}
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
		if i.Reused {
			tr.keepAliveReused.Add(1)
		}
	}}
	bg.every(time.Second/time.Duration(freshPerSec), func() { tr.do(fresh, nil) })
	bg.every(time.Second/time.Duration(keepPerSec), func() { tr.do(keep, trace) })
	return tr
}

func (tr *traffic) do(c *http.Client, trace *httptrace.ClientTrace) {
	req, _ := http.NewRequest("GET", tr.target, nil)
	if trace != nil {
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
	}
	tr.sent.Add(1)
	resp, err := c.Do(req)
	if err == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("%s", resp.Status)
		}
	}
	if err != nil {
		tr.failed.Add(1)
		tr.mu.Lock()
		if len(tr.failures) < maxKeptFailures {
			tr.failures = append(tr.failures, fmt.Sprintf("%s: %v", time.Since(tr.started).Round(time.Second), err))
		}
		tr.mu.Unlock()
	}
}

// firstFailures returns the first failures, with their time since start.
func (tr *traffic) firstFailures() []string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]string(nil), tr.failures...)
}
