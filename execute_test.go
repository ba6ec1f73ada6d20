package swo

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgswo/swo/internal/pgtest"
)

const ledgerSchema = `
CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
CREATE TABLE ledger (node int, worker int, seq bigint, counter int NOT NULL, at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (node, worker, seq));
CREATE TABLE notes (id bigserial PRIMARY KEY, body text);`

const ledgerSeed = `INSERT INTO counters SELECT i, 0 FROM generate_series(0, 99) i;
INSERT INTO notes (body) SELECT 'note ' || i FROM generate_series(1, 1000) i;`

// testCluster is several nodes (connectors with their *sql.DB, and a pool
// from OpenPool where the node's load goes through one) over one old and one
// next database.
type testCluster struct {
	old, next *pgtest.Database
	nodes     []*Connector
	dbs       []*sql.DB
	pools     []*pgxpool.Pool // nil for a node whose load does not use a pool
	via       []frontEnd      // the front ends each node's load writes through
}

// frontEnd is a way into a connector: database/sql (sql.OpenDB(connector))
// or pgx (connector.OpenPool). A node of a test cluster may write through
// either or both.
type frontEnd int

const (
	viaSQL  frontEnd = 1 << iota // the node's *sql.DB
	viaPool                      // the node's *pgxpool.Pool
)

func (f frontEnd) String() string {
	switch f {
	case viaSQL:
		return "sql"
	case viaPool:
		return "pool"
	case viaSQL | viaPool:
		return "sql+pool"
	}
	return fmt.Sprintf("frontEnd(%d)", int(f))
}

// each lists the single front ends in f, database/sql first.
func (f frontEnd) each() []frontEnd {
	var out []frontEnd
	for _, one := range []frontEnd{viaSQL, viaPool} {
		if f&one != 0 {
			out = append(out, one)
		}
	}
	return out
}

func newCluster(t *testing.T, n int, owner bool, mod func(i int, cfg *Config)) *testCluster {
	t.Helper()
	var opts []pgtest.DBOption
	if owner {
		opts = append(opts, pgtest.Owner("app"))
	}
	return clusterOn(t, pgtest.NewDatabase(t, opts...), pgtest.NewDatabase(t, opts...), n, mod)
}

// newClusterVia is newCluster with one node per element of via, each node's
// load writing through the front ends given.
func newClusterVia(t *testing.T, owner bool, via []frontEnd, mod func(i int, cfg *Config)) *testCluster {
	t.Helper()
	var opts []pgtest.DBOption
	if owner {
		opts = append(opts, pgtest.Owner("app"))
	}
	return clusterVia(t, pgtest.NewDatabase(t, opts...), pgtest.NewDatabase(t, opts...), via, mod)
}

// clusterOn is newCluster over the given databases.
func clusterOn(t *testing.T, old, next *pgtest.Database, n int, mod func(i int, cfg *Config)) *testCluster {
	t.Helper()
	via := make([]frontEnd, n)
	for i := range via {
		via[i] = viaSQL
	}
	return clusterVia(t, old, next, via, mod)
}

// clusterVia is newClusterVia over the given databases. Every node has its
// *sql.DB; a node whose load uses a pool also has a pool from OpenPool, of
// as many connections as the *sql.DB may open.
func clusterVia(t *testing.T, old, next *pgtest.Database, via []frontEnd, mod func(i int, cfg *Config)) *testCluster {
	t.Helper()
	n := len(via)
	tc := &testCluster{old: old, next: next, via: via}
	pgtest.Exec(t, tc.old.URL, ledgerSchema+ledgerSeed)
	pgtest.Exec(t, tc.next.URL, ledgerSchema)
	for i := 0; i < n; i++ {
		cfg := Config{OldURL: tc.old.URL, NextURL: tc.next.URL, NodeName: fmt.Sprintf("node-%d", i),
			PauseBudget: 5 * time.Second, SyncWorkers: 2}
		if mod != nil {
			mod(i, &cfg)
		}
		c := newConnector(t, cfg)
		db := openDB(t, c)
		db.SetMaxOpenConns(8)
		var pool *pgxpool.Pool
		if via[i]&viaPool != 0 {
			pool = openPool(t, c, func(pc *pgxpool.Config) { pc.MaxConns = 8 })
		}
		tc.nodes = append(tc.nodes, c)
		tc.dbs = append(tc.dbs, db)
		tc.pools = append(tc.pools, pool)
	}
	tc.awaitNodes(t, n)
	return tc
}

// awaitNodes waits until every node sees n alive nodes.
func (tc *testCluster) awaitNodes(t *testing.T, n int) {
	t.Helper()
	waitFor(t, func() bool {
		for _, c := range tc.nodes {
			alive := 0
			for _, ns := range c.Status().Nodes {
				if ns.Alive {
					alive++
				}
			}
			if alive != n {
				return false
			}
		}
		return true
	})
}

