// Command emojivoto is a tiny, emojivoto-shaped set of services for the
// sds-server demo mesh: one binary, four modes. Each instance listens on
// loopback only and reaches the others through the local outbound listeners
// of its own Envoy sidecar (plain HTTP on 127.0.0.1), so every hop between
// services is mTLS with a mesh identity and passes the destination's ACL.
//
//	emojivoto -mode emoji    -listen 127.0.0.1:7001
//	emojivoto -mode voting   -listen 127.0.0.1:7002
//	emojivoto -mode web      -listen 127.0.0.1:7003 -emoji http://127.0.0.1:15001 -voting http://127.0.0.1:15002
//	emojivoto -mode vote-bot -listen 127.0.0.1:7004 -web http://127.0.0.1:15003 [-voting http://127.0.0.1:15004]
//
// Endpoints:
//   - emoji: GET /emoji/list, GET /emoji/find?code=:joy:
//   - voting: POST /vote?choice=:joy:, GET /results
//   - web: GET /api/list (emoji list), POST /api/vote?choice=:joy: (emoji
//     find, then voting vote), GET /api/results (voting results)
//   - vote-bot: votes through web every -interval (-count votes, 0 = until
//     stopped); its own listener serves GET /healthz and POST
//     /direct-vote?choice=..., which calls voting directly: the demo uses it
//     to show that the mesh refuses what the ACLs do not allow.
//
// Every mode serves GET /healthz.
//
// It uses the standard library only.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Emoji is one votable emoji.
type Emoji struct {
	Shortcode string `json:"shortcode"`
	Unicode   string `json:"unicode"`
}

var emojis = []Emoji{
	{":joy:", "😂"}, {":sunglasses:", "😎"}, {":doughnut:", "🍩"}, {":rocket:", "🚀"},
	{":pizza:", "🍕"}, {":tada:", "🎉"}, {":ghost:", "👻"}, {":taco:", "🌮"},
	{":fire:", "🔥"}, {":rainbow:", "🌈"}, {":cat2:", "🐈"}, {":dog:", "🐕"},
	{":beer:", "🍺"}, {":trophy:", "🏆"}, {":bulb:", "💡"}, {":100:", "💯"},
}

// Result is one line of the voting results.
type Result struct {
	Shortcode string `json:"shortcode"`
	Votes     int    `json:"votes"`
}

// client talks to the local sidecar; every call is bounded.
var client = &http.Client{Timeout: 5 * time.Second}

func main() {
	log.SetFlags(0)
	mode := flag.String("mode", "", "web, emoji, voting or vote-bot (required)")
	listen := flag.String("listen", "127.0.0.1:0", "listen address (loopback: the sidecar is the only way in)")
	emojiURL := flag.String("emoji", "", "web: base URL of emoji (the sidecar's local outbound listener)")
	votingURL := flag.String("voting", "", "web, vote-bot: base URL of voting (the sidecar's local outbound listener)")
	webURL := flag.String("web", "", "vote-bot: base URL of web (the sidecar's local outbound listener)")
	interval := flag.Duration("interval", time.Second, "vote-bot: time between votes")
	count := flag.Int("count", 0, "vote-bot: number of votes to cast, then exit; 0 = until stopped")
	flag.Parse()
	log.SetPrefix(*mode + ": ")

	var h http.Handler
	switch *mode {
	case "emoji":
		h = emojiHandler()
	case "voting":
		h = newVoting().handler()
	case "web":
		if *emojiURL == "" || *votingURL == "" {
			usage("web needs -emoji and -voting")
		}
		h = webHandler(*emojiURL, *votingURL)
	case "vote-bot":
		if *webURL == "" {
			usage("vote-bot needs -web")
		}
		h = botHandler(*votingURL)
	default:
		usage(fmt.Sprintf("unknown -mode %q", *mode))
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	log.Printf("listening on %s", lis.Addr())
	if *mode == "vote-bot" {
		go func() {
			bot(ctx, *webURL, *interval, *count)
			if *count > 0 {
				stop()
			}
		}()
	}
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}

func usage(msg string) {
	fmt.Fprintln(os.Stderr, "emojivoto:", msg)
	flag.Usage()
	os.Exit(2)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code int, format string, args ...any) {
	writeJSON(w, code, map[string]string{"error": fmt.Sprintf(format, args...)})
}

// only wraps h so that other methods get 405.
func only(method string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != method {
			w.Header().Set("Allow", method)
			fail(w, http.StatusMethodNotAllowed, "%s %s: use %s", r.Method, r.URL.Path, method)
			return
		}
		h(w, r)
	}
}

func healthz(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") }

func emojiHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", healthz)
	mux.HandleFunc("/emoji/list", only("GET", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, emojis)
	}))
	mux.HandleFunc("/emoji/find", only("GET", func(w http.ResponseWriter, r *http.Request) {
		code := r.URL.Query().Get("code")
		for _, e := range emojis {
			if e.Shortcode == code {
				writeJSON(w, http.StatusOK, e)
				return
			}
		}
		fail(w, http.StatusNotFound, "no emoji %q", code)
	}))
	return mux
}

type voting struct {
	mu    sync.Mutex
	votes map[string]int
}

