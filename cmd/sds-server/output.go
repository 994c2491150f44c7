package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"
)

// Output formats of -o/--output on list, show and status commands.
const (
	outputTable = "table"
	outputJSON  = "json"
	outputYAML  = "yaml"
)

// addOutputFlag adds -o/--output to a command that prints a report, with
// def as its default format.
func addOutputFlag(cmd *cobra.Command, def string) {
	cmd.Flags().StringP("output", "o", def, "output format: table, json or yaml (json and yaml carry the admin API's field names)")
}

// outputFormat returns the command's -o value, or a usage error for a
// format it does not know. Commands check it before calling the server.
func outputFormat(cmd *cobra.Command) (string, error) {
	f, _ := cmd.Flags().GetString("output")
	switch f {
	case outputTable, outputJSON, outputYAML:
		return f, nil
	}
	return "", usageError{fmt.Errorf("unknown output format %q for -o: use table, json or yaml", f)}
}

// writeOutput prints v as JSON or YAML (the admin API's field names, which
// are stable), or calls table for the human-readable form.
func writeOutput(w io.Writer, format string, v any, table func(io.Writer) error) error {
	switch format {
	case outputJSON:
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return fmt.Errorf("encode JSON: %w", err)
		}
		_, err = w.Write(append(b, '\n'))
		return err
	case outputYAML:
		// sigs.k8s.io/yaml goes through JSON: the same field names.
		b, err := yaml.Marshal(v)
		if err != nil {
			return fmt.Errorf("encode YAML: %w", err)
		}
		_, err = w.Write(b)
		return err
	}
	return table(w)
}