// ack is an acknowledged write, with where and when (server clock) it ran,
// and the front end it went through.
type ack struct {
	node, worker int
	seq          int64
	counter      int
	db           string
	start, end   time.Time
	via          frontEnd
}

// loadWriter runs one write of the load through a front end: a transaction that
// inserts a ledger row and increments a counter, filling in a's database and
// server times.
type loadWriter interface {
	write(ctx context.Context, a *ack) error
}

const (
	loadInsert = "INSERT INTO ledger (node, worker, seq, counter) VALUES ($1, $2, $3, $4)"
	loadUpdate = "UPDATE counters SET n = n + 1 WHERE id = $1 RETURNING current_database(), statement_timestamp(), clock_timestamp()"
)

// sqlWriter writes through a *sql.DB.
type sqlWriter struct{ db *sql.DB }

func (w sqlWriter) write(ctx context.Context, a *ack) error {
	tx, err := w.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck
	if _, err := tx.ExecContext(ctx, loadInsert, a.node, a.worker, a.seq, a.counter); err != nil {
		return err
	}
	if err := tx.QueryRowContext(ctx, loadUpdate, a.counter).Scan(&a.db, &a.start, &a.end); err != nil {
		return err
	}
	return tx.Commit()
}

// poolWriter writes through a *pgxpool.Pool.
type poolWriter struct{ pool *pgxpool.Pool }

