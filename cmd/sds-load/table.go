package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"text/tabwriter"
	"time"
)

const tableUsage = `Usage: sds-load table RESULT.json...

Prints one row per run result (sds-load run -json), each figure followed by
its ratio to the run labelled "baseline" with the same N (x1.00 = as fast or
as small as the bare baseline server).
`

// loadResults reads sds-load run -json files.
func loadResults(paths []string) ([]*Result, error) {
	var out []*Result
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		var r Result
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("%s: not an sds-load result: %w", p, err)
		}
		out = append(out, &r)
	}
	return out, nil
}

// ratio formats v/base, or "" when there is no baseline figure.
func ratio(v, base float64) string {
	if base <= 0 {
		return ""
	}
	return fmt.Sprintf(" (x%.2f)", v/base)
}

func printTable(w io.Writer, paths []string) error {
	rs, err := loadResults(paths)
	if err != nil {
		return err
	}
	base := map[int]*Result{}
	for _, r := range rs {
		if r.Label == "baseline" {
			base[r.N] = r
		}
	}
	sort.SliceStable(rs, func(i, j int) bool {
		if rs[i].N != rs[j].N {
			return rs[i].N < rs[j].N
		}
		return rs[i].Label == "baseline" && rs[j].Label != "baseline"
	})
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "N\trun\tserved\terrors\tall served s\tfirst secret p99 ms\tCPU/sidecar ms\tRSS/sidecar KiB\tpush p99 ms\tload avg")
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	for _, r := range rs {
		b := base[r.N]
		if b == nil {
			b = &Result{}
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%.2f%s\t%.0f%s\t%.2f%s\t%.1f%s\t%.0f%s\t%s\n", r.N, r.Label, r.Served, formatCodes(r.Errors),
			r.AllServed.Seconds(), ratio(r.AllServed.Seconds(), b.AllServed.Seconds()),
			ms(r.FirstSecret.P99), ratio(ms(r.FirstSecret.P99), ms(b.FirstSecret.P99)),
			ms(r.CPUPerSidecar), ratio(ms(r.CPUPerSidecar), ms(b.CPUPerSidecar)),
			r.RSSPerSidecarKiB, ratio(r.RSSPerSidecarKiB, b.RSSPerSidecarKiB),
			ms(r.Push.P99), ratio(ms(r.Push.P99), ms(b.Push.P99)), r.LoadAvg)
	}
	return tw.Flush()
}
