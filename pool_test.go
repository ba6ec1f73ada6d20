package swo

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgswo/swo/internal/pgtest"
)

// openPool opens a pool with c.OpenPool, closed when the test ends (before
// the connector, whose cleanup was registered first). With mod nil the pool
// is opened with a nil configuration; otherwise mod adjusts one parsed from
// the connector's OldURL.
func openPool(t testing.TB, c *Connector, mod func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	var cfg *pgxpool.Config
	if mod != nil {
		var err error
		if cfg, err = pgxpool.ParseConfig(c.cfg.OldURL); err != nil {
			t.Fatal(err)
		}
		mod(cfg)
	}
	p, err := c.OpenPool(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// poolDB returns the name of the database a pooled query reaches.
func poolDB(t testing.TB, p *pgxpool.Pool) string {
	t.Helper()
	var name string
	if err := p.QueryRow(testCtx(t), "SELECT current_database()").Scan(&name); err != nil {
		t.Fatal(err)
	}
	return name
}

// sessions counts the sessions on the database conn is connected to whose
// application_name contains marker (":app:" for the application's
// connections in switchover mode), other than conn's own.
func sessions(t testing.TB, conn *pgx.Conn, marker string) int {
	t.Helper()
	var n int
	err := conn.QueryRow(testCtx(t), `SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND strpos(application_name, $1) > 0`, marker).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// holdsConnLockSQL is true on a session that holds the connection lock (of
// namespace "swo"), in either mode.
var holdsConnLockSQL = "EXISTS (SELECT 1 FROM pg_locks l WHERE " + newLockKeys("swo").on(lockConn) + " AND l.pid = pg_backend_pid() AND l.granted)"

// connLockFree waits until the exclusive connection lock can be taken on the
// old database (no application connection holds it), and releases it.
func connLockFree(t testing.TB, conn *pgx.Conn) {
	t.Helper()
	keys := newLockKeys("swo")
	waitFor(t, func() bool {
		var got bool
		err := conn.QueryRow(testCtx(t), "SELECT pg_try_advisory_lock($1, $2)", keys.space, lockConn).Scan(&got)
		return err == nil && got
	})
	if _, err := conn.Exec(testCtx(t), "SELECT pg_advisory_unlock($1, $2)", keys.space, lockConn); err != nil {
		t.Fatal(err)
	}
}

// acquireN acquires n connections of p at once (so n distinct ones) and
// returns them with the database each reached. Those still held when the
// test ends are released then (before the pool closes, which waits for
// them).
func acquireN(t testing.TB, p *pgxpool.Pool, n int) ([]*pgxpool.Conn, []string) {
	t.Helper()
	ctx := testCtx(t)
	var conns []*pgxpool.Conn
	var dbs []string
	t.Cleanup(func() { releaseAll(conns) })
	for i := 0; i < n; i++ {
		conn, err := p.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, conn)
		var db string
		if err := conn.QueryRow(ctx, "SELECT current_database()").Scan(&db); err != nil {
			t.Fatal(err)
		}
		dbs = append(dbs, db)
	}
	return conns, dbs
}

func releaseAll(conns []*pgxpool.Conn) {
	for _, c := range conns {
		c.Release()
	}
}

// ---- Switches under load ----

// TestExecuteSwitchesThreeNodesUnderLoadThroughPools is
// TestExecuteSwitchesThreeNodesUnderLoad with every node writing through a
// pool from OpenPool.
func TestExecuteSwitchesThreeNodesUnderLoadThroughPools(t *testing.T) {
	tc := newClusterVia(t, true, []frontEnd{viaPool, viaPool, viaPool}, nil)
	l := executeUnderLoad(t, tc, 3)
	checkAfterSwitch(t, tc, l)
}

// TestExecuteWithPoolsAndSQLDBMixed switches a cluster whose nodes write
// through a *sql.DB, through a pool, and (one connector serving both at
// once) through both.
func TestExecuteWithPoolsAndSQLDBMixed(t *testing.T) {
	tc := newClusterVia(t, true, []frontEnd{viaSQL, viaPool, viaSQL | viaPool}, nil)
	l := executeUnderLoad(t, tc, 3)
	checkAfterSwitch(t, tc, l)
}

// checkAfterSwitch checks, after executeUnderLoad: no application connection
// is left on the old database; every pool's new connections, and its
// node's *sql.DB's, reach the new database; and it logs where each front end
// wrote.
func checkAfterSwitch(t *testing.T, tc *testCluster, l *load) {
	t.Helper()
	oc := pgtest.Connect(t, tc.old.URL)
	waitFor(t, func() bool { return sessions(t, oc, ":app:") == 0 })
	for n := range tc.nodes {
		if p := tc.pools[n]; p != nil {
			conns, dbs := acquireN(t, p, int(p.Config().MaxConns))
			releaseAll(conns)
			for _, db := range dbs {
				if db != tc.next.Name {
					t.Errorf("node %d: after the switch a pool connection reached %s", n, db)
				}
			}
		}
		if tc.viaOf(n)&viaSQL != 0 {
			if db := dbName(t, tc.dbs[n]); db != tc.next.Name {
				t.Errorf("node %d: after the switch the *sql.DB reached %s", n, db)
			}
		}
	}
	type key struct {
		node int
		via  frontEnd
		db   string
	}
	count := map[key]int{}
	for _, a := range l.acks {
		count[key{a.node, a.via, a.db}]++
	}
	for n := range tc.nodes {
		for _, f := range tc.viaOf(n).each() {
			t.Logf("node %d through %s: %d writes on the old database, %d on the new", n, f,
				count[key{n, f, tc.old.Name}], count[key{n, f, tc.next.Name}])
		}
	}
}

// ---- Routing ----

func TestPoolNormalModeGoesToTheOldDatabase(t *testing.T) {
	old := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NodeName: "n1"})
	pool := openPool(t, c, nil) // a nil configuration
	ctx := testCtx(t)
	var db, app string
	var locked, schema bool
	err := pool.QueryRow(ctx, `SELECT current_database(), application_name, `+holdsConnLockSQL+`,
	EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'swo')
FROM pg_stat_activity WHERE pid = pg_backend_pid()`).Scan(&db, &app, &locked, &schema)
	if err != nil {
		t.Fatal(err)
	}
	if db != old.Name || app != "swo:app-normal:n1" || !locked {
		t.Fatalf("normal-mode pool connection: database %s (want %s), application_name %q, connection lock held %v", db, old.Name, app, locked)
	}
	if schema {
		t.Fatal("normal mode created the swo schema")
	}
}