func (w poolWriter) write(ctx context.Context, a *ack) error {
	tx, err := w.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if _, err := tx.Exec(ctx, loadInsert, a.node, a.worker, a.seq, a.counter); err != nil {
		return err
	}
	if err := tx.QueryRow(ctx, loadUpdate, a.counter).Scan(&a.db, &a.start, &a.end); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// load writes through the nodes' front ends (their *sql.DB unless a cluster
// says otherwise): each write is a transaction that inserts a ledger row and
// increments a counter.
type load struct {
	stop     chan struct{}
	wg       sync.WaitGroup
	mu       sync.Mutex
	acks     []ack
	errs     []error
	count    atomic.Int64
	report   func(ack) // if set, called with each acknowledged write
	tolerate bool      // keep writing after an error (a database is down on purpose)
}

// startLoad starts workers writers on each of every node's front ends
// (numbered across them: a node writing through both has 2*workers).
func startLoad(tc *testCluster, workers int) *load {
	l := &load{stop: make(chan struct{})}
	for n := range tc.nodes {
		w := 0
		for _, f := range tc.viaOf(n).each() {
			for i := 0; i < workers; i++ {
				l.wg.Add(1)
				go l.runOn(tc.writer(n, f), f, n, w)
				w++
			}
		}
	}
	return l
}

// writer returns node n's writer through front end f.
func (tc *testCluster) writer(n int, f frontEnd) loadWriter {
	if f == viaPool {
		return poolWriter{tc.pools[n]}
	}
	return sqlWriter{tc.dbs[n]}
}

// run writes through db until the load stops.
func (l *load) run(db *sql.DB, node, worker int) {
	l.runOn(sqlWriter{db}, viaSQL, node, worker)
}

// runOn writes through w (front end via) until the load stops.
func (l *load) runOn(w loadWriter, via frontEnd, node, worker int) {
	defer l.wg.Done()
	ctx := context.Background()
	for seq := int64(1); ; seq++ {
		select {
		case <-l.stop:
			return
		default:
		}
		a := ack{node: node, worker: worker, seq: seq, counter: (node*31 + worker*7 + int(seq)) % 100, via: via}
		err := w.write(ctx, &a)
		l.mu.Lock()
		if err != nil {
			l.errs = append(l.errs, fmt.Errorf("node %d worker %d (%s) seq %d: %w", node, worker, via, seq, err))
			l.mu.Unlock()
			if !l.tolerate {
				return
			}
			time.Sleep(20 * time.Millisecond)
			continue
		}
		l.acks = append(l.acks, a)
		l.mu.Unlock()
		l.count.Add(1)
		if l.report != nil {
			l.report(a)
		}
	}
}

func (l *load) halt() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

// check verifies, after the switch: no error reached the application; every
// acknowledged write is in the new database exactly once, and no other;
// counters equal their ledger rows (no write half-applied or applied twice);
// no write ran on the old database after the switch committed, none on the
// new one before.
func (l *load) check(t *testing.T, tc *testCluster, doneAt time.Time) {
	t.Helper()
	l.halt()
	for _, err := range l.errs {
		t.Errorf("application error: %v", err)
	}
	checkAcks(t, tc, doneAt, l.acks, true)
}

// checkAcks checks acknowledged writes against the new database (see
// checkLedger), and the independent checker every other table. complete
// says that acks are all the writes there were (no writer was killed).
func checkAcks(t *testing.T, tc *testCluster, doneAt time.Time, acks []ack, complete bool) {
	t.Helper()
	checkLedger(testCtx(t), t, tc, doneAt, acks, complete)
	// Everything else the load does not write after the switch: the
	// independent checker compares it.
	pgtest.AssertSame(t, tc.old, tc.next, pgtest.CompareOptions{SkipTables: []string{"public.ledger", "public.counters"}})
}

// checkLedger checks acknowledged writes: each ran on the database that was
// live at the time and is in the new database exactly once, no other write
// is (if complete), the counters equal their ledger rows, and the writes
// span the switch.
func checkLedger(ctx context.Context, t *testing.T, tc *testCluster, doneAt time.Time, acks []ack, complete bool) {
	t.Helper()
	nc := pgtest.Connect(t, tc.next.URL)
	var oldN, newN int
	for _, a := range acks {
		switch a.db {
		case tc.old.Name:
			oldN++
			if !a.end.Before(doneAt) {
				t.Errorf("write %d/%d/%d ran on the old database at %v, after the switch committed at %v", a.node, a.worker, a.seq, a.end, doneAt)
			}
		case tc.next.Name:
			newN++
			if !a.start.After(doneAt) {
				t.Errorf("write %d/%d/%d ran on the new database at %v, before the switch committed at %v", a.node, a.worker, a.seq, a.start, doneAt)
			}
		default:
			t.Errorf("write reached database %q", a.db)
		}
	}
	var rows int
	if err := nc.QueryRow(ctx, "SELECT count(*) FROM ledger").Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if complete && rows != len(acks) {
		t.Errorf("new database holds %d ledger rows, %d writes were acknowledged", rows, len(acks))
	}
	var missing int
	batch := &pgx.Batch{}
	for _, a := range acks {
		batch.Queue("SELECT count(*) FROM ledger WHERE node = $1 AND worker = $2 AND seq = $3", a.node, a.worker, a.seq)
	}
	br := nc.SendBatch(ctx, batch)
	for range acks {
		var n int
		if err := br.QueryRow().Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			missing++
		}
	}
	br.Close()
	if missing > 0 {
		t.Errorf("%d acknowledged writes are not in the new database exactly once", missing)
	}
	var bad int
	err := nc.QueryRow(ctx, `SELECT count(*) FROM counters c
		LEFT JOIN (SELECT counter, count(*) AS n FROM ledger GROUP BY counter) l ON l.counter = c.id
		WHERE c.n <> coalesce(l.n, 0)`).Scan(&bad)
	if err != nil {
		t.Fatal(err)
	}
	if bad > 0 {
		t.Errorf("%d counters differ from their ledger rows in the new database: a write was half-applied or applied twice", bad)
	}
	if oldN == 0 || newN == 0 {
		t.Errorf("the load did not span the switch: %d writes on the old database, %d on the new", oldN, newN)
	}
	t.Logf("%d acknowledged writes: %d on the old database, %d on the new; all present once", len(acks), oldN, newN)
}

// doneAt reads when the switch committed (the done message, old database clock).
func doneAt(t *testing.T, tc *testCluster) time.Time {
	t.Helper()
	var at time.Time
	err := pgtest.Connect(t, tc.old.URL).QueryRow(testCtx(t), "SELECT at FROM swo.log WHERE kind = 'done'").Scan(&at)
	if err != nil {
		t.Fatal(err)
	}
	return at
}

func TestExecuteSwitchesThreeNodesUnderLoad(t *testing.T) {
	tc := newCluster(t, 3, true, nil) // as a non-superuser role that owns the tables
	executeUnderLoad(t, tc, 3)
}

