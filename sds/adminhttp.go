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