// TestPoolWaitsDuringThePauseAndResumes: the pause closes the pool's idle
// connections; an Acquire during it waits (honouring its context) without
// dialling, and proceeds to the old database once the pause ends.
func TestPoolWaitsDuringThePauseAndResumes(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	var dialled atomic.Int32
	pool := openPool(t, c, func(pc *pgxpool.Config) {
		pc.BeforeConnect = func(context.Context, *pgx.ConnConfig) error { dialled.Add(1); return nil }
	})
	ctx := testCtx(t)
	if got := poolDB(t, pool); got != old.Name {
		t.Fatalf("pool reached %s, want %s", got, old.Name)
	}
	oc := pgtest.Connect(t, old.URL)
	if n := sessions(t, oc, ":app:"); n != 1 {
		t.Fatalf("%d application sessions on the old database, want the pool's idle one", n)
	}
	c.router.pause(time.Now().Add(time.Minute))
	// The idle connection was closed: its lock is free, its session gone.
	connLockFree(t, oc)
	waitFor(t, func() bool { return sessions(t, oc, ":app:") == 0 })
	dialled.Store(0)

	// An Acquire during the pause, which reports where its connection went.
	type acquired struct {
		db     string
		locked bool
		err    error
	}
	done := make(chan acquired, 1)
	actx, cancelAcquire := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var r acquired
		defer func() { done <- r }()
		conn, err := pool.Acquire(actx)
		if r.err = err; err != nil {
			return
		}
		defer conn.Release()
		r.err = conn.QueryRow(actx, "SELECT current_database(), "+holdsConnLockSQL).Scan(&r.db, &r.locked)
	}()
	t.Cleanup(func() { // before the pool closes, should the test fail
		cancelAcquire()
		c.router.resume()
		wg.Wait()
	})
	// The Acquire is opening a connection: it waits in the connector.
	waitFor(t, func() bool { return pool.Stat().ConstructingConns() == 1 })
	// An Acquire with a deadline waits until it, and fails only for it.
	short, cancel := context.WithTimeout(ctx, 150*time.Millisecond)
	defer cancel()
	if conn, err := pool.Acquire(short); !errors.Is(err, context.DeadlineExceeded) {
		if conn != nil {
			conn.Release()
		}
		t.Fatalf("Acquire during the pause: err = %v, want its deadline", err)
	}
	select {
	case r := <-done:
		t.Fatalf("Acquire returned during the pause (err = %v)", r.err)
	default:
	}
	if n := dialled.Load(); n != 0 {
		t.Fatalf("%d connections dialled during the pause", n)
	}
	if n := sessions(t, oc, ":app:"); n != 0 {
		t.Fatalf("%d application sessions on the old database during the pause", n)
	}
	if s := c.Status(); !s.Paused {
		t.Fatalf("status during the pause: %+v", s)
	}

	c.router.resume()
	var r acquired
	select {
	case r = <-done:
	case <-ctx.Done():
		t.Fatal("Acquire did not proceed after the pause ended")
	}
	if r.err != nil {
		t.Fatalf("Acquire after the pause: %v", r.err)
	}
	if r.db != old.Name || !r.locked {
		t.Fatalf("after the pause: database %s (want %s), connection lock held %v", r.db, old.Name, r.locked)
	}
}

