package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"go.yaml.in/yaml/v3"
)

// checkKeyCase refuses a config file that spells one key in two cases
// (data_dir and DATA_DIR, at any level). Viper folds keys to lower case and
// keeps whichever spelling its map iteration visits last, so such a file
// would load a different value from one start to the next. It decodes the
// file with the libraries viper uses; a file they cannot decode is left to
// viper, which has already read it and reports its own errors.
func checkKeyCase(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	m := map[string]any{}
	switch strings.ToLower(strings.TrimPrefix(filepath.Ext(path), ".")) {
	case "yaml", "yml":
		err = yaml.Unmarshal(data, &m)
	case "json":
		err = json.Unmarshal(data, &m)
	case "toml":
		err = toml.Unmarshal(data, &m)
	default:
		return nil
	}
	if err != nil {
		return nil
	}
	return keyCaseClash("", m)
}

// keyCaseClash reports the first two keys of m (or of a map nested in it)
// that differ only in case, in sorted order so the message is stable.
func keyCaseClash(prefix string, m map[string]any) error {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	seen := map[string]string{}
	for _, k := range keys {
		lower := strings.ToLower(k)
		if prev, dup := seen[lower]; dup {
			return fmt.Errorf("keys %q and %q are the same key spelled differently (keys ignore case); keep one", prefix+prev, prefix+k)
		}
		seen[lower] = k
		if sub, ok := m[k].(map[string]any); ok {
			if err := keyCaseClash(prefix+k+".", sub); err != nil {
				return err
			}
		}
	}
	return nil
}
