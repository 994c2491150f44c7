package main

import (
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// emptyMeans lists the keys for which an empty value has a documented
// meaning; an SDS_* variable set to "" gives them that meaning, exactly as
// an empty value in the config file or an empty flag does. Every other key
// has no empty value: an empty variable is an error naming it (rather than
// silently falling back to the file or the default, which hides a typo'd
// `SDS_X=$UNSET` in a unit file).
var emptyMeans = map[string]string{
	"metrics_addr":        "disables the metrics listener",
	"admin_socket":        "<data_dir>/admin.sock",
	"policy_dir":          "<data_dir>/policies",
	"ca.url":              "not set",
	"ca.root_fingerprint": "not set",
	"ca.root_file":        "not set",
	"ca.provisioner":      "not set",
	"ca.key_file":         "not set",
	"ca.password_file":    "not set",
}

// envName is the SDS_* variable of a config key.
func envName(key string) string {
	return "SDS_" + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// checkEmptyEnv makes viper take SDS_* variables set to "" as values (it
// ignores them by default) and refuses those of keys with no empty value,
// unless a flag given on the command line overrides them anyway.
func checkEmptyEnv(v *viper.Viper, flagSets ...*pflag.FlagSet) error {
	v.AllowEmptyEnv(true)
	flagged := map[string]bool{}
	for _, fs := range flagSets {
		fs.Visit(func(fl *pflag.Flag) {
			if key, ok := flagKeys[fl.Name]; ok {
				flagged[key] = true
			}
		})
	}
	keys := v.AllKeys()
	sort.Strings(keys)
	for _, key := range keys {
		val, set := os.LookupEnv(envName(key))
		if !set || val != "" || flagged[key] {
			continue
		}
		if _, ok := emptyMeans[key]; ok {
			continue
		}
		def, ok := defaults[key]
		if !ok {
			def = limitDefaults()[key]
		}
		return fmt.Errorf("%s is set but empty: unset it to use %s's default (%s), or give it a value", envName(key), key, showDefault(def))
	}
	return nil
}

// showDefault renders a default the way a user would write it.
func showDefault(d any) string {
	switch d := d.(type) {
	case []string:
		return strings.Join(d, ",")
	case nil:
		return "none"
	}
	return fmt.Sprint(d)
}