// TestPoolBusyConnectionFinishesItsTransactionDuringThePause: a connection
// in use when the pause starts finishes its transaction and is closed when
// released.
func TestPoolBusyConnectionFinishesItsTransactionDuringThePause(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	pgtest.Exec(t, old.URL, "CREATE TABLE t (v int)")
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	pool := openPool(t, c, nil)
	ctx := testCtx(t)
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if _, err := tx.Exec(ctx, "INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	c.router.pause(time.Now().Add(time.Minute))
	if _, err := tx.Exec(ctx, "INSERT INTO t VALUES (2)"); err != nil {
		t.Fatalf("in-flight transaction broken by the pause: %v", err)
	}
	if err := tx.Commit(ctx); err != nil { // releases the connection
		t.Fatal(err)
	}
	oc := pgtest.Connect(t, old.URL)
	connLockFree(t, oc)
	waitFor(t, func() bool { return sessions(t, oc, ":app:") == 0 })
	var n int
	if err := oc.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil || n != 2 {
		t.Fatalf("rows = %d, %v", n, err)
	}
	c.router.resume()
	if got := poolDB(t, pool); got != old.Name {
		t.Fatalf("after the pause the pool reached %s", got)
	}
}

// TestPoolFollowsTheSwitch: at the switch the pool's connections to the old
// database are closed, and every new one goes to the new database.
func TestPoolFollowsTheSwitch(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "n1"})
	const size = 4
	pool := openPool(t, c, func(pc *pgxpool.Config) { pc.MaxConns = size })
	conns, dbs := acquireN(t, pool, size)
	releaseAll(conns)
	for _, db := range dbs {
		if db != old.Name {
			t.Fatalf("before the switch a pool connection reached %s", db)
		}
	}
	oc := pgtest.Connect(t, old.URL)
	if n := sessions(t, oc, ":app:"); n != size {
		t.Fatalf("%d application sessions on the old database, want the pool's %d idle ones", n, size)
	}
	flip(t, old, next, c)
	waitFor(t, func() bool { return sessions(t, oc, ":app:") == 0 })
	for round := 0; round < 3; round++ {
		conns, dbs := acquireN(t, pool, size)
		releaseAll(conns)
		for _, db := range dbs {
			if db != next.Name {
				t.Fatalf("after the switch a pool connection reached %s, want %s", db, next.Name)
			}
		}
	}
	if n := pool.Stat().TotalConns(); n != size {
		t.Fatalf("pool holds %d connections, want %d", n, size)
	}
	nc := pgtest.Connect(t, next.URL)
	if n := sessions(t, nc, "swo:app:n1"); n != size {
		t.Fatalf("%d application sessions on the new database, want %d", n, size)
	}
	if n := sessions(t, oc, ":app:"); n != 0 {
		t.Fatalf("%d application sessions on the old database after the switch", n)
	}
	if s := c.Status(); s.Routing != "next" || s.Paused {
		t.Fatalf("status after the switch: %+v", s)
	}
}

