package swo

// The fault matrix: every phase of a run × every fault, each case a whole
// switchover of three nodes under write load with one fault injected at one
// phase, and the same checks after every case (matrixCase.run).
//
// Plain `go test` runs a short subset (shortMatrix, about a minute). The
// whole matrix (60 cases, about 20 minutes):
//
//	SWO_FAULT_MATRIX=1 go test -race -count=1 -run 'TestFaultMatrix$' -timeout 90m -v .
//
// and, to write its table into docs/fault-matrix.md:
//
//	SWO_FAULT_MATRIX=1 go test -race -count=1 -run 'TestFaultMatrix$' -timeout 90m . -update

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo/internal/faultproxy"
	"github.com/pgswo/swo/internal/pgtest"
)

var updateMatrix = flag.Bool("update", false, "with SWO_FAULT_MATRIX=1: rewrite docs/fault-matrix.md from the whole fault matrix")

// matrixPhases are when a fault strikes: during RESET, or at a boundary of
// the leader's run (its test hook's phases).
var matrixPhases = []string{"reset", "initial copy", "incremental sync", "pausing", "final", "switched"}

var phaseLegend = map[string]string{
	"reset":            "while RESET runs (node 0 pressed it); then EXECUTE is pressed with the fault still there",
	"initial copy":     "the initial copy is done, before the incremental sync",
	"incremental sync": "the incremental sync has caught up, before the pause is announced",
	"pausing":          "the pause is announced, before the leader asks for the connection lock",
	"final":            "inside the window: the final sync committed on the new database, before the switch commits on the old one",
	"switched":         "the switch has committed, before the leader seals the old database and validates foreign keys",
}

// matrixFault is one kind of fault.
type matrixFault int

const (
	leaderKilled matrixFault = iota
	nodeKilled
	nodeRestarted
	oldDown
	newDown
	nodeCutOff
	slowLink
	resetPressed
	longTransaction
	sourceDDL
	numFaults
)

var matrixFaults = [numFaults]struct{ name, legend string }{
	leaderKilled:    {"leader killed", "the leading node (node 2) is killed (crash: no goodbye, its sessions end); during RESET, the resetting node (node 0)"},
	nodeKilled:      {"node killed", "node 1, a writer that does not lead, is killed"},
	nodeRestarted:   {"node restarted", "node 1 is killed and a new connector with its configuration starts at once (a restarted instance), writing too"},
	oldDown:         {"old db down", "the old database's server stops (fast shutdown) and starts again 2 s later"},
	newDown:         {"new db down", "the new database's server stops; it starts again once the run's outcome is known"},
	nodeCutOff:      {"node cut off", "node 1's URLs go through proxies; its link to the old database is blackholed (a partition: nothing moves, nothing closes) until the outcome is known"},
	slowLink:        {"latency 200ms", "the leader's URLs go through proxies; its link to the old database gets 200 ms each way (every one of its sessions there) until the outcome is known; the nodes use the library's default liveness timings (1 s heartbeat, 5 s timeout) rather than the tests' shorter ones"},
	resetPressed:    {"RESET pressed", "RESET is pressed on node 0 (during RESET: on node 1, a second one)"},
	longTransaction: {"long transaction", "a transaction through node 1 inserts a row and stays open until the outcome is known, then commits"},
	sourceDDL:       {"DDL on source", "ALTER TABLE notes ADD COLUMN on the old database; removing the fault applies the same DDL to the new database"},
}

// shortMatrix is the subset plain `go test` runs: every phase, and six of
// the faults, once each.
var shortMatrix = []struct {
	phase string
	fault matrixFault
}{
	{"reset", leaderKilled},
	{"initial copy", oldDown},
	{"incremental sync", nodeCutOff},
	{"pausing", nodeRestarted},
	{"final", resetPressed},
	{"switched", newDown},
}

// minFault is how long a fault lasts at least: longer than the nodes'
// liveness timeout in tests (testTimings.timeout).
const minFault = 4 * time.Second

// Node roles in every case.
const (
	mResetter = 0 // presses RESET; APIOnly: never leads
	mOther    = 1 // writes, may lead, does not
	mLeader   = 2 // presses EXECUTE, and so leads
)

// matrixResult is one cell of the matrix.
type matrixResult struct {
	cell   string
	detail string
	took   time.Duration
}

