package store

import "testing"

func TestMemory(t *testing.T) {
	testStore(t, func(t *testing.T) Store {
		s := NewMemory()
		t.Cleanup(func() { _ = s.Close() })
		return s
	})
}