// TestPoolOnAnObsoleteDatabaseFailsWithErrObsolete: a normal-mode pool whose
// database was switched away from refuses new connections; a restarted
// switchover-mode node's pool goes to the new database.
func TestPoolOnAnObsoleteDatabaseFailsWithErrObsolete(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	ctx := testCtx(t)
	normal := newConnector(t, Config{OldURL: old.URL})
	np := openPool(t, normal, nil) // no connection yet
	sw := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	flip(t, old, next, sw)
	conn, err := np.Acquire(ctx)
	if conn != nil {
		conn.Release()
	}
	if !errors.Is(err, ErrObsolete) {
		t.Fatalf("Acquire on the obsolete database in normal mode: err = %v, want ErrObsolete", err)
	}
	t.Logf("Acquire: %v", err)
	if _, err := np.Exec(ctx, "SELECT 1"); !errors.Is(err, ErrObsolete) {
		t.Fatalf("Exec on the obsolete database in normal mode: err = %v, want ErrObsolete", err)
	}
	if n := np.Stat().TotalConns(); n != 0 {
		t.Fatalf("the refused pool holds %d connections", n)
	}
	c2 := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	if got := poolDB(t, openPool(t, c2, nil)); got != next.Name {
		t.Fatalf("restarted switchover node's pool reached %s, want %s", got, next.Name)
	}
}

// ---- The host's pool configuration ----

// countingTracer counts the queries pgx traces.
type countingTracer struct{ n atomic.Int32 }

func (ct *countingTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	ct.n.Add(1)
	return ctx
}

func (ct *countingTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// TestPoolKeepsTheHostsSettingsAndHooks: a given configuration's pool
// settings, tracer and hooks are kept, and each hook is called as on a plain
// pool; the configuration itself is not modified.
func TestPoolKeepsTheHostsSettingsAndHooks(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "n1"})
	ctx := testCtx(t)
	cfg, err := pgxpool.ParseConfig(old.URL)
	if err != nil {
		t.Fatal(err)
	}
	var before, after, prepare, release, closed atomic.Int32
	var reject atomic.Bool
	var mu sync.Mutex
	var seen []string // what each BeforeConnect call saw
	tracer := &countingTracer{}
	const size = 3
	cfg.MaxConns = size
	cfg.ConnConfig.Tracer = tracer
	cfg.BeforeConnect = func(_ context.Context, cc *pgx.ConnConfig) error {
		before.Add(1)
		mu.Lock()
		seen = append(seen, cc.Database+" "+cc.RuntimeParams["application_name"])
		mu.Unlock()
		cc.RuntimeParams["search_path"] = "from_pool_hook, public"
		return nil
	}
	cfg.AfterConnect = func(context.Context, *pgx.Conn) error { after.Add(1); return nil }
	cfg.PrepareConn = func(context.Context, *pgx.Conn) (bool, error) {
		prepare.Add(1)
		return !reject.CompareAndSwap(true, false), nil
	}
	cfg.AfterRelease = func(*pgx.Conn) bool { release.Add(1); return true }
	cfg.BeforeClose = func(*pgx.Conn) { closed.Add(1) }
	pool, err := c.OpenPool(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)

	if got := pool.Config().MaxConns; got != size {
		t.Fatalf("pool MaxConns = %d, want %d", got, size)
	}
	if got := pool.Stat().MaxConns(); got != size {
		t.Fatalf("pool Stat().MaxConns() = %d, want %d", got, size)
	}
	conns, _ := acquireN(t, pool, size)
	for _, conn := range conns {
		var db, app, sp string
		if err := conn.QueryRow(ctx, "SELECT current_database(), current_setting('application_name'), current_setting('search_path')").Scan(&db, &app, &sp); err != nil {
			t.Fatal(err)
		}
		if db != old.Name || app != "swo:app:n1" || sp != "from_pool_hook, public" {
			t.Fatalf("pool connection: database %s, application_name %q, search_path %q", db, app, sp)
		}
	}
	// MaxConns is enforced.
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if conn, err := pool.Acquire(short); !errors.Is(err, context.DeadlineExceeded) {
		if conn != nil {
			conn.Release()
		}
		t.Fatalf("Acquire beyond MaxConns: err = %v, want its deadline", err)
	}
	releaseAll(conns)
	// AfterRelease runs in a goroutine of pgxpool's before the connection is idle.
	waitFor(t, func() bool { return release.Load() == size && pool.Stat().IdleConns() == size })
	if before.Load() != size || after.Load() != size || prepare.Load() != size {
		t.Fatalf("BeforeConnect called %d times, AfterConnect %d, PrepareConn %d, want %d each", before.Load(), after.Load(), prepare.Load(), size)
	}
	mu.Lock()
	for _, s := range seen {
		if s != old.Name+" swo:app:n1" {
			t.Errorf("the pool's BeforeConnect saw database and application_name %q, want the connector's settings", s)
		}
	}
	mu.Unlock()
	if tracer.n.Load() < size {
		t.Fatalf("tracer saw %d queries, want at least %d", tracer.n.Load(), size)
	}
	// PrepareConn's refusal destroys the connection (BeforeClose runs) and
	// the Acquire takes another.
	reject.Store(true)
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	conn.Release()
	if reject.Load() {
		t.Fatal("PrepareConn not called on Acquire")
	}
	waitFor(t, func() bool { return closed.Load() == 1 && pool.Stat().TotalConns() == size-1 })
	// The pause closes the idle connections through the pool: BeforeClose
	// runs for each.
	c.router.pause(time.Now().Add(time.Minute))
	waitFor(t, func() bool { return closed.Load() == size && pool.Stat().TotalConns() == 0 })
	c.router.resume()

	// The host's configuration is as it was: it still opens a plain pool,
	// whose connections run the host's hooks and none of swo's.
	if cfg.ConnConfig.Database != old.Name || cfg.ConnConfig.RuntimeParams["application_name"] != "" || cfg.MaxConns != size {
		t.Fatalf("OpenPool modified the configuration it was given: %+v", cfg.ConnConfig.RuntimeParams)
	}
	plain, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(plain.Close)
	before.Store(0)
	var app, sp string
	if err := plain.QueryRow(ctx, "SELECT current_setting('application_name'), current_setting('search_path')").Scan(&app, &sp); err != nil {
		t.Fatal(err)
	}
	if app != "" || sp != "from_pool_hook, public" || before.Load() != 1 {
		t.Fatalf("plain pool from the same configuration: application_name %q, search_path %q, BeforeConnect called %d times", app, sp, before.Load())
	}
}

