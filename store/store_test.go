package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// errSentinel is what test callbacks return to abort Update or stop List.
var errSentinel = errors.New("sentinel")

// testStore is the behavioural contract of Store, run against every backend.
// open must return a fresh, empty store; it is closed by the suite's cleanup
// (open should register Close with t.Cleanup; closing twice must be fine).
func testStore(t *testing.T, open func(t *testing.T) Store) {
	ctx := context.Background()

	t.Run("UpdateMany", func(t *testing.T) {
		s := open(t)
		mu, ok := s.(MultiUpdater)
		if !ok {
			t.Fatal("store does not implement MultiUpdater")
		}
		mustPut(t, s, "tokens", "t", "1")
		errRefuse := errors.New("refused")
		tests := []struct {
			name    string
			fn      func(tx Txn) error
			wantErr error
			want    map[[2]string]*string // nil value: absent
		}{
			{"writes of several buckets together", func(tx Txn) error {
				v, err := tx.Get("tokens", "t")
				if err != nil {
					return err
				}
				if err := tx.Put("tokens", "t", append(v, '+')); err != nil {
					return err
				}
				if err := tx.Put("nodes", "n1", []byte("node")); err != nil {
					return err
				}
				// Reads see the transaction's own writes.
				if v, err := tx.Get("nodes", "n1"); err != nil || string(v) != "node" {
					return fmt.Errorf("own write not visible: %q, %v", v, err)
				}
				return tx.Put("index", "t/a", []byte("n1"))
			}, nil, map[[2]string]*string{{"tokens", "t"}: ptr("1+"), {"nodes", "n1"}: ptr("node"), {"index", "t/a"}: ptr("n1")}},
			{"an error writes nothing", func(tx Txn) error {
				if err := tx.Put("tokens", "t", []byte("lost")); err != nil {
					return err
				}
				if err := tx.Put("nodes", "n2", []byte("lost")); err != nil {
					return err
				}
				return fmt.Errorf("token exhausted: %w", errRefuse)
			}, errRefuse, map[[2]string]*string{{"tokens", "t"}: ptr("1+"), {"nodes", "n2"}: nil}},
			{"missing key", func(tx Txn) error {
				_, err := tx.Get("nodes", "nope")
				return err
			}, ErrNotFound, nil},
			{"empty names refused", func(tx Txn) error { return tx.Put("", "k", nil) }, errEmptyName, nil},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				err := mu.UpdateMany(ctx, tc.fn)
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("UpdateMany = %v, want %v", err, tc.wantErr)
				}
				for k, v := range tc.want {
					if v == nil {
						wantMissing(t, s, k[0], k[1])
					} else {
						wantValue(t, s, k[0], k[1], *v)
					}
				}
			})
		}
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := mu.UpdateMany(cctx, func(tx Txn) error { return tx.Put("b", "k", []byte("v")) }); !errors.Is(err, context.Canceled) {
			t.Errorf("UpdateMany with a cancelled context = %v", err)
		}
		wantMissing(t, s, "b", "k")
	})

	t.Run("PutGetRoundtrip", func(t *testing.T) {
		big := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
		tests := []struct {
			name, bucket, key string
			value, want       []byte
		}{
			{"json", "tokens", "t1", []byte(`{"id":"t1"}`), []byte(`{"id":"t1"}`)},
			{"binary with NULs", "b", "k", []byte{0, 1, 0, 255}, []byte{0, 1, 0, 255}},
			{"empty value", "b", "empty", []byte{}, []byte{}},
			{"nil value stored as empty", "b", "nil", nil, []byte{}},
			{"unicode key and bucket", "nœuds", "clé/ü", []byte("v"), []byte("v")},
			{"1 MiB value", "b", "big", big, big},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				s := open(t)
				if err := s.Put(ctx, tc.bucket, tc.key, tc.value); err != nil {
					t.Fatalf("Put: %v", err)
				}
				got, err := s.Get(ctx, tc.bucket, tc.key)
				if err != nil {
					t.Fatalf("Get: %v", err)
				}
				if got == nil || !bytes.Equal(got, tc.want) {
					t.Fatalf("Get = %q (nil=%t), want %q", trunc(got), got == nil, trunc(tc.want))
				}
			})
		}
	})

	t.Run("Overwrite", func(t *testing.T) {
		s := open(t)
		mustPut(t, s, "b", "k", "one")
		mustPut(t, s, "b", "k", "two")
		wantValue(t, s, "b", "k", "two")
	})

	t.Run("BucketsAreSeparate", func(t *testing.T) {
		s := open(t)
		mustPut(t, s, "a", "k", "in a")
		mustPut(t, s, "b", "k", "in b")
		wantValue(t, s, "a", "k", "in a")
		wantValue(t, s, "b", "k", "in b")
		if err := s.Delete(ctx, "a", "k"); err != nil {
			t.Fatal(err)
		}
		wantMissing(t, s, "a", "k")
		wantValue(t, s, "b", "k", "in b")
	})

	t.Run("NotFound", func(t *testing.T) {
		tests := []struct {
			name, bucket, key string
		}{
			{"missing bucket", "nope", "k"},
			{"missing key in existing bucket", "b", "other"},
			{"prefix of existing key", "b", "ke"},
			{"extension of existing key", "b", "key2"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				s := open(t)
				mustPut(t, s, "b", "key", "v")
				wantMissing(t, s, tc.bucket, tc.key)
			})
		}
	})

	t.Run("ValuesAreCopies", func(t *testing.T) {
		s := open(t)
		// Make "b" too big to be a bbolt inline bucket (those are copied to
		// the heap by bbolt): its values are then read from the read-only
		// mmap, and writing to an uncopied one crashes the test.
		mustPut(t, s, "b", "filler", strings.Repeat("f", 8<<10))
		in := []byte("value")
		if err := s.Put(ctx, "b", "k", in); err != nil {
			t.Fatal(err)
		}
		in[0] = 'X' // the caller reuses its buffer after Put
		got, err := s.Get(ctx, "b", "k")
		if err != nil {
			t.Fatal(err)
		}
		got[0] = 'Y' // the caller scribbles on what Get returned
		wantValue(t, s, "b", "k", "value")

		// fn writes into old (on bbolt, old would be read-only mmap memory
		// if not copied) and then aborts: the stored value must not move.
		err = s.Update(ctx, "b", "k", func(old []byte) ([]byte, error) {
			old[0] = 'Z'
			return nil, errSentinel
		})
		if !errors.Is(err, errSentinel) {
			t.Fatalf("Update err = %v, want sentinel", err)
		}
		wantValue(t, s, "b", "k", "value")

		// fn returns old modified in place: that is a legitimate update.
		err = s.Update(ctx, "b", "k", func(old []byte) ([]byte, error) {
			return append(old, "-2"...), nil
		})
		if err != nil {
			t.Fatal(err)
		}
		wantValue(t, s, "b", "k", "value-2")

		err = s.List(ctx, "b", func(_ string, v []byte) error {
			v[0] = 'L'
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		wantValue(t, s, "b", "k", "value-2")
	})

	t.Run("Update", func(t *testing.T) {
		wrapped := fmt.Errorf("validating token: %w", errSentinel)
		tests := []struct {
			name    string
			initial *string // nil: key absent before Update
			wantOld *string // what fn must receive (nil: fn must get a nil slice)
			ret     []byte
			retErr  error
			wantErr error   // checked with errors.Is
			want    *string // value after Update (nil: key absent)
		}{
			{name: "create", initial: nil, wantOld: nil, ret: []byte("1"), want: ptr("1")},
			{name: "modify", initial: ptr("1"), wantOld: ptr("1"), ret: []byte("2"), want: ptr("2")},
			{name: "delete with nil", initial: ptr("1"), wantOld: ptr("1"), ret: nil, want: nil},
			{name: "delete absent with nil", initial: nil, wantOld: nil, ret: nil, want: nil},
			{name: "store empty value", initial: nil, wantOld: nil, ret: []byte{}, want: ptr("")},
			{name: "present empty value is not nil", initial: ptr(""), wantOld: ptr(""), ret: []byte("x"), want: ptr("x")},
			{name: "abort keeps value", initial: ptr("1"), wantOld: ptr("1"), ret: []byte("2"), retErr: errSentinel, wantErr: errSentinel, want: ptr("1")},
			{name: "abort does not create", initial: nil, wantOld: nil, ret: []byte("2"), retErr: errSentinel, wantErr: errSentinel, want: nil},
			{name: "abort does not delete", initial: ptr("1"), wantOld: ptr("1"), ret: nil, retErr: wrapped, wantErr: errSentinel, want: ptr("1")},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				s := open(t)
				mustPut(t, s, "b", "neighbour", "n") // must survive every case
				if tc.initial != nil {
					mustPut(t, s, "b", "k", *tc.initial)
				}
				calls := 0
				err := s.Update(ctx, "b", "k", func(old []byte) ([]byte, error) {
					calls++
					switch {
					case tc.wantOld == nil && old != nil:
						t.Errorf("fn got old = %q, want nil", old)
					case tc.wantOld != nil && (old == nil || string(old) != *tc.wantOld):
						t.Errorf("fn got old = %q (nil=%t), want %q", old, old == nil, *tc.wantOld)
					}
					return tc.ret, tc.retErr
				})
				if calls == 0 {
					t.Fatal("fn was not called")
				}
				if tc.wantErr == nil && err != nil {
					t.Fatalf("Update: %v", err)
				}
				if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
					t.Fatalf("Update err = %v, want errors.Is %v", err, tc.wantErr)
				}
				if tc.want == nil {
					wantMissing(t, s, "b", "k")
				} else {
					wantValue(t, s, "b", "k", *tc.want)
				}
				wantValue(t, s, "b", "neighbour", "n")
			})
		}
	})

	t.Run("UpdateOnMissingBucketAbortOrDeleteCreatesNothing", func(t *testing.T) {
		s := open(t)
		for _, ret := range []error{nil, errSentinel} {
			_ = s.Update(ctx, "ghost", "k", func([]byte) ([]byte, error) { return nil, ret })
		}
		if keys := listKeys(t, s, "ghost"); len(keys) != 0 {
			t.Fatalf("List(ghost) = %q, want nothing", keys)
		}
	})

	t.Run("Delete", func(t *testing.T) {
		tests := []struct {
			name, bucket, key string
		}{
			{"existing key", "b", "k"},
			{"missing key", "b", "missing"},
			{"missing bucket", "nope", "k"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				s := open(t)
				mustPut(t, s, "b", "k", "v")
				mustPut(t, s, "b", "other", "o")
				if err := s.Delete(ctx, tc.bucket, tc.key); err != nil {
					t.Fatalf("Delete: %v", err)
				}
				wantMissing(t, s, tc.bucket, tc.key)
				wantValue(t, s, "b", "other", "o")
				if tc.bucket == "nope" {
					if keys := listKeys(t, s, "nope"); len(keys) != 0 {
						t.Fatalf("Delete created bucket with %q", keys)
					}
				}
			})
		}
	})

	t.Run("ListOrder", func(t *testing.T) {
		s := open(t)
		// Inserted out of order; want byte-wise order (as bbolt sorts).
		insert := []string{"b", "a", "10", "aa", "B", "9", "a/b", "\x00", "ä", "z", "a\x00"}
		want := []string{"\x00", "10", "9", "B", "a", "a\x00", "a/b", "aa", "b", "z", "ä"}
		for _, k := range insert {
			mustPut(t, s, "b", k, "v:"+k)
		}
		mustPut(t, s, "other", "0", "not me")
		var got []string
		err := s.List(ctx, "b", func(k string, v []byte) error {
			if string(v) != "v:"+k {
				t.Errorf("List value for %q = %q, want %q", k, v, "v:"+k)
			}
			got = append(got, k)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if fmt.Sprintf("%q", got) != fmt.Sprintf("%q", want) {
			t.Fatalf("List order = %q, want %q", got, want)
		}
	})

	t.Run("ListMissingBucket", func(t *testing.T) {
		s := open(t)
		mustPut(t, s, "b", "k", "v")
		err := s.List(ctx, "nope", func(k string, _ []byte) error {
			t.Errorf("fn called with %q", k)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})

	t.Run("ListEarlyStop", func(t *testing.T) {
		s := open(t)
		for i := range 10 {
			mustPut(t, s, "b", fmt.Sprintf("k%02d", i), "v")
		}
		var seen []string
		err := s.List(ctx, "b", func(k string, _ []byte) error {
			seen = append(seen, k)
			if len(seen) == 3 {
				return fmt.Errorf("stop at %s: %w", k, errSentinel)
			}
			return nil
		})
		if !errors.Is(err, errSentinel) {
			t.Fatalf("List err = %v, want sentinel", err)
		}
		if fmt.Sprint(seen) != "[k00 k01 k02]" {
			t.Fatalf("List visited %v, want [k00 k01 k02]", seen)
		}
	})

	t.Run("ListValuesOutliveListAndLaterWrites", func(t *testing.T) {
		s := open(t)
		for i := range 50 {
			mustPut(t, s, "b", fmt.Sprintf("k%02d", i), fmt.Sprintf("value-%02d", i))
		}
		kept := map[string][]byte{}
		if err := s.List(ctx, "b", func(k string, v []byte) error {
			kept[k] = v
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		// Grow the store (bbolt remaps its file) and overwrite the keys.
		big := bytes.Repeat([]byte{'x'}, 64<<10)
		for i := range 50 {
			if err := s.Put(ctx, "b", fmt.Sprintf("k%02d", i), big); err != nil {
				t.Fatal(err)
			}
		}
		for i := range 50 {
			k := fmt.Sprintf("k%02d", i)
			if want := fmt.Sprintf("value-%02d", i); string(kept[k]) != want {
				t.Fatalf("retained value %s = %q, want %q", k, trunc(kept[k]), want)
			}
		}
	})

	t.Run("ListCallbackMayWrite", func(t *testing.T) {
		s := open(t)
		for i := range 20 {
			mustPut(t, s, "b", fmt.Sprintf("k%02d", i), "v")
		}
		done := make(chan error, 1)
		go func() {
			done <- s.List(ctx, "b", func(k string, _ []byte) error {
				// Large writes so that bbolt has to grow and remap the file.
				if err := s.Put(ctx, "copy", k, bytes.Repeat([]byte{'x'}, 256<<10)); err != nil {
					return err
				}
				return s.Delete(ctx, "b", k)
			})
		}()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("List with a writing callback deadlocked")
		}
		if n := len(listKeys(t, s, "copy")); n != 20 {
			t.Fatalf("copied %d keys, want 20", n)
		}
		if keys := listKeys(t, s, "b"); len(keys) != 0 {
			t.Fatalf("left %q in b", keys)
		}
	})

	t.Run("CancelledContext", func(t *testing.T) {
		s := open(t)
		mustPut(t, s, "b", "k", "v")
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := s.Get(cctx, "b", "k"); !errors.Is(err, context.Canceled) {
			t.Errorf("Get err = %v, want context.Canceled", err)
		}
		if err := s.Put(cctx, "b", "k", []byte("new")); !errors.Is(err, context.Canceled) {
			t.Errorf("Put err = %v, want context.Canceled", err)
		}
		err := s.Update(cctx, "b", "k", func([]byte) ([]byte, error) {
			t.Error("Update called fn with a cancelled context")
			return []byte("new"), nil
		})
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Update err = %v, want context.Canceled", err)
		}
		if err := s.Delete(cctx, "b", "k"); !errors.Is(err, context.Canceled) {
			t.Errorf("Delete err = %v, want context.Canceled", err)
		}
		err = s.List(cctx, "b", func(string, []byte) error {
			t.Error("List called fn with a cancelled context")
			return nil
		})
		if !errors.Is(err, context.Canceled) {
			t.Errorf("List err = %v, want context.Canceled", err)
		}
		wantValue(t, s, "b", "k", "v")
	})

	t.Run("ContextCancelledWhileWaitingForWriter", func(t *testing.T) {
		s := open(t)
		mustPut(t, s, "b", "k", "v")
		holding, release := make(chan struct{}), make(chan struct{})
		first := make(chan error, 1)
		go func() { // holds the write lock until released
			first <- s.Update(ctx, "b", "held", func([]byte) ([]byte, error) {
				close(holding)
				<-release
				return []byte("h"), nil
			})
		}()
		<-holding
		cctx, cancel := context.WithCancel(ctx)
		calls := []struct {
			name string
			call func() error
		}{
			{"Put", func() error { return s.Put(cctx, "b", "k", []byte("put")) }},
			{"Delete", func() error { return s.Delete(cctx, "b", "k") }},
			{"Update", func() error {
				return s.Update(cctx, "b", "k", func([]byte) ([]byte, error) {
					t.Error("Update called fn after its context was cancelled")
					return []byte("update"), nil
				})
			}},
		}
		errs := make([]chan error, len(calls))
		for i, c := range calls {
			errs[i] = make(chan error, 1)
			go func() { errs[i] <- c.call() }()
		}
		time.Sleep(100 * time.Millisecond) // let them queue behind the writer
		cancel()
		close(release)
		if err := <-first; err != nil {
			t.Fatal(err)
		}
		for i, c := range calls {
			if err := <-errs[i]; !errors.Is(err, context.Canceled) {
				t.Errorf("%s err = %v, want context.Canceled", c.name, err)
			}
		}
		wantValue(t, s, "b", "k", "v")
		wantValue(t, s, "b", "held", "h")
	})

	t.Run("ContextCancelledDuringList", func(t *testing.T) {
		s := open(t)
		for i := range 5 {
			mustPut(t, s, "b", fmt.Sprintf("k%d", i), "v")
		}
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		n := 0
		err := s.List(cctx, "b", func(string, []byte) error {
			n++
			if n == 2 {
				cancel()
			}
			return nil
		})
		if !errors.Is(err, context.Canceled) || n != 2 {
			t.Fatalf("List err = %v after %d calls, want context.Canceled after 2", err, n)
		}
	})

	t.Run("EmptyNamesRejected", func(t *testing.T) {
		s := open(t)
		noop := func(old []byte) ([]byte, error) { return []byte("v"), nil }
		calls := map[string]func() error{
			"Put empty bucket":    func() error { return s.Put(ctx, "", "k", []byte("v")) },
			"Put empty key":       func() error { return s.Put(ctx, "b", "", []byte("v")) },
			"Update empty bucket": func() error { return s.Update(ctx, "", "k", noop) },
			"Update empty key":    func() error { return s.Update(ctx, "b", "", noop) },
			"Delete empty key":    func() error { return s.Delete(ctx, "b", "") },
			"Get empty key":       func() error { _, err := s.Get(ctx, "b", ""); return err },
			"List empty bucket":   func() error { return s.List(ctx, "", func(string, []byte) error { return nil }) },
		}
		for name, call := range calls {
			if err := call(); err == nil || errors.Is(err, ErrNotFound) {
				t.Errorf("%s: err = %v, want a non-NotFound error", name, err)
			}
		}
	})

	t.Run("ConcurrentUpdates", func(t *testing.T) {
		s := open(t)
		const workers, perWorker = 16, 25
		var wg sync.WaitGroup
		errs := make(chan error, workers*2)
		for range workers {
			wg.Go(func() {
				for range perWorker {
					err := s.Update(ctx, "counters", "n", func(old []byte) ([]byte, error) {
						n := 0
						if old != nil {
							var err error
							if n, err = strconv.Atoi(string(old)); err != nil {
								return nil, err
							}
						}
						return []byte(strconv.Itoa(n + 1)), nil
					})
					if err != nil {
						errs <- err
						return
					}
				}
			})
			// Readers alongside the writers (exercises the race detector).
			wg.Go(func() {
				for range perWorker {
					if _, err := s.Get(ctx, "counters", "n"); err != nil && !errors.Is(err, ErrNotFound) {
						errs <- err
						return
					}
					if err := s.List(ctx, "counters", func(string, []byte) error { return nil }); err != nil {
						errs <- err
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		wantValue(t, s, "counters", "n", strconv.Itoa(workers*perWorker))
	})

	t.Run("UseAfterClose", func(t *testing.T) {
		s := open(t)
		mustPut(t, s, "b", "k", "v")
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if _, err := s.Get(ctx, "b", "k"); err == nil || errors.Is(err, ErrNotFound) {
			t.Errorf("Get after Close: err = %v, want a closed-store error", err)
		}
		if err := s.Put(ctx, "b", "k", []byte("v")); err == nil {
			t.Error("Put after Close succeeded")
		}
		if err := s.List(ctx, "b", func(string, []byte) error { return nil }); err == nil {
			t.Error("List after Close succeeded")
		}
	})
}

func mustPut(t *testing.T, s Store, bucket, key, value string) {
	t.Helper()
	if err := s.Put(context.Background(), bucket, key, []byte(value)); err != nil {
		t.Fatalf("Put(%s, %s): %v", bucket, key, err)
	}
}

func wantValue(t *testing.T, s Store, bucket, key, want string) {
	t.Helper()
	got, err := s.Get(context.Background(), bucket, key)
	if err != nil {
		t.Fatalf("Get(%s, %s): %v, want %q", bucket, key, err, want)
	}
	if got == nil || string(got) != want {
		t.Fatalf("Get(%s, %s) = %q (nil=%t), want %q", bucket, key, trunc(got), got == nil, want)
	}
}

func wantMissing(t *testing.T, s Store, bucket, key string) {
	t.Helper()
	got, err := s.Get(context.Background(), bucket, key)
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get(%s, %s) = %q, %v; want ErrNotFound", bucket, key, trunc(got), err)
	}
	if got != nil {
		t.Fatalf("Get(%s, %s) returned %q with ErrNotFound", bucket, key, trunc(got))
	}
}

func listKeys(t *testing.T, s Store, bucket string) []string {
	t.Helper()
	var keys []string
	if err := s.List(context.Background(), bucket, func(k string, _ []byte) error {
		keys = append(keys, k)
		return nil
	}); err != nil {
		t.Fatalf("List(%s): %v", bucket, err)
	}
	return keys
}

func ptr(s string) *string { return &s }

// trunc keeps failure messages readable for big values.
func trunc(b []byte) []byte {
	if len(b) > 64 {
		return append(b[:64:64], "..."...)
	}
	return b
}
