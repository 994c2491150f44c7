package local

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"path/filepath"
	"slices"
	"time"
)

// rootCA is a root of the CA: its certificate and where it is kept. The
// key stays on disk, read only to sign a new intermediate.
type rootCA struct {
	name              string
	cert              *x509.Certificate
	certFile, keyFile string
	status            string // rootStatus*
	// cross is this root's subject and key signed by the root crossBy
	// (a root rotation's old root), nil when none.
	cross     *x509.Certificate
	crossFile string
	crossBy   string
}

// inBundle reports whether r is in the trust bundle.
func (r *rootCA) inBundle() bool { return r.status != rootStatusRetired }

// intermediate is one generation of the intermediate CA. Immutable.
type intermediate struct {
	gen               int
	root              *rootCA
	cert              *x509.Certificate
	key               crypto.Signer
	pem               []byte // of cert, appended to every issued chain
	certFile, keyFile string
	stagedAt          time.Time
}

func newIntermediateState(gen int, r *rootCA, cert *x509.Certificate, key crypto.Signer, certFile, keyFile string) *intermediate {
	return &intermediate{
		gen: gen, root: r, cert: cert, key: key,
		pem:      pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
		certFile: certFile, keyFile: keyFile,
	}
}

// signerState is what the CA signs with at one moment. It is never
// modified: a lifecycle change builds a new one and swaps the pointer, so a
// signer that loaded it keeps a consistent view (one intermediate's
// certificate with its own key) however long it takes.
type signerState struct {
	roots []*rootCA
	// active signs every certificate.
	active *intermediate
	// staged is its successor, signing revocation lists only until it is
	// activated; nil when none.
	staged *intermediate
	// retired are the earlier generations not yet pruned: they sign
	// revocation lists while certificates they signed may be valid.
	retired []*intermediate
	// incoming is the new root's intermediate during a rotation's first
	// phase: it signs revocation lists and the SDS listener's
	// certificate; nil when none.
	incoming *intermediate
	// rotation is the root rotation in progress; nil when none.
	rotation *rotation
}

// rotation is a root rotation in progress (rotate.go).
type rotation struct {
	phase                     string
	startedAt, phaseStartedAt time.Time
	oldRoot, newRoot          *rootCA
	renewOver                 time.Duration
}

// with returns a copy of s for a change to build on.
func (s *signerState) with() *signerState {
	c := *s
	c.retired = slices.Clone(s.retired)
	c.roots = slices.Clone(s.roots)
	return &c
}

// bundle returns the roots in the trust bundle, the one new bootstrap
// tokens should pin first: incoming, then active, then outgoing.
func (s *signerState) bundle() []*rootCA {
	var out []*rootCA
	for _, st := range []string{rootStatusIncoming, rootStatusActive, rootStatusOutgoing} {
		for _, r := range s.roots {
			if r.status == st {
				out = append(out, r)
			}
		}
	}
	return out
}

func (s *signerState) rootCerts() []*x509.Certificate {
	b := s.bundle()
	out := make([]*x509.Certificate, len(b))
	for i, r := range b {
		out[i] = r.cert
	}
	return out
}

// leafChainTail is what follows a workload certificate in its chain: the
// active intermediate and, while a rotation is under way, the cross-signed
// new root, so a peer still trusting only the old root verifies it.
func (s *signerState) leafChainTail() []byte {
	if s.rotation == nil || s.active.root.cross == nil {
		return s.active.pem
	}
	out := slices.Clone(s.active.pem)
	return append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.active.root.cross.Raw})...)
}

// serverSigner is the intermediate that signs the SDS listener's
// certificate: the new root's from the start of a rotation (its chain,
// with the cross-signed root, verifies against either root).
func (s *signerState) serverSigner() *intermediate {
	if s.incoming != nil {
		return s.incoming
	}
	return s.active
}

// crlSigners are the intermediates whose certificates may be valid or are
// about to be issued.
func (s *signerState) crlSigners() []*intermediate {
	out := []*intermediate{s.active}
	if s.staged != nil {
		out = append(out, s.staged)
	}
	if s.incoming != nil {
		out = append(out, s.incoming)
	}
	return append(out, s.retired...)
}

// nextGeneration is the number of the next intermediate.
func (s *signerState) nextGeneration() int {
	n := s.active.gen
	if s.staged != nil {
		n = max(n, s.staged.gen)
	}
	if s.incoming != nil {
		n = max(n, s.incoming.gen)
	}
	for _, r := range s.retired {
		n = max(n, r.gen)
	}
	return n + 1
}

// file returns the state file describing s.
func (s *signerState) file() *stateFile {
	sf := &stateFile{Format: stateFormat}
	for _, r := range s.roots {
		sf.Roots = append(sf.Roots, rootEntry{Name: r.name, Cert: r.certFile, Key: r.keyFile, Status: r.status,
			Cross: r.crossFile, CrossBy: r.crossBy})
	}
	if r := s.rotation; r != nil {
		sf.Rotation = &rotationEntry{Phase: r.phase, StartedAt: r.startedAt.UTC(), PhaseStartedAt: r.phaseStartedAt.UTC(),
			OldRoot: r.oldRoot.name, NewRoot: r.newRoot.name, RenewOverSeconds: r.renewOver.Seconds()}
	}
	add := func(in *intermediate, status string) {
		e := interEntry{Generation: in.gen, Cert: in.certFile, Key: in.keyFile, Root: in.root.name, Status: status}
		if status == statusStaged {
			e.StagedAt = in.stagedAt.UTC()
		}
		sf.Intermediates = append(sf.Intermediates, e)
	}
	for _, r := range s.retired {
		add(r, statusRetired)
	}
	add(s.active, statusActive)
	if s.staged != nil {
		add(s.staged, statusStaged)
	}
	if s.incoming != nil {
		add(s.incoming, statusIncoming)
	}
	return sf
}