// TestPoolHonoursTheDeprecatedBeforeAcquire: a configuration with
// BeforeAcquire and no PrepareConn keeps its BeforeAcquire.
func TestPoolHonoursTheDeprecatedBeforeAcquire(t *testing.T) {
	old := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL})
	var called atomic.Int32
	pool := openPool(t, c, func(pc *pgxpool.Config) {
		//lint:ignore SA1019 the deprecated hook is what is tested
		pc.BeforeAcquire = func(context.Context, *pgx.Conn) bool { called.Add(1); return true }
	})
	for i := 0; i < 3; i++ {
		if got := poolDB(t, pool); got != old.Name {
			t.Fatalf("pool reached %s", got)
		}
	}
	if n := called.Load(); n != 3 {
		t.Fatalf("BeforeAcquire called %d times, want 3", n)
	}
}

// TestPoolIgnoresWhereItsConfigurationPoints: a configuration parsed from
// another database's URL (with its own runtime parameters) still reaches
// the connector's database, before and after the switch.
func TestPoolIgnoresWhereItsConfigurationPoints(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	other := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "n1"})
	ctx := testCtx(t)
	cfg, err := pgxpool.ParseConfig(other.URL + "&application_name=elsewhere&search_path=elsewhere")
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 2
	pool, err := c.OpenPool(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	check := func(want string) {
		t.Helper()
		var db, app, sp string
		if err := pool.QueryRow(ctx, "SELECT current_database(), current_setting('application_name'), current_setting('search_path')").Scan(&db, &app, &sp); err != nil {
			t.Fatal(err)
		}
		if db != want || app != "swo:app:n1" || sp == "elsewhere" {
			t.Fatalf("pool connection: database %s (want %s), application_name %q, search_path %q", db, want, app, sp)
		}
	}
	check(old.Name)
	if got := pool.Config().MaxConns; got != 2 {
		t.Fatalf("MaxConns = %d", got)
	}
	flip(t, old, next, c)
	check(next.Name)
	if n := sessions(t, pgtest.Connect(t, other.URL), "swo:"); n != 0 {
		t.Fatalf("%d connector sessions on the database the configuration named", n)
	}
}

// ---- Hooks of the connector's configuration ----

// hookCall is what a connection hook saw on its connection.
type hookCall struct {
	who    string
	pid    uint32
	db     string
	locked bool
}

// hookRecorder records the calls of connection hooks; each hook queries, on
// its own connection, the database and whether the connection holds the
// connection lock.
type hookRecorder struct {
	mu    sync.Mutex
	calls []hookCall
}