// executeUnderLoad switches a cluster of at least three nodes while workers
// writers per front end of every node write (RESET on one node, EXECUTE on
// another), and checks every write (load.check), the nodes' state and the
// timings. Every front end of every node writes on the old database before
// the run and on the new one after it. It returns the halted load.
func executeUnderLoad(t *testing.T, tc *testCluster, workers int) *load {
	t.Helper()
	ctx := testCtx(t)
	l := startLoad(tc, workers)
	defer l.halt()
	waitFor(t, func() bool { return l.count.Load() > 100 && l.reached(tc, tc.old.Name) })
	if err := tc.nodes[1].Reset(ctx); err != nil {
		t.Fatal(err)
	}
	for _, c := range tc.nodes {
		waitFor(t, func() bool { return c.Status().State == StateIdle })
	}
	start := time.Now()
	if err := tc.nodes[2].Execute(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("EXECUTE returned after %v", time.Since(start))
	for i, c := range tc.nodes {
		if s := c.Status(); s.State != StateDone || s.Routing != "next" {
			t.Errorf("node %d after EXECUTE: state %s, routing %s", i, s.State, s.Routing)
		}
	}
	// Every node's list of nodes (its status page) comes to show every node
	// on the new database: it does not freeze at the switch.
	for i, c := range tc.nodes {
		waitFor(t, func() bool {
			nodes := c.Status().Nodes
			for _, ns := range nodes {
				if ns.Routing != RoutingNext {
					return false
				}
			}
			return len(nodes) == len(tc.nodes)
		})
		t.Logf("node %d lists every node on the new database", i)
	}
	n := l.count.Load()
	// Keep writing on the new database.
	waitFor(t, func() bool { return l.count.Load() > n+100 && l.reached(tc, tc.next.Name) })
	at := doneAt(t, tc)
	l.check(t, tc, at)
	s := tc.nodes[0].Status()
	t.Logf("timings: sync %dms, pause %dms (final sync and commit %dms), EXECUTE to live %dms",
		s.Timings.SyncMS, s.Timings.PauseMS, s.Timings.FinalMS, s.Timings.TotalMS)
	if s.Timings.PauseMS <= 0 || s.Timings.TotalMS <= 0 {
		t.Errorf("timings missing: %+v", s.Timings)
	}
	return l
}

// viaOf returns the front ends node n's load writes through.
func (tc *testCluster) viaOf(n int) frontEnd {
	if tc.via == nil {
		return viaSQL
	}
	return tc.via[n]
}

// reached reports whether every front end of every node has an
// acknowledged write on the database named.
func (l *load) reached(tc *testCluster, name string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	seen := map[[2]int]bool{}
	for _, a := range l.acks {
		if a.db == name {
			seen[[2]int{a.node, int(a.via)}] = true
		}
	}
	for n := range tc.nodes {
		for _, f := range tc.viaOf(n).each() {
			if !seen[[2]int{n, int(f)}] {
				return false
			}
		}
	}
	return true
}

func TestObsoleteDatabaseRejectsWrites(t *testing.T) {
	tc := newCluster(t, 1, false, nil)
	ctx := testCtx(t)
	if err := tc.nodes[0].Reset(ctx); err != nil {
		t.Fatal(err)
	}
	if err := tc.nodes[0].Execute(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.AssertSame(t, tc.old, tc.next, pgtest.CompareOptions{})
	oc := pgtest.Connect(t, tc.old.URL)
	// A write that draws from a moved sequence is refused by the sequence,
	// frozen at the switch, before the row is written.
	// (The leader freezes the sequences right after the switch.)
	var seqErr error
	waitFor(t, func() bool {
		_, seqErr = oc.Exec(ctx, "INSERT INTO notes (body) VALUES ('straggler')")
		return seqErr != nil && strings.Contains(seqErr.Error(), `reached maximum value of sequence "notes_id_seq"`)
	})
	for _, q := range []string{
		"INSERT INTO notes (id, body) VALUES (1000000, 'straggler')",
		"UPDATE counters SET n = n + 1 WHERE id = 1",
		"DELETE FROM notes WHERE id = 1",
		"TRUNCATE notes",
	} {
		_, err := oc.Exec(ctx, q)
		if err == nil || !strings.Contains(err.Error(), "obsolete") {
			t.Errorf("%s on the obsolete database: err = %v, want a refusal saying it is obsolete", q, err)
		}
	}
	// Reads still work, and the new database takes writes.
	var n int
	if err := oc.QueryRow(ctx, "SELECT count(*) FROM notes").Scan(&n); err != nil || n != 1000 {
		t.Fatalf("read on the obsolete database: %d, %v", n, err)
	}
	if _, err := tc.dbs[0].ExecContext(ctx, "INSERT INTO notes (body) VALUES ('after')"); err != nil {
		t.Fatal(err)
	}
	// RESET after the switch is refused; a straggler in normal mode refuses to start.
	if err := tc.nodes[0].Reset(ctx); !errors.Is(err, ErrDone) {
		t.Fatalf("RESET after the switch: %v", err)
	}
	if _, err := NewConnector(ctx, Config{OldURL: tc.old.URL}); !errors.Is(err, ErrObsolete) {
		t.Fatalf("normal mode on the old database: %v", err)
	}
	// An instance restarted with both URLs works on the new database.
	c := newConnector(t, Config{OldURL: tc.old.URL, NextURL: tc.next.URL})
	if got := dbName(t, openDB(t, c)); got != tc.next.Name {
		t.Fatalf("restarted node reached %s", got)
	}
}