func newVoting() *voting { return &voting{votes: map[string]int{}} }

func (v *voting) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", healthz)
	mux.HandleFunc("/vote", only("POST", func(w http.ResponseWriter, r *http.Request) {
		choice := r.URL.Query().Get("choice")
		if choice == "" {
			fail(w, http.StatusBadRequest, "choice is required")
			return
		}
		v.mu.Lock()
		v.votes[choice]++
		n := v.votes[choice]
		v.mu.Unlock()
		writeJSON(w, http.StatusOK, Result{Shortcode: choice, Votes: n})
	}))
	mux.HandleFunc("/results", only("GET", func(w http.ResponseWriter, _ *http.Request) {
		v.mu.Lock()
		res := make([]Result, 0, len(v.votes))
		for s, n := range v.votes {
			res = append(res, Result{s, n})
		}
		v.mu.Unlock()
		slices.SortFunc(res, func(a, b Result) int {
			if a.Votes != b.Votes {
				return b.Votes - a.Votes
			}
			return strings.Compare(a.Shortcode, b.Shortcode)
		})
		writeJSON(w, http.StatusOK, res)
	}))
	return mux
}

// call sends method base+path and returns the status and body; an error
// only when no answer came.
func call(ctx context.Context, method, base, path string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(base, "/")+path, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, b, err
}

// relay answers with what an upstream answered, or 502 when it did not.
func relay(w http.ResponseWriter, code int, body []byte, err error, what string) {
	if err != nil {
		fail(w, http.StatusBadGateway, "%s: %v", what, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write(body)
}

func webHandler(emojiURL, votingURL string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", healthz)
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "emojivoto web: GET /api/list, POST /api/vote?choice=:joy:, GET /api/results")
	})
	mux.HandleFunc("/api/list", only("GET", func(w http.ResponseWriter, r *http.Request) {
		code, body, err := call(r.Context(), "GET", emojiURL, "/emoji/list")
		relay(w, code, body, err, "emoji list")
	}))
	mux.HandleFunc("/api/vote", only("POST", func(w http.ResponseWriter, r *http.Request) {
		choice := r.URL.Query().Get("choice")
		q := url.Values{"choice": {choice}}.Encode()
		code, body, err := call(r.Context(), "GET", emojiURL, "/emoji/find?"+url.Values{"code": {choice}}.Encode())
		if err != nil || code != http.StatusOK {
			if err == nil && code == http.StatusNotFound {
				fail(w, http.StatusBadRequest, "no emoji %q", choice)
				return
			}
			relay(w, code, body, err, "emoji find")
			return
		}
		code, body, err = call(r.Context(), "POST", votingURL, "/vote?"+q)
		relay(w, code, body, err, "voting vote")
	}))
	mux.HandleFunc("/api/results", only("GET", func(w http.ResponseWriter, r *http.Request) {
		code, body, err := call(r.Context(), "GET", votingURL, "/results")
		relay(w, code, body, err, "voting results")
	}))
	return mux
}

// botHandler is vote-bot's own listener: health, and a direct call to
// voting that its ACL does not allow.
func botHandler(votingURL string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", healthz)
	mux.HandleFunc("/direct-vote", only("POST", func(w http.ResponseWriter, r *http.Request) {
		if votingURL == "" {
			fail(w, http.StatusNotFound, "vote-bot has no -voting upstream")
			return
		}
		q := url.Values{"choice": {r.URL.Query().Get("choice")}}.Encode()
		code, body, err := call(r.Context(), "POST", votingURL, "/vote?"+q)
		if err != nil {
			fail(w, http.StatusBadGateway, "voting: %v", err)
			return
		}
		w.WriteHeader(code)
		_, _ = w.Write(body)
	}))
	return mux
}

// bot votes through web: list, then vote for one at random (a doughnut
// 15 % of the time, as emojivoto's vote-bot does), and every fifth round
// reads the results.
func bot(ctx context.Context, webURL string, interval time.Duration, count int) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for i := 0; count == 0 || i < count; i++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		code, body, err := call(ctx, "GET", webURL, "/api/list")
		if err != nil || code != http.StatusOK {
			log.Printf("GET /api/list: %d %v %s", code, err, strings.TrimSpace(string(body)))
			continue
		}
		var list []Emoji
		if err := json.Unmarshal(body, &list); err != nil || len(list) == 0 {
			log.Printf("GET /api/list: bad answer: %v", err)
			continue
		}
		choice := list[rand.IntN(len(list))].Shortcode
		if rand.Float32() < 0.15 {
			choice = ":doughnut:"
		}
		if code, body, err := call(ctx, "POST", webURL, "/api/vote?"+url.Values{"choice": {choice}}.Encode()); err != nil || code != http.StatusOK {
			log.Printf("POST /api/vote %s: %d %v %s", choice, code, err, strings.TrimSpace(string(body)))
		}
		if i%5 == 4 {
			if code, body, err := call(ctx, "GET", webURL, "/api/results"); err != nil || code != http.StatusOK {
				log.Printf("GET /api/results: %d %v %s", code, err, strings.TrimSpace(string(body)))
			}
		}
	}
}