func (h *hookRecorder) hook(who string) func(context.Context, *pgx.Conn) error {
	return func(ctx context.Context, conn *pgx.Conn) error {
		call := hookCall{who: who, pid: conn.PgConn().PID()}
		if err := conn.QueryRow(ctx, "SELECT current_database(), "+holdsConnLockSQL).Scan(&call.db, &call.locked); err != nil {
			return err
		}
		h.mu.Lock()
		h.calls = append(h.calls, call)
		h.mu.Unlock()
		return nil
	}
}

// take returns the calls recorded since the last take.
func (h *hookRecorder) take() []hookCall {
	h.mu.Lock()
	defer h.mu.Unlock()
	calls := h.calls
	h.calls = nil
	return calls
}

// TestAfterConnectHookRunsUnderTheConnectionLock: Config.AfterConnect, and a
// pool configuration's AfterConnect after it, run on a connection only once
// it holds the connection lock: on the old database for both front ends and
// in both modes, and on the new database after the switch (where
// connections are admitted too, against a chained switchover).
func TestAfterConnectHookRunsUnderTheConnectionLock(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	ctx := testCtx(t)

	for _, mode := range []string{"normal", "switchover"} {
		t.Run(mode, func(t *testing.T) {
			var h hookRecorder
			cfg := Config{OldURL: old.URL, AfterConnect: h.hook("config")}
			if mode == "switchover" {
				cfg.NextURL = next.URL
			}
			c := newConnector(t, cfg)
			db := openDB(t, c)
			if got := dbName(t, db); got != old.Name {
				t.Fatalf("*sql.DB reached %s", got)
			}
			if calls := h.take(); len(calls) != 1 || calls[0] != (hookCall{"config", calls[0].pid, old.Name, true}) {
				t.Fatalf("database/sql: AfterConnect calls %+v, want one on %s under the connection lock", calls, old.Name)
			}
			pool := openPool(t, c, func(pc *pgxpool.Config) { pc.AfterConnect = h.hook("pool") })
			if got := poolDB(t, pool); got != old.Name {
				t.Fatalf("pool reached %s", got)
			}
			calls := h.take()
			if len(calls) != 2 || calls[0] != (hookCall{"config", calls[0].pid, old.Name, true}) ||
				calls[1] != (hookCall{"pool", calls[0].pid, old.Name, true}) {
				t.Fatalf("pool: AfterConnect calls %+v, want Config's then the pool's, on one connection to %s under the connection lock", calls, old.Name)
			}
			db.Close()
			pool.Close()
		})
	}

	// After the switch: the hooks run on the new database's connections.
	var h hookRecorder
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, AfterConnect: h.hook("config")})
	db := openDB(t, c)
	pool := openPool(t, c, func(pc *pgxpool.Config) { pc.AfterConnect = h.hook("pool") })
	flip(t, old, next, c)
	h.take()
	if got := dbName(t, db); got != next.Name {
		t.Fatalf("*sql.DB reached %s after the switch", got)
	}
	if got := poolDB(t, pool); got != next.Name {
		t.Fatalf("pool reached %s after the switch", got)
	}
	calls := h.take()
	if len(calls) != 3 || calls[0] != (hookCall{"config", calls[0].pid, next.Name, true}) ||
		calls[1] != (hookCall{"config", calls[1].pid, next.Name, true}) || calls[2] != (hookCall{"pool", calls[1].pid, next.Name, true}) {
		t.Fatalf("after the switch: AfterConnect calls %+v, want database/sql's, then Config's and the pool's on one pool connection, on %s under its connection lock",
			calls, next.Name)
	}

	// An error from the hook fails the connection, in both front ends.
	hookErr := errors.New("custom types not registered")
	bad := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL,
		AfterConnect: func(context.Context, *pgx.Conn) error { return hookErr }})
	if err := openDB(t, bad).PingContext(ctx); !errors.Is(err, hookErr) {
		t.Fatalf("database/sql with a failing AfterConnect: %v", err)
	}
	if _, err := openPool(t, bad, nil).Exec(ctx, "SELECT 1"); !errors.Is(err, hookErr) {
		t.Fatalf("pool with a failing AfterConnect: %v", err)
	}
}

