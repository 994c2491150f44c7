package sds

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
)

// maxAdminBody bounds an admin API request body.
const maxAdminBody = 1 << 16

// decodeJSON reads the request body as exactly one JSON object of v's type:
// no unknown field, nothing after it but white space, at most maxAdminBody
// bytes. A trailing second object or stray text is an error rather than
// silently ignored, so a garbled request is never half-applied.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	var extra json.RawMessage
	switch err := dec.Decode(&extra); {
	case errors.Is(err, io.EOF):
		return nil
	case err != nil:
		return fmt.Errorf("after the JSON object: %w", err)
	}
	return errors.New("more than one JSON value: send one object")
}

// jsonErrors answers the requests mux has no route for (unknown path, wrong
// method, "*" target) with the admin API's JSON error body, as every other
// admin error, instead of ServeMux's plain text. Redirects to a cleaned path
// pass through.
func jsonErrors(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.RequestURI == "*" {
			writeError(w, http.StatusBadRequest, fmt.Errorf("no admin API route for %s *", r.Method))
			return
		}
		h, pattern := mux.Handler(r)
		if pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		// Learn what ServeMux would answer (404, 405 with Allow, or a
		// redirect), without its body.
		c := &statusCapture{header: http.Header{}}
		h.ServeHTTP(c, r)
		switch {
		case c.code >= 300 && c.code < 400:
			w.Header().Set("Location", c.header.Get("Location"))
			w.WriteHeader(c.code)
		case c.code == http.StatusMethodNotAllowed:
			w.Header().Set("Allow", c.header.Get("Allow"))
			writeError(w, c.code, fmt.Errorf("method %s is not allowed on %s (allowed: %s)", r.Method, r.URL.Path, c.header.Get("Allow")))
		default:
			writeError(w, http.StatusNotFound, fmt.Errorf("no admin API route for %s %s", r.Method, r.URL.Path))
		}
	})
}

// statusCapture is a ResponseWriter that keeps the status and headers and
// drops the body.
type statusCapture struct {
	header http.Header
	code   int
}

func (c *statusCapture) Header() http.Header { return c.header }

func (c *statusCapture) Write(b []byte) (int, error) {
	if c.code == 0 {
		c.code = http.StatusOK
	}
	return len(b), nil
}

func (c *statusCapture) WriteHeader(code int) {
	if c.code == 0 {
		c.code = code
	}
}