// TestFaultMatrix runs the fault matrix (the short subset unless
// SWO_FAULT_MATRIX is set) and logs its table; with -update, the whole
// matrix also writes it into docs/fault-matrix.md.
func TestFaultMatrix(t *testing.T) {
	full := os.Getenv("SWO_FAULT_MATRIX") != ""
	type key struct {
		phase string
		fault matrixFault
	}
	var cases []key
	if full {
		for _, p := range matrixPhases {
			for f := matrixFault(0); f < numFaults; f++ {
				cases = append(cases, key{p, f})
			}
		}
	} else {
		for _, c := range shortMatrix {
			cases = append(cases, key{c.phase, c.fault})
		}
	}
	results := map[key]matrixResult{}
	start := time.Now()
	for _, k := range cases {
		var res matrixResult
		ran := false
		caseStart := time.Now()
		ok := t.Run(k.phase+"/"+matrixFaults[k.fault].name, func(t *testing.T) {
			ran = true
			mc := newMatrixCase(t, k.phase, k.fault)
			defer func() { res = mc.result() }()
			mc.run()
		})
		if !ran { // not selected by -run
			continue
		}
		res.took = time.Since(caseStart)
		if !ok && !strings.HasPrefix(res.cell, "ERROR") {
			res.cell = "ERROR (see the test log)"
		}
		results[k] = res
	}
	cell := func(phase string, f matrixFault) (string, bool) {
		r, ok := results[key{phase, f}]
		return r.cell, ok
	}
	table := matrixTable(cell)
	var details strings.Builder
	for _, k := range cases {
		r, ok := results[k]
		if !ok {
			continue
		}
		fmt.Fprintf(&details, "- %s × %s: %s (%.1fs)%s\n", k.phase, matrixFaults[k.fault].name, r.cell, r.took.Seconds(), r.detail)
	}
	t.Logf("fault matrix (%d cases, %v):\n%s\n%s", len(results), time.Since(start).Round(time.Second), table, details.String())
	if *updateMatrix {
		if !full {
			t.Log("-update: docs/fault-matrix.md is written from the whole matrix only (SWO_FAULT_MATRIX=1)")
			return
		}
		if len(results) < len(cases) {
			t.Log("-update: docs/fault-matrix.md is written from the whole matrix only (no -run filter)")
			return
		}
		if err := os.WriteFile("docs/fault-matrix.md", []byte(matrixDoc(table, details.String(), len(cases), time.Since(start))), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// matrixTable renders phases × faults as a Markdown table.
func matrixTable(cell func(phase string, f matrixFault) (string, bool)) string {
	var b strings.Builder
	b.WriteString("| phase \\ fault |")
	for f := matrixFault(0); f < numFaults; f++ {
		b.WriteString(" " + matrixFaults[f].name + " |")
	}
	b.WriteString("\n|---|")
	for f := matrixFault(0); f < numFaults; f++ {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, p := range matrixPhases {
		b.WriteString("| " + p + " |")
		for f := matrixFault(0); f < numFaults; f++ {
			c, ok := cell(p, f)
			if !ok {
				c = "·"
			}
			b.WriteString(" " + strings.ReplaceAll(c, "|", "/") + " |")
		}
		b.WriteString("\n")
	}
	return b.String()
}

func matrixDoc(table, details string, n int, took time.Duration) string {
	var b strings.Builder
	b.WriteString("# Fault matrix\n\n")
	fmt.Fprintf(&b, "Generated on %s by\n\n```sh\nSWO_FAULT_MATRIX=1 go test -race -count=1 -run 'TestFaultMatrix$' -timeout 90m . -update\n```\n\n", time.Now().Format("2006-01-02"))
	fmt.Fprintf(&b, "(%d cases, %v; `matrix_test.go`). Plain `go test` runs six of the cases.\n\n", n, took.Round(time.Second))
	b.WriteString(`Each case is a whole switchover of three nodes (node 0 presses RESET and never leads,
node 1 writes, node 2 presses EXECUTE and leads), each writing continuously (two writers
a node, a transaction that inserts a ledger row and increments a counter). One fault is
injected at one phase: the leader's test hook stops it at the phase boundary until the
fault is in place. Once the run's outcome is in the old database's log (and the fault has
lasted at least 4 s, longer than the nodes' liveness timeout in tests) the fault is
removed, and every case then checks:

- the service works on exactly one database: a write through every surviving node
  succeeds, all on the new database, and every surviving node's Status says done;
- if the first run did not switch, RESET and EXECUTE succeed once the fault is removed;
  if it did, the new database is live without them;
- every acknowledged write is in the new database exactly once, counters equal their
  ledger rows, no write reached the old database after the switch committed and none the
  new one before it; the other tables equal the old database's (the independent checker,
  ` + "`pgtest.AssertSame`" + `);
- no application error, except on killed nodes and while a live database was down.

A cell says what the first run did: **switched**, or **failed safely** (the service stayed
on the old database; in brackets, why); **ERROR** is a case whose checks failed.

`)
	b.WriteString(table)
	b.WriteString("\nPhases (when the fault strikes):\n\n")
	for _, p := range matrixPhases {
		fmt.Fprintf(&b, "- **%s**: %s\n", p, phaseLegend[p])
	}
	b.WriteString("\nFaults:\n\n")
	for f := matrixFault(0); f < numFaults; f++ {
		fmt.Fprintf(&b, "- **%s**: %s\n", matrixFaults[f].name, matrixFaults[f].legend)
	}
	b.WriteString("\nCases, with the time each took:\n\n")
	b.WriteString(details)
	return b.String()
}

// matrixCase is one case of the matrix.
type matrixCase struct {
	t     *testing.T
	start time.Time
	phase string
	fault matrixFault

	oldSrv, newSrv *pgtest.Server    // the databases' own servers, when the fault stops one
	proxied        int               // the node whose links go through proxies (-1: none)
	oldProxy       *faultproxy.Proxy // its link to the old database
	tc             *testCluster
	cfgs           []Config // each node's configuration (a restart reuses it)
	l              *load
	api            []context.Context // each node's operator calls; cancelled when it is killed
	apiCancel      []context.CancelFunc
	killed         map[int]bool

	fired    atomic.Bool
	reached  chan struct{} // closed when the leader's run reaches the phase
	injected chan struct{} // closed once the fault is in place

	// Fault state, for its removal.
	injectedAt  time.Time
	healed      bool
	oldBack     chan error // the old database's server started again
	newStopped  bool
	longRelease chan struct{}
	longResult  chan longTxResult
	ddlDone     chan error
	ddlResult   *error

	switched bool
	outcome  string
	problem  string // the first thing a check found wrong
	notes    []string
}

type longTxResult struct {
	a   ack
	err error
}

func newMatrixCase(t *testing.T, phase string, f matrixFault) *matrixCase {
	return &matrixCase{t: t, start: time.Now(), phase: phase, fault: f, proxied: -1, killed: map[int]bool{},
		reached: make(chan struct{}), injected: make(chan struct{})}
}

// mark logs how long the case has run at a milestone.
func (mc *matrixCase) mark(what string) {
	mc.t.Logf("%.1fs: %s", time.Since(mc.start).Seconds(), what)
}

func (mc *matrixCase) note(format string, args ...any) {
	mc.notes = append(mc.notes, fmt.Sprintf(format, args...))
	mc.t.Logf(format, args...)
}

// errorf records a failed check (the first one names the cell) and fails the case.
func (mc *matrixCase) errorf(format string, args ...any) {
	mc.t.Helper()
	msg := fmt.Sprintf(format, args...)
	if mc.problem == "" {
		mc.problem = msg
	}
	mc.t.Error(msg)
}

func (mc *matrixCase) fatalf(format string, args ...any) {
	mc.t.Helper()
	mc.errorf(format, args...)
	mc.t.FailNow()
}

func (mc *matrixCase) result() matrixResult {
	r := matrixResult{cell: mc.outcome}
	if mc.t.Failed() {
		p := mc.problem
		if p == "" {
			p = "see the test log"
		}
		p = strings.SplitN(p, "\n", 2)[0]
		if len(p) > 160 {
			p = p[:157] + "..."
		}
		r.cell = "ERROR: " + p
		if mc.outcome != "" {
			r.cell += " (first run: " + mc.outcome + ")"
		}
	}
	for _, n := range mc.notes {
		n = strings.SplitN(n, "\n", 2)[0]
		if len(n) > 240 {
			n = n[:237] + "..."
		}
		r.detail += "; " + n
	}
	return r
}

// setup starts the databases (on servers of their own when the fault stops
// one), the proxies, the three nodes and the load, and arms the leader's
// hook.
func (mc *matrixCase) setup() {
	t := mc.t
	var old, next *pgtest.Database
	if mc.fault == oldDown {
		mc.oldSrv = pgtest.NewServer(t)
		old = mc.oldSrv.NewDatabase(t)
	} else {
		old = pgtest.NewDatabase(t)
	}
	if mc.fault == newDown {
		mc.newSrv = pgtest.NewServer(t)
		next = mc.newSrv.NewDatabase(t)
	} else {
		next = pgtest.NewDatabase(t)
	}
	var oldThrough, nextThrough string
	switch mc.fault {
	case nodeCutOff:
		mc.proxied = mOther
	case slowLink:
		mc.proxied = mLeader
	}
	if mc.proxied >= 0 {
		mc.oldProxy, oldThrough = proxyFor(t, old.URL)
		_, nextThrough = proxyFor(t, next.URL)
	}
	mc.cfgs = make([]Config, 3)
	mc.tc = clusterOn(t, old, next, 3, func(i int, cfg *Config) {
		cfg.APIOnly = i == mResetter
		if mc.fault == slowLink {
			// The library's own liveness timings: with the tests' shorter
			// timeout, the leader's heartbeats, slowed by the link, would
			// make it look dead, and the case would test the timeout.
			cfg.timing = defaultTimings
		}
		if i == mc.proxied {
			cfg.OldURL, cfg.NextURL = oldThrough, nextThrough
		}
		mc.cfgs[i] = *cfg
	})
	for range mc.tc.nodes {
		mc.addAPI()
	}
	mc.tc.nodes[mLeader].leader.testHook = mc.hook
	mc.l = &load{stop: make(chan struct{}), tolerate: true}
	for n := range mc.tc.nodes {
		mc.startWriters(n)
	}
	waitFor(t, func() bool { return mc.l.count.Load() > 60 && mc.l.reached(mc.tc, old.Name) })
}

// proxyFor starts a proxy in front of the database of dbURL and returns it
// with the URL through it.
func proxyFor(t *testing.T, dbURL string) (*faultproxy.Proxy, string) {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	p, err := faultproxy.New(u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	through, err := p.URL(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	return p, through
}

func (mc *matrixCase) addAPI() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	mc.t.Cleanup(cancel)
	mc.api = append(mc.api, ctx)
	mc.apiCancel = append(mc.apiCancel, cancel)
}

func (mc *matrixCase) startWriters(n int) {
	for w := 0; w < 2; w++ {
		mc.l.wg.Add(1)
		go mc.l.runOn(mc.tc.writer(n, viaSQL), viaSQL, n, w)
	}
}

// hook stops the leader's run at the case's phase until the fault is in
// place (or the run is cancelled: a killed leader, a RESET).
func (mc *matrixCase) hook(ctx context.Context, phase string) {
	if phase != mc.phase || !mc.fired.CompareAndSwap(false, true) {
		return
	}
	close(mc.reached)
	select {
	case <-mc.injected:
	case <-ctx.Done():
	}
}

// run is the case: the first run with the fault, its removal, recovery,
// and the checks.
func (mc *matrixCase) run() {
	mc.setup()
	mc.mark("set up, load running")
	defer mc.l.halt() // after the fault is gone: a blackholed writer waits for the heal
	defer mc.heal()

	var sinceID int64
	execDone := make(chan error, 1)
	if mc.phase == "reset" {
		resetDone := make(chan error, 1)
		go func() { resetDone <- mc.tc.nodes[mResetter].Reset(mc.api[mResetter]) }()
		deadline := time.Now().Add(30 * time.Second)
		for mc.tc.nodes[mResetter].node.resetting.Load() == 0 && len(resetDone) == 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if len(resetDone) > 0 {
			mc.note("RESET was over before the fault came")
		}
		mc.inject()
		mc.injectedAt = time.Now()
		mc.mark("fault injected")
		close(mc.injected)
		select {
		case err := <-resetDone:
			mc.note("the RESET the fault hit returned %v", errOrOK(err))
		case <-time.After(2 * time.Minute):
			mc.fatalf("RESET did not return within 2 minutes of the fault")
		}
		mc.awaitLog(0, 2*time.Minute, "the RESET to end", func(rows []logRow) bool {
			return len(rows) > 0 && rows[len(rows)-1].kind != "reset"
		})
		sinceID = mc.lastLogID()
		go func() { execDone <- mc.tc.nodes[mLeader].Execute(mc.api[mLeader]) }()
	} else {
		if err := mc.tc.nodes[mResetter].Reset(mc.api[mResetter]); err != nil {
			mc.fatalf("RESET before the run: %v", err)
		}
		sinceID = mc.lastLogID()
		go func() { execDone <- mc.tc.nodes[mLeader].Execute(mc.api[mLeader]) }()
		select {
		case <-mc.reached:
		case err := <-execDone:
			select {
			case <-mc.reached: // both at once: EXECUTE returns while the leader waits at "switched"
				execDone <- err
			default:
				mc.fatalf("the run ended before it reached %q: %v", mc.phase, err)
			}
		case <-time.After(2 * time.Minute):
			mc.fatalf("the run did not reach %q within 2 minutes", mc.phase)
		}
		mc.inject()
		mc.injectedAt = time.Now()
		mc.mark("fault injected")
		close(mc.injected)
	}

	// The first run's outcome, from the old database's log.
	var execErr error
	execReturned := false
	mc.awaitLog(sinceID, 2*time.Minute, "the run's outcome", func(rows []logRow) bool {
		if !execReturned && len(execDone) > 0 {
			execErr, execReturned = <-execDone, true
		}
		// Outside the reset phase the hook fired: EXECUTE was appended (a
		// later RESET deletes the messages before it).
		executed := mc.phase != "reset"
		for _, r := range rows {
			executed = executed || r.kind == "execute"
			if r.kind == "done" {
				mc.switched, mc.outcome = true, "switched"
				return true
			}
		}
		switch {
		case execReturned && !executed && execErr != nil && !errors.Is(execErr, ErrRunFailed):
			mc.outcome = "failed safely (EXECUTE refused)"
			return true
		case len(rows) == 0:
			return false
		}
		switch last := rows[len(rows)-1]; last.kind {
		case "failed":
			mc.outcome = "failed safely (" + shortReason(last.code, last.err) + ")"
			return true
		case "idle":
			if executed {
				mc.outcome = "failed safely (cancelled by RESET)"
				return true
			}
		}
		return false
	})
	if !execReturned {
		select {
		case execErr = <-execDone:
		case <-time.After(time.Minute):
			mc.errorf("EXECUTE did not return within a minute of the run's outcome (%s)", mc.outcome)
		}
	}
	mc.note("first run: %s; EXECUTE on node %d returned %v", mc.outcome, mLeader, errOrOK(execErr))
	if !mc.killed[mLeader] {
		switch {
		case mc.switched && execErr != nil && !errors.Is(execErr, ErrDone) && !errors.Is(execErr, ErrUnconfirmed):
			// Execute's contract: nil once the new database is live, or an
			// error saying what failed, the service then being on the old
			// database. After the commit, an error must say the switch is
			// done (ErrUnconfirmed, or ErrDone).
			mc.errorf("the switch committed, but EXECUTE returned an error that does not say so: %v", execErr)
		case !mc.switched && errors.Is(execErr, ErrUnconfirmed):
			mc.errorf("EXECUTE says the switch committed, but it did not: %v", execErr)
		case !mc.switched && execErr == nil:
			mc.errorf("EXECUTE returned success, but the run did not switch")
		}
	}

	mc.mark("outcome known")
	// A fault lasts at least minFault, even when the outcome was known at
	// once (after the switch): long enough for nodes to judge each other.
	if wait := time.Until(mc.injectedAt.Add(minFault)); wait > 0 {
		time.Sleep(wait)
	}
	mc.heal()
	mc.mark("fault removed")
	mc.recover()
	mc.mark("recovered")
	mc.check()
	mc.mark("checked")
}

// survivors are the nodes not killed.
func (mc *matrixCase) survivors() []int {
	var out []int
	for i := range mc.tc.nodes {
		if !mc.killed[i] {
			out = append(out, i)
		}
	}
	return out
}

// recover waits until every surviving node agrees on the first run's
// outcome, and, unless it switched, runs RESET and EXECUTE.
func (mc *matrixCase) recover() {
	var last string
	settled := waitUntil(30*time.Second, func() bool {
		for _, i := range mc.survivors() {
			s := mc.tc.nodes[i].Status()
			last = fmt.Sprintf("node %d: state %s, routing %s, paused %v", i, s.State, s.Routing, s.Paused)
			if mc.switched && (s.State != StateDone || s.Routing != RoutingNext) ||
				!mc.switched && (s.State != StateFailed && s.State != StateIdle || s.Routing != RoutingOld || s.Paused) {
				return false
			}
		}
		return true
	})
	if !settled {
		mc.errorf("the surviving nodes did not settle on the outcome (%s) within 30s after the fault was removed: %s", mc.outcome, last)
	}
	if mc.switched {
		return
	}
	resetter, executor := -1, -1
	for _, i := range mc.survivors() {
		if resetter < 0 {
			resetter = i
		}
		if i != mResetter && (executor < 0 || i == mLeader) {
			executor = i
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := mc.tc.nodes[resetter].Reset(ctx); err != nil {
		mc.fatalf("RESET on node %d after the fault was removed: %v (node table: %s)", resetter, err, mc.nodeTable())
	}
	mc.mark("RESET after the fault")
	if err := mc.tc.nodes[executor].Execute(ctx); err != nil {
		mc.fatalf("EXECUTE on node %d after the fault was removed: %v (node table: %s)", executor, err, mc.nodeTable())
	}
}

// check is what every case ends with: one live database, reached by every
// surviving node; every acknowledged write in it; none on the old one after
// the switch; the rest of the data equal.
func (mc *matrixCase) check() {
	t, tc := mc.t, mc.tc
	for _, i := range mc.survivors() {
		var s Status
		if !waitUntil(15*time.Second, func() bool { s = tc.nodes[i].Status(); return s.State == StateDone && s.Routing == RoutingNext }) {
			mc.errorf("node %d after the switch: state %s, routing %s", i, s.State, s.Routing)
		}
	}
	for _, i := range mc.survivors() {
		a := ack{node: 50 + i, worker: 0, seq: 1, counter: i, via: viaSQL}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := tc.writer(i, viaSQL).write(ctx, &a)
		cancel()
		switch {
		case err != nil:
			mc.errorf("a write through node %d after the switch: %v", i, err)
		case a.db != tc.next.Name:
			mc.errorf("a write through node %d after the switch reached %s, not the new database %s", i, a.db, tc.next.Name)
		default:
			mc.l.mu.Lock()
			mc.l.acks = append(mc.l.acks, a)
			mc.l.mu.Unlock()
		}
	}
	mc.l.halt()
	mc.mark("probes written, load halted")
	allowed := func(node int) bool {
		return mc.killed[node] || mc.fault == oldDown || mc.fault == newDown && mc.switched
	}
	tolerated := 0
	for _, err := range mc.l.errs {
		var node int
		if _, serr := fmt.Sscanf(err.Error(), "node %d ", &node); serr == nil && allowed(node) {
			tolerated++
			continue
		}
		mc.errorf("application error: %v", err)
	}
	if tolerated > 0 {
		mc.note("%d write errors on killed nodes or while a live database was down", tolerated)
	}
	complete := len(mc.killed) == 0 && mc.fault != oldDown && mc.fault != newDown
	before := t.Failed()
	checkAcks(t, tc, doneAt(t, tc), mc.l.acks, complete)
	if !before && t.Failed() && mc.problem == "" {
		mc.problem = "the acknowledged writes or the data differ (checkAcks)"
	}
}

// kill crashes node i (and whatever operator call it was making).
func (mc *matrixCase) kill(i int) {
	mc.apiCancel[i]()
	crash(mc.tc.nodes[i], mc.tc.dbs[i])
	mc.killed[i] = true
}

// inject puts the fault in place (the leader waits at the phase meanwhile).
func (mc *matrixCase) inject() {
	t, tc := mc.t, mc.tc
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	switch mc.fault {
	case leaderKilled:
		if mc.phase == "reset" {
			mc.kill(mResetter)
		} else {
			mc.kill(mLeader)
		}
	case nodeKilled:
		mc.kill(mOther)
	case nodeRestarted:
		mc.kill(mOther)
		cfg := mc.cfgs[mOther]
		cfg.timing, cfg.Logger = testTimings, testLogger(t)
		c, err := NewConnector(ctx, cfg)
		if err != nil {
			mc.fatalf("the restarted node did not start: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		db := openDB(t, c)
		db.SetMaxOpenConns(8)
		tc.nodes, tc.dbs, tc.pools, tc.via = append(tc.nodes, c), append(tc.dbs, db), append(tc.pools, nil), append(tc.via, viaSQL)
		mc.addAPI()
		mc.startWriters(len(tc.nodes) - 1)
	case oldDown:
		if err := mc.oldSrv.Stop(ctx); err != nil {
			mc.fatalf("stop the old database's server: %v", err)
		}
		mc.oldBack = make(chan error, 1)
		go func() {
			time.Sleep(2 * time.Second)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			mc.oldBack <- mc.oldSrv.Restart(ctx)
		}()
	case newDown:
		if err := mc.newSrv.Stop(ctx); err != nil {
			mc.fatalf("stop the new database's server: %v", err)
		}
		mc.newStopped = true
	case nodeCutOff:
		mc.oldProxy.Blackhole(true)
	case slowLink:
		mc.oldProxy.SetLatency(200 * time.Millisecond)
	case resetPressed:
		who := mResetter
		if mc.phase == "reset" {
			who = mOther
		}
		done := make(chan error, 1)
		go func() { done <- tc.nodes[who].Reset(mc.api[who]) }()
		select {
		case err := <-done:
			mc.note("the RESET pressed on node %d returned %v", who, errOrOK(err))
		case <-time.After(time.Minute):
			mc.fatalf("the RESET pressed on node %d did not return within a minute", who)
		}
	case longTransaction:
		mc.longRelease, mc.longResult = make(chan struct{}), make(chan longTxResult, 1)
		started := make(chan struct{})
		go mc.longTx(started)
		select {
		case <-started:
		case <-time.After(time.Second):
			mc.note("the long transaction waits for a connection")
		}
	case sourceDDL:
		mc.ddlDone = make(chan error, 1)
		go func() { mc.ddlDone <- execSQL(tc.old.URL, "ALTER TABLE notes ADD COLUMN extra int") }()
		select {
		case err := <-mc.ddlDone:
			mc.ddlResult = &err
		case <-time.After(time.Second):
			mc.note("the DDL waits for a lock")
		}
	}
}

// longTx is the long transaction: a ledger row (as a write of the load,
// outside the counters) inserted through node 1, the transaction held open
// until the fault is removed, then committed.
func (mc *matrixCase) longTx(started chan<- struct{}) {
	var once sync.Once
	start := func() { once.Do(func() { close(started) }) }
	defer start()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res := longTxResult{a: ack{node: 90, worker: 0, seq: 1, counter: -1, via: viaSQL}}
	defer func() { mc.longResult <- res }()
	tx, err := mc.tc.dbs[mOther].BeginTx(ctx, nil)
	if err != nil {
		res.err = err
		return
	}
	defer tx.Rollback() //nolint:errcheck
	err = tx.QueryRowContext(ctx, "INSERT INTO ledger (node, worker, seq, counter) VALUES (90, 0, 1, -1) RETURNING current_database(), statement_timestamp(), clock_timestamp()").
		Scan(&res.a.db, &res.a.start, &res.a.end)
	start()
	if err != nil {
		res.err = err
		return
	}
	<-mc.longRelease
	var db string
	if err := tx.QueryRowContext(ctx, "SELECT current_database(), clock_timestamp()").Scan(&db, &res.a.end); err != nil {
		res.err = err
		return
	}
	res.err = tx.Commit()
}

// heal removes the fault (once): what was stopped starts, what was cut
// reconnects, what was held is released.
func (mc *matrixCase) heal() {
	if mc.healed {
		return
	}
	mc.healed = true
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	switch mc.fault {
	case oldDown:
		if mc.oldBack != nil {
			if err := <-mc.oldBack; err != nil {
				mc.errorf("start the old database's server again: %v", err)
			}
		}
	case newDown:
		if mc.newStopped {
			if err := mc.newSrv.Restart(ctx); err != nil {
				mc.errorf("start the new database's server again: %v", err)
			}
		}
	case nodeCutOff:
		mc.oldProxy.Blackhole(false)
	case slowLink:
		mc.oldProxy.SetLatency(0)
	case longTransaction:
		if mc.longRelease == nil {
			return
		}
		close(mc.longRelease)
		select {
		case res := <-mc.longResult:
			if res.err != nil {
				mc.errorf("the long transaction failed: %v", res.err)
				return
			}
			mc.note("the long transaction committed on %s", dbRole(mc.tc, res.a.db))
			mc.l.mu.Lock()
			mc.l.acks = append(mc.l.acks, res.a)
			mc.l.mu.Unlock()
		case <-time.After(time.Minute):
			mc.errorf("the long transaction did not end within a minute of its release")
		}
	case sourceDDL:
		if mc.ddlDone == nil {
			return
		}
		if mc.ddlResult == nil {
			select {
			case err := <-mc.ddlDone:
				mc.ddlResult = &err
			case <-time.After(time.Minute):
				mc.errorf("the DDL on the old database did not end within a minute")
			}
		}
		if err := *mc.ddlResult; err != nil {
			mc.note("the old database refused the DDL: %v", err)
			return
		}
		if err := execSQL(mc.tc.next.URL, "ALTER TABLE notes ADD COLUMN extra int"); err != nil {
			mc.errorf("the same DDL on the new database: %v", err)
		}
	}
}

func dbRole(tc *testCluster, name string) string {
	switch name {
	case tc.old.Name:
		return "the old database"
	case tc.next.Name:
		return "the new database"
	}
	return name
}

func errOrOK(err error) string {
	if err == nil {
		return "success"
	}
	return err.Error()
}

// execSQL runs statements on a database, without failing the test.
func execSQL(dbURL, sql string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	_, err = c.Exec(ctx, sql)
	return err
}

// logRow is a message of the old database's log.
type logRow struct {
	id        int64
	kind      string
	code, err string
}

// logSince reads the log's messages after id (nil if the old database cannot be read now).
func (mc *matrixCase) logSince(id int64) ([]logRow, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, mc.tc.old.URL)
	if err != nil {
		return nil, err
	}
	defer c.Close(context.Background())
	rows, err := c.Query(ctx, "SELECT id, kind, coalesce(data->>'code', ''), coalesce(data->>'error', '') FROM swo.log WHERE id > $1 ORDER BY id", id)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (logRow, error) {
		var l logRow
		return l, r.Scan(&l.id, &l.kind, &l.code, &l.err)
	})
}

func (mc *matrixCase) lastLogID() int64 {
	rows, err := mc.logSince(0)
	if err != nil {
		mc.fatalf("read the log: %v", err)
	}
	if len(rows) == 0 {
		return 0
	}
	return rows[len(rows)-1].id
}

// awaitLog waits until done holds for the log's messages after since (read
// again every 100 ms; while the old database is down, not at all).
func (mc *matrixCase) awaitLog(since int64, within time.Duration, what string, done func([]logRow) bool) {
	deadline := time.Now().Add(within)
	var last []logRow
	var lastErr error
	for {
		rows, err := mc.logSince(since)
		if err == nil {
			last = rows
			if done(rows) {
				return
			}
		}
		lastErr = err
		if time.Now().After(deadline) {
			kinds := make([]string, 0, 8)
			for _, r := range last[max(0, len(last)-8):] {
				kinds = append(kinds, r.kind)
			}
			mc.fatalf("no sign of %s within %v (%s); the log ends with %v (last read error: %v)", what, within, mc.statusSummary(), kinds, lastErr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// nodeTable lists the old database's node table, for a failure.
func (mc *matrixCase) nodeTable() string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, mc.tc.old.URL)
	if err != nil {
		return err.Error()
	}
	defer c.Close(context.Background())
	rows, err := c.Query(ctx, "SELECT name || ' ' || left(id::text, 8) || ' started ' || to_char(started_at, 'HH24:MI:SS.MS') || ' seen ' || to_char(seen_at, 'HH24:MI:SS.MS') || ' (' || round(extract(epoch FROM now() - seen_at)::numeric, 1) || 's ago)' FROM swo.nodes ORDER BY name")
	if err != nil {
		return err.Error()
	}
	list, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err.Error()
	}
	return strings.Join(list, "; ")
}

// statusSummary is what the surviving nodes' Status says, for a failure.
func (mc *matrixCase) statusSummary() string {
	var out []string
	for _, i := range mc.survivors() {
		s := mc.tc.nodes[i].Status()
		line := fmt.Sprintf("node %d: %s", i, s.State)
		if p := s.Progress; p != nil {
			line += fmt.Sprintf(", %s %d of %d rows after %.0fs", p.Phase, p.RowsDone, p.RowsTotal, float64(p.ElapsedMS)/1000)
		}
		out = append(out, line)
	}
	return strings.Join(out, "; ")
}

// shortReason names why a run failed, for a cell of the matrix.
func shortReason(code, text string) string {
	for _, lost := range []string{"terminating connection", "connection refused", "connection reset", "unexpected EOF", "failed to connect", "conn closed"} {
		if strings.Contains(text, lost) {
			step, _, _ := strings.Cut(strings.TrimPrefix(text, "execution failed: "), ":")
			if strings.HasPrefix(step, "connect to") {
				return "database unreachable"
			}
			return step + ": connection lost"
		}
	}
	switch {
	case strings.Contains(text, "blocked by other sessions"):
		return "capture blocked by open transactions"
	case code == "pause_budget":
		return "pause budget"
	case code == "preconditions":
		return "preconditions"
	case strings.Contains(text, "stopped answering"):
		return "owner stopped answering"
	case strings.Contains(text, "stopped working on the run"):
		return "run lost"
	case strings.Contains(text, "changed during the run"):
		return "DDL detected"
	case strings.Contains(text, "lost changes the run had committed"):
		return "target lost work"
	}
	text = strings.TrimPrefix(text, "execution failed: ")
	text = strings.SplitN(text, "\n", 2)[0]
	if len(text) > 60 {
		text = text[:57] + "..."
	}
	return text
}

// waitUntil polls cond until it holds (true) or within has passed (false).
func waitUntil(within time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}