// TestBeforeConnectHookMayNotRedirect: a Config.BeforeConnect, or a pool
// configuration's, that changes where a connection goes is refused with
// ErrConfig, and no application connection is made.
func TestBeforeConnectHookMayNotRedirect(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	other := pgtest.NewDatabase(t)
	ctx := testCtx(t)
	toLocalhost := func(_ context.Context, cc *pgx.ConnConfig) error {
		if cc.Host != "127.0.0.1" {
			return fmt.Errorf("test needs 127.0.0.1 URLs, got host %q", cc.Host)
		}
		cc.Host = "localhost" // the same server by another name: still refused
		return nil
	}
	if _, err := NewConnector(ctx, Config{OldURL: old.URL, NextURL: next.URL, BeforeConnect: toLocalhost}); !errors.Is(err, ErrConfig) {
		t.Fatalf("NewConnector with a BeforeConnect that changes the host: err = %v, want ErrConfig", err)
	}

	var redirect atomic.Bool
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, BeforeConnect: func(ctx context.Context, cc *pgx.ConnConfig) error {
		if redirect.Load() {
			return toLocalhost(ctx, cc)
		}
		return nil
	}})
	db := openDB(t, c)
	pool := openPool(t, c, nil)
	redirect.Store(true)
	err := db.PingContext(ctx)
	if !errors.Is(err, ErrConfig) {
		t.Fatalf("database/sql with a BeforeConnect that changes the host: err = %v, want ErrConfig", err)
	}
	t.Logf("database/sql: %v", err)
	if _, err := pool.Exec(ctx, "SELECT 1"); !errors.Is(err, ErrConfig) {
		t.Fatalf("pool with a BeforeConnect that changes the host: err = %v, want ErrConfig", err)
	}
	redirect.Store(false)

	// The pool's own BeforeConnect.
	for name, hook := range map[string]func(context.Context, *pgx.ConnConfig) error{
		"host":     toLocalhost,
		"database": func(_ context.Context, cc *pgx.ConnConfig) error { cc.Database = other.Name; return nil },
	} {
		p := openPool(t, c, func(pc *pgxpool.Config) { pc.BeforeConnect = hook })
		_, err := p.Exec(ctx, "SELECT 1")
		if !errors.Is(err, ErrConfig) {
			t.Fatalf("pool whose BeforeConnect changes the %s: err = %v, want ErrConfig", name, err)
		}
		t.Logf("pool's BeforeConnect changing the %s: %v", name, err)
		p.Close()
	}
	for _, d := range []*pgtest.Database{old, other} {
		if n := sessions(t, pgtest.Connect(t, d.URL), ":app:"); n != 0 {
			t.Fatalf("%d application sessions on %s", n, d.Name)
		}
	}
	// And without the redirection both work.
	if got := dbName(t, db); got != old.Name {
		t.Fatalf("*sql.DB reached %s", got)
	}
	if got := poolDB(t, pool); got != old.Name {
		t.Fatalf("pool reached %s", got)
	}
}

// TestBeforeConnectHookParametersApplyToApplicationConnections: runtime
// parameters a Config.BeforeConnect sets apply to the application's
// connections of both front ends, on the old database and on the new one.
func TestBeforeConnectHookParametersApplyToApplicationConnections(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	ctx := testCtx(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "n1",
		BeforeConnect: func(_ context.Context, cc *pgx.ConnConfig) error {
			cc.RuntimeParams["search_path"] = "app_schema, public"
			cc.RuntimeParams["statement_timeout"] = "12345"
			return nil
		}})
	db := openDB(t, c)
	pool := openPool(t, c, nil)
	check := func(when, want string) {
		t.Helper()
		q := "SELECT current_database(), current_setting('search_path'), current_setting('statement_timeout'), current_setting('application_name')"
		var got [2][4]string
		if err := db.QueryRowContext(ctx, q).Scan(&got[0][0], &got[0][1], &got[0][2], &got[0][3]); err != nil {
			t.Fatal(err)
		}
		if err := pool.QueryRow(ctx, q).Scan(&got[1][0], &got[1][1], &got[1][2], &got[1][3]); err != nil {
			t.Fatal(err)
		}
		for i, front := range []string{"database/sql", "pool"} {
			if got[i] != [4]string{want, "app_schema, public", "12345ms", "swo:app:n1"} {
				t.Errorf("%s, %s: database, search_path, statement_timeout, application_name = %q", when, front, got[i])
			}
		}
	}
	check("before the switch", old.Name)
	flip(t, old, next, c)
	check("after the switch", next.Name)
}

// ---- The lock protocol through a pool ----

