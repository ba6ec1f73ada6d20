package swo

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgswo/swo/internal/pgtest"
)

// TestSoak switches over a data set whose initial copy takes a minute or
// more on a small machine (four related tables of wide rows: 6.8 million
// rows, 2.4 GB with indexes, at scale 1) under mixed load through both
// front ends, and samples the Go heap and each database's sessions every
// second.
//
// It is the one test that skips by default: it runs for several minutes,
// writes a few GB, and wants the machine to itself. Run it with
//
//	SWO_SOAK=1 go test -count=1 -run TestSoak -timeout 30m .
//
// (without -race: the race detector's slowdown would make it a test of the
// detector; the same code paths run under -race in the shorter tests).
// SWO_SOAK_SCALE (default 1) multiplies the row counts.
//
// The load, on three nodes (one writing through its *sql.DB, one through a
// pool from OpenPool, one through both): the ledger writers of
// executeUnderLoad (multi-statement transactions); single-row autocommit
// inserts; multi-row transactions that also update, insert and delete rows
// of the big tables while they run on the old database; a transaction of
// 1.5 s on every node, started again 2.5 s (±50%) after it commits
// (SWO_SOAK_LONG_GAP; shorter than the pause budget, so the pause may wait
// for one; with a gap of 0 they overlap without end, and change capture
// cannot lock the table: a limitation reported); transactions of 15 s
// that straddle the start of the sync (capture waits for one) and the
// initial copy, but end before the pause; readers; and connection churn: a
// *sql.DB and a pool per node closed and opened again every 3 s, their
// connections living one second.
//
// Bounds asserted:
//   - Sessions on each database, counted by their swo marker: application
//     sessions within what the front ends may open (every *sql.DB's and
//     pool's maximum, twice for the churned ones, which overlap while one
//     closes; on the new database also the connections pre-opened for
//     database/sql before the pause, at most one per database/sql
//     connection of the node), the library's within one control session
//     and one transient session per node per database, and for the leader
//     the sync's workers, its two control sessions and its lock session; no
//     client session without a marker.
//   - The Go heap: its peak, less what the test's own record of
//     acknowledged writes holds, stays within 128 MiB of the heap measured
//     before EXECUTE. The sync streams rows (COPY through a 64 KiB buffer
//     per worker; incremental rounds hold keys only, at most 200,000 a
//     round, some 30 MiB), so what it holds does not grow with the data; the
//     allowance covers a round's keys, the copy buffers, the buffers and
//     statement caches of some 80 pgx connections, and the garbage
//     collector's headroom (GOGC=100 lets the heap reach twice the live
//     data). At scale 1 and more the test requires the data set to be at
//     least four times the allowance, so that a heap growing with the data
//     would fail.
//
// At the end every acknowledged write must be in the new database exactly
// once, and the independent checker must find every other table equal in
// both databases, the big ones included: they are written only on the old
// database (soakCheck).
func TestSoak(t *testing.T) {
	if os.Getenv("SWO_SOAK") != "1" {
		t.Skip("the soak test runs with SWO_SOAK=1 (see its comment)")
	}
	scale := 1.0
	if v := os.Getenv("SWO_SOAK_SCALE"); v != "" {
		var err error
		if scale, err = strconv.ParseFloat(v, 64); err != nil || scale <= 0 {
			t.Fatalf("SWO_SOAK_SCALE=%q", v)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	sz := soakSizes{accounts: int(600000 * scale), events: int(3750000 * scale), items: int(2250000 * scale), docs: int(225000 * scale)}

	old := pgtest.NewDatabase(t, pgtest.Owner("app"))
	next := pgtest.NewDatabase(t, pgtest.Owner("app"))
	start := time.Now()
	soakExec(ctx, t, next.URL, soakTables+soakConstraints)
	soakExec(ctx, t, old.URL, soakTables)
	for _, q := range sz.data() {
		soakExec(ctx, t, old.URL, q)
	}
	soakExec(ctx, t, old.URL, soakConstraints+"ANALYZE;")
	var dataBytes int64
	if conn, err := pgx.Connect(ctx, old.URL); err != nil {
		t.Fatal(err)
	} else {
		err = conn.QueryRow(ctx, `SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c
			WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace`).Scan(&dataBytes)
		conn.Close(ctx)
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("data set: %d rows, %.0f MiB with indexes, generated in %v", sz.rows(), float64(dataBytes)/(1<<20), time.Since(start).Round(time.Second))
	const heapAllowance = 128 << 20
	if scale >= 1 && dataBytes < 4*heapAllowance {
		t.Fatalf("the data set (%d MiB) is too small to tell a heap that grows with it", dataBytes>>20)
	}

	longGap := 2500 * time.Millisecond
	if v := os.Getenv("SWO_SOAK_LONG_GAP"); v != "" {
		var err error
		if longGap, err = time.ParseDuration(v); err != nil {
			t.Fatalf("SWO_SOAK_LONG_GAP=%q", v)
		}
	}

	via := []frontEnd{viaSQL, viaPool, viaSQL | viaPool}
	const syncWorkers, maxConns, churnConns = 2, 8, 2
	tc := clusterVia(t, old, next, via, func(i int, cfg *Config) {
		cfg.SyncWorkers = syncWorkers
		cfg.PauseBudget = 5 * time.Second
	})

	// The load, every writer paced.
	l := &load{stop: make(chan struct{})}
	defer l.halt()
	const pace = 10 * time.Millisecond
	var nextWorker = map[int]int{}
	run := func(node int, f frontEnd, w loadWriter) {
		l.wg.Add(1)
		go l.runOn(throttled{w, pace}, f, node, nextWorker[node])
		nextWorker[node]++
	}
	var churns atomic.Int64
	for n, c := range tc.nodes {
		fronts := tc.viaOf(n).each()
		for _, f := range fronts {
			run(n, f, tc.writer(n, f)) // executeUnderLoad's
			run(n, f, singleWriter{tc.front(n, f)})
		}
		f := fronts[len(fronts)-1]
		run(n, f, &batchWriter{f: tc.front(n, f), old: old.Name, sz: sz, rng: rand.New(rand.NewPCG(uint64(n), 1))})
		run(n, fronts[0], longWriter{f: tc.front(n, fronts[0]), old: old.Name, hold: 1500 * time.Millisecond, account: int64(1 + n),
			gap: longGap, rng: rand.New(rand.NewPCG(uint64(n), 2))})
		run(n, viaSQL, &churnWriter{open: churnSQL(c, churnConns), every: 3 * time.Second, count: &churns})
		run(n, viaPool, &churnWriter{open: churnPool(t, c, churnConns), every: 3 * time.Second, count: &churns})
		for i := 0; i < 2; i++ {
			l.wg.Add(1)
			go soakRead(l, tc.front(n, fronts[i%len(fronts)]), sz, rand.New(rand.NewPCG(uint64(n), uint64(i+10))))
		}
	}
	waitFor(t, func() bool { return l.count.Load() > 200 && l.reached(tc, old.Name) })

	// The samplers.
	smp := newSoakSampler(t, tc, l)
	defer smp.stop()
	smp.baseline()

	if err := tc.nodes[1].Reset(ctx); err != nil {
		t.Fatal(err)
	}
	for _, c := range tc.nodes {
		waitFor(t, func() bool { return c.Status().State == StateIdle })
	}

	// A transaction open when EXECUTE installs change capture, and then
	// transactions open across the initial copy, none across the pause.
	straddled := make(chan error, 1)
	straddler := longWriter{f: tc.front(0, viaSQL), old: old.Name, hold: 15 * time.Second, account: 10}
	straddle := func(seq int64) error {
		a := ack{node: 0, worker: 99, seq: seq, via: viaSQL}
		if err := straddler.write(ctx, &a); err != nil {
			return fmt.Errorf("straddling transaction %d: %w", seq, err)
		}
		l.mu.Lock()
		l.acks = append(l.acks, a)
		l.mu.Unlock()
		return nil
	}
	var executed atomic.Bool
	go func() {
		errs := []error{straddle(1)}
		seq, sawCopy := int64(2), false
		for !executed.Load() && !smp.paused() {
			p := tc.nodes[2].Status().Progress
			switch {
			case p == nil:
			case p.Phase == PhaseInitialCopy && p.ETAMS > 25000:
				sawCopy = true
				errs = append(errs, straddle(seq))
				seq++
				continue
			case p.Phase == PhaseInitialCopy:
				sawCopy = true
			case sawCopy:
				straddled <- errors.Join(errs...)
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
		straddled <- errors.Join(errs...)
	}()
	time.Sleep(time.Second) // the first straddling transaction is open
	execStart := time.Now()
	if err := tc.nodes[2].Execute(ctx); err != nil {
		t.Fatalf("EXECUTE: %v\nphases: %s", err, smp.phaseReport())
	}
	execTime := time.Since(execStart)
	executed.Store(true)
	n := l.count.Load()
	waitFor(t, func() bool { return l.count.Load() > n+200 && l.reached(tc, next.Name) })
	smp.stop()
	l.halt()
	if err := <-straddled; err != nil {
		t.Error(err)
	}

	// Bounds.
	peakHeap, heapOverBase := smp.heapPeak()
	t.Logf("heap: %.1f MiB before EXECUTE, peak %.1f MiB (%.1f MiB over it, not counting the test's record of %d writes); peak over it by phase: %s",
		mib(smp.base), mib(peakHeap), mib(uint64(max(heapOverBase, 0))), len(l.acks), smp.heapByPhase())
	if heapOverBase > heapAllowance {
		t.Errorf("the heap grew %.1f MiB over the baseline, more than the %d MiB allowed", mib(uint64(heapOverBase)), heapAllowance>>20)
	}
	nodesN, sqlConns, poolConns := len(via), 0, 0
	for n := range via {
		sqlConns += maxConns + 2*churnConns // every node has its *sql.DB, and churns one
		poolConns += 2 * churnConns         // and a pool
		if via[n]&viaPool != 0 {
			poolConns += maxConns
		}
	}
	warm := 0
	for range via {
		warm += maxConns + churnConns
	}
	libBound := 2*nodesN + syncWorkers + 3
	for _, db := range []*pgtest.Database{old, next} {
		appBound := sqlConns + poolConns
		if db == next {
			appBound += warm
		}
		peak := smp.sessionPeak(db.Name)
		t.Logf("sessions on %s: peak %d (application %d of at most %d, library %d of at most %d, unmarked %d); at the peak of all: %v",
			db.Name, peak.total, peak.app, appBound, peak.lib, libBound, peak.unmarked, peak.roles)
		if peak.app > appBound || peak.lib > libBound || peak.unmarked > 0 {
			t.Errorf("sessions on %s over their bounds", db.Name)
		}
	}

	// Every acknowledged write, and the data.
	for _, err := range l.errs {
		t.Errorf("application error: %v", err)
	}
	checkStart := time.Now()
	soakCheck(t, tc, doneAt(t, tc), l.acks)
	s := tc.nodes[0].Status()
	t.Logf("summary: data %d rows, %.0f MiB; EXECUTE returned after %v; sync %v (%s), pause %d ms (final sync and commit %d ms), EXECUTE to switch %v; "+
		"%d writes acknowledged, %d connection churns; peak heap %.1f MiB; checks took %v",
		sz.rows(), float64(dataBytes)/(1<<20), execTime.Round(time.Millisecond), ms(s.Timings.SyncMS), smp.phaseReport(),
		s.Timings.PauseMS, s.Timings.FinalMS, ms(s.Timings.TotalMS), len(l.acks), churns.Load(), mib(peakHeap), time.Since(checkStart).Round(time.Second))
}

// soakCheck is checkAcks for the soak's volume: every acknowledged write
// ran on the database that was live at the time and is in the new database
// exactly once, no other write is, the counters equal their ledger rows;
// and the independent checker (pgtest.Compare, as pgtest.AssertSame runs
// it) finds every other table, the big ones included, equal in both
// databases. AssertSame's two minutes do not cover comparing gigabytes row
// by row on a small machine: the comparison gets half an hour here.
func soakCheck(t *testing.T, tc *testCluster, doneAt time.Time, acks []ack) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	checkLedger(ctx, t, tc, doneAt, acks, true)
	start := time.Now()
	diffs, err := pgtest.Compare(ctx, tc.old.AdminURL(), tc.next.AdminURL(), pgtest.CompareOptions{
		SkipSchemas: []string{"swo"}, SkipTables: []string{"public.ledger", "public.counters"}})
	if err != nil {
		t.Fatalf("pgtest: compare databases: %v", err)
	}
	if len(diffs) > 0 {
		t.Fatalf("the independent checker found %d difference(s) between %s and %s:\n  %s", len(diffs), tc.old.Name, tc.next.Name, strings.Join(diffs, "\n  "))
	}
	t.Logf("the independent checker found the databases equal (but for the ledger) in %v", time.Since(start).Round(time.Second))
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func ms(n int64) time.Duration { return time.Duration(n) * time.Millisecond }

// soakExec runs SQL statements without pgtest.Exec's time limit.
func soakExec(ctx context.Context, t *testing.T, url, sql string) {
	t.Helper()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := conn.PgConn().Exec(ctx, sql).Close(); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

const soakTables = `
CREATE TABLE accounts (id bigint NOT NULL, email text NOT NULL, name text, balance bigint NOT NULL DEFAULT 0, meta jsonb,
	created timestamptz NOT NULL);
CREATE TABLE events (id bigserial NOT NULL, account_id bigint NOT NULL, kind text NOT NULL, payload text, amount numeric(12, 2),
	created timestamptz NOT NULL DEFAULT now());
CREATE TABLE items (order_id bigint NOT NULL, line int NOT NULL, sku text NOT NULL, qty int NOT NULL, note text);
CREATE TABLE docs (id uuid NOT NULL, n int NOT NULL, body text, tags text[], created timestamptz NOT NULL);
`

// soakConstraints come after the data in the old database (as a restore
// does), before it in the new one: the same definitions either way.
const soakConstraints = `
ALTER TABLE accounts ADD CONSTRAINT accounts_pkey PRIMARY KEY (id), ADD CONSTRAINT accounts_email_key UNIQUE (email);
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (id),
	ADD CONSTRAINT events_account_fk FOREIGN KEY (account_id) REFERENCES accounts;
CREATE INDEX events_account ON events (account_id);
CREATE INDEX events_created ON events (created);
ALTER TABLE items ADD CONSTRAINT items_pkey PRIMARY KEY (order_id, line);
CREATE INDEX items_sku ON items (sku);
ALTER TABLE docs ADD CONSTRAINT docs_pkey PRIMARY KEY (id), ADD CONSTRAINT docs_n_key UNIQUE (n);
`

type soakSizes struct{ accounts, events, items, docs int }

func (z soakSizes) rows() int { return z.accounts + z.events + z.items + z.docs }

// data fills the tables: rows of some 250 bytes (accounts), 330 (events),
// 190 (items) and 1 KB (docs), below the size at which PostgreSQL would
// compress them.
func (z soakSizes) data() []string {
	return []string{
		fmt.Sprintf(`INSERT INTO accounts SELECT i, 'user' || i || '@example.com', 'Account holder ' || md5(i::text), (i * 37) %% 100000,
			jsonb_build_object('tier', i %% 5, 'tags', jsonb_build_array(md5((i + 1)::text), md5((i + 2)::text)), 'note', repeat(md5((i + 3)::text), 2)),
			'2024-01-01'::timestamptz + i * interval '1 second' FROM generate_series(1::bigint, %d) i`, z.accounts),
		fmt.Sprintf(`INSERT INTO events SELECT i, 1 + (i * 7919) %% %d, (ARRAY['login', 'order', 'refund', 'ping'])[1 + i %% 4],
			repeat(md5(i::text), 8), (i %% 100000) / 100.0, '2024-01-01'::timestamptz + i * interval '100 ms' FROM generate_series(1::bigint, %d) i;
			SELECT setval('events_id_seq', %d)`, z.accounts, z.events, z.events),
		fmt.Sprintf(`INSERT INTO items SELECT 1 + i / 4, i %% 4, 'SKU-' || (i %% 50000), 1 + i %% 9, repeat(md5((i * 3)::text), 4)
			FROM generate_series(0::bigint, %d) i`, z.items-1),
		fmt.Sprintf(`INSERT INTO docs SELECT md5('doc' || i)::uuid, i, repeat(md5(i::text || 'body'), 28), ARRAY['t' || (i %% 10), 't' || (i %% 7)],
			'2024-01-01'::timestamptz + i * interval '1 minute' FROM generate_series(1::bigint, %d) i`, z.docs),
	}
}

// soakFront is what the soak's writers and readers use of a front end.
type soakFront interface {
	begin(ctx context.Context) (soakTx, error)
	queryRow(ctx context.Context, q string, args ...any) soakRow
}

type soakTx interface {
	exec(ctx context.Context, q string, args ...any) error
	queryRow(ctx context.Context, q string, args ...any) soakRow
	commit(ctx context.Context) error
	rollback(ctx context.Context)
}

type soakRow interface{ Scan(dest ...any) error }

// beginOn begins a transaction through f and says which database it runs on.
func beginOn(ctx context.Context, f soakFront) (soakTx, string, error) {
	tx, err := f.begin(ctx)
	if err != nil {
		return nil, "", err
	}
	var db string
	if err := tx.queryRow(ctx, "SELECT current_database()").Scan(&db); err != nil {
		tx.rollback(ctx)
		return nil, "", err
	}
	return tx, db, nil
}

// front returns node n's front end f.
func (tc *testCluster) front(n int, f frontEnd) soakFront {
	if f == viaPool {
		return poolFront{tc.pools[n]}
	}
	return sqlFront{tc.dbs[n]}
}

type sqlFront struct{ db *sql.DB }

func (f sqlFront) begin(ctx context.Context) (soakTx, error) {
	tx, err := f.db.BeginTx(ctx, nil)
	return sqlTx{tx}, err
}

func (f sqlFront) queryRow(ctx context.Context, q string, args ...any) soakRow {
	return f.db.QueryRowContext(ctx, q, args...)
}

type sqlTx struct{ tx *sql.Tx }

func (t sqlTx) exec(ctx context.Context, q string, args ...any) error {
	_, err := t.tx.ExecContext(ctx, q, args...)
	return err
}

func (t sqlTx) queryRow(ctx context.Context, q string, args ...any) soakRow {
	return t.tx.QueryRowContext(ctx, q, args...)
}

func (t sqlTx) commit(context.Context) error { return t.tx.Commit() }
func (t sqlTx) rollback(context.Context)     { _ = t.tx.Rollback() }

type poolFront struct{ p *pgxpool.Pool }

func (f poolFront) begin(ctx context.Context) (soakTx, error) {
	tx, err := f.p.Begin(ctx)
	return poolTx{tx}, err
}

func (f poolFront) queryRow(ctx context.Context, q string, args ...any) soakRow {
	return f.p.QueryRow(ctx, q, args...)
}

type poolTx struct{ tx pgx.Tx }

func (t poolTx) exec(ctx context.Context, q string, args ...any) error {
	_, err := t.tx.Exec(ctx, q, args...)
	return err
}

func (t poolTx) queryRow(ctx context.Context, q string, args ...any) soakRow {
	return t.tx.QueryRow(ctx, q, args...)
}

func (t poolTx) commit(ctx context.Context) error { return t.tx.Commit(ctx) }
func (t poolTx) rollback(ctx context.Context)     { _ = t.tx.Rollback(ctx) }

// throttled paces a writer.
type throttled struct {
	w loadWriter
	d time.Duration
}

func (w throttled) write(ctx context.Context, a *ack) error {
	time.Sleep(w.d)
	return w.w.write(ctx, a)
}

// loadSingle is a single-row autocommit write: a ledger row that no
// counter counts (counter -1; checkAcks compares counters 0 to 99).
const loadSingle = `INSERT INTO ledger (node, worker, seq, counter) VALUES ($1, $2, $3, -1)
	RETURNING current_database(), statement_timestamp(), clock_timestamp()`

type singleWriter struct{ f soakFront }

func (w singleWriter) write(ctx context.Context, a *ack) error {
	a.counter = -1
	return w.f.queryRow(ctx, loadSingle, a.node, a.worker, a.seq).Scan(&a.db, &a.start, &a.end)
}

// batchWriter runs multi-row transactions: on the old database they also
// move a balance between two accounts, add an event, change one, replace an
// item and change a document; on the new one they write the ledger only,
// so that the big tables end equal in both databases.
type batchWriter struct {
	f   soakFront
	old string
	sz  soakSizes
	rng *rand.Rand
}

func (w *batchWriter) write(ctx context.Context, a *ack) error {
	tx, db, err := beginOn(ctx, w.f)
	if err != nil {
		return err
	}
	defer tx.rollback(ctx)
	if db == w.old {
		// Rows in one order (no deadlock between writers); accounts
		// below 100 are the long transactions'.
		first, second := 100+w.rng.Int64N(int64(w.sz.accounts-100)), 100+w.rng.Int64N(int64(w.sz.accounts-100))
		give, take := -1, 1 // the first pays the second
		if second < first {
			first, second, give, take = second, first, take, give
		}
		order, line := 1+w.rng.Int64N(int64(w.sz.items/4)), w.rng.IntN(4)
		for _, st := range []struct {
			q    string
			args []any
		}{
			{"UPDATE accounts SET balance = balance + $2 WHERE id = $1", []any{first, give}},
			{"UPDATE accounts SET balance = balance + $2 WHERE id = $1", []any{second, take}},
			{"INSERT INTO events (account_id, kind, payload, amount) VALUES ($1, 'soak', repeat(md5($2::bigint::text), 8), 1)", []any{second, a.seq}},
			{"UPDATE events SET amount = amount + 1, kind = 'changed' WHERE id = $1", []any{1 + w.rng.Int64N(int64(w.sz.events))}},
			{"DELETE FROM items WHERE order_id = $1 AND line = $2", []any{order, line}},
			{"INSERT INTO items VALUES ($1, $2, 'SKU-soak', 1, md5($3::bigint::text)) ON CONFLICT (order_id, line) DO NOTHING", []any{order, line, a.seq}},
			{"UPDATE docs SET tags = tags || 'soak'::text, body = md5(body) WHERE n = $1", []any{1 + w.rng.IntN(w.sz.docs)}},
		} {
			if err := tx.exec(ctx, st.q, st.args...); err != nil {
				return err
			}
		}
	}
	if err := tx.exec(ctx, loadInsert, a.node, a.worker, a.seq, a.counter); err != nil {
		return err
	}
	if err := tx.queryRow(ctx, loadUpdate, a.counter).Scan(&a.db, &a.start, &a.end); err != nil {
		return err
	}
	return tx.commit(ctx)
}

// longWriter holds a transaction open for hold: it updates its own account
// (on the old database), waits, and adds its ledger row.
type longWriter struct {
	f       soakFront
	old     string
	hold    time.Duration
	account int64         // no other writer's
	gap     time.Duration // between two, on average (±50%)
	rng     *rand.Rand
}

func (w longWriter) write(ctx context.Context, a *ack) error {
	if w.gap > 0 {
		time.Sleep(w.gap/2 + time.Duration(w.rng.Int64N(int64(w.gap))))
	}
	tx, db, err := beginOn(ctx, w.f)
	if err != nil {
		return err
	}
	defer tx.rollback(ctx)
	if db == w.old {
		if err := tx.exec(ctx, "UPDATE accounts SET balance = balance + 1 WHERE id = $1", w.account); err != nil {
			return err
		}
	}
	select {
	case <-time.After(w.hold):
	case <-ctx.Done():
		return ctx.Err()
	}
	a.counter = -1
	if err := tx.queryRow(ctx, loadSingle, a.node, a.worker, a.seq).Scan(&a.db, &a.start, &a.end); err != nil {
		return err
	}
	return tx.commit(ctx)
}

// churnWriter writes single rows through a front end it closes and opens
// again every so often.
type churnWriter struct {
	open   func() (soakFront, func(), error)
	every  time.Duration
	count  *atomic.Int64
	cur    soakFront
	close  func()
	opened time.Time
}

func (w *churnWriter) write(ctx context.Context, a *ack) error {
	if w.cur != nil && time.Since(w.opened) > w.every {
		w.close()
		w.cur = nil
		w.count.Add(1)
	}
	if w.cur == nil {
		f, closeFn, err := w.open()
		if err != nil {
			return err
		}
		w.cur, w.close, w.opened = f, closeFn, time.Now()
	}
	return singleWriter{w.cur}.write(ctx, a)
}

// noClose is the connector without its Close: database/sql closes the
// connector with the *sql.DB, and the node must outlive its churned handles.
type noClose struct{ c *Connector }

func (n noClose) Connect(ctx context.Context) (driver.Conn, error) { return n.c.Connect(ctx) }
func (n noClose) Driver() driver.Driver                            { return n.c.Driver() }

func churnSQL(c *Connector, conns int) func() (soakFront, func(), error) {
	return func() (soakFront, func(), error) {
		db := sql.OpenDB(noClose{c})
		db.SetMaxOpenConns(conns)
		db.SetConnMaxLifetime(time.Second)
		return sqlFront{db}, func() { db.Close() }, nil
	}
}

func churnPool(t *testing.T, c *Connector, conns int) func() (soakFront, func(), error) {
	return func() (soakFront, func(), error) {
		cfg, err := pgxpool.ParseConfig(c.cfg.OldURL)
		if err != nil {
			return nil, nil, err
		}
		cfg.MaxConns = int32(conns)
		cfg.MaxConnLifetime = time.Second
		cfg.MaxConnLifetimeJitter = 0
		cfg.HealthCheckPeriod = 250 * time.Millisecond
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		p, err := c.OpenPool(ctx, cfg)
		if err != nil {
			return nil, nil, err
		}
		return poolFront{p}, p.Close, nil
	}
}

// soakRead reads the big tables until the load stops.
func soakRead(l *load, f soakFront, sz soakSizes, rng *rand.Rand) {
	defer l.wg.Done()
	ctx := context.Background()
	for {
		select {
		case <-l.stop:
			return
		case <-time.After(10 * time.Millisecond):
		}
		var err error
		switch rng.IntN(3) {
		case 0:
			var balance int64
			var amount string
			err = f.queryRow(ctx, "SELECT a.balance, e.amount::text FROM events e JOIN accounts a ON a.id = e.account_id WHERE e.id = $1",
				1+rng.Int64N(int64(sz.events))).Scan(&balance, &amount)
		case 1:
			var n, qty int64
			err = f.queryRow(ctx, "SELECT count(*), coalesce(sum(qty), 0) FROM items WHERE order_id BETWEEN $1 AND $1 + 20",
				1+rng.Int64N(int64(sz.items/4))).Scan(&n, &qty)
		default:
			var n int
			err = f.queryRow(ctx, "SELECT length(body) FROM docs WHERE n = $1", 1+rng.IntN(sz.docs)).Scan(&n)
		}
		if err != nil && !errors.Is(err, sql.ErrNoRows) && !errors.Is(err, pgx.ErrNoRows) {
			l.mu.Lock()
			l.errs = append(l.errs, fmt.Errorf("reader: %w", err))
			l.mu.Unlock()
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// soakSampler samples, every second, the Go heap and the sessions on each
// database (by the role in their swo marker), and every 100 ms the phase
// of the run that the executing node reports.
type soakSampler struct {
	t      *testing.T
	l      *load
	base   uint64 // HeapInuse before EXECUTE, less the record of writes
	mu     sync.Mutex
	heap   []int64 // HeapInuse less the record of writes, per second
	phase  Phase   // the last phase seen
	byPh   map[Phase]int64
	peak   uint64
	sess   map[string][]sessionCount
	phases map[Phase][2]time.Time
	order  []Phase
	halt   chan struct{}
	done   sync.WaitGroup
	once   sync.Once
}

type sessionCount struct {
	total, app, lib, unmarked int
	roles                     map[string]int
}

var markerRE = regexp.MustCompile(`(?:^| )swo:([a-z-]+):`)

func newSoakSampler(t *testing.T, tc *testCluster, l *load) *soakSampler {
	s := &soakSampler{t: t, l: l, sess: map[string][]sessionCount{}, phases: map[Phase][2]time.Time{}, halt: make(chan struct{}),
		byPh: map[Phase]int64{}}
	admin := pgtest.Connect(t, pgtest.Shared(t).AdminURL())
	dbs := []string{tc.old.Name, tc.next.Name}
	s.done.Add(2)
	go func() {
		defer s.done.Done()
		for {
			s.sample(admin, dbs)
			select {
			case <-s.halt:
				return
			case <-time.After(time.Second):
			}
		}
	}()
	go func() {
		defer s.done.Done()
		for {
			if p := tc.nodes[2].Status().Progress; p != nil {
				now := time.Now()
				s.mu.Lock()
				span, ok := s.phases[p.Phase]
				if !ok {
					span[0] = now
					s.order = append(s.order, p.Phase)
				}
				span[1] = now
				s.phases[p.Phase] = span
				s.phase = p.Phase
				s.mu.Unlock()
			}
			select {
			case <-s.halt:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return s
}

// ackBytes is what the test's record of acknowledged writes holds.
func (s *soakSampler) ackBytes() uint64 {
	s.l.mu.Lock()
	defer s.l.mu.Unlock()
	return uint64(cap(s.l.acks)) * uint64(unsafe.Sizeof(ack{}))
}

func (s *soakSampler) sample(admin *pgx.Conn, dbs []string) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heap := int64(ms.HeapInuse) - int64(s.ackBytes())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rows, err := admin.Query(ctx, `SELECT datname, coalesce(application_name, ''), count(*) FROM pg_stat_activity
		WHERE datname = ANY($1) AND backend_type = 'client backend' GROUP BY 1, 2`, dbs)
	counts := map[string]*sessionCount{}
	for _, db := range dbs {
		counts[db] = &sessionCount{roles: map[string]int{}}
	}
	if err == nil {
		for rows.Next() {
			var db, app string
			var n int
			if err = rows.Scan(&db, &app, &n); err != nil {
				break
			}
			c := counts[db]
			c.total += n
			m := markerRE.FindStringSubmatch(app)
			switch {
			case m == nil:
				c.unmarked += n
				c.roles["unmarked:"+app] += n
			case m[1] == roleApp || m[1] == roleAppNormal:
				c.app += n
				c.roles[m[1]] += n
			default:
				c.lib += n
				c.roles[m[1]] += n
			}
		}
		rows.Close()
		if err == nil {
			err = rows.Err()
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.heap = append(s.heap, heap)
	s.byPh[s.phase] = max(s.byPh[s.phase], heap)
	s.peak = max(s.peak, ms.HeapInuse)
	if err != nil {
		s.t.Logf("sampling sessions: %v", err)
		return
	}
	for _, db := range dbs {
		s.sess[db] = append(s.sess[db], *counts[db])
	}
}

// baseline measures the heap before EXECUTE, after a collection.
func (s *soakSampler) baseline() {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.base = uint64(int64(ms.HeapInuse) - int64(s.ackBytes()))
	s.heap = s.heap[:0]
	clear(s.byPh)
}

func (s *soakSampler) stop() {
	s.once.Do(func() { close(s.halt) })
	s.done.Wait()
}

// paused reports whether the run reached the pause.
func (s *soakSampler) paused() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, p := s.phases[PhasePausing]
	_, f := s.phases[PhaseFinalSync]
	return p || f
}

// heapPeak returns the peak HeapInuse, and the peak of the heap less the
// record of writes over the baseline.
func (s *soakSampler) heapPeak() (uint64, int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	over := int64(0)
	for _, h := range s.heap {
		over = max(over, h-int64(s.base))
	}
	return s.peak, over
}

// heapByPhase renders the peak heap (less the record of writes) over the
// baseline in each phase.
func (s *soakSampler) heapByPhase() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var parts []string
	order := s.order
	if !slices.Contains(order, "") {
		order = append([]Phase{""}, order...)
	}
	for _, p := range order {
		if h, ok := s.byPh[p]; ok {
			name := string(p)
			if name == "" {
				name = "before the copy"
			}
			parts = append(parts, fmt.Sprintf("%s %+.1f MiB", name, float64(h-int64(s.base))/(1<<20)))
		}
	}
	return strings.Join(parts, ", ")
}

// sessionPeak returns the sample with the most sessions on db, with the
// peak of each kind taken apart.
func (s *soakSampler) sessionPeak(db string) sessionCount {
	s.mu.Lock()
	defer s.mu.Unlock()
	var peak sessionCount
	for _, c := range s.sess[db] {
		if c.total > peak.total {
			peak.total, peak.roles = c.total, c.roles
		}
		peak.app = max(peak.app, c.app)
		peak.lib = max(peak.lib, c.lib)
		peak.unmarked = max(peak.unmarked, c.unmarked)
	}
	return peak
}

// phaseReport lists the phases the executing node reported, with how long
// each was seen.
func (s *soakSampler) phaseReport() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var parts []string
	for _, p := range s.order {
		span := s.phases[p]
		name := string(p)
		if name == "" {
			name = "starting (change capture)"
		}
		parts = append(parts, fmt.Sprintf("%s %v", name, span[1].Sub(span[0]).Round(100*time.Millisecond)))
	}
	return strings.Join(parts, ", ")
}