// legacyState describes the first layout: one root, intermediate
// generation 1, no state file.
func legacyState() *stateFile {
	return &stateFile{
		Format: stateFormat,
		Roots:  []rootEntry{{Name: legacyRootName, Cert: RootCertFile, Key: RootKeyFile, Status: rootStatusActive}},
		Intermediates: []interEntry{{Generation: 1, Cert: IntermediateCertFile, Key: IntermediateKeyFile,
			Root: legacyRootName, Status: statusActive}},
	}
}

// loadState reads and cross-checks every file sf names. A root's key is
// checked to be there, private and matching (renewal needs it), not kept.
func loadState(dir string, sf *stateFile) (*signerState, error) {
	st := &signerState{}
	roots := map[string]*rootCA{}
	for _, e := range sf.Roots {
		path := filepath.Join(dir, e.Cert)
		cert, err := readCert(path)
		if err != nil {
			return nil, err
		}
		if err := checkCA(cert); err != nil {
			return nil, fmt.Errorf("load CA: %s: %w", path, err)
		}
		if e.Key != "" {
			if _, err := readKey(filepath.Join(dir, e.Key), cert); err != nil {
				return nil, err
			}
		}
		r := &rootCA{name: e.Name, cert: cert, certFile: e.Cert, keyFile: e.Key, status: e.Status, crossFile: e.Cross, crossBy: e.CrossBy}
		roots[e.Name] = r
		st.roots = append(st.roots, r)
	}
	for _, r := range st.roots {
		if r.crossFile == "" {
			continue
		}
		path := filepath.Join(dir, r.crossFile)
		cross, err := readCert(path)
		if err != nil {
			return nil, err
		}
		by := roots[r.crossBy]
		if err := cross.CheckSignatureFrom(by.cert); err != nil {
			return nil, fmt.Errorf("load CA: %s: not signed by the root %s: %w", path, filepath.Join(dir, by.certFile), err)
		}
		if !bytes.Equal(cross.RawSubject, r.cert.RawSubject) || !bytes.Equal(cross.RawSubjectPublicKeyInfo, r.cert.RawSubjectPublicKeyInfo) {
			return nil, fmt.Errorf("load CA: %s: not the root %s cross-signed (subject or key differ)", path, filepath.Join(dir, r.certFile))
		}
		r.cross = cross
	}
	if e := sf.Rotation; e != nil {
		st.rotation = &rotation{phase: e.Phase, startedAt: e.StartedAt, phaseStartedAt: e.PhaseStartedAt,
			oldRoot: roots[e.OldRoot], newRoot: roots[e.NewRoot], renewOver: time.Duration(e.RenewOverSeconds * float64(time.Second))}
	}
	for _, e := range sf.Intermediates {
		r := roots[e.Root]
		path := filepath.Join(dir, e.Cert)
		cert, err := readCert(path)
		if err != nil {
			return nil, err
		}
		key, err := readKey(filepath.Join(dir, e.Key), cert)
		if err != nil {
			return nil, err
		}
		if err := checkCA(cert); err != nil {
			return nil, fmt.Errorf("load CA: %s: %w", path, err)
		}
		if err := cert.CheckSignatureFrom(r.cert); err != nil {
			return nil, fmt.Errorf("load CA: %s: not signed by the root %s: %w", path, filepath.Join(dir, r.certFile), err)
		}
		in := newIntermediateState(e.Generation, r, cert, key, e.Cert, e.Key)
		in.stagedAt = e.StagedAt
		switch e.Status {
		case statusActive:
			st.active = in
		case statusStaged:
			st.staged = in
		case statusRetired:
			st.retired = append(st.retired, in)
		case statusIncoming:
			st.incoming = in
		}
	}
	return st, nil
}

// CertificateInfo describes one CA certificate the built-in CA holds.
type CertificateInfo struct {
	// Role is "root" (in the trust bundle), or "intermediate" (signs
	// certificates now), "intermediate_incoming" (a rotation's new root's,
	// not signing workload certificates yet),
	// "intermediate_staged" (its successor, published, not yet signing) or
	// "intermediate_retired" (replaced, signing revocation lists until it
	// expires).
	Role string
	// Generation numbers the intermediates from 1; 0 for a root.
	Generation int
	// Status is a root's: "active" (over the intermediate that signs),
	// "incoming" or "outgoing" (during a rotation); "" for intermediates.
	Status string
	Cert   *x509.Certificate
}

// Certificates lists the CA certificates held now, roots first: what an
// operator or a metric (expiry gauges) looks at. Callers must not modify
// the certificates.
func (ca *CA) Certificates() []CertificateInfo {
	st := ca.state.Load()
	var out []CertificateInfo
	for _, r := range st.bundle() {
		out = append(out, CertificateInfo{Role: "root", Status: r.status, Cert: r.cert})
	}
	out = append(out, CertificateInfo{Role: "intermediate", Generation: st.active.gen, Cert: st.active.cert})
	if st.incoming != nil {
		out = append(out, CertificateInfo{Role: "intermediate_incoming", Generation: st.incoming.gen, Cert: st.incoming.cert})
	}
	if st.staged != nil {
		out = append(out, CertificateInfo{Role: "intermediate_staged", Generation: st.staged.gen, Cert: st.staged.cert})
	}
	retired := slices.Clone(st.retired)
	slices.SortFunc(retired, func(a, b *intermediate) int { return b.gen - a.gen })
	for _, r := range retired {
		out = append(out, CertificateInfo{Role: "intermediate_retired", Generation: r.gen, Cert: r.cert})
	}
	return out
}