// TestPoolConnectionsOpenedDuringTheCommitGoToTheNewDatabase is
// TestConnectionsOpenedDuringTheCommitGoToTheNewDatabase for a pool: a node
// deaf to the log (so only the lock protocol routes it) opens a pool
// connection for every statement, so that connections wait for the
// connection lock exactly while the switch commits; none may write to the
// old database after the commit.
func TestPoolConnectionsOpenedDuringTheCommitGoToTheNewDatabase(t *testing.T) {
	violations, errs, waited := poolConnectDuringCommit(t)
	if violations > 0 || errs > 0 {
		t.Fatalf("%d writes on the old database after the commit, %d errors", violations, errs)
	}
	if waited == 0 {
		t.Fatal("no connection waited through the commit: the test did not exercise the window")
	}
	t.Logf("%d pool connections waited through the commit and went to the new database", waited)
}

// TestPoolSingleStatementStateReadIsCaught is the negative control of the
// test above.
func TestPoolSingleStatementStateReadIsCaught(t *testing.T) {
	unsafeSingleStatementRead = true
	defer func() { unsafeSingleStatementRead = false }()
	violations, errs, _ := poolConnectDuringCommit(t)
	if violations+errs == 0 {
		t.Fatal("the single-statement read went unnoticed")
	}
	t.Logf("caught: %d writes on the old database after the commit, %d refused writes", violations, errs)
}

func poolConnectDuringCommit(t *testing.T) (violations, errs, waited int) {
	t.Helper()
	tc := newCluster(t, 2, false, nil)
	ctx := testCtx(t)
	deaf := tc.nodes[1]
	deafen(t, deaf)
	const writers = 8
	pool := openPool(t, deaf, func(pc *pgxpool.Config) {
		pc.MaxConns = writers
		pc.AfterRelease = func(*pgx.Conn) bool { return false } // every statement opens a connection
	})
	if err := tc.nodes[0].Reset(ctx); err != nil {
		t.Fatal(err)
	}
	// Hold the stop-the-world window open a little so that many connection
	// attempts queue on the lock.
	tc.nodes[0].leader.testHook = func(_ context.Context, phase string) {
		if phase == "locked" {
			time.Sleep(200 * time.Millisecond)
		}
	}
	type write struct {
		db         string
		sent       time.Time
		start, end time.Time
		err        error
	}
	var mu sync.Mutex
	var writes []write
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for seq := 1; ; seq++ {
				select {
				case <-stop:
					return
				default:
				}
				wr := write{sent: time.Now()}
				wr.err = pool.QueryRow(ctx, "INSERT INTO ledger (node, worker, seq, counter) VALUES (9, $1, $2, -1) RETURNING current_database(), statement_timestamp(), clock_timestamp()",
					w, seq).Scan(&wr.db, &wr.start, &wr.end)
				mu.Lock()
				writes = append(writes, wr)
				mu.Unlock()
			}
		}(w)
	}
	err := tc.nodes[0].Execute(ctx)
	// Keep writing after the switch until every writer has written there.
	if err == nil {
		waitFor(t, func() bool {
			mu.Lock()
			defer mu.Unlock()
			n := 0
			for _, w := range writes {
				if w.err == nil && w.db == tc.next.Name {
					n++
				}
			}
			return n >= 2*writers
		})
	}
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	done := doneAt(t, tc)
	for _, w := range writes {
		switch {
		case w.err != nil:
			errs++
			if errs <= 3 {
				t.Logf("write failed: %v", w.err)
			}
		case w.db == tc.old.Name && !w.end.Before(done):
			violations++
		case w.db == tc.next.Name && w.sent.Before(done):
			waited++
		}
	}
	return violations, errs, waited
}

// TestPoolAfterTheConnectorIsClosed: once the connector is closed, OpenPool
// and a pool's new connections fail with ErrClosed.
func TestPoolAfterTheConnectorIsClosed(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	pool := openPool(t, c, nil)
	if got := poolDB(t, pool); got != old.Name {
		t.Fatalf("pool reached %s", got)
	}
	c.Close()
	ctx := testCtx(t)
	if p, err := c.OpenPool(ctx, nil); !errors.Is(err, ErrClosed) {
		if p != nil {
			p.Close()
		}
		t.Fatalf("OpenPool after Close: err = %v, want ErrClosed", err)
	}
	pool.Reset() // drop the idle connection: the next query needs a new one
	if _, err := pool.Exec(ctx, "SELECT 1"); !errors.Is(err, ErrClosed) {
		t.Fatalf("new pool connection after Close: err = %v, want ErrClosed", err)
	}
}
